"""A static estimate of the memory a MIL function asks for: tensor sizes and liveness over op order.

This reads shapes off the graph; it is not a measurement on a device. A runtime may fuse,
alias or schedule differently, but the tensors it is asked to produce are these.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import attrs
from coremltools.converters.mil.mil import Block, Operation, Program, Var, types

from sdpa_slicer._graph import SDPA, position_in, readers, sdpa_scores_shape, tensor_bytes
from sdpa_slicer._text import format_bytes

# Var types are classes made once per dtype and shape, slow to inspect: their sizes are cached.
_SIZES: dict[Any, Optional[int]] = {}


@attrs.frozen
class TensorInfo:
    """A tensor the estimate counted: where it comes from and how big it is."""

    name: str
    op_type: str
    bytes: int


@attrs.frozen(kw_only=True)
class MemoryEstimate:
    """What one function asks for, from its graph.

    - ``largest_tensor``: the biggest tensor an op produces; a fused attention op counts the
      scores tensor it implies (batch dims x L x S x itemsize) as a tensor of its own.
    - ``peak_live_bytes``: the most bytes alive at once, a tensor living from the op that
      produces it to its last consumer (function outputs to the end); ops in nested blocks
      count at their parent op.
    - ``weights_bytes``: constants, at their stored size; never part of the live bytes.
    - ``state_bytes``: Core ML state tensors (KV caches), held for the whole call.
    - ``uncounted``: tensors left out because their shape is symbolic.
    """

    function: str
    largest_tensor: Optional[TensorInfo]
    peak_live_bytes: int
    weights_bytes: int
    state_bytes: int = 0
    uncounted: tuple[str, ...] = ()

    @property
    def largest_tensor_bytes(self) -> int:
        return 0 if self.largest_tensor is None else self.largest_tensor.bytes

    def summary(self) -> str:
        largest = self.largest_tensor
        where = "" if largest is None else f" ({largest.name}, {largest.op_type})"
        text = (
            f"peak live {format_bytes(self.peak_live_bytes)}, "
            f"largest tensor {format_bytes(self.largest_tensor_bytes)}{where}"
        )
        if self.uncounted:
            text += f", {len(self.uncounted)} symbolic tensor(s) not counted"
        return text


def estimate_memory(prog: Program, function_name: str = "main") -> MemoryEstimate:
    """Estimate the memory ``function_name`` of ``prog`` asks for (see ``MemoryEstimate``).

    >>> import coremltools as ct
    >>> from coremltools.converters.mil import Builder as mb
    >>> @mb.program(input_specs=[mb.TensorSpec((1, 8, 1024, 64)) for _ in range(3)],
    ...             opset_version=ct.target.iOS18)
    ... def prog(q, k, v):
    ...     return mb.scaled_dot_product_attention(query=q, key=k, value=v, name="attention")
    >>> estimate = estimate_memory(prog)
    >>> estimate.largest_tensor
    TensorInfo(name='attention (scores)', op_type='scaled_dot_product_attention', bytes=33554432)
    >>> format_bytes(estimate.peak_live_bytes)   # q, k, v, the scores and the output
    '40.0 MiB'
    """
    if not isinstance(prog, Program):
        raise TypeError(f"estimate_memory expects a coremltools MIL Program, got {type(prog).__name__}")
    if function_name not in prog.functions:
        raise KeyError(f"no function '{function_name}' in the program; it has {', '.join(prog.functions)}")
    function = prog.functions[function_name]
    tally = _Tally()
    state_bytes = 0
    for var in function.inputs.values():
        if types.is_state(var.sym_type):
            state_bytes += tally.size(var) or 0
    peak = _block_peak(function, tally, inputs=function.inputs.values())
    return MemoryEstimate(
        function=function_name,
        largest_tensor=tally.largest,
        peak_live_bytes=peak,
        weights_bytes=tally.weights_bytes,
        state_bytes=state_bytes,
        uncounted=tuple(tally.uncounted),
    )


class _Tally:
    """Sizes seen so far: the largest tensor, weights, and tensors with symbolic shapes."""

    def __init__(self) -> None:
        self.largest: Optional[TensorInfo] = None
        self.weights_bytes = 0
        self.uncounted: list[str] = []

    def size(self, var: Var) -> Optional[int]:
        """Bytes of a tensor var; ``None`` (and noted) when its shape is symbolic."""
        sym_type = var.sym_type
        if sym_type in _SIZES:
            size = _SIZES[sym_type]
        else:
            size = _SIZES[sym_type] = var_bytes(var)
        if size is None:
            self.uncounted.append(var.name)
        return size

    def produced(self, name: str, op_type: str, size: Optional[int]) -> None:
        if size is not None and (self.largest is None or size > self.largest.bytes):
            self.largest = TensorInfo(name, op_type, size)


def var_bytes(var: Var) -> Optional[int]:
    """Bytes of a tensor, scalar or state var; 0 for other types, ``None`` when its shape is symbolic."""
    sym_type = var.sym_type
    if not (types.is_tensor(sym_type) or types.is_scalar(sym_type) or types.is_state(sym_type)):
        return 0
    return tensor_bytes(tuple(var.shape), var.dtype)


def _block_peak(block: Block, tally: _Tally, inputs: Iterable[Var] = ()) -> int:
    """Peak live bytes of ``block``'s own tensors (and its inputs), nested blocks at their op."""
    ops = list(block.operations)
    position = {op: index for index, op in enumerate(ops)}
    end = len(ops)
    births: list[list[int]] = [[] for _ in range(end + 1)]
    deaths: list[list[int]] = [[] for _ in range(end + 1)]
    extra = [0] * (end + 1)
    outputs = set(block.outputs)

    def track(var: Var, born: int, size: Optional[int]) -> None:
        if not size:
            return
        if var in outputs:
            last = end
        else:
            uses = (position_in(user, block, position) for user in readers(var))
            last = max([born, *(end if use is None else use for use in uses)])
        births[born].append(size)
        deaths[last].append(size)

    for var in inputs:
        if not types.is_state(var.sym_type):
            track(var, 0, tally.size(var))
    for index, op in enumerate(ops):
        if op.op_type == "const":
            tally.weights_bytes += sum(tally.size(var) or 0 for var in op.outputs)
            continue
        if op.op_type.startswith("constexpr_"):
            continue  # decompressed weights; their stored form is the const ops feeding them
        for var in op.outputs:
            size = tally.size(var)
            tally.produced(var.name, op.op_type, size)
            track(var, index, size)
        transient = _transient_bytes(op, tally)
        nested = max((_block_peak(nested, tally) for nested in op.blocks), default=0)
        extra[index] = transient + nested

    live = peak = 0
    for index in range(end + 1):
        live += sum(births[index])
        peak = max(peak, live + extra[index])
        live -= sum(deaths[index])
    return peak


def _transient_bytes(op: Operation, tally: _Tally) -> int:
    """Bytes an op needs beyond its inputs and outputs: a fused attention's scores."""
    if op.op_type != SDPA:
        return 0
    name = f"{op.name} (scores)"
    size = tensor_bytes(sdpa_scores_shape(op), op.inputs["query"].dtype)
    if size is None:
        tally.uncounted.append(name)
        return 0
    tally.produced(name, op.op_type, size)
    return size
