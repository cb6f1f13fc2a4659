"""Planning: turn a site's geometry and a ``SliceConfig`` into chunks, or a reason to skip.

A plan cuts the query rows into chunks and, for each query chunk, says which keys it
attends to: all of them, one pruned range (a constant mask hides the rest), or several
key chunks combined with an online softmax. Planning is pure: it reads plain shapes and
values (``SiteGeometry``) and never touches a graph.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import attrs
import numpy as np

from sdpa_slicer._rewrite.config import SliceConfig
from sdpa_slicer._rewrite.plan.geometry import SiteGeometry
from sdpa_slicer._rewrite.plan.pruning import visible_keys

Chunk = tuple[int, int]
"""Half-open row range ``[start, end)``."""
KeyChunks = Optional[tuple[Chunk, ...]]
"""The key ranges one query chunk attends to; ``None``: all keys, unsliced."""

MANY_KEY_CHUNKS = 256
"""Above this many key chunks for one query chunk, a site's note warns: the rewrite is slow to
build (a few ops per key chunk) and fp16 rounding grows with the count."""

ALREADY_ONE_CHUNK = "already written out as ops, and planned as one chunk over every key: nothing to change"
UNCHUNKED_KEPT = "planned as one chunk over every key, and decompose_unchunked is off: left as the fused op"
UNCHUNKED_DECOMPOSED = (
    "one chunk over every key: written out as ops anyway, as the fused op itself is suspected on device "
    "(decompose_unchunked); the static estimate may rise, as it counts the scores and their softmax as two tensors"
)
UNCHUNKED_REGROUPED = (
    "one chunk over every key, the query heads of each KV head stacked as rows of one query: {} on the un-repeated "
    "keys and values"
)
QUANTIZED_WEIGHTS_NOTE = (
    "kv_chunk_size not applicable: the softmax's result is quantized before the value matmul, "
    "and an online softmax over key chunks would quantize it before it is normalized"
)
UNCHUNKED_GROUPS = (
    "one chunk over every key per group of query heads: written out as ops on the un-repeated keys and values"
)


@attrs.frozen
class SitePlan:
    """How one site is rewritten."""

    query_chunks: tuple[Chunk, ...]
    key_chunks: tuple[KeyChunks, ...]
    """Per query chunk."""
    scores_bytes_before: Optional[int]
    scores_bytes_after: Optional[int]
    """The largest scores tensor of one (query chunk, key chunk) pair."""
    matmul_work_before: Optional[int] = None
    """Multiply-adds of the two attention matmuls."""
    matmul_work_after: Optional[int] = None
    notes: tuple[str, ...] = ()
    groups: int = 1
    """Query head groups, each attending the same un-repeated keys and values; the chunks above
    are those of each group."""
    regrouped: bool = False
    """One chunk over every key, with the query heads of each KV head stacked as rows of one
    query instead of attending group by group (every operand broadcasts over heads and rows)."""

    @property
    def num_chunks(self) -> int:
        return len(self.query_chunks)

    @property
    def chunk_size(self) -> int:
        """Rows of the largest query chunk."""
        return max(self.split_sizes)

    @property
    def split_sizes(self) -> tuple[int, ...]:
        return tuple(end - start for start, end in self.query_chunks)

    @property
    def max_key_chunks(self) -> int:
        """Key chunks of the query chunk that has the most (1 without key chunking)."""
        return most_key_chunks(self.key_chunks)

    def report_fields(self) -> dict[str, Any]:
        """What a ``SiteReport`` says of a site rewritten by this plan."""
        scores = (self.scores_bytes_before, self.scores_bytes_after)
        work = (self.matmul_work_before, self.matmul_work_after)
        chunks = {"num_chunks": self.num_chunks, "chunk_size": self.chunk_size, "key_chunks": self.max_key_chunks}
        return {**chunks, **_size_fields(scores, work, self.notes)}

    def skipped(self, reason: str) -> Skip:
        """This site left as it is after all, because of ``reason``."""
        return Skip(reason, self.scores_bytes_before, self.matmul_work_before, self.notes)


@attrs.frozen
class Skip:
    """Why a site is left as it is."""

    reason: str
    scores_bytes: Optional[int] = None
    matmul_work: Optional[int] = None
    notes: tuple[str, ...] = ()

    def report_fields(self) -> dict[str, Any]:
        """What a ``SiteReport`` says of a site left as it is: the same scores and work after."""
        scores, work = (self.scores_bytes, self.scores_bytes), (self.matmul_work, self.matmul_work)
        return {"reason": self.reason, **_size_fields(scores, work, self.notes)}


Plan = Union[SitePlan, Skip]


def _size_fields(
    scores: tuple[Optional[int], Optional[int]], work: tuple[Optional[int], Optional[int]], notes: tuple[str, ...]
) -> dict[str, Any]:
    """The report's scores and work, before and after, and the notes."""
    return {
        "scores_bytes_before": scores[0],
        "scores_bytes_after": scores[1],
        "matmul_work_before": work[0],
        "matmul_work_after": work[1],
        "notes": notes,
    }


def plan_site(geometry: SiteGeometry, config: SliceConfig) -> Plan:
    """Choose the query chunks of one site, and the keys each attends to.

    >>> from sdpa_slicer._rewrite.plan.geometry import SiteGeometry
    >>> g = SiteGeometry(batch_shape=(1, 32), query_length=2048, key_length=2048,
    ...                  head_dim=64, value_dim=64, dtype="fp16")
    >>> plan = plan_site(g, SliceConfig())   # 256 MiB of scores, 16 MiB budget
    >>> plan.num_chunks, plan.chunk_size, plan.scores_bytes_after
    (16, 128, 16777216)
    """
    length = geometry.query_length
    full_work = _work(geometry, [((0, length), None)]) if length is not None else None
    scores_bytes = _times(geometry.groups, _scores_bytes(geometry, length, geometry.key_length))
    grouped = geometry.groups > 1
    short = length is not None and length < config.min_seq_length
    short_reason = f"query length {length} is below min_seq_length {config.min_seq_length}"
    reason = short_reason if short and not grouped else _skip_reason(geometry, config)
    if reason is not None:
        return Skip(reason, scores_bytes, full_work)
    assert length is not None
    notes: list[str] = []
    if short:
        notes.append(f"{short_reason}: not chunked")
        query_chunks: tuple[Chunk, ...] = ((0, length),)
        key_chunks: tuple[KeyChunks, ...] = (None,)
    else:
        query_chunks, key_chunk_size = _chunk_sizes(geometry, config, notes)
        visible = _visible_key_ranges(geometry, query_chunks) if config.prune_masked_keys else None
        key_chunks = tuple(
            _key_chunks(geometry, None if visible is None else visible[index], key_chunk_size)
            for index in range(len(query_chunks))
        )
    whole = len(query_chunks) == 1 and key_chunks[0] is None
    if geometry.written_out and whole and not grouped:
        return Skip(ALREADY_ONE_CHUNK, scores_bytes, full_work, tuple(notes))
    if whole and not grouped and not config.decompose_unchunked:
        return Skip(UNCHUNKED_KEPT, scores_bytes, full_work, tuple(notes))
    regrouped = whole and geometry.regroupable
    if whole and not short:
        notes.append(_unchunked_note(geometry, regrouped))
    most = most_key_chunks(key_chunks)
    if most > MANY_KEY_CHUNKS:
        notes.append(
            f"{most} key chunks for one query chunk: each adds ops to build and, in fp16, "
            "roundings (docs/numerics.md); a larger max_scores_bytes or kv_chunk_size makes fewer"
        )
    if len(query_chunks) > 1:
        notes += operand_notes(geometry)
    pairs = list(zip(query_chunks, key_chunks))
    scores_bytes_after = max(
        (_scores_bytes(geometry, end - start, _key_span(geometry, keys)) for (start, end), keys in pairs),
        key=lambda size: -1 if size is None else size,
    )
    return SitePlan(
        query_chunks=query_chunks,
        key_chunks=key_chunks,
        scores_bytes_before=scores_bytes,
        scores_bytes_after=scores_bytes if regrouped else scores_bytes_after,
        matmul_work_before=full_work,
        matmul_work_after=_work(geometry, pairs),
        notes=tuple(notes),
        groups=geometry.groups,
        regrouped=regrouped,
    )


def operand_notes(geometry: SiteGeometry) -> list[str]:
    """What happens to each operand as large as the scores when the site is cut into query chunks.

    >>> from sdpa_slicer._rewrite.plan.geometry import FullSizeOperand, OperandGeometry
    >>> bias = FullSizeOperand("'b' (1x1x64x64 fp32, 16.0 KiB)", recipe="add <- expand_dims x2")
    >>> operand_notes(SiteGeometry(batch_shape=(1, 1), query_length=64, key_length=64, head_dim=16,
    ...     value_dim=16, dtype="fp32", operands=(OperandGeometry("the mask", "fp32", 4, 64, full_size=bias),)))
    ["the mask, 'b' (1x1x64x64 fp32, 16.0 KiB): built per query chunk (add <- expand_dims x2), never at full size"]
    """
    notes = []
    for operand in geometry.operands:
        full = operand.full_size
        if full is None:
            continue
        if full.recipe is not None:
            notes.append(
                f"{operand.label}, {full.description}: built per query chunk ({full.recipe}), never at full size"
            )
        else:
            notes.append(
                f"{operand.label}, {full.description}, is as large as the scores and stays built at full size before "
                f"the site, cut per chunk: {full.reason}"
            )
    return notes


def _unchunked_note(geometry: SiteGeometry, regrouped: bool) -> str:
    """What a site planned as one chunk over every key becomes, and why it is rewritten at all."""
    if geometry.groups == 1:
        return UNCHUNKED_DECOMPOSED
    if regrouped:
        return UNCHUNKED_REGROUPED.format("written out as ops" if geometry.written_out else "one fused op")
    return UNCHUNKED_GROUPS


def _times(count: int, size: Optional[int]) -> Optional[int]:
    return None if size is None else count * size


def _skip_reason(geometry: SiteGeometry, config: SliceConfig) -> Optional[str]:
    length = geometry.query_length
    if length is None:
        return "query length is dynamic"
    if geometry.dtype not in ("fp16", "fp32"):
        return f"attention dtype {geometry.dtype} is not fp16 or fp32"
    if geometry.scale is None:
        return "head dimension is dynamic, so the 1/sqrt(E) scale is unknown"
    scores_rank = len(geometry.batch_shape) + 2
    for operand in geometry.operands:
        if operand.rank > scores_rank:
            return f"rank {operand.rank} of {operand.label} exceeds the attention rank {scores_rank}"
        if operand.rows is None:
            return f"query axis of {operand.label} is dynamic"
        if operand.rows not in (1, length):
            return f"query axis of {operand.label} has size {operand.rows}, expected 1 or {length}"
        if operand.is_mask and operand.dtype not in ("bool", "fp16", "fp32"):
            return f"dtype {operand.dtype} of {operand.label} is not bool, fp16 or fp32"
        query_heads = _times(geometry.groups, geometry.batch_shape[-1]) if geometry.batch_shape else None
        if geometry.groups > 1 and operand.heads not in (1, query_heads):
            return f"head axis of {operand.label} has size {operand.heads}, expected 1 or {query_heads}"
    return None


def _chunk_sizes(
    geometry: SiteGeometry, config: SliceConfig, notes: list[str]
) -> tuple[tuple[Chunk, ...], Optional[int]]:
    """Query chunks, and the key chunk size (``None``: no key chunking)."""
    length = geometry.query_length
    assert length is not None
    key_chunk_size = config.kv_chunk_size
    if key_chunk_size is not None and geometry.key_length is None:
        notes.append("kv_chunk_size not applicable: the key length is dynamic")
        key_chunk_size = None
    if key_chunk_size is not None and geometry.weights_quantized:
        notes.append(QUANTIZED_WEIGHTS_NOTE)
        key_chunk_size = None
    if config.chunk_size is not None:
        rows = min(config.chunk_size, length)
        return tuple((start, min(start + rows, length)) for start in range(0, length, rows)), key_chunk_size
    if config.num_chunks is not None:
        count = config.num_chunks
        if count > length:
            notes.append(f"num_chunks {count} exceeds the query length; using {length} one-row chunks")
            count = length
        return even_chunks(length, count), key_chunk_size
    return _chunks_within_budget(geometry, config, key_chunk_size, notes)


def _chunks_within_budget(
    geometry: SiteGeometry, config: SliceConfig, key_chunk_size: Optional[int], notes: list[str]
) -> tuple[tuple[Chunk, ...], Optional[int]]:
    """The fewest near-equal query chunks whose scores fit in ``max_scores_bytes``; below
    ``min_query_chunk`` rows, chunks of that many rows and keys chunked to fit instead."""
    length = geometry.query_length
    assert length is not None
    budget = config.max_scores_bytes
    sized = geometry
    if _scores_bytes(geometry, 1, geometry.key_length) is None:
        sized = attrs.evolve(
            geometry,
            batch_shape=tuple(1 if d is None else d for d in geometry.batch_shape),
            key_length=length if geometry.key_length is None else geometry.key_length,
        )
        notes.append("scores size is dynamic; chunks sized assuming symbolic batch dims of 1 and S = L")
    assert sized.key_length is not None
    keys = sized.key_length if key_chunk_size is None else min(key_chunk_size, sized.key_length)
    row_bytes = _scores_bytes(sized, 1, keys)
    assert row_bytes is not None
    rows = budget // row_bytes
    floor = min(config.min_query_chunk, length)
    if rows >= length:
        return ((0, length),), key_chunk_size
    if rows < floor and key_chunk_size is None and geometry.key_length is not None and not geometry.weights_quantized:
        query_chunks = even_chunks(length, math.ceil(length / floor))
        column_bytes = _scores_bytes(sized, max(end - start for start, end in query_chunks), 1)
        assert column_bytes is not None
        if column_bytes > budget:
            notes.append(
                f"one key of scores for {floor} query rows ({column_bytes} bytes) exceeds max_scores_bytes {budget}"
            )
        return query_chunks, max(1, budget // column_bytes)
    if rows == 0:
        notes.append(f"one query row of scores ({row_bytes} bytes) exceeds max_scores_bytes {budget}")
        return even_chunks(length, length), key_chunk_size
    return even_chunks(length, math.ceil(length / rows)), key_chunk_size


def most_key_chunks(key_chunks: Sequence[KeyChunks]) -> int:
    """The most key chunks any one query chunk has (1 for all keys, unsliced)."""
    return max(1 if keys is None else len(keys) for keys in key_chunks)


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


def _visible_key_ranges(geometry: SiteGeometry, query_chunks: tuple[Chunk, ...]) -> Optional[list[Optional[Chunk]]]:
    """Per query chunk, the smallest key range holding every key its rows may see (constant
    masks hide the rest, see ``pruning.py``); ``None`` for a chunk with a row that sees no key
    (it keeps all keys, as the op would)."""
    visible = visible_keys(geometry.steps)
    if visible is None or visible.shape[-1] != geometry.key_length:
        return None
    rows_axis_size = visible.shape[-2]
    ranges: list[Optional[Chunk]] = []
    for start, end in query_chunks:
        rows = visible[..., start:end, :] if rows_axis_size > 1 else visible
        if not rows.any(axis=-1).all():
            ranges.append(None)
            continue
        columns = np.flatnonzero(rows.reshape(-1, rows.shape[-1]).any(axis=0))
        ranges.append((int(columns[0]), int(columns[-1]) + 1))
    return ranges


def _key_chunks(geometry: SiteGeometry, visible: Optional[Chunk], key_chunk_size: Optional[int]) -> KeyChunks:
    """The key ranges of one query chunk: its visible range, cut on a grid of ``key_chunk_size``."""
    key_length = geometry.key_length
    if key_length is None:
        return None
    start, end = (0, key_length) if visible is None else visible
    if key_chunk_size is None or key_chunk_size >= end - start:
        return None if (start, end) == (0, key_length) else ((start, end),)
    grid = range((start // key_chunk_size) * key_chunk_size, end, key_chunk_size)
    return tuple((max(edge, start), min(edge + key_chunk_size, end)) for edge in grid)


def _key_span(geometry: SiteGeometry, keys: KeyChunks) -> Optional[int]:
    """Keys in the largest key chunk."""
    return geometry.key_length if keys is None else max(end - start for start, end in keys)


def _known(*dims: Optional[int]) -> Optional[tuple[int, ...]]:
    """``dims`` when every one is static, else ``None``."""
    static = tuple(d for d in dims if d is not None)
    return static if len(static) == len(dims) else None


def _scores_bytes(geometry: SiteGeometry, rows: Optional[int], keys: Optional[int]) -> Optional[int]:
    dims = _known(*geometry.batch_shape, rows, keys)
    return None if dims is None else math.prod(dims) * geometry.itemsize


def _work(geometry: SiteGeometry, pairs: list[tuple[Chunk, KeyChunks]]) -> Optional[int]:
    """Multiply-adds of ``query @ key^T`` and ``weights @ value`` over (query chunk, keys) pairs."""
    dims = _known(*geometry.batch_shape, geometry.key_length, geometry.head_dim, geometry.value_dim)
    if dims is None:
        return None
    *batch, key_length, head_dim, value_dim = dims
    per_pair = math.prod(batch) * (head_dim + value_dim)
    total = 0
    for (start, end), keys in pairs:
        key_count = key_length if keys is None else sum(e - s for s, e in keys)
        total += (end - start) * key_count * per_pair
    return total * geometry.groups
