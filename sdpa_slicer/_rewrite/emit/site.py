"""Emitting: build the chunked subgraph of each site of a block and swap it in, all or nothing.

For a site with a mask that has an L axis, in three chunks::

    before                                   after
    ------                                   -----
    %out = scaled_dot_product_attention(     %qs            = mul(%q, 1/sqrt(E))
        %q, %k, %v, %m)                      %q0, %q1, %q2  = split(%qs, axis=-2)
                                             %m0, %m1, %m2  = split(%m_additive, axis=-2)
                                             %s0 = matmul(%q0, %k, transpose_y=True)
                                             %a0 = add(%s0, %m0)
                                             %p0 = softmax(%a0, axis=-1)
                                             %o0 = matmul(%p0, %v)
                                             ...  (same for chunks 1 and 2)
                                             %out = concat(%o0, %o1, %o2, axis=-2)

A written-out chain's score steps (``tanh``, ``add``, ``select``, ...) are applied to each
chunk's scores in the same way, each operand cut to the chunk's rows (and keys) where it has a
full axis. An operand as large as the scores that the program makes from smaller tensors (SAM's
relative-position bias) is instead built per chunk from them, right after the chunk's scores
(``operands.py``), so that it is never made at full size. ``BlockRewriter`` takes the sites
of one block in order, each with the inputs that earlier rewrites replaced; ``SiteLayout``
lays out one site: the query and operand cuts, head groups and joins, around
``ChunkAttention`` (``chunks.py``), the attention of each chunk. Every op is added through an
``OpBuilder`` (``ops.py``), whose ``SiteTransaction`` is the only code that changes the graph.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import attrs
import numpy as np
from coremltools.converters.mil.mil import Block, Var
from coremltools.converters.mil.mil import Builder as mb

from sdpa_slicer._errors import EmitError, failure_reason
from sdpa_slicer._graph import dtype_name
from sdpa_slicer._rewrite.emit.chunks import ChunkAttention, ChunkedOperand, ChunkedStep
from sdpa_slicer._rewrite.emit.masks import additive_mask
from sdpa_slicer._rewrite.emit.operands import LazyPieces, OperandChunks
from sdpa_slicer._rewrite.emit.ops import OpBuilder
from sdpa_slicer._rewrite.emit.transaction import NameAllocator
from sdpa_slicer._rewrite.plan.planning import SitePlan
from sdpa_slicer._rewrite.recipes import OperandRecipe, is_scores_sized, operand_recipe
from sdpa_slicer._rewrite.sites import INTERLEAVED, TILED, AttentionSite, HeadGroups, ScoreStep


class BlockRewriter:
    """Rewrites the sites of one block. Use inside ``with block:``, sites in block order."""

    def __init__(self, block: Block, names: NameAllocator) -> None:
        self._ops = OpBuilder(block, names)
        self._replacements: dict[Var, Var] = {}

    def rewrite(self, site: AttentionSite, plan: SitePlan) -> Var:
        """Replace ``site`` by its chunked form and return the new output var.

        On any failure the ops emitted for this site are removed, the site's ops stay
        exactly as they were, and ``EmitError`` is raised from the original error.
        """
        old_output = site.output
        try:
            self._ops.begin(site.ops)
            new_output = SiteLayout(self._ops, self._resolved(site), plan).build()
            self._ops.commit(new_output)
        except Exception as error:
            self._ops.roll_back()
            raise EmitError(failure_reason(site.anchor, error)) from error
        self._replacements[old_output] = new_output
        return new_output

    def _resolved(self, site: AttentionSite) -> AttentionSite:
        """``site`` reading what replaced each of its inputs that an earlier site of the block produced."""
        current = self._replacements.get

        def resolved(steps: tuple[ScoreStep, ...]) -> tuple[ScoreStep, ...]:
            return tuple(
                attrs.evolve(step, operands=tuple((name, current(var, var)) for name, var in step.operands))
                for step in steps
            )

        return attrs.evolve(
            site,
            query=current(site.query, site.query),
            key=current(site.key, site.key),
            value=current(site.value, site.value),
            steps=resolved(site.steps),
            weight_steps=resolved(site.weight_steps),
        )


class SiteLayout:
    """The chunked form of one site, as ops: the query split into chunks (per group of query
    heads when its keys and values are read un-repeated), each operand cut alike, the attention
    of each chunk, and the joins."""

    def __init__(self, ops: OpBuilder, site: AttentionSite, plan: SitePlan) -> None:
        self.ops = ops
        self.site = site
        self.plan = plan
        self._base = site.anchor.name
        self._dtype = dtype_name(site.query)

    def build(self) -> Var:
        """The new output of the site."""
        site, plan, ops, base = self.site, self.plan, self.ops, self._base
        heads = site.heads
        if heads is not None and plan.regrouped and not site.written_out and site.key_transposed:
            # (A fold may leave the key as (..., E, S), which the fused op cannot read.)
            return self._regrouped_fused(heads)
        query = site.query
        if site.scale is not None and site.scale != 1.0 and not site.scale_steps:
            query = ops.op(mb.mul, f"{base}_scaled_query", x=query, y=ops.scalar(site.scale, self._dtype))
        if heads is not None and plan.regrouped:
            regrouped = self._regrouped(query, heads)
            (output,) = self._attention([None]).chunks([(f"{base}_0", regrouped, None)])
            return self._ungrouped(output, heads)
        groups = [None] if heads is None else list(range(heads.repeats))
        names = [base if group is None else f"{base}_group{group}" for group in groups]
        rows = [
            ops.split(f"{name}_query_chunk", self._heads_of(name, query, group), plan.split_sizes)
            for name, group in zip(names, groups)
        ]
        # Chunk-major: the groups of one query chunk run one after another, so what they share
        # (a mask's rows cut to a key range) is alive only while they run.
        pieces = [
            (f"{names[group]}_{index}", rows[group][index], keys)
            for index, keys in enumerate(plan.key_chunks)
            for group in range(len(groups))
        ]
        outputs = self._attention(groups, chunked=True).chunks(pieces)
        joined = [ops.concat(f"{name}_concat", outputs[group :: len(groups)], -2) for group, name in enumerate(names)]
        if heads is None:
            return joined[0]
        return ops.concat(f"{base}_heads", joined, -3, interleave=heads.layout == INTERLEAVED)

    def _attention(self, groups: Sequence[Optional[int]], chunked: bool = False) -> ChunkAttention:
        site = self.site
        steps = [self._chunked_step(step, groups, chunked) for step in (*site.scale_steps, *site.steps)]
        weight_steps = [self._chunked_step(step, groups, chunked) for step in site.weight_steps]
        return ChunkAttention(
            self.ops, self._base, site.key, site.key_transposed, site.value, self._dtype, steps, weight_steps
        )

    def _chunked_step(self, step: ScoreStep, groups: Sequence[Optional[int]], chunked: bool) -> ChunkedStep:
        """``step`` with each operand cut per query piece: by group (when it has a full head axis),
        then, when ``chunked``, by the plan's row chunks (when it has a full L axis)."""
        base = self._base
        operands = []
        for name, var in step.operands:
            rebuilt = self._rebuilt_pieces(step, name, var, groups) if chunked else None
            if rebuilt is not None:
                operands.append(ChunkedOperand(name, rebuilt, step.operand_axis(name, var, -1)))
                continue
            if step.is_mask:
                var = additive_mask(self.ops, var, self._dtype, base)
            heads_axis, rows_axis = (step.operand_axis(name, var, axis) for axis in (-3, -2))
            per_group = [
                self._row_pieces(
                    f"{base}_{name}_chunk",
                    self._heads_of(f"{base}_{name}_group{group}", var, group, heads_axis),
                    rows_axis,
                )
                if chunked
                else (var,)
                for group in groups
            ]
            pieces = tuple(piece for chunk in zip(*per_group) for piece in chunk)
            operands.append(ChunkedOperand(name, pieces, step.operand_axis(name, var, -1)))
        return ChunkedStep(step, "masked_scores" if step.op is None else step.op.name, tuple(operands))

    def _rebuilt_pieces(
        self, step: ScoreStep, name: str, var: Var, groups: Sequence[Optional[int]]
    ) -> Optional[LazyPieces]:
        """The pieces of an operand as large as the scores built per query chunk from its recipe
        (``emit/operands.py``), each right before its chunk reads it; ``None`` when it has none."""
        plan, site = self.plan, self.site
        if plan.num_chunks == 1 or var.val is not None or step.along_axis(name, var):
            return None
        if not is_scores_sized(var.shape, site.scores_shape):
            return None
        recipe = operand_recipe(var, site.block, site.ops)
        if not isinstance(recipe, OperandRecipe):
            return None
        base = self._base
        chunks = OperandChunks(self.ops, recipe, plan.query_chunks, base)
        heads_axis = step.operand_axis(name, var, -3)

        def piece(index: int) -> Var:
            chunk, group = divmod(index, len(groups))
            rows = chunks.piece(chunk)
            if step.is_mask:
                rows = additive_mask(self.ops, rows, self._dtype, f"{base}_{chunk}")
            return self._heads_of(f"{base}_{chunk}_{name}_group{groups[group]}", rows, groups[group], heads_axis)

        return LazyPieces(plan.num_chunks * len(groups), piece)

    def _heads_of(self, name: str, x: Var, group: Optional[int], axis: Optional[int] = -3) -> Var:
        """The query heads of ``group`` in ``x`` (a query, or an operand whose ``axis`` is a full head axis)."""
        heads = self.site.heads
        if heads is None or group is None or axis is None or x.rank < -axis:
            return x
        if x.shape[axis] != heads.kv_heads * heads.repeats:
            return x
        start, end, stride = heads.query_heads(group)
        return self.ops.cut(name, x, axis, (start, end), stride)

    def _row_pieces(self, name: str, var: Var, axis: Optional[int]) -> tuple[Var, ...]:
        """``var`` cut into the query chunks' rows when its ``axis`` is a full L axis; else whole, per chunk."""
        plan, ops = self.plan, self.ops
        length = plan.query_chunks[-1][1]
        if plan.num_chunks == 1 or axis is None or length == 1 or var.shape[axis] != length:
            return (var,) * plan.num_chunks
        sizes = plan.split_sizes

        def split() -> tuple[Var, ...]:
            if var.val is None:
                return ops.split(name, var, sizes)
            pieces = np.split(var.val, np.cumsum(sizes)[:-1], axis=axis)
            return tuple(ops.op(mb.const, f"{name}_{index}", val=piece) for index, piece in enumerate(pieces))

        return ops.cached(("split", id(var), sizes), split)

    def _regrouped(self, query: Var, heads: HeadGroups) -> Var:
        """``(..., H, L, E)`` as ``(..., KVH, r * L, E)``: the query heads of each KV head stacked as rows."""
        ops, base = self.ops, self._base
        if heads.layout == TILED and heads.kv_heads > 1:
            query = ops.op(mb.gather, f"{base}_query_by_kv_head", x=query, indices=self._head_order(heads), axis=-3)
        *batch, _, length, width = query.shape
        shape = np.array([*batch, heads.kv_heads, heads.repeats * length, width], dtype=np.int32)
        return ops.op(mb.reshape, f"{base}_grouped_query", x=query, shape=ops.const(shape, "int32"))

    def _ungrouped(self, output: Var, heads: HeadGroups) -> Var:
        """The inverse of ``_regrouped``, for the output ``(..., KVH, r * L, EV)``."""
        ops, base = self.ops, self._base
        target = np.array([int(dim) for dim in self.site.output.shape], dtype=np.int32)
        output = ops.op(mb.reshape, f"{base}_heads", x=output, shape=ops.const(target, "int32"))
        if heads.layout == TILED and heads.kv_heads > 1:
            order = np.argsort(self._head_order(heads).val).astype(np.int32)
            output = ops.op(mb.gather, f"{base}_heads_in_order", x=output, indices=ops.const(order, "int32"), axis=-3)
        return output

    def _head_order(self, heads: HeadGroups) -> Var:
        """Query heads ordered by the KV head they read (for the tiled layout, where they are not)."""
        order = [
            repeat * heads.kv_heads + kv_head for kv_head in range(heads.kv_heads) for repeat in range(heads.repeats)
        ]
        return self.ops.const(np.array(order, dtype=np.int32), "int32")

    def _regrouped_fused(self, heads: HeadGroups) -> Var:
        """One fused op over the un-repeated keys and values, the query heads grouped as rows."""
        site = self.site
        query = self._regrouped(site.query, heads)
        inputs: dict[str, Any] = {"query": query, "key": site.key, "value": site.value}
        if site.steps:
            ((_, mask),) = site.steps[0].operands
            inputs["attn_mask"] = mask
        output = self.ops.op(mb.scaled_dot_product_attention, f"{self._base}_grouped", **inputs)
        return self._ungrouped(output, heads)
