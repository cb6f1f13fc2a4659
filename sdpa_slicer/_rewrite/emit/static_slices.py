"""Slices with a run-time start but a static length, given that length.

``table[start : start + L]`` with ``start`` an input (rotary tables read at the cache position)
converts to a ``slice_by_index`` whose begin and end are both computed at run time, so its
type has a symbolic length on every axis, and so has everything computed from it: the query
of a one-token decode call becomes ``(1, 4, is33, 8)``, and its attention is neither planned
nor counted by the estimate. The end is the begin plus ``L``, so the length is ``L``. Such a
slice becomes a ``slice_by_size`` with the same begin and a constant size, whose type MIL
infers as static, and the types of the ops downstream are inferred again::

    before                                            after
    ------                                            -----
    %start = slice_by_index(%position, squeeze)       %start = slice_by_index(%position, squeeze)
    %end   = add(%start, 1)      # cast to int16 and back on the way, squeezed
    %b     = concat(%start, 0)                        %b     = concat(%start, 0)
    %e     = concat(%end, 0)
    %cos   = slice_by_index(%table, begin=%b,         %cos   = slice_by_size(%table, begin=%b,
                end=%e, end_mask=[F, T])                          size=[1, 8])
    # (is309, is310)                                  # (1, 8)

What counts as ``begin + L`` on an axis: the begin's own element, plus constants (``add``,
``sub``), through integer ``cast``, ``squeeze``, ``expand_dims`` and ``reshape`` of one
value, and elements gathered by a ``concat`` along axis 0; an axis whose begin and end are
both constants, or whose end is masked and begin constant, has a static length as well. The
new type assumes what the program needs anyway: the slice lies inside the table
(``0 <= start`` and ``start + L`` at most the axis size), as a cache written at the same
position must. A cast to a narrower integer (coremltools casts such ends to int16 and back)
is taken as exact only where every value inside the axis fits it. A slice whose changed types
would reach an op with nested blocks (``cond``, ``while_loop``), or that squeezes or strides,
is left as it is.
"""

from __future__ import annotations

from typing import Optional, Sequence

import attrs
import numpy as np
from coremltools.converters.mil.mil import Builder as mb
from coremltools.converters.mil.mil import Function, Operation, Program, Var, types

from sdpa_slicer._graph import ops_in_block, readers, static_dim
from sdpa_slicer._rewrite.emit.transaction import NameAllocator, remove_dead_producers

SLICE = "slice_by_index"
PASS_THROUGH_OPS = frozenset(("squeeze", "expand_dims", "reshape"))
"""Ops that keep the one value of a scalar or one-element tensor as it is."""
INTEGER_BOUNDS = {types.int8: 2**7, types.int16: 2**15, types.int32: 2**31}
"""Every value from 0 up to (not including) the bound fits the signed integer dtype."""


@attrs.frozen
class Offset:
    """A value that is ``base + constant`` at run time (``base`` ``None``: the constant alone),
    found through casts whose narrowest dtype holds every value below ``bound``."""

    base: Optional[Var]
    constant: int
    bound: int = INTEGER_BOUNDS[types.int32]


@attrs.frozen
class StaticSlice:
    """A ``slice_by_index`` with a run-time begin or end, found to have these static sizes."""

    op: Operation
    sizes: tuple[int, ...]


def give_static_slice_lengths(prog: Program) -> tuple[str, ...]:
    """Replace every slice of ``prog`` with a run-time start and a static length by a
    ``slice_by_size`` (see the module), and infer the types downstream again. Returns one note per
    function where any slice was replaced."""
    notes = []
    for name, function in prog.functions.items():
        count = _give_static_lengths(function)
        if count:
            notes.append(
                f"function '{name}': {count} slice(s) with a run-time start and a static length "
                "given that length (slice_by_size)"
            )
    return tuple(notes)


def _give_static_lengths(function: Function) -> int:
    found = [static for op in ops_in_block(function) if op.op_type == SLICE for static in [static_slice(op)] if static]
    names: Optional[NameAllocator] = None
    downstream: set[Operation] = set()
    replaced = 0
    for static in found:
        reached = _computed_from(static.op.outputs[0])
        if any(op.blocks for op in reached):
            continue
        names = names or NameAllocator.for_function(function)
        _replace(static, names)
        downstream |= reached
        replaced += 1
    for op in ops_in_block(function):
        if op in downstream:
            op.type_value_inference(overwrite_output=True)
    return replaced


def static_slice(op: Operation) -> Optional[StaticSlice]:
    """The static sizes of a ``slice_by_index`` whose begin or end is computed at run time, when
    every axis has one; ``None`` otherwise, and for a slice whose type is static already."""
    x, out = op.inputs["x"], op.outputs[0]
    if all(static_dim(dim) is not None for dim in out.shape):
        return None
    rank = x.rank
    begin_mask, end_mask = (_flags(op, name, rank) for name in ("begin_mask", "end_mask"))
    if any(_flags(op, "squeeze_mask", rank)) or not _unit_strides(op):
        return None
    sizes = []
    for axis in range(rank):
        dim = static_dim(x.shape[axis])
        begin = _element(op.inputs["begin"], axis)
        if begin_mask[axis]:  # slice_by_size reads the begin as it is: it must be the 0 the mask stands for
            begin = begin if begin == Offset(None, 0) else None
        end = (None if dim is None else Offset(None, dim)) if end_mask[axis] else _element(op.inputs["end"], axis)
        size = _length(begin, end, dim)
        if size is None:
            return None
        sizes.append(size)
    return StaticSlice(op, tuple(sizes))


def _flags(op: Operation, name: str, rank: int) -> list[bool]:
    var = op.inputs.get(name)
    return [False] * rank if var is None else [bool(flag) for flag in var.val]


def _unit_strides(op: Operation) -> bool:
    stride = op.inputs.get("stride")
    return stride is None or (stride.val is not None and all(int(step) == 1 for step in stride.val))


def _length(begin: Optional[Offset], end: Optional[Offset], dim: Optional[int]) -> Optional[int]:
    """``end - begin`` when it is static: both constants (negatives counted from the end, as MIL
    does), or the same base, with every index of the axis exact through the casts on the way."""
    if begin is None or end is None:
        return None
    if begin.base is None and end.base is None:
        if dim is None:
            return None
        start, stop = (value + dim if value < 0 else value for value in (begin.constant, end.constant))
        return max(0, min(stop, dim) - min(max(start, 0), dim))
    if begin.base is not end.base or dim is None or dim >= min(begin.bound, end.bound):
        return None
    length = end.constant - begin.constant
    return length if 0 <= length <= dim else None


def _element(vector: Var, index: int) -> Optional[Offset]:
    """Element ``index`` of a rank-1 int vector, a constant or a ``concat`` of scalars and
    vectors along its axis; ``None`` when unknown."""
    if vector.val is not None:
        return Offset(None, int(np.asarray(vector.val).reshape(-1)[index]))
    op = vector.op
    if op is None or op.op_type != "concat" or vector.rank != 1:
        return None
    for part in op.inputs["values"]:
        length = 1 if part.rank == 0 else static_dim(part.shape[0])
        if length is None:
            return None
        if index < length:
            if part.val is not None:
                return Offset(None, int(np.asarray(part.val).reshape(-1)[index]))
            return _scalar(part) if length == 1 else None
        index -= length
    return None


def _scalar(var: Var) -> Offset:
    """A scalar or one-element int tensor as ``base + constant``, through adds and subs of
    constants, integer casts and ops that keep the value; the base is the first var made otherwise."""
    constant, bound = 0, INTEGER_BOUNDS[types.int32]
    while var.val is None and var.op is not None:
        op = var.op
        if op.op_type == "cast" and var.dtype in INTEGER_BOUNDS:
            bound = min(bound, INTEGER_BOUNDS[var.dtype])
            var = op.inputs["x"]
        elif op.op_type in PASS_THROUGH_OPS:
            var = op.inputs["x"]
        elif op.op_type in ("add", "sub"):
            x, y = _one_value(op.inputs["x"]), _one_value(op.inputs["y"])
            if y is not None:
                constant += y if op.op_type == "add" else -y
                var = op.inputs["x"]
            elif x is not None and op.op_type == "add":
                constant += x
                var = op.inputs["y"]
            else:
                break
        else:
            break
    if var.val is not None:
        return Offset(None, constant + int(np.asarray(var.val).reshape(-1)[0]), bound)
    return Offset(var, constant, bound)


def _one_value(var: Var) -> Optional[int]:
    """The value of a constant scalar or one-element int tensor."""
    if var.val is None or np.size(var.val) != 1 or not types.is_int(var.dtype):
        return None
    return int(np.asarray(var.val).reshape(-1)[0])


def _computed_from(var: Var) -> set[Operation]:
    """Every op whose inputs are computed from ``var``, at any distance."""
    found: set[Operation] = set()
    pending = [var]
    while pending:
        for reader in readers(pending.pop()):
            if reader not in found:
                found.add(reader)
                pending.extend(reader.outputs)
    return found


def _replace(static: StaticSlice, names: NameAllocator) -> None:
    op, block = static.op, static.op.enclosing_block
    old = op.outputs[0]
    with block:
        new = mb.slice_by_size(
            x=op.inputs["x"],
            begin=op.inputs["begin"],
            size=np.array(static.sizes, np.int32),
            name=names(op.name),
            before_op=op,
        )
    block.replace_uses_of_var_after_op(anchor_op=op, old_var=old, new_var=new, no_check_var_types=True)
    read: Sequence[Var] = op.get_flattened_inputs()
    block.remove_ops([op])
    new.name = old.name
    remove_dead_producers([block], read)
