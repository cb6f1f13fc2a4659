"""Planning: turn a site's geometry and a ``SliceConfig`` into query chunks, or a reason to skip.

Planning is pure: it reads plain shapes (``SiteGeometry``) and never touches a graph.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import attrs

from sdpa_slicer._config import SliceConfig
from sdpa_slicer._match import SiteGeometry

Chunk = tuple[int, int]
"""Half-open row range ``[start, end)`` of the query axis."""


@attrs.frozen
class SitePlan:
    """How one site is rewritten."""

    query_chunks: tuple[Chunk, ...]
    slice_mask_rows: bool
    """True when the mask has an L axis of full length, so each chunk takes its own rows."""
    scores_bytes_before: Optional[int]
    scores_bytes_after: Optional[int]
    notes: tuple[str, ...] = ()

    @property
    def num_chunks(self) -> int:
        return len(self.query_chunks)

    @property
    def chunk_size(self) -> int:
        """Rows of the largest chunk."""
        return max(end - start for start, end in self.query_chunks)

    @property
    def split_sizes(self) -> tuple[int, ...]:
        return tuple(end - start for start, end in self.query_chunks)


@attrs.frozen
class Skip:
    """Why a site is left as it is."""

    reason: str
    scores_bytes: Optional[int] = None


Plan = Union[SitePlan, Skip]


def plan_site(geometry: SiteGeometry, config: SliceConfig) -> Plan:
    """Choose the query chunks of one site.

    >>> from sdpa_slicer._match import SiteGeometry
    >>> g = SiteGeometry(batch_shape=(1, 32), query_length=2048, key_length=2048,
    ...                  head_dim=64, value_dim=64, dtype="fp16")
    >>> plan = plan_site(g, SliceConfig())   # 256 MiB of scores, 16 MiB budget
    >>> plan.num_chunks, plan.chunk_size, plan.scores_bytes_after
    (16, 128, 16777216)
    """
    length = geometry.query_length
    scores_bytes = _scores_bytes(geometry, length)
    reason = _skip_reason(geometry, config)
    if reason is not None:
        return Skip(reason, scores_bytes)
    assert length is not None
    chunks, notes = _query_chunks(geometry, config)
    mask = geometry.mask
    return SitePlan(
        query_chunks=chunks,
        slice_mask_rows=mask is not None and mask.rows != 1 and len(chunks) > 1,
        scores_bytes_before=scores_bytes,
        scores_bytes_after=_scores_bytes(geometry, max(end - start for start, end in chunks)),
        notes=notes,
    )


def _skip_reason(geometry: SiteGeometry, config: SliceConfig) -> Optional[str]:
    length = geometry.query_length
    if length is None:
        return "query length is dynamic"
    if length < config.min_seq_length:
        return f"query length {length} is below min_seq_length {config.min_seq_length}"
    if geometry.dtype not in ("fp16", "fp32"):
        return f"attention dtype {geometry.dtype} is not fp16 or fp32"
    if geometry.scale is None:
        return "head dimension is dynamic, so the 1/sqrt(E) scale is unknown"
    mask = geometry.mask
    if mask is None:
        return None
    scores_rank = len(geometry.batch_shape) + 2
    if mask.rank > scores_rank:
        return f"mask rank {mask.rank} exceeds the attention rank {scores_rank}"
    if mask.rows is None:
        return "mask's query axis is dynamic"
    if mask.rows not in (1, length):
        return f"mask's query axis has size {mask.rows}, expected 1 or {length}"
    if mask.dtype not in ("bool", "fp16", "fp32"):
        return f"mask dtype {mask.dtype} is not bool, fp16 or fp32"
    return None


def _query_chunks(geometry: SiteGeometry, config: SliceConfig) -> tuple[tuple[Chunk, ...], tuple[str, ...]]:
    length = geometry.query_length
    assert length is not None
    if config.chunk_size is not None:
        rows = min(config.chunk_size, length)
        return tuple((start, min(start + rows, length)) for start in range(0, length, rows)), ()
    notes: list[str] = []
    if config.num_chunks is not None:
        count = config.num_chunks
        if count > length:
            notes.append(f"num_chunks {count} exceeds the query length; using {length} one-row chunks")
            count = length
    else:
        count = _chunks_within_budget(geometry, config.max_scores_bytes, notes)
    return even_chunks(length, count), tuple(notes)


def _chunks_within_budget(geometry: SiteGeometry, budget: int, notes: list[str]) -> int:
    """The fewest near-equal chunks whose scores fit in ``budget`` bytes."""
    length = geometry.query_length
    assert length is not None
    row_bytes = _scores_bytes(geometry, 1)
    if row_bytes is None:
        assumed = attrs.evolve(
            geometry,
            batch_shape=tuple(1 if d is None else d for d in geometry.batch_shape),
            key_length=length if geometry.key_length is None else geometry.key_length,
        )
        row_bytes = _scores_bytes(assumed, 1)
        assert row_bytes is not None
        notes.append("scores size is dynamic; chunks sized assuming symbolic batch dims of 1 and S = L")
    rows = budget // row_bytes
    if rows == 0:
        notes.append(f"one query row of scores ({row_bytes} bytes) exceeds max_scores_bytes {budget}")
        return length
    return math.ceil(length / rows)


def even_chunks(length: int, count: int) -> tuple[Chunk, ...]:
    """Split ``length`` rows into ``count`` chunks whose sizes differ by at most one.

    >>> even_chunks(10, 4)
    ((0, 3), (3, 6), (6, 8), (8, 10))
    """
    base, extra = divmod(length, count)
    chunks = []
    start = 0
    for index in range(count):
        end = start + base + (1 if index < extra else 0)
        chunks.append((start, end))
        start = end
    return tuple(chunks)


def _scores_bytes(geometry: SiteGeometry, rows: Optional[int]) -> Optional[int]:
    dims = (*geometry.batch_shape, rows, geometry.key_length)
    if any(d is None for d in dims):
        return None
    return math.prod(dims) * geometry.itemsize  # type: ignore[arg-type]
