"""Keys and values that repeat fewer heads: grouped-query and multi-query attention.

::

    %k8  = read_state(input=%k_cache)                               # (1, 8, S, E): 8 KV heads
    %k5  = expand_dims(x=%k8, axes=[2])                             # (1, 8, 1, S, E)
    %k32 = reshape(x=tile(x=%k5, reps=[1, 1, 4, 1, 1]), shape=[1, 32, S, E])
    %out = scaled_dot_product_attention(query=%q, key=%k32, value=%v32)   # %q: 32 heads

is attention whose query head ``h`` reads KV head ``h // 4``: the site keeps reading ``%k8`` and
``%v8``, with ``HeadGroups(kv_heads=8, repeats=4, layout="interleaved")``, and the repeat ops
become dead. Which KV head each output head reads is found by following what every op of the
chain (``expand_dims``, ``squeeze``, ``tile``, ``reshape``, ``transpose``) does to indices, not
by the ops' names: each axis is a list of factors (major first), each a run of a source axis's
indices or a repeat. ``repeat_interleave(r, dim=1)``, transformers' ``repeat_kv`` and
``expand`` of one head all come out as ``[kv heads, repeat]`` (head ``h`` reads ``h // r``);
``tile`` of the whole head axis as ``[repeat, kv heads]`` (``h % kv_heads``). Any other
result, or keys and values repeated differently, leaves the site as it is, with the reason.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence, Union

import attrs
import numpy as np
from coremltools.converters.mil.mil import Operation, Var
from coremltools.converters.mil.mil.types.symbolic import is_symbolic

from sdpa_slicer._rewrite.config import SliceConfig
from sdpa_slicer._rewrite.sites import INTERLEAVED, TILED, AttentionSite, Failed, HeadGroups

REPEAT_OPS = ("expand_dims", "squeeze", "tile", "reshape", "transpose")
Orientation = Literal["same", "swapped"]
"""How the axes other than the heads come out of a chain: as they were, or the last two swapped."""
SAME: Orientation = "same"
SWAPPED: Orientation = "swapped"
MAX_CHAIN = 16
"""Ops followed back from a key or a value."""

Factor = tuple[Optional[int], int, int]
"""A run of indices along an axis: (the source axis it reads, or ``None`` for a repeat; its size;
its stride within that source axis)."""
Layout = list[list[Factor]]
"""Per axis, its factors, major first; an axis of size 1 has none."""


@attrs.frozen(eq=False)
class Repeat:
    """A var whose heads repeat the heads of ``source``; ``swapped``: its last two axes are the
    source's last two, swapped (a key read as ``(..., E, S)``)."""

    source: Var
    heads: HeadGroups
    swapped: bool = False


class RepeatedKv:
    name = "repeated_kv"

    def enabled(self, config: SliceConfig) -> bool:
        return config.fold_repeated_kv

    def fold(self, site: AttentionSite) -> Union[AttentionSite, Failed, None]:
        """``site`` reading the un-repeated keys and values; why it cannot; or ``None`` when
        neither its keys nor its values are repeated at all."""
        key, value = head_repeat(site.key, allow_swap=True), head_repeat(site.value, allow_swap=False)
        if key is None and value is None:
            return None
        if not isinstance(key, Repeat):
            return _not_folded("keys", key)
        if not isinstance(value, Repeat):
            return _not_folded("values", value)
        if key.heads != value.heads:
            return Failed(
                f"keys and values not folded: keys repeat {key.heads.summary()}, values {value.heads.summary()}"
            )
        query_heads = site.query.shape[-3] if site.query.rank >= 3 else None
        expected = key.heads.kv_heads * key.heads.repeats
        if query_heads is None or is_symbolic(query_heads) or int(query_heads) != expected:
            return Failed(f"keys and values not folded: the query has {query_heads} heads, not {expected}")
        return attrs.evolve(
            site,
            key=key.source,
            key_transposed=site.key_transposed != key.swapped,
            value=value.source,
            heads=key.heads,
        )


REPEATED_KV = RepeatedKv()


def _not_folded(what: str, found: Optional[Failed]) -> Failed:
    return Failed(f"{what} not folded: {found.reason if found else 'they are not a repeat of fewer heads'}")


def head_repeat(var: Var, allow_swap: bool) -> Union[Repeat, Failed, None]:
    """How ``var`` (``(..., heads, S, E)``) repeats the heads of a smaller tensor; why it does not
    when a ``tile`` makes it; ``None`` when nothing repeats it."""
    chain: list[Operation] = []
    current = var
    while current.op is not None and current.op.op_type in REPEAT_OPS and len(chain) < MAX_CHAIN:
        chain.insert(0, current.op)
        current = current.op.inputs["x"]
    first_failure: Optional[Failed] = None
    for start in range(len(chain)):
        ops = chain[start:]
        if not any(op.op_type == "tile" for op in ops):
            break
        found = _analyse(ops[0].inputs["x"], ops, allow_swap)
        if isinstance(found, Repeat):
            return found
        first_failure = first_failure or found
    return first_failure


def _analyse(source: Var, ops: Sequence[Operation], allow_swap: bool) -> Union[Repeat, Failed]:
    shape = tuple(source.shape)
    if any(is_symbolic(dim) for dim in shape) or len(shape) < 3:
        return Failed(f"'{source.name}' has a dynamic shape or fewer than 3 axes")
    layout: Layout = [[(axis, int(size), 1)] if size != 1 else [] for axis, size in enumerate(shape)]
    for op in ops:
        applied = _apply(op, layout)
        if isinstance(applied, Failed):
            return applied
        layout = applied
    layout = [_canonical(factors) for factors in layout]
    if len(layout) != len(shape):
        return Failed(f"the chain from '{source.name}' changes its rank")
    head = len(shape) - 3
    orientation = _orientation(layout, shape, head)
    if orientation is None:
        return Failed(f"the chain from '{source.name}' mixes axes other than the heads")
    if orientation == SWAPPED and not allow_swap:
        return Failed(f"the chain from '{source.name}' reorders its axes")
    heads = _head_groups(layout[head], head, int(shape[head]))
    if heads is None:
        return Failed(f"its heads are not a repeat of the heads of '{source.name}'")
    return Repeat(source, heads, orientation == SWAPPED)


def _apply(op: Operation, layout: Layout) -> Union[Layout, Failed]:
    """``layout`` after ``op``; the reason when ``op`` does something this analysis cannot follow."""
    kind = op.op_type
    if kind == "transpose":
        return [layout[int(axis) % len(layout)] for axis in op.inputs["perm"].val]
    if kind == "expand_dims":
        rank = len(layout) + len(op.inputs["axes"].val)
        result = list(layout)
        for axis in sorted(int(axis) % rank for axis in op.inputs["axes"].val):
            result.insert(axis, [])
        return result
    if kind == "squeeze":
        axes = op.inputs.get("axes")
        dropped = (
            {index for index, factors in enumerate(layout) if not factors}
            if axes is None
            else {int(axis) % len(layout) for axis in axes.val}
        )
        return [factors for index, factors in enumerate(layout) if index not in dropped]
    if kind == "tile":
        if op.inputs["reps"].val is None:
            return Failed(f"tile '{op.name}' repeats by amounts computed at run time")
        reps = [int(rep) for rep in np.asarray(op.inputs["reps"].val).reshape(-1)]
        return [([(None, rep, 1)] if rep > 1 else []) + factors for rep, factors in zip(reps, layout)]
    return _reshape(layout, op.outputs[0].shape, op.name)


def _reshape(layout: Layout, target: Sequence[object], name: str) -> Union[Layout, Failed]:
    if any(is_symbolic(dim) for dim in target):
        return Failed(f"reshape '{name}' has a dynamic shape")
    flat = [factor for factors in layout for factor in factors]
    result: Layout = []
    for size in (int(dim) for dim in target):  # type: ignore[call-overload]
        taken: list[Factor] = []
        while size > 1:
            if not flat:
                return Failed(f"reshape '{name}' does not keep the number of elements")
            axis, length, stride = flat.pop(0)
            if length <= size:
                if size % length:
                    return Failed(f"reshape '{name}' splits an axis unevenly")
                taken.append((axis, length, stride))
                size //= length
            else:
                if length % size:
                    return Failed(f"reshape '{name}' splits an axis unevenly")
                taken.append((axis, size, stride * (length // size)))
                flat.insert(0, (axis, length // size, stride))
                size = 1
        result.append(taken)
    return result if not flat else Failed(f"reshape '{name}' does not keep the number of elements")


def _canonical(factors: list[Factor]) -> list[Factor]:
    """Adjacent runs of the same source axis joined, adjacent repeats joined, size-1 runs dropped."""
    merged: list[Factor] = []
    for axis, length, stride in factors:
        if length == 1:
            continue
        if merged:
            last_axis, last_length, last_stride = merged[-1]
            if axis is None and last_axis is None:
                merged[-1] = (None, last_length * length, 1)
                continue
            if axis is not None and axis == last_axis and last_stride == length * stride:
                merged[-1] = (axis, last_length * length, stride)
                continue
        merged.append((axis, length, stride))
    return merged


def _orientation(layout: Layout, shape: tuple[object, ...], head: int) -> Optional[Orientation]:
    """``SAME`` when every axis but ``head`` reads its own source axis whole, ``SWAPPED`` when
    the last two read each other's; ``None`` if an axis reads anything else (a repeat, part of an
    axis). Axes of size 1 carry no index and fit either way."""
    pairs = []
    for index, factors in enumerate(layout):
        if index == head or not factors:
            continue
        if len(factors) != 1:
            return None
        axis, length, stride = factors[0]
        if axis is None or axis == head or stride != 1 or length != shape[axis]:
            return None
        pairs.append((index, axis))
    last = len(shape) - 1
    swap = {last: last - 1, last - 1: last}
    if all(axis == index for index, axis in pairs):
        return SAME
    if all(axis == swap.get(index, index) for index, axis in pairs):
        return SWAPPED
    return None


def _head_groups(factors: list[Factor], head: int, kv_heads: int) -> Optional[HeadGroups]:
    whole = (head, kv_heads, 1)
    if kv_heads == 1 and len(factors) == 1 and factors[0][0] is None:
        return HeadGroups(1, factors[0][1], INTERLEAVED)
    if len(factors) == 2 and factors[0] == whole and factors[1][0] is None:
        return HeadGroups(kv_heads, factors[1][1], INTERLEAVED)
    if len(factors) == 2 and factors[1] == whole and factors[0][0] is None:
        return HeadGroups(kv_heads, factors[0][1], TILED)
    return None
