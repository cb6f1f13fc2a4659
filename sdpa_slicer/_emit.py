"""Emitting: build the chunked subgraph of a site and swap it in, all or nothing.

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
full axis. Ops are added and swapped in through a ``SiteTransaction`` (``_transaction.py``),
the only code that mutates a program. Shared constants (axes, flags, the scale, split sizes,
converted masks, row pieces of masks) are made once per block and reused by every site; cuts
of keys and values are made per site, right before they are used.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Optional, Sequence

import numpy as np
from coremltools.converters.mil.mil import Block, Builder as mb, Operation, Var

from sdpa_slicer._graph import FLOAT_DTYPES, dtype_name
from sdpa_slicer._chunk_attention import ChunkAttention, ChunkedStep
from sdpa_slicer._match import FUSED, INTERLEAVED, TILED, AttentionSite, HeadGroups
from sdpa_slicer._plan import Chunk, SitePlan
from sdpa_slicer._transaction import EmitError, NameAllocator, SiteTransaction, failure_reason

def masked_score(dtype: str) -> float:
    """What a False entry of a bool mask adds to the scores: large, negative and finite.

    Half the dtype's range, so adding a score cannot overflow to -inf, and a row whose
    keys are all masked stays finite instead of becoming NaN.
    """
    return -float(np.finfo(FLOAT_DTYPES[dtype]).max) / 2


def additive_mask_values(mask: np.ndarray, dtype: str) -> np.ndarray:
    """A constant mask in the form the emitted ops would compute from it."""
    target = FLOAT_DTYPES[dtype]
    if mask.dtype == np.bool_:
        return np.where(mask, 0.0, masked_score(dtype)).astype(target)
    limit = -masked_score("fp16") if dtype == "fp16" else np.inf
    return np.clip(mask, -limit, limit).astype(target)


class BlockEmitter:
    """Rewrites the sites of one block. Use inside ``with block:``, sites in block order."""

    def __init__(self, block: Block, names: NameAllocator) -> None:
        self._block = block
        self._names = names
        self._cache: dict[Hashable, Any] = {}
        self._site_cache: dict[Hashable, Any] = {}
        self._transaction: Optional[SiteTransaction] = None
        self._replacements: dict[Var, Var] = {}

    def rewrite(self, site: AttentionSite, plan: SitePlan) -> Var:
        """Replace ``site`` by its chunked form and return the new output var.

        On any failure the ops emitted for this site are removed, the site's ops stay
        exactly as they were, and ``EmitError`` is raised from the original error.
        """
        old_output = site.output
        self._transaction = None
        self._site_cache = {}
        try:
            self._transaction = SiteTransaction(self._block, site.ops, self._names)
            new_output = self._build(site, plan)
            self._transaction.commit(new_output)
        except Exception as error:
            self._roll_back()
            raise EmitError(failure_reason(site.anchor, error)) from error
        finally:
            self._transaction = None
        self._replacements[old_output] = new_output
        return new_output

    def current(self, var: Var) -> Var:
        """``var``, or what replaced it when it was the output of a site rewritten earlier."""
        return self._replacements.get(var, var)

    def _build(self, site: AttentionSite, plan: SitePlan) -> Var:
        base = site.anchor.name
        dtype = dtype_name(site.query)
        heads = site.heads
        if heads is not None and plan.regrouped and site.kind == FUSED and site.key_transposed:
            # (A fold may leave the key as (..., E, S), which the fused op cannot read.)
            return self._regrouped_fused(site, heads)
        query = self.current(site.query)
        if site.scale is not None and site.scale != 1.0:
            query = self.op(mb.mul, f"{base}_scaled_query", x=query, y=self.scalar(site.scale, dtype))
        if heads is not None and plan.regrouped:
            regrouped = self._regrouped(query, heads, base)
            attention = ChunkAttention(self, site, dtype, self._steps(site, dtype, [None]))
            (output,) = attention.chunks([(f"{base}_0", regrouped, None)])
            return self._ungrouped(output, heads, base, site.output.shape)
        groups = [None] if heads is None else list(range(heads.repeats))
        names = [base if group is None else f"{base}_group{group}" for group in groups]
        rows = [
            self.split(f"{name}_query_chunk", self._heads_of(name, query, heads, group), plan.split_sizes)
            for name, group in zip(names, groups)
        ]
        # Chunk-major: the groups of one query chunk run one after another, so what they share
        # (a mask's rows cut to a key range) is alive only while they run.
        pieces = [
            (f"{names[group]}_{index}", rows[group][index], keys)
            for index, keys in enumerate(plan.key_chunks)
            for group in range(len(groups))
        ]
        outputs = ChunkAttention(self, site, dtype, self._steps(site, dtype, groups, plan)).chunks(pieces)
        joined = [
            self._concat(f"{name}_concat", outputs[group :: len(groups)], -2) for group, name in enumerate(names)
        ]
        if heads is None:
            return joined[0]
        return self._concat(f"{base}_heads", joined, -3, interleave=heads.layout == INTERLEAVED)

    def _steps(
        self, site: AttentionSite, dtype: str, groups: Sequence[Optional[int]], plan: Optional[SitePlan] = None
    ) -> list[ChunkedStep]:
        """The site's score steps, each operand cut per query piece: by group (when it has a full
        head axis), then by the plan's row chunks (when it has a full L axis)."""
        base = site.anchor.name
        chunked = []
        for step in site.steps:
            operands = []
            for name, var in step.operands:
                var = self.current(var)
                if step.is_mask:
                    var = self._additive_mask(var, dtype, base)
                per_group = [
                    self._row_pieces(f"{base}_{name}_chunk", self._heads_of(f"{base}_{name}_group{group}", var, site.heads, group), plan)
                    if plan
                    else (var,)
                    for group in groups
                ]
                operands.append((name, tuple(piece for chunk in zip(*per_group) for piece in chunk)))
            chunked.append(ChunkedStep(step, "masked_scores" if step.op is None else step.op.name, tuple(operands)))
        return chunked

    def _heads_of(self, name: str, x: Var, heads: Optional[HeadGroups], group: Optional[int]) -> Var:
        """The query heads of ``group`` in ``x`` (a query, or an operand with a full head axis)."""
        if heads is None or group is None or x.rank < 3 or x.shape[-3] != heads.kv_heads * heads.repeats:
            return x
        start, end, stride = heads.query_heads(group)
        return self.cut(name, x, -3, (start, end), stride)

    def _regrouped(self, query: Var, heads: HeadGroups, base: str) -> Var:
        """``(..., H, L, E)`` as ``(..., KVH, r * L, E)``: the query heads of each KV head stacked as rows."""
        if heads.layout == TILED and heads.kv_heads > 1:
            query = self.op(mb.gather, f"{base}_query_by_kv_head", x=query, indices=self._head_order(heads), axis=-3)
        *batch, _, length, width = query.shape
        shape = np.array([*batch, heads.kv_heads, heads.repeats * length, width], dtype=np.int32)
        return self.op(mb.reshape, f"{base}_grouped_query", x=query, shape=self.const(shape, "int32"))

    def _ungrouped(self, output: Var, heads: HeadGroups, base: str, shape: Sequence[Any]) -> Var:
        """The inverse of ``_regrouped``, for the output ``(..., KVH, r * L, EV)``."""
        target = np.array([int(dim) for dim in shape], dtype=np.int32)
        output = self.op(mb.reshape, f"{base}_heads", x=output, shape=self.const(target, "int32"))
        if heads.layout == TILED and heads.kv_heads > 1:
            order = np.argsort(self._head_order(heads).val).astype(np.int32)
            output = self.op(mb.gather, f"{base}_heads_in_order", x=output, indices=self.const(order, "int32"), axis=-3)
        return output

    def _head_order(self, heads: HeadGroups) -> Var:
        """Query heads ordered by the KV head they read (for the tiled layout, where they are not)."""
        order = [repeat * heads.kv_heads + kv_head for kv_head in range(heads.kv_heads) for repeat in range(heads.repeats)]
        return self.const(np.array(order, dtype=np.int32), "int32")

    def _regrouped_fused(self, site: AttentionSite, heads: HeadGroups) -> Var:
        """One fused op over the un-repeated keys and values, the query heads grouped as rows."""
        base = site.anchor.name
        query = self._regrouped(self.current(site.query), heads, base)
        inputs = {"query": query, "key": self.current(site.key), "value": self.current(site.value)}
        if site.steps:
            ((_, mask),) = site.steps[0].operands
            inputs["attn_mask"] = self.current(mask)
        output = self.op(mb.scaled_dot_product_attention, f"{base}_grouped", **inputs)
        return self._ungrouped(output, heads, base, site.output.shape)

    def _concat(self, name: str, values: Sequence[Var], axis: int, interleave: bool = False) -> Var:
        if len(values) == 1:
            return values[0]
        return self.op(
            mb.concat, name, values=tuple(values), axis=self.const(axis, "int32"), interleave=self.const(interleave, "bool")
        )

    def _row_pieces(self, name: str, var: Var, plan: SitePlan) -> tuple[Var, ...]:
        """``var`` cut into the query chunks' rows when it has a full L axis; else whole, per chunk."""
        length = plan.query_chunks[-1][1]
        if plan.num_chunks == 1 or var.rank < 2 or length == 1 or var.shape[-2] != length:
            return (var,) * plan.num_chunks
        sizes = plan.split_sizes

        def split() -> tuple[Var, ...]:
            if var.val is None:
                return self.split(name, var, sizes)
            pieces = np.split(var.val, np.cumsum(sizes)[:-1], axis=-2)
            return tuple(self.op(mb.const, f"{name}_{index}", val=piece) for index, piece in enumerate(pieces))

        return self._cached(self._cache, ("split", id(var), sizes), split)

    def op(self, builder: Callable[..., Any], name: str, **inputs: Any) -> Any:
        """Add one op right before the anchor of the site being rewritten."""
        assert self._transaction is not None, "ops are only added while a site is rewritten"
        return self._transaction.add(builder, name, **inputs)

    def split(self, name: str, x: Var, sizes: Sequence[int]) -> tuple[Var, ...]:
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

    def cut(self, name: str, x: Var, axis: int, span: Chunk, stride: int = 1) -> Var:
        """``x`` cut to ``span`` (every ``stride``-th index) along ``axis`` (negative), once per
        site; a constant is cut into a constant (once per block)."""
        start, end = span
        key = ("cut", id(x), axis, span, stride)
        if x.val is not None:
            index = [slice(None)] * x.rank
            index[axis] = slice(start, end, stride)
            value = np.ascontiguousarray(x.val[tuple(index)])
            return self._cached(self._cache, key, lambda: self.op(mb.const, name, val=value))
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
        return self._cached(self._site_cache, key, make)

    def _strided_cut(self, name: str, x: Var, axis: int, span: Chunk, stride: int) -> Var:
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

    def _additive_mask(self, mask: Var, dtype: str, base: str) -> Var:
        """The mask as values to add to the scores, in the scores' dtype; folded when constant."""
        mask_dtype = dtype_name(mask)
        if mask_dtype == dtype:
            return mask

        def convert() -> Var:
            if mask.val is not None:
                return self.op(mb.const, f"{base}_mask_additive", val=additive_mask_values(mask.val, dtype))
            if mask_dtype == "bool":
                ones = self.op(mb.cast, f"{base}_mask_as_float", x=mask, dtype=self.const(dtype, "str"))
                kept_as_zero = self.op(mb.sub, f"{base}_mask_minus_one", x=ones, y=self.scalar(1.0, dtype))
                return self.op(mb.mul, f"{base}_mask_additive", x=kept_as_zero, y=self.scalar(-masked_score(dtype), dtype))
            source = mask
            if dtype == "fp16":
                limit = -masked_score("fp16")
                source = self.op(
                    mb.clip,
                    f"{base}_mask_clipped",
                    x=mask,
                    alpha=self.scalar(-limit, mask_dtype),
                    beta=self.scalar(limit, mask_dtype),
                )
            return self.op(mb.cast, f"{base}_mask_cast", x=source, dtype=self.const(dtype, "str"))

        return self._cached(self._cache, ("additive_mask", id(mask), dtype), convert)

    def scalar(self, value: float, dtype: str) -> Var:
        return self.const(FLOAT_DTYPES[dtype](value), dtype)

    def const(self, value: Any, kind: str) -> Var:
        key = ("const", kind, _hashable(value))
        return self._cached(self._cache, key, lambda: self.op(mb.const, f"sdpa_slicer_{kind}_const", val=value))

    @staticmethod
    def _cached(cache: dict[Hashable, Any], key: Hashable, make: Callable[[], Any]) -> Any:
        if key not in cache:
            cache[key] = make()
        return cache[key]

    def _roll_back(self) -> None:
        """Remove the ops of the failed site's transaction, and forget the shared values they made."""
        if self._transaction is None:
            return
        removed = set(self._transaction.roll_back())
        self._cache = {key: value for key, value in self._cache.items() if _made_by(value) not in removed}


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
