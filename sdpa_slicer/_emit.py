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

Ops are added and swapped in through a ``SiteTransaction`` (``_transaction.py``), the only
code that mutates a program. Shared constants (axes, flags, the scale, split sizes,
converted masks) are made once per block and reused by every site.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Optional

import numpy as np
from coremltools.converters.mil.mil import Block, Builder as mb, Operation, Var

from sdpa_slicer._match import AttentionSite, dtype_name
from sdpa_slicer._plan import SitePlan
from sdpa_slicer._transaction import EmitError, NameAllocator, SiteTransaction, failure_reason

NUMPY_DTYPES: dict[str, type[np.floating]] = {"fp16": np.float16, "fp32": np.float32}


def masked_score(dtype: str) -> float:
    """What a False entry of a bool mask adds to the scores: large, negative and finite.

    Half the dtype's range, so adding a score cannot overflow to -inf, and a row whose
    keys are all masked stays finite instead of becoming NaN.
    """
    return -float(np.finfo(NUMPY_DTYPES[dtype]).max) / 2


def additive_mask_values(mask: np.ndarray, dtype: str) -> np.ndarray:
    """A constant mask in the form the emitted ops would compute from it."""
    target = NUMPY_DTYPES[dtype]
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
        self._transaction: Optional[SiteTransaction] = None
        self._replacements: dict[Var, Var] = {}

    def rewrite(self, site: AttentionSite, plan: SitePlan) -> Var:
        """Replace ``site`` by its chunked form and return the new output var.

        On any failure the ops emitted for this site are removed, the site's ops stay
        exactly as they were, and ``EmitError`` is raised from the original error.
        """
        old_output = site.output
        self._transaction = None
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

    def _current(self, var: Var) -> Var:
        """``var``, or what replaced it when it was the output of a site rewritten earlier."""
        return self._replacements.get(var, var)

    def _build(self, site: AttentionSite, plan: SitePlan) -> Var:
        base = site.anchor.name
        dtype = dtype_name(site.query)
        query = self._current(site.query)
        if site.scale is not None and site.scale != 1.0:
            query = self._op(mb.mul, f"{base}_scaled_query", x=query, y=self._scalar(site.scale, dtype))
        query_chunks = self._split(f"{base}_query_chunk", query, plan.split_sizes)

        mask_chunks: list[Optional[Var]] = [None] * plan.num_chunks
        may_hold_minus_inf = False
        if site.mask is not None:
            mask = self._current(site.mask)
            additive = self._additive_mask(mask, dtype, base)
            may_hold_minus_inf = additive is mask and (mask.val is None or bool(np.isneginf(mask.val).any()))
            if plan.slice_mask_rows:
                mask_chunks = list(self._cached_split(f"{base}_mask_chunk", additive, plan.split_sizes))
            else:
                mask_chunks = [additive] * plan.num_chunks

        attend = _ChunkAttention(
            self, site, self._current(site.key), self._current(site.value), dtype, may_hold_minus_inf
        )
        outputs = [
            attend(f"{base}_{index}", query_chunk, mask_chunk, keys)
            for index, (query_chunk, mask_chunk, keys) in enumerate(zip(query_chunks, mask_chunks, plan.key_chunks))
        ]
        if len(outputs) == 1:
            return outputs[0]
        return self._op(
            mb.concat,
            f"{base}_concat",
            values=tuple(outputs),
            axis=self._const(-2, "int32"),
            interleave=self._const(False, "bool"),
        )

    def _op(self, builder: Callable[..., Any], name: str, **inputs: Any) -> Any:
        """Add one op right before the anchor of the site being rewritten."""
        assert self._transaction is not None, "ops are only added while a site is rewritten"
        return self._transaction.add(builder, name, **inputs)

    def _split(self, name: str, x: Var, sizes: tuple[int, ...]) -> tuple[Var, ...]:
        if len(sizes) == 1:
            return (x,)
        outputs = self._op(
            mb.split,
            name,
            x=x,
            split_sizes=self._const(np.array(sizes, dtype=np.int32), "int32"),
            axis=self._const(-2, "int32"),
        )
        return tuple(outputs)

    def _columns(self, name: str, x: Var, axis: int, start: int, end: int) -> Var:
        """``x`` cut to ``[start, end)`` along ``axis`` (negative), once per block; a constant
        is cut into a constant."""

        def cut() -> Var:
            if x.val is not None:
                index = [slice(None)] * x.rank
                index[axis] = slice(start, end)
                return self._op(mb.const, name, val=np.ascontiguousarray(x.val[tuple(index)]))
            begin = np.zeros(x.rank, dtype=np.int32)
            size = np.full(x.rank, -1, dtype=np.int32)
            begin[axis] = start
            size[axis] = end - start
            return self._op(
                mb.slice_by_size, name, x=x, begin=self._const(begin, "int32"), size=self._const(size, "int32")
            )

        return self._cached(("columns", id(x), axis, start, end), cut)

    def _cached_split(self, name: str, x: Var, sizes: tuple[int, ...]) -> tuple[Var, ...]:
        """Split ``x`` into rows once per block; a constant is split into constants."""

        def split() -> tuple[Var, ...]:
            if x.val is None:
                return self._split(name, x, sizes)
            pieces = np.split(x.val, np.cumsum(sizes)[:-1], axis=-2)
            return tuple(self._op(mb.const, f"{name}_{index}", val=piece) for index, piece in enumerate(pieces))

        return self._cached(("split", id(x), sizes), split)

    def _additive_mask(self, mask: Var, dtype: str, base: str) -> Var:
        """The mask as values to add to the scores, in the scores' dtype; folded when constant."""
        mask_dtype = dtype_name(mask)
        if mask_dtype == dtype:
            return mask

        def convert() -> Var:
            if mask.val is not None:
                return self._op(mb.const, f"{base}_mask_additive", val=additive_mask_values(mask.val, dtype))
            if mask_dtype == "bool":
                ones = self._op(mb.cast, f"{base}_mask_as_float", x=mask, dtype=self._const(dtype, "str"))
                kept_as_zero = self._op(mb.sub, f"{base}_mask_minus_one", x=ones, y=self._scalar(1.0, dtype))
                return self._op(mb.mul, f"{base}_mask_additive", x=kept_as_zero, y=self._scalar(-masked_score(dtype), dtype))
            source = mask
            if dtype == "fp16":
                limit = -masked_score("fp16")
                source = self._op(
                    mb.clip,
                    f"{base}_mask_clipped",
                    x=mask,
                    alpha=self._scalar(-limit, mask_dtype),
                    beta=self._scalar(limit, mask_dtype),
                )
            return self._op(mb.cast, f"{base}_mask_cast", x=source, dtype=self._const(dtype, "str"))

        return self._cached(("additive_mask", id(mask), dtype), convert)

    def _scalar(self, value: float, dtype: str) -> Var:
        return self._const(NUMPY_DTYPES[dtype](value), dtype)

    def _const(self, value: Any, kind: str) -> Var:
        key = ("const", kind, _hashable(value))
        return self._cached(key, lambda: self._op(mb.const, f"sdpa_slicer_{kind}_const", val=value))

    def _cached(self, key: Hashable, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def _roll_back(self) -> None:
        """Remove the ops of the failed site's transaction, and forget the shared values they made."""
        if self._transaction is None:
            return
        removed = set(self._transaction.roll_back())
        self._cache = {key: value for key, value in self._cache.items() if _made_by(value) not in removed}


class _ChunkAttention:
    """Builds the attention of one query chunk over the keys its plan gives it.

    One key range (all keys, or the range a constant mask leaves visible)::

        %s = matmul(%q_i, %k[range], transpose_y=...)  -> add(%mask_i[range]) -> softmax -> matmul(%v[range])

    Several key ranges: an online softmax (running max ``m``, running sum ``l``, rescaled
    accumulator ``acc``), so no tensor exceeds one query chunk by one key chunk::

        %s_j   = matmul(%q_i, %k_j) + %mask_ij
        %m_j   = maximum(%m_{j-1}, reduce_max(%s_j))
        %p_j   = exp(%s_j - %m_j)
        %a_j   = exp(%m_{j-1} - %m_j)
        %l_j   = %l_{j-1} * %a_j + reduce_sum(%p_j)
        %acc_j = %acc_{j-1} * %a_j + matmul(%p_j, %v_j)
        %out_i = real_div(%acc_last, %l_last)
    """

    def __init__(
        self, emitter: BlockEmitter, site: AttentionSite, key: Var, value: Var, dtype: str, may_hold_minus_inf: bool
    ) -> None:
        self._emit = emitter
        self._site = site
        self._key = key
        self._value = value
        self._dtype = dtype
        self._may_hold_minus_inf = may_hold_minus_inf

    def __call__(self, name: str, query: Var, mask: Optional[Var], keys: Optional[tuple[tuple[int, int], ...]]) -> Var:
        if keys is None or len(keys) == 1:
            columns = None if keys is None else keys[0]
            scores = self._scores(name, query, mask, columns)
            weights = self._emit._op(mb.softmax, f"{name}_weights", x=scores, axis=self._axis(-1))
            return self._matmul(f"{name}_chunk", weights, self._values(columns))
        return self._online_softmax(name, query, mask, keys)

    def _scores(self, name: str, query: Var, mask: Optional[Var], columns: Optional[tuple[int, int]]) -> Var:
        """``query @ key^T (+ mask)`` over the keys in ``columns`` (all keys if ``None``)."""
        emit = self._emit
        key = self._key
        if columns is not None:
            start, end = columns
            key_axis = -2 if self._site.key_transposed else -1
            key = emit._columns(f"{self._site.anchor.name}_key_{start}_{end}", key, key_axis, start, end)
            if mask is not None and mask.shape[-1] != 1:
                mask = emit._columns(f"{name}_mask_{start}_{end}", mask, -1, start, end)
        scores = emit._op(
            mb.matmul,
            f"{name}_scores",
            x=query,
            y=key,
            transpose_x=emit._const(False, "bool"),
            transpose_y=emit._const(self._site.key_transposed, "bool"),
        )
        if mask is None:
            return scores
        return emit._op(mb.add, f"{name}_masked_scores", x=scores, y=mask)

    def _values(self, columns: Optional[tuple[int, int]]) -> Var:
        """The values of the keys in ``columns``. Cut only when needed, after the scores: a cut is
        a new tensor, and it need not be alive while the scores are."""
        if columns is None:
            return self._value
        start, end = columns
        return self._emit._columns(f"{self._site.anchor.name}_value_{start}_{end}", self._value, -2, start, end)

    def _online_softmax(
        self, name: str, query: Var, mask: Optional[Var], keys: tuple[tuple[int, int], ...]
    ) -> Var:
        emit = self._emit
        running_max = running_sum = accumulator = None
        for index, columns in enumerate(keys):
            step = f"{name}_keys{index}"
            scores = self._scores(step, query, mask, columns)
            piece_max = self._reduce(mb.reduce_max, f"{step}_max", scores)
            if running_max is None:
                new_max = piece_max
                if self._may_hold_minus_inf:
                    # A row whose keys are all -inf so far would give exp(-inf - -inf) = NaN.
                    lowest = float(np.finfo(NUMPY_DTYPES[self._dtype]).min)
                    new_max = emit._op(mb.maximum, f"{step}_max_floor", x=piece_max, y=emit._scalar(lowest, self._dtype))
            else:
                new_max = emit._op(mb.maximum, f"{step}_running_max", x=running_max, y=piece_max)
            probabilities = emit._op(
                mb.exp, f"{step}_exp", x=emit._op(mb.sub, f"{step}_shifted", x=scores, y=new_max)
            )
            piece_sum = self._reduce(mb.reduce_sum, f"{step}_sum", probabilities)
            piece_out = self._matmul(f"{step}_out", probabilities, self._values(columns))
            if running_max is None:
                running_sum, accumulator = piece_sum, piece_out
            else:
                rescale = emit._op(
                    mb.exp, f"{step}_rescale", x=emit._op(mb.sub, f"{step}_max_change", x=running_max, y=new_max)
                )
                running_sum = emit._op(
                    mb.add,
                    f"{step}_running_sum",
                    x=emit._op(mb.mul, f"{step}_old_sum", x=running_sum, y=rescale),
                    y=piece_sum,
                )
                accumulator = emit._op(
                    mb.add,
                    f"{step}_accumulated",
                    x=emit._op(mb.mul, f"{step}_old_out", x=accumulator, y=rescale),
                    y=piece_out,
                )
            running_max = new_max
        return emit._op(mb.real_div, f"{name}_chunk", x=accumulator, y=running_sum)

    def _reduce(self, reduction: Callable[..., Var], name: str, x: Var) -> Var:
        emit = self._emit
        return emit._op(
            reduction,
            name,
            x=x,
            axes=emit._const(np.array([-1], dtype=np.int32), "int32"),
            keep_dims=emit._const(True, "bool"),
        )

    def _matmul(self, name: str, weights: Var, value: Var) -> Var:
        false = self._emit._const(False, "bool")
        return self._emit._op(mb.matmul, name, x=weights, y=value, transpose_x=false, transpose_y=false)

    def _axis(self, axis: int) -> Var:
        return self._emit._const(axis, "int32")


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
