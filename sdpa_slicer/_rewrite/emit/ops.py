"""Adding ops for the site being rewritten: named, cached, and all removed again if it fails.

``OpBuilder`` adds every op through the site's ``SiteTransaction``, right before the site's
anchor. What several sites of a block can share is made once per block and cached: constants
(axes, flags, scales, split sizes), and constant pieces of constants. Cuts of run-time tensors
(keys, values, operand columns) are cached per site, so that each is made right before it is
used. A rolled-back site takes the cached values it made with it, and so does a committed one
the values it made and then left unread.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Optional, Protocol, Sequence

import numpy as np
from coremltools.converters.mil.mil import Block, Operation, Var
from coremltools.converters.mil.mil import Builder as mb

from sdpa_slicer._graph import FLOAT_DTYPES
from sdpa_slicer._rewrite.emit.transaction import NameAllocator, SiteTransaction

Span = tuple[int, int]
"""Half-open index range ``[start, end)`` along one axis."""


class Ops(Protocol):
    """What building the attention of chunks needs from an op builder."""

    def op(self, builder: Callable[..., Any], name: str, **inputs: Any) -> Any: ...

    def const(self, value: Any, kind: str) -> Var: ...

    def scalar(self, value: float, dtype: str) -> Var: ...

    def cut(self, name: str, x: Var, axis: int, span: Span, stride: int = 1) -> Var: ...


class OpBuilder:
    """Adds the ops of the sites of one block, one site at a time (``begin`` ... ``commit`` or
    ``roll_back``). Use inside ``with block:``."""

    def __init__(self, block: Block, names: NameAllocator) -> None:
        self._block = block
        self._names = names
        self._cache: dict[Hashable, Any] = {}
        self._site_cache: dict[Hashable, Any] = {}
        self._transaction: Optional[SiteTransaction] = None

    def begin(self, site_ops: Sequence[Operation]) -> None:
        """Start adding the ops that replace ``site_ops`` (anchor last)."""
        self._transaction = None
        self._site_cache = {}
        self._transaction = SiteTransaction(self._block, site_ops, self._names)

    def commit(self, new_output: Var) -> None:
        """Swap the added ops in for the site's (see ``SiteTransaction.commit``)."""
        assert self._transaction is not None, "commit follows begin"
        removed = self._transaction.commit(new_output)  # on failure the transaction stays, for roll_back
        self._transaction = None
        self._forget(removed)

    def roll_back(self) -> None:
        """Remove the ops added for the site, and forget the shared values they made."""
        if self._transaction is None:
            return
        removed = self._transaction.roll_back()
        self._transaction = None
        self._forget(removed)

    def _forget(self, removed: Sequence[Operation]) -> None:
        """Drop the shared values that ``removed`` ops made."""
        gone = set(removed)
        self._cache = {key: value for key, value in self._cache.items() if _made_by(value) not in gone}

    def op(self, builder: Callable[..., Any], name: str, **inputs: Any) -> Any:
        """Add one op right before the anchor of the site being rewritten."""
        assert self._transaction is not None, "ops are only added while a site is rewritten"
        return self._transaction.add(builder, name, **inputs)

    def cached(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """What ``make()`` returns, made once per block for ``key``."""
        return _cached(self._cache, key, make)

    def scalar(self, value: float, dtype: str) -> Var:
        return self.const(FLOAT_DTYPES[dtype](value), dtype)

    def const(self, value: Any, kind: str) -> Var:
        key = ("const", kind, _hashable(value))
        return self.cached(key, lambda: self.op(mb.const, f"sdpa_slicer_{kind}_const", val=value))

    def split(self, name: str, x: Var, sizes: Sequence[int]) -> tuple[Var, ...]:
        """``x`` split along its rows (axis -2) into pieces of ``sizes``; ``x`` itself for one piece."""
        if len(sizes) == 1:
            return (x,)
        outputs = self.op(
            mb.split,
            name,
            x=x,
            split_sizes=self.const(np.array(sizes, dtype=np.int32), "int32"),
            axis=self.const(-2, "int32"),
        )
        return tuple(outputs)

    def concat(self, name: str, values: Sequence[Var], axis: int, interleave: bool = False) -> Var:
        """``values`` joined along ``axis``; the one value itself when there is one."""
        if len(values) == 1:
            return values[0]
        return self.op(
            mb.concat,
            name,
            values=tuple(values),
            axis=self.const(axis, "int32"),
            interleave=self.const(interleave, "bool"),
        )

    def cut(self, name: str, x: Var, axis: int, span: Span, stride: int = 1) -> Var:
        """``x`` cut to ``span`` (every ``stride``-th index) along ``axis`` (negative), once per
        site; a constant is cut into a constant (once per block)."""
        start, end = span
        key = ("cut", id(x), axis, span, stride)
        if x.val is not None:
            index = [slice(None)] * x.rank
            index[axis] = slice(start, end, stride)
            value = np.ascontiguousarray(x.val[tuple(index)])
            return self.cached(key, lambda: self.op(mb.const, name, val=value))
        if stride == 1:
            begin = np.zeros(x.rank, dtype=np.int32)
            size = np.full(x.rank, -1, dtype=np.int32)
            begin[axis] = start
            size[axis] = end - start
            make = lambda: self.op(  # noqa: E731
                mb.slice_by_size, name, x=x, begin=self.const(begin, "int32"), size=self.const(size, "int32")
            )
        else:
            make = lambda: self._strided_cut(name, x, axis, span, stride)  # noqa: E731
        return _cached(self._site_cache, key, make)

    def _strided_cut(self, name: str, x: Var, axis: int, span: Span, stride: int) -> Var:
        begin, end, steps = (np.zeros(x.rank, dtype=np.int32) for _ in range(3))
        steps[:] = 1
        begin[axis], end[axis], steps[axis] = span[0], span[1], stride
        every = np.ones(x.rank, dtype=bool)
        every[axis] = False
        return self.op(
            mb.slice_by_index,
            name,
            x=x,
            begin=self.const(begin, "int32"),
            end=self.const(end, "int32"),
            stride=self.const(steps, "int32"),
            begin_mask=self.const(every, "bool"),
            end_mask=self.const(every, "bool"),
        )


def _cached(cache: dict[Hashable, Any], key: Hashable, make: Callable[[], Any]) -> Any:
    if key not in cache:
        cache[key] = make()
    return cache[key]


def _hashable(value: Any) -> Hashable:
    if isinstance(value, np.ndarray):
        return (value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, np.generic):
        return (value.dtype.str, value.item())
    return (type(value).__name__, value)


def _made_by(value: Any) -> Optional[Operation]:
    """The op that made a cached var or tuple of vars."""
    first = value[0] if isinstance(value, tuple) else value
    return first.op if isinstance(first, Var) else None
