"""Building an operand as large as the scores per query chunk, from its recipe (``recipes.py``).

::

    before                                          after (chunk i of rows [a, b), c = b - a)
    ------                                          -----------------------------------------
    %h   = expand_dims(%rel_h, [-1])  # rank 5      %hm   = reshape(%rel_h, (BH, L, kh))          # once
    %w   = expand_dims(%rel_w, [-2])                %h_i  = slice_by_size(%hm, rows [a, b))
    %rel = add(%h, %w)                # L x S       %e_i  = expand_dims(%h_i, [-1])             # (BH, c, kh, 1)
    %b   = reshape(%rel, (B, H, L, S))              %r_i  = add(%e_i, expand_dims(%w_i, [-2]))  # (BH, c, kh, kw)
    ... add(%scores, %b) ...                        %b_i  = reshape(%r_i, (B, H, c, S))
                                                    ... add(%scores_i, %b_i) ...

Each chunk's rows are built right before its scores need them (``OperandChunks.piece``), so no
more than one chunk of the operand is alive at a time. The tensors the recipe starts from are
merged (their row axes reshaped into one) once, and cut per chunk.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence, Union, overload

import numpy as np
from coremltools.converters.mil.mil import Builder as mb
from coremltools.converters.mil.mil import Operation, Var

from sdpa_slicer._rewrite.emit.ops import OpBuilder
from sdpa_slicer._rewrite.plan.planning import Chunk
from sdpa_slicer._rewrite.plan.rows import expand_dims_rows, merged_axis, merged_reps, merged_shape
from sdpa_slicer._rewrite.recipes import Cut, OperandRecipe, Part, Whole


class OperandChunks:
    """The rows of each query chunk of one operand, each built on first use."""

    def __init__(self, ops: OpBuilder, recipe: OperandRecipe, chunks: Sequence[Chunk], name: str) -> None:
        self._ops = ops
        self._recipe = recipe
        self._chunks = tuple(chunks)
        self._name = name
        self._built: dict[int, Var] = {}

    def piece(self, index: int) -> Var:
        """The operand's rows of query chunk ``index``, as a tensor of the operand's rank."""
        if index not in self._built:
            self._built[index] = self._build(self._recipe.root, self._chunks[index], f"{self._name}_{index}")
        return self._built[index]

    def _build(self, part: Part, span: Chunk, name: str) -> Var:
        ops = self._ops
        if isinstance(part, Whole):
            return part.var if part.shape is None else self._reshaped(part.var, part.shape)
        if isinstance(part, Cut):
            merged = self._reshaped(part.var, merged_shape(_shape(part.var), part.rows, _rows(part.var, part.rows)))
            axis = part.rows[0] - merged.rank
            return ops.cut(f"{name}_{part.var.name}_rows", merged, axis, span)
        op = part.op
        inputs = {input_name: self._build(child, span, name) for input_name, child in part.inputs}
        count = span[1] - span[0]
        out_rank = op.outputs[0].rank
        if op.op_type == "expand_dims":
            expanded = expand_dims_rows(op.inputs["x"].rank, [int(axis) for axis in op.inputs["axes"].val], part.rows)
            assert expanded is not None, "the recipe checked the expand_dims"
            if not expanded[1]:
                return inputs["x"]
            inputs["axes"] = ops.const(np.array(expanded[1], dtype=np.int32), "int32")
        elif op.op_type == "reshape":
            shape = merged_shape(_shape(op.outputs[0]), part.rows, count)
            inputs["shape"] = ops.const(np.array(shape, dtype=np.int32), "int32")
        elif op.op_type == "tile":
            ((_, source),) = part.inputs
            repeated = isinstance(source, Whole)
            reps = merged_reps([int(rep) for rep in op.inputs["reps"].val], part.rows, count if repeated else None)
            inputs["reps"] = ops.const(np.array(reps, dtype=np.int32), "int32")
        else:
            inputs = {**_parameters(op, inputs), **inputs}
            if op.inputs.get("axis") is not None and op.op_type in ("quantize", "dequantize"):
                axis = merged_axis(int(op.inputs["axis"].val), out_rank, part.rows)
                # None: along the query rows, its scale and zero point cut with them
                inputs["axis"] = ops.const(part.rows[0] if axis is None else axis, "int32")
        builder: Callable[..., Var] = getattr(mb, op.op_type)
        return ops.op(builder, f"{name}_{op.outputs[0].name}", **inputs)

    def _reshaped(self, var: Var, shape: tuple[int, ...]) -> Var:
        """``var`` as ``shape``, made once per block (a constant is reshaped into a constant)."""
        if _shape(var) == tuple(shape):
            return var
        ops, name = self._ops, f"{var.name}_rows_merged"

        def reshape() -> Var:
            if var.val is not None:
                return ops.op(mb.const, name, val=np.reshape(var.val, shape))
            return ops.op(mb.reshape, name, x=var, shape=ops.const(np.array(shape, dtype=np.int32), "int32"))

        return ops.cached(("merged", id(var), shape), reshape)


class LazyPieces(Sequence[Var]):
    """``make(index)`` for each of ``count`` query pieces, made when first read."""

    def __init__(self, count: int, make: Callable[[int], Var]) -> None:
        self._count = count
        self._make = make
        self._made: dict[int, Var] = {}

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> Var: ...

    @overload
    def __getitem__(self, index: slice) -> list[Var]: ...

    def __getitem__(self, index: Union[int, slice]) -> Union[Var, list[Var]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._count))]
        if not -self._count <= index < self._count:
            raise IndexError(index)
        index %= self._count
        if index not in self._made:
            self._made[index] = self._make(index)
        return self._made[index]

    def __iter__(self) -> Iterator[Var]:
        return (self[index] for index in range(self._count))


def _parameters(op: Operation, inputs: dict[str, Any]) -> dict[str, Any]:
    """The inputs of ``op`` that are not tensor inputs of the recipe, as they are."""
    return {name: var for name, var in op.inputs.items() if name not in inputs}


def _shape(var: Var) -> tuple[int, ...]:
    return tuple(int(dim) for dim in var.shape)


def _rows(var: Var, rows: tuple[int, int]) -> int:
    return int(np.prod(_shape(var)[rows[0] : rows[1]]))
