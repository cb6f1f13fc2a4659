"""hypothesis strategies: attention problems and slicing configurations."""

from __future__ import annotations

import math

from hypothesis import strategies as st

from attention_cases import AttentionCase, MaskCase
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
    draw: st.DrawFn, max_length: int = 40, max_dim: int = 12, dynamic_key: bool = True
) -> AttentionCase:
    """Rank 3 to 5, any L, S, E, EV (L rarely divisible by the chunk), fp16 or fp32, any mask."""
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    query_length = draw(st.integers(1, max_length))
    key_length = draw(st.integers(1, max_length))
    mask = draw(st.none() | mask_cases(batch + (query_length, key_length)))
    return AttentionCase(
        batch=batch,
        query_length=query_length,
        key_length=key_length,
        head_dim=draw(st.integers(1, max_dim)),
        value_dim=draw(st.integers(1, max_dim)),
        dtype=draw(st.sampled_from(DTYPES)),
        mask=mask,
        dynamic_key=dynamic_key and draw(st.booleans()),
    )


@st.composite
def slice_configs(draw: st.DrawFn, case: AttentionCase) -> SliceConfig:
    """A config that rewrites ``case``: explicit chunk rows or count, or a scores budget."""
    length = case.query_length
    policy = draw(st.sampled_from(("chunk_size", "num_chunks", "max_scores_bytes")))
    if policy == "chunk_size":
        return SliceConfig(min_seq_length=1, chunk_size=draw(st.integers(1, length + 2)))
    if policy == "num_chunks":
        return SliceConfig(min_seq_length=1, num_chunks=draw(st.integers(1, length + 2)))
    itemsize = 2 if case.dtype == "fp16" else 4
    scores_bytes = math.prod(case.batch) * length * case.key_length * itemsize
    return SliceConfig(min_seq_length=1, max_scores_bytes=draw(st.integers(1, 2 * scores_bytes)))
