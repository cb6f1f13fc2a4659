"""hypothesis strategies: attention problems and slicing configurations."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from hypothesis import strategies as st

from attention_cases import MASKED_FLOAT, NUMPY_DTYPES, AttentionCase, MaskCase
from programs import (
    LEVEL_DTYPES,
    MODIFIER_OPS,
    QUANTIZED,
    REPEAT_FORMS,
    UNARY_MODIFIERS,
    DecomposedForm,
    GroupedCase,
    Modifier,
    QuantizedPair,
    ScoreChain,
)
from sdpa_slicer import SliceConfig

DTYPES = ("fp16", "fp32")
MASK_DTYPES = ("bool", "fp16", "fp32")


@st.composite
def mask_cases(draw: st.DrawFn, scores_shape: tuple[int, ...]) -> MaskCase:
    """A mask of any rank up to the scores' rank; each dim but S is full or broadcast (1)."""
    rank = draw(st.integers(1, len(scores_shape)))
    dims = scores_shape[-rank:]
    shape = tuple(draw(st.sampled_from(sorted({1, dim}))) for dim in dims[:-1]) + (dims[-1],)
    return MaskCase(dtype=draw(st.sampled_from(MASK_DTYPES)), shape=shape)


@st.composite
def attention_cases(
    draw: st.DrawFn,
    max_length: int = 40,
    max_dim: int = 12,
    dynamic_key: bool = True,
    masks: bool = True,
    mask_dtype_follows: bool = False,
) -> AttentionCase:
    """Rank 3 to 5, any L, S, E, EV (L rarely divisible by the chunk), fp16 or fp32, any mask;
    with ``mask_dtype_follows`` the mask has the attention dtype, as an ``add`` needs."""
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    query_length = draw(st.integers(1, max_length))
    key_length = draw(st.integers(1, max_length))
    dtype = draw(st.sampled_from(DTYPES))
    mask = draw(st.none() | mask_cases(batch + (query_length, key_length))) if masks else None
    if mask is not None and mask_dtype_follows:
        mask = MaskCase(dtype=dtype, shape=mask.shape)
    return AttentionCase(
        batch=batch,
        query_length=query_length,
        key_length=key_length,
        head_dim=draw(st.integers(1, max_dim)),
        value_dim=draw(st.integers(1, max_dim)),
        dtype=dtype,
        mask=mask,
        dynamic_key=dynamic_key and draw(st.booleans()),
    )


@st.composite
def slice_configs(draw: st.DrawFn, case: AttentionCase) -> SliceConfig:
    """A config that rewrites ``case``: explicit chunk rows or count, or a scores budget, with
    or without key chunking and pruning."""
    length = case.query_length
    options = draw(key_options(case))
    policy = draw(st.sampled_from(("chunk_size", "num_chunks", "max_scores_bytes")))
    if policy == "chunk_size":
        options["chunk_size"] = draw(st.integers(1, length + 2))
    elif policy == "num_chunks":
        options["num_chunks"] = draw(st.integers(1, length + 2))
    else:
        itemsize = 2 if case.dtype == "fp16" else 4
        scores_bytes = math.prod(case.batch) * length * case.key_length * itemsize
        options["max_scores_bytes"] = draw(st.integers(1, 2 * scores_bytes))
        options["min_query_chunk"] = draw(st.integers(1, 16))
    return SliceConfig(min_seq_length=1, **options)


@st.composite
def key_options(draw: st.DrawFn, case: AttentionCase) -> dict:
    """Optional key chunking and key pruning settings."""
    kv_chunk_size = draw(st.none() | st.integers(1, case.key_length + 2))
    return {"kv_chunk_size": kv_chunk_size, "prune_masked_keys": draw(st.booleans())}


@st.composite
def constant_masks(draw: st.DrawFn, case: AttentionCase) -> np.ndarray:
    """Causal (offset for S != L), sliding-window or random masks, bool or float, for ``case``."""
    rows, columns = np.indices((case.query_length, case.key_length))
    offset = case.key_length - case.query_length
    kind = draw(st.sampled_from(("causal", "window", "random")))
    if kind == "causal":
        visible = columns <= rows + offset
    elif kind == "window":
        width = draw(st.integers(1, case.key_length))
        visible = (columns <= rows + offset) & (columns > rows + offset - width)
    else:
        seed = draw(st.integers(0, 2**32 - 1))
        visible = np.random.default_rng(seed).random((case.query_length, case.key_length)) < 0.5
    dtype = draw(st.sampled_from(MASK_DTYPES))
    if dtype == "bool":
        return visible
    return np.where(visible, 0.0, MASKED_FLOAT).astype(NUMPY_DTYPES[dtype])


@st.composite
def decomposed_forms(draw: st.DrawFn) -> DecomposedForm:
    return DecomposedForm(
        scale_at=draw(st.sampled_from(("query", "scores", "scores_left", "divide", "none"))),
        key_transpose=draw(st.sampled_from(("flag", "op"))),
        mask_first=draw(st.booleans()),
        positive_axis=draw(st.booleans()),
    )


SIGN_FLIPS = ("abs",)
"""Modifiers that can turn a large negative score (a masked key's) into a large positive one."""


SCORE_STEPS = (1 / 64, 1 / 16, 1 / 4)
"""Level steps of quantized scores: fine to coarse, each saturating within the scores' range."""
MASK_STEPS = (1 / 16, 80.0)
"""Of a quantized mask: fine (-1e4 saturates near the visible scores: masked keys come back) or
as calibrated on a -1e4 mask (every visible entry rounds to 0)."""
WEIGHT_STEPS = (1 / 127, 1 / 255)


@st.composite
def quantized_pairs(
    draw: st.DrawFn, rank: int, steps: tuple[float, ...] = SCORE_STEPS, per_axis: bool = True
) -> QuantizedPair:
    """A ``quantize -> dequantize`` pair of a rank-``rank`` tensor: int8 or uint8, maybe a zero
    point, per tensor or (with ``per_axis``, for static shapes) along any axis."""
    axes = st.none() | st.integers(-rank, -1) if per_axis and rank else st.none()
    return QuantizedPair(
        step=draw(st.sampled_from(steps)),
        axis=draw(axes),
        levels=draw(st.sampled_from(sorted(LEVEL_DTYPES))),
        offset=draw(st.none() | st.integers(-8, 8)),
        seed=draw(st.integers(0, 2**16)),
    )


@st.composite
def modifiers(
    draw: st.DrawFn, scores_rank: int, constant: bool = True, runtime: bool = True, after_mask: bool = False
) -> Modifier:
    """A score modifier: any op of ``MODIFIER_OPS``; an operand (for ops that take one) of any
    rank up to the scores', each axis full or broadcast; constant or (when its rank allows) a
    function input, as ``constant`` and ``runtime`` allow; the scores on either side, but as
    the dividend of a ``real_div`` (never divided by). ``after_mask``: nothing that would make a
    masked key (-1e4) the largest score, which leaves a row to fp rounding at 1e4 and compares
    nothing."""
    op = draw(st.sampled_from([op for op in MODIFIER_OPS if not (after_mask and op in SIGN_FLIPS)]))
    if op == QUANTIZED:
        return Modifier(op=op, pair=draw(quantized_pairs(scores_rank, per_axis=constant)))
    if op in UNARY_MODIFIERS:
        return Modifier(op=op)
    shape = tuple(draw(st.lists(st.sampled_from((1, None)), max_size=scores_rank)))
    is_constant = not (runtime and shape) or (constant and draw(st.booleans()))
    scores_first = op == "real_div" or (after_mask and op == "sub") or draw(st.booleans())
    return Modifier(
        op=op, shape=shape, constant=is_constant, scores_first=scores_first, seed=draw(st.integers(0, 2**16))
    )


@st.composite
def score_chains(
    draw: st.DrawFn, scores_rank: int, max_modifiers: int = 3, constant: bool = True, mask_rank: int = 0
) -> ScoreChain:
    """Up to ``max_modifiers`` modifiers, with the mask added anywhere among them; sometimes
    quantize -> dequantize pairs on a float mask of rank ``mask_rank`` (0: none), on the
    softmax's result and on q, k and v. ``constant``: static shapes, so pairs may be per axis."""
    count = draw(st.integers(0, max_modifiers))
    mask_at = draw(st.integers(0, count))
    chain = tuple(
        draw(modifiers(scores_rank, constant=constant, after_mask=index >= mask_at)) for index in range(count)
    )

    def sometimes(pairs: st.SearchStrategy[QuantizedPair]) -> Optional[QuantizedPair]:
        return draw(st.none() | st.none() | st.none() | pairs)

    return ScoreChain(
        modifiers=chain,
        mask_at=mask_at,
        mask_pair=sometimes(quantized_pairs(mask_rank, MASK_STEPS, constant)) if mask_rank else None,
        weights_pair=sometimes(quantized_pairs(scores_rank, WEIGHT_STEPS, constant)),
        inputs_pair=sometimes(quantized_pairs(scores_rank, SCORE_STEPS, per_axis=False)),
    )


@st.composite
def grouped_cases(draw: st.DrawFn) -> GroupedCase:
    """Grouped-query attention: 1 to 3 KV heads each read by 2 to 4 query heads, any repeat form,
    fused or written out, without a mask, with one broadcast over heads or one per head, or a
    constant causal one; L from 1 (decode) up."""
    return GroupedCase(
        batch=draw(st.integers(1, 2)),
        kv_heads=draw(st.integers(1, 3)),
        repeats=draw(st.integers(2, 4)),
        query_length=draw(st.integers(1, 24)),
        key_length=draw(st.integers(1, 24)),
        head_dim=draw(st.integers(1, 8)),
        dtype=draw(st.sampled_from(DTYPES)),
        repeat_form=draw(st.sampled_from(REPEAT_FORMS)),
        fused=draw(st.booleans()),
        mask=draw(st.sampled_from((None, "heads", "per_head", "causal"))),
        keys_as_columns=draw(st.booleans()),
    )
