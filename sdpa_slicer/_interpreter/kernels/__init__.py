"""Kernel registry: NumPy implementations of MIL ops, looked up by op type.

A kernel is a plain function whose parameters are the op's input names, e.g.
``def _add(x, y)``. The engine calls it with the evaluated inputs as keyword
arguments (tuple inputs such as ``concat``'s ``values`` arrive as tuples of
arrays; optional inputs the op does not carry are left to the kernel's
defaults). A kernel that also declares a parameter named ``op`` receives the
``Operation``, and one that declares ``ctx`` receives the ``EvalContext``.
It returns an array (or anything ``np.asarray`` accepts) for a single-output op,
and a tuple with one such value per output otherwise (a tuple always means
several outputs); the engine casts each result to the declared output dtype.

A Core ML state input arrives as a ``state.StateBuffer``, whose ``value`` the state
kernels read and replace. ``constexpr_*`` kernels (compressed weights) run once, when
the engine resolves the program.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, TypeVar

import attrs
import numpy as np

KernelFn = Callable[..., Any]
F = TypeVar("F", bound=KernelFn)

OP_PARAMETER = "op"
CONTEXT_PARAMETER = "ctx"


@attrs.frozen
class Kernel:
    """A registered kernel, the input names it takes, and which extra arguments it asks for."""

    op_type: str
    fn: KernelFn
    inputs: frozenset[str]
    takes_any_input: bool
    wants_op: bool
    wants_ctx: bool

    @classmethod
    def of(cls, op_type: str, fn: KernelFn) -> Kernel:
        """Describe ``fn`` as the kernel of ``op_type`` from its signature."""
        parameters = inspect.signature(fn).parameters
        return cls(
            op_type=op_type,
            fn=fn,
            inputs=frozenset(parameters) - {OP_PARAMETER, CONTEXT_PARAMETER},
            takes_any_input=any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()),
            wants_op=OP_PARAMETER in parameters,
            wants_ctx=CONTEXT_PARAMETER in parameters,
        )


@attrs.define
class EvalContext:
    """What a kernel may need beyond its inputs: the function being run, and fp32 copies of fp16
    values that several ops read. (State ops need nothing here: a state input's value is a
    ``state.StateBuffer``.)"""

    function_name: str
    _shared: dict[int, list[Optional[np.ndarray]]] = attrs.field(factory=dict, init=False, repr=False)

    def share(self, value: np.ndarray) -> None:
        """Note that several ops read ``value``: ``widened`` then makes its fp32 copy only once."""
        self._shared[id(value)] = [value, None]

    def forget(self, value: Any) -> None:
        """``value`` is read no more; drop its fp32 copy."""
        self._shared.pop(id(value), None)

    def widened(self, x: np.ndarray) -> np.ndarray:
        """``x`` in fp32 if it is fp16, else unchanged; read-only when it is a shared copy."""
        if x.dtype != np.float16:
            return x
        entry = self._shared.get(id(x))
        if entry is None or entry[0] is not x:
            return x.astype(np.float32)
        wide = entry[1]
        if wide is None:
            wide = entry[1] = x.astype(np.float32)
            wide.flags.writeable = False
        return wide


KERNELS: dict[str, Kernel] = {}


def register(op_type: str, fn: KernelFn) -> KernelFn:
    """Register ``fn`` as the kernel of ``op_type``; each op type has exactly one kernel."""
    if op_type in KERNELS:
        raise ValueError(f"op type {op_type!r} already has a kernel ({KERNELS[op_type].fn.__qualname__})")
    KERNELS[op_type] = Kernel.of(op_type, fn)
    return fn


def kernel(*op_types: str) -> Callable[[F], F]:
    """Decorator registering one function as the kernel of each of ``op_types``."""

    def decorate(fn: F) -> F:
        for op_type in op_types:
            register(op_type, fn)
        return fn

    return decorate


# Importing the families fills KERNELS.
from sdpa_slicer._interpreter.kernels import (  # noqa: E402,F401
    activation,
    attention,
    compression,
    conv,
    elementwise,
    linalg,
    normalization,
    pool,
    quantization,
    rearrange,
    reduction,
    resize,
    scatter,
    state,
    tensor,
)
