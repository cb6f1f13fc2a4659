"""Operand recipes: how an operand of the score chain as large as the scores is made, from
tensors that are not, so that each query chunk can build its own rows of it.

SAM's global attention adds a decomposed relative-position bias, made at full ``L x S``::

    %h   = expand_dims(%rel_h, axes=[-1])        # (BH, qh, qw, kh, 1)
    %w   = expand_dims(%rel_w, axes=[-2])        # (BH, qh, qw, 1, kw)
    %rel = add(%h, %w)                           # (BH, qh, qw, kh, kw)     rank 5, L x S
    %b   = reshape(%rel, shape=(B, heads, L, S))
    %out = scaled_dot_product_attention(%q, %k, %v, attn_mask=%b)

Its recipe is ``reshape(add(expand_dims(cut rel_h), expand_dims(cut rel_w)))``: ``rel_h`` and
``rel_w`` are the tensors it is made from (each ``L x kh``), cut per chunk; every op above them
is built again per chunk, in merged forms (``plan/rows.py``), so that no tensor exceeds rank 4::

    %h_i   = slice_by_size(reshape(%rel_h, (BH, L, kh)), rows of chunk i)   # (BH, c, kh)
    %rel_i = add(expand_dims(%h_i, [-1]), expand_dims(%w_i, [-2]))           # (BH, c, kh, kw)
    %b_i   = reshape(%rel_i, (B, heads, c, S))

The recipe follows an operand back through elementwise and broadcasting ops (``add``, ``mul``,
comparisons, ``select``, ``cast``, ``quantize``/``dequantize``, ...), ``expand_dims``, ``tile``
and ``reshape`` whose rows line up, for as long as each tensor is read only by the recipe and
made in the site's block. What it stops at is cut per chunk (a tensor with the rows) or used
whole (one that does not vary along them). The operand's ops, dead once the chunks no longer
read it, are removed with the site's.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import attrs
from coremltools.converters.mil.mil import Block, Operation, Var

from sdpa_slicer._graph import (
    BINARY_OPS,
    QUANTIZATION_OPS,
    QUANTIZATION_PARAMETERS,
    UNARY_OPS,
    dtype_name,
    private_use_problem,
    static_dim,
    tensor_bytes,
)
from sdpa_slicer._rewrite.plan.rows import (
    BROADCAST,
    InputRows,
    Rows,
    broadcast_rows,
    expand_dims_rows,
    merged_axis,
    merged_input_shape,
    merged_shape,
    reshape_rows,
    tile_rows,
)
from sdpa_slicer._text import format_bytes

MAX_RANK = 4
"""Emitted tensors have at most this rank."""
COMPARISON_OPS = ("equal", "not_equal", "less", "less_equal", "greater", "greater_equal")
LOGICAL_OPS = ("logical_and", "logical_or", "logical_xor")
TENSOR_INPUTS: dict[str, tuple[str, ...]] = {
    **{op: ("x", "y") for op in (*BINARY_OPS, "floor_div", "mod", *COMPARISON_OPS, *LOGICAL_OPS)},
    **{op: ("x",) for op in (*UNARY_OPS, "cast", "logical_not")},
    **{op: ("input",) for op in QUANTIZATION_OPS},
    "select": ("cond", "a", "b"),
}
"""The inputs of each elementwise op that broadcast against its output; the rest are parameters."""
REARRANGING_OPS = ("expand_dims", "reshape", "tile")
MAX_OPS = 64
"""Ops followed back from an operand before giving up."""


@attrs.frozen(eq=False)
class Cut:
    """A tensor with the query rows at ``rows``, cut per chunk (after its rows are merged)."""

    var: Var
    rows: Rows


@attrs.frozen(eq=False)
class Whole:
    """A tensor that does not vary along the rows, used whole (reshaped to ``shape`` if given)."""

    var: Var
    shape: Optional[tuple[int, ...]] = None


@attrs.frozen(eq=False)
class Rebuilt:
    """An op built again per chunk: its output has the rows at ``rows``, its tensor inputs by name."""

    op: Operation
    rows: Rows
    inputs: tuple[tuple[str, Part], ...]

    @property
    def var(self) -> Var:
        return self.op.outputs[0]


Part = Union[Cut, Whole, Rebuilt]


@attrs.frozen(eq=False)
class OperandRecipe:
    """How to build the rows of one chunk of ``var`` (its query axis last but one)."""

    var: Var
    root: Rebuilt

    def ops(self) -> tuple[Operation, ...]:
        """The ops built per chunk, from the operand back."""
        found: list[Operation] = []
        pending: list[Part] = [self.root]
        while pending:
            part = pending.pop(0)
            if isinstance(part, Rebuilt):
                found.append(part.op)
                pending += [child for _, child in part.inputs]
        return tuple(found)

    def describe(self) -> str:
        """``"reshape <- add <- expand_dims x2"``: the op types built per chunk."""
        counts: dict[str, int] = {}
        for op in self.ops():
            counts[op.op_type] = counts.get(op.op_type, 0) + 1
        return " <- ".join(op_type if count == 1 else f"{op_type} x{count}" for op_type, count in counts.items())


def is_scores_sized(shape: tuple[object, ...], scores_shape: tuple[object, ...]) -> bool:
    """Whether an operand of ``shape`` (aligned right with the scores) holds full query and key
    axes: ``L x S`` values at least, as large as one head's scores. (A constant one is a weight,
    cut into constants per chunk.)"""
    if len(shape) < 2 or len(scores_shape) < 2:
        return False
    rows, keys = (static_dim(dim) for dim in shape[-2:])
    length, key_length = (static_dim(dim) for dim in scores_shape[-2:])
    return rows is not None and rows == length and rows > 1 and keys is not None and keys == key_length


def operand_recipe(var: Var, block: Block, site_ops: Sequence[Operation]) -> Union[OperandRecipe, str]:
    """The recipe of ``var``, an operand (of a rank of 2 or more, its query axis last but one)
    read by the site of ``site_ops`` in ``block``; or why it has none."""
    members = set(site_ops)
    rows = (var.rank - 2, var.rank - 1)
    part = _part(var, rows, block, members, budget=[MAX_OPS])
    if not isinstance(part, Rebuilt):
        reason = _stop_reason(var, block, set(site_ops))
        return reason or f"'{var.name}' is made by {var.op.op_type} '{var.op.name}', whose rows do not line up"
    return _rank_problem(part) or _large_source(part, var) or OperandRecipe(var, part)


def operand_bytes(var: Var) -> Optional[int]:
    return tensor_bytes(tuple(var.shape), var.dtype)


def _part(var: Var, rows: Rows, block: Block, members: set[Operation], budget: list[int]) -> Part:
    """``var``, whose rows are at ``rows``, as a part of a recipe."""
    if _stop_reason(var, block, members) is not None or budget[0] <= 0:
        return Cut(var, rows)
    op = var.op
    mapping = _input_rows(op, rows)
    if mapping is None:
        return Cut(var, rows)
    budget[0] -= 1
    members.add(op)
    inputs: list[tuple[str, Part]] = []
    for name, in_rows in mapping:
        source = op.inputs[name]
        if in_rows == BROADCAST:
            inputs.append((name, Whole(source, _whole_shape(op, source, rows))))
            continue
        assert not isinstance(in_rows, str) and in_rows is not None
        inputs.append((name, _part(source, in_rows, block, members, budget)))
    return Rebuilt(op, rows, tuple(inputs))


def _stop_reason(var: Var, block: Block, members: set[Operation]) -> Optional[str]:
    """Why the recipe does not follow ``var`` back to its op; ``None`` when it does."""
    op = var.op
    if var.val is not None:
        return f"'{var.name}' is a constant"
    problem = private_use_problem(var, block, members.__contains__)
    if problem is not None:
        return problem
    if op.op_type not in TENSOR_INPUTS and op.op_type not in REARRANGING_OPS:
        return f"'{var.name}' is made by {op.op_type} '{op.name}', which the chunks cannot build row by row"
    if any(not _static(output) for output in op.outputs):
        return f"'{var.name}' has a dynamic shape"
    return None


def _static(var: Var) -> bool:
    return all(static_dim(dim) is not None for dim in var.shape)


def _input_rows(op: Operation, rows: Rows) -> Optional[list[tuple[str, InputRows]]]:
    """Where the rows of each tensor input of ``op`` are, given its output's; ``None`` when the
    op cannot be built row by row."""
    out_shape = _shape(op.outputs[0])
    if op.op_type in TENSOR_INPUTS:
        found: list[tuple[str, InputRows]] = []
        for name in TENSOR_INPUTS[op.op_type]:
            source = op.inputs.get(name)
            if source is None:
                continue
            if not _static(source):
                return None
            found.append((name, broadcast_rows(out_shape, rows, _shape(source))))
        if any(in_rows is None for _, in_rows in found) or all(in_rows == BROADCAST for _, in_rows in found):
            return None
        if op.op_type in QUANTIZATION_OPS and _per_axis(op) and merged_axis(_axis(op), len(out_shape), rows) is None:
            if rows[1] - rows[0] > 1:
                return None  # a scale along several row axes
            # A scale and zero point along the query rows: cut with them.
            found += [(name, (0, 1)) for name in QUANTIZATION_PARAMETERS if op.inputs.get(name) is not None]
        return found
    source = op.inputs["x"]
    if not _static(source):
        return None
    in_shape = _shape(source)
    if op.op_type == "expand_dims":
        expanded = expand_dims_rows(len(in_shape), [int(axis) for axis in op.inputs["axes"].val], rows)
        return None if expanded is None else [("x", expanded[0])]
    if op.op_type == "reshape":
        in_rows = reshape_rows(in_shape, out_shape, rows)
        return None if in_rows is None else [("x", in_rows)]
    reps = op.inputs["reps"].val
    if reps is None or len(in_shape) != len(out_shape):
        return None
    tiled = tile_rows(in_shape, [int(rep) for rep in reps], rows)
    return None if tiled is None else [("x", tiled)]


def _whole_shape(op: Operation, source: Var, rows: Rows) -> Optional[tuple[int, ...]]:
    """How an input used whole reads in the merged forms: its row axes as one axis of 1."""
    if op.op_type == "tile":
        start, end = rows
        return None if end - start == 1 else merged_shape(_shape(source), rows, 1)
    return merged_input_shape(_shape(source), op.outputs[0].rank, rows)


def _per_axis(op: Operation) -> bool:
    return op.inputs.get("axis") is not None and op.inputs["scale"].rank == 1


def _axis(op: Operation) -> int:
    return int(op.inputs["axis"].val)


def _shape(var: Var) -> tuple[int, ...]:
    return tuple(int(dim) for dim in var.shape)


def _large_source(root: Rebuilt, operand: Var) -> Optional[str]:
    """Why the recipe would not stop the operand from being made at full size: it starts from a
    tensor an op of the block makes, of as many values as the operand."""
    values = math.prod(_shape(operand))
    pending: list[Part] = [root]
    while pending:
        part = pending.pop()
        if isinstance(part, Rebuilt):
            pending += [child for _, child in part.inputs]
        elif part.var.op is not None and part.var.val is None and math.prod(_shape(part.var)) >= values:
            op = part.var.op
            return f"it is made from '{part.var.name}', of as many values, which {op.op_type} '{op.name}' makes"
    return None


def _rank_problem(root: Rebuilt) -> Optional[str]:
    """Why building ``root`` per chunk would need a tensor of a rank above ``MAX_RANK``."""
    pending: list[Part] = [root]
    while pending:
        part = pending.pop()
        if isinstance(part, Rebuilt):
            pending += [child for _, child in part.inputs]
        if isinstance(part, Whole):
            rank = part.var.rank if part.shape is None else len(part.shape)
        else:
            rank = part.var.rank - (part.rows[1] - part.rows[0]) + 1
        if rank > MAX_RANK:
            return f"'{part.var.name}' would be of rank {rank} per chunk, above {MAX_RANK}"
    return None


def describe_operand(var: Var) -> str:
    """``"'attn_bias' (1x2x256x256 fp32, 512.0 KiB)"``."""
    shape = "x".join(str(dim) for dim in var.shape)
    return f"'{var.name}' ({shape} {dtype_name(var)}, {format_bytes(operand_bytes(var))})"
