"""A static estimate of the memory a MIL function asks for: tensor sizes and liveness over op order.

This reads shapes off the graph; it is not a measurement on a device. A runtime may fuse,
alias or schedule differently, but the tensors it is asked to produce are these.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import attrs
from coremltools.converters.mil.mil import Block, Operation, Program, Var, types

from sdpa_slicer._coreml_compat import value_tag
from sdpa_slicer._graph import (
    SDPA,
    check_program,
    position_in,
    program_function,
    readers,
    sdpa_scores_shape,
    tensor_bytes,
)
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
class TimelinePoint:
    """One op of a function's top-level block, and the bytes alive while it runs.

    ``live_bytes`` counts every tensor alive at the op (its inputs still needed later, its
    outputs, anything produced earlier and read later), plus what the op needs beyond them: a
    fused attention's scores, or the peak of its nested blocks.
    """

    position: int
    """The op's index in the block, constants included."""
    op_name: str
    op_type: str
    live_bytes: int
    outputs: tuple[str, ...] = ()
    """The vars the op produces; for an op holding blocks (``cond``, ``while_loop``), also every
    var produced inside them."""
    tensor: Optional[TensorInfo] = None
    """The largest tensor the op produces (a fused attention's scores, a tensor inside its
    blocks); ``None`` for constants and ops producing nothing countable."""


@attrs.frozen(kw_only=True)
class MemoryEstimate:
    """What one function asks for, from its graph.

    - ``largest_tensor``: the biggest tensor an op produces; a fused attention op counts the
      scores tensor it implies (batch dims x L x S x itemsize) as a tensor of its own.
    - ``peak_live_bytes``: the most bytes alive at once, a tensor living from the op that
      produces it to its last consumer (function outputs to the end); ops in nested blocks
      count at their parent op.
    - ``weights_bytes``: constants, at their stored size; never part of the live bytes. A value
      of a package's weight file that several constants read counts once.
    - ``state_bytes``: Core ML state tensors (KV caches), held for the whole call.
    - ``uncounted``: tensors left out because their shape is symbolic.
    - ``timeline``: live bytes op by op over the function's top-level block, from the same count
      as the peak: ``peak_live_bytes`` is the largest ``live_bytes`` in it (for a function
      without ops, its inputs). ``to_dict()`` leaves it out.
    """

    function: str
    largest_tensor: Optional[TensorInfo]
    peak_live_bytes: int
    weights_bytes: int
    state_bytes: int = 0
    uncounted: tuple[str, ...] = ()
    timeline: tuple[TimelinePoint, ...] = attrs.field(default=(), repr=False)

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

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, without the timeline (one entry per op)."""
        return attrs.asdict(self, filter=lambda attribute, _: attribute.name != "timeline")


def estimate_memory(prog: Program, function_name: Optional[str] = None) -> MemoryEstimate:
    """Estimate the memory function ``function_name`` of ``prog`` asks for (see ``MemoryEstimate``);
    by default its default function: ``main``, or the one a loaded package names.

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
    >>> [(point.op_name, format_bytes(point.live_bytes)) for point in estimate.timeline]
    [('attention', '40.0 MiB')]
    """
    check_program(prog, "estimate_memory")
    function_name, function = program_function(prog, function_name)
    tally = _Tally()
    state_bytes = 0
    for var in function.inputs.values():
        if types.is_state(var.sym_type):
            state_bytes += tally.size(var) or 0
    liveness = _block_liveness(function, tally, inputs=function.inputs.values())
    return MemoryEstimate(
        function=function_name,
        largest_tensor=tally.largest,
        peak_live_bytes=liveness.peak,
        weights_bytes=tally.weights_bytes,
        state_bytes=state_bytes,
        uncounted=tuple(tally.uncounted),
        timeline=liveness.timeline,
    )


class _Tally:
    """Sizes seen so far: the largest tensor, weights, and tensors with symbolic shapes."""

    def __init__(self) -> None:
        self.largest: Optional[TensorInfo] = None
        self.weights_bytes = 0
        self.uncounted: list[str] = []
        self.stored: set[object] = set()

    def weight_size(self, var: Var) -> int:
        """Bytes of a constant; 0 for a value stored in a package's weight file that an earlier
        constant already reads (it is stored, and loaded, once)."""
        stored = value_tag(var)
        if stored is not None:
            if stored in self.stored:
                return 0
            self.stored.add(stored)
        return self.size(var) or 0

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

    def produced(self, name: str, op_type: str, size: Optional[int]) -> Optional[TensorInfo]:
        """Note a tensor an op produces; return it (``None`` when its size is unknown)."""
        if size is None:
            return None
        tensor = TensorInfo(name, op_type, size)
        if self.largest is None or size > self.largest.bytes:
            self.largest = tensor
        return tensor


@attrs.frozen
class _Liveness:
    """A block's live bytes: per op, and the peak."""

    timeline: tuple[TimelinePoint, ...]
    peak: int


def var_bytes(var: Var) -> Optional[int]:
    """Bytes of a tensor, scalar or state var; 0 for other types, ``None`` when its shape is symbolic."""
    sym_type = var.sym_type
    if not (types.is_tensor(sym_type) or types.is_scalar(sym_type) or types.is_state(sym_type)):
        return 0
    return tensor_bytes(tuple(var.shape), var.dtype)


def _block_liveness(block: Block, tally: _Tally, inputs: Iterable[Var] = ()) -> _Liveness:
    """Live bytes of ``block``'s own tensors (and its inputs) at each op, nested blocks at their op."""
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
    produced: list[tuple[tuple[str, ...], Optional[TensorInfo]]] = []
    for index, op in enumerate(ops):
        names = tuple(var.name for var in op.outputs)
        tensors: list[Optional[TensorInfo]] = []
        if op.op_type == "const":
            tally.weights_bytes += sum(tally.weight_size(var) for var in op.outputs)
        elif not op.op_type.startswith("constexpr_"):  # decompressed weights: counted as the consts they read
            for var in op.outputs:
                size = tally.size(var)
                tensors.append(tally.produced(var.name, op.op_type, size))
                track(var, index, size)
            transient = _transient(op, tally)
            nested = [_block_liveness(inner, tally) for inner in op.blocks]
            extra[index] = (transient.bytes if transient else 0) + max((inner.peak for inner in nested), default=0)
            tensors += [transient, *(point.tensor for inner in nested for point in inner.timeline)]
            names += tuple(name for inner in nested for point in inner.timeline for name in point.outputs)
        produced.append((names, max(filter(None, tensors), key=lambda tensor: tensor.bytes, default=None)))

    live = 0
    live_at = []
    for index in range(end + 1):
        live += sum(births[index])
        live_at.append(live + extra[index])
        live -= sum(deaths[index])
    timeline = tuple(
        TimelinePoint(
            position=index, op_name=op.name, op_type=op.op_type, live_bytes=live_at[index], outputs=names, tensor=tensor
        )
        for index, (op, (names, tensor)) in enumerate(zip(ops, produced))
    )
    return _Liveness(timeline, max(live_at))


def _transient(op: Operation, tally: _Tally) -> Optional[TensorInfo]:
    """What an op needs beyond its inputs and outputs: a fused attention's scores."""
    if op.op_type != SDPA:
        return None
    name = f"{op.name} (scores)"
    size = tensor_bytes(sdpa_scores_shape(op), op.inputs["query"].dtype)
    if size is None:
        tally.uncounted.append(name)
    return tally.produced(name, op.op_type, size)
