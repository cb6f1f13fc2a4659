"""What ``slice_attention`` did: one ``SiteReport`` per attention site found, in a ``SliceReport``."""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence

import attrs

from sdpa_slicer._graph import ReportShape
from sdpa_slicer._memory import MemoryEstimate
from sdpa_slicer._rewrite.sites import KvLayout, SiteKind
from sdpa_slicer._text import format_bytes, format_table

SiteStatus = Literal["rewritten", "skipped"]


@attrs.frozen
class Column:
    """A column of the report's table: its title, the ``SiteReport`` field it shows, what it means."""

    title: str
    field: str
    meaning: str


COLUMNS = (
    Column("function", "function", "the function holding the site"),
    Column(
        "op", "op_name", "the op whose output the site produces: the fused op, or a written-out chain's last matmul"
    ),
    Column("kind", "kind", "fused (a scaled_dot_product_attention op) or decomposed (attention written out as ops)"),
    Column("status", "status", "rewritten, or skipped with the reason printed below the table"),
    Column("L", "query_length", "query length: the query rows, each attending on its own"),
    Column("S", "key_length", "key length: the keys every query row attends to"),
    Column("chunks", "num_chunks", "query chunks the L rows are cut into"),
    Column("rows", "chunk_size", "query rows of the largest chunk"),
    Column(
        "key chunks",
        "key_chunks",
        "key chunks walked with an online softmax by the query chunk with the most; 1: keys not cut",
    ),
    Column(
        "kv heads",
        "kv_heads",
        "key/value heads read un-repeated where the program repeated them for more query heads (grouped-query "
        "attention), and in (xN) the query heads each serves; shown only when some site's were folded",
    ),
    Column("scores before", "scores_bytes_before", "the scores tensor (batch dims x L x S) of the attention as it was"),
    Column("scores after", "scores_bytes_after", "the largest scores tensor left: one query chunk by one key chunk"),
    Column(
        "work after",
        "matmul_work_after",
        "multiply-adds of the two attention matmuls, as a share of before: below 100% where masked keys are skipped",
    ),
)
"""The table's columns, in order; ``?`` in a cell means unknown (a dynamic size, a site skipped)."""


@attrs.frozen(kw_only=True)
class SiteReport:
    """One attention site: where it is, what was done, and why not if nothing was."""

    function: str
    op_name: str
    kind: SiteKind
    """``"fused"`` for a ``scaled_dot_product_attention`` op, ``"decomposed"`` for a matched chain."""
    status: SiteStatus
    """``"rewritten"`` or ``"skipped"``."""
    reason: Optional[str] = None
    query_length: Optional[int] = None
    key_length: Optional[int] = None
    """``None`` when the length is dynamic."""
    num_chunks: Optional[int] = None
    """Query chunks the L rows are cut into."""
    chunk_size: Optional[int] = None
    """Query rows of the largest chunk."""
    key_chunks: Optional[int] = None
    """Key chunks of the query chunk that has the most; 1 without key chunking."""
    scores_bytes_before: Optional[int] = None
    """The scores tensor (batch dims x L x S) of the attention as it was."""
    scores_bytes_after: Optional[int] = None
    """The largest scores tensor: one query chunk by one key chunk."""
    matmul_work_before: Optional[int] = None
    """Multiply-adds of the two attention matmuls."""
    matmul_work_after: Optional[int] = None
    """The same after the rewrite; key pruning lowers them."""
    notes: tuple[str, ...] = ()
    """What else the rewrite did, or could not do, and why."""
    dtype: Optional[str] = None
    """The attention's dtype, ``"fp16"`` or ``"fp32"`` (others are skipped)."""
    query_shape: Optional[ReportShape] = None
    """``(..., L, E)``; a symbolic dim is its symbol's name."""
    key_shape: Optional[ReportShape] = None
    """``(..., S, E)``, whichever way the site reads it."""
    value_shape: Optional[ReportShape] = None
    """``(..., S, EV)``."""
    mask_shape: Optional[ReportShape] = None
    """The fused op's mask, or the operand of a written-out chain's last ``add``."""
    score_ops: tuple[str, ...] = ()
    """The elementwise ops between the scores and the softmax (after the scale), in order."""
    weight_ops: tuple[str, ...] = ()
    """The ops between the softmax and the value matmul (``quantize``, ``dequantize``), in order."""
    kv_heads: Optional[int] = None
    """Key/value heads a rewritten site reads directly, where the program repeated them for
    more query heads (grouped-query attention); ``None`` when nothing was folded."""
    kv_repeats: Optional[int] = None
    """Query heads per key/value head, when folded."""
    kv_layout: Optional[KvLayout] = None
    """``"interleaved"`` (query head h reads KV head h // kv_repeats) or ``"tiled"`` (h % kv_heads)."""

    @property
    def rewritten(self) -> bool:
        return self.status == "rewritten"

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen(kw_only=True)
class NearMissReport:
    """A softmax that looks like part of an attention, but that no pattern took: why, and the ops."""

    function: str
    op_name: str
    """The op the pattern started from (a ``softmax``)."""
    pattern: str
    reason: str
    chain: tuple[str, ...]
    """The ops looked at, in program order, as ``op_type 'name'``."""

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


NOTHING_GAINED = (
    "nothing gained: every site rewritten runs as one chunk (its scores fit max_scores_bytes) and no peak went "
    "down; to cut the scores, lower max_scores_bytes (--max-scores-bytes) or set num_chunks; to leave such fused ops "
    "fused, decompose_unchunked=False (--keep-unchunked-fused)"
)
"""The report's last line when the rewrite only wrote fused ops out as ops (see ``nothing_gained``)."""


@attrs.frozen
class SliceReport:
    """Every attention site ``slice_attention`` found, rewritten or skipped.

    ``str(report)`` is a table; ``notes`` say why a program had nothing to rewrite.
    """

    sites: tuple[SiteReport, ...]
    notes: tuple[str, ...] = ()
    memory_before: tuple[MemoryEstimate, ...] = ()
    """Per function, the graph's memory estimate before the rewrite."""
    memory_after: tuple[MemoryEstimate, ...] = ()
    near_misses: tuple[NearMissReport, ...] = ()
    """Softmax ops that look like attention but were not matched, with the reason."""

    @property
    def num_rewritten(self) -> int:
        return sum(site.rewritten for site in self.sites)

    @property
    def num_skipped(self) -> int:
        return len(self.sites) - self.num_rewritten

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_rewritten": self.num_rewritten,
            "num_skipped": self.num_skipped,
            "sites": [site.to_dict() for site in self.sites],
            "notes": list(self.notes),
            "memory_before": [estimate.to_dict() for estimate in self.memory_before],
            "memory_after": [estimate.to_dict() for estimate in self.memory_after],
            "near_misses": [miss.to_dict() for miss in self.near_misses],
        }

    def __str__(self) -> str:
        return self.text()

    def text(self, *, near_misses_listed: bool = False) -> str:
        """``str(report)``; with ``near_misses_listed`` (the near misses are printed after it, as by
        ``sdpa-slicer inspect --explain``), without the line pointing to them."""
        lines = [f"{self.num_rewritten} attention site(s) rewritten, {self.num_skipped} skipped"]
        if self.sites:
            folded = any(site.kv_heads for site in self.sites)
            columns = [column for column in COLUMNS if column.field != "kv_heads" or folded]
            lines += format_table([column.title for column in columns], [_row(site, columns) for site in self.sites])
        for site in self.sites:
            for remark in ([site.reason] if site.reason else []) + list(site.notes):
                lines.append(f"  {site.function}/{site.op_name}: {remark}")
        lines += [f"  {note}" for note in self.notes]
        if self.near_misses and not near_misses_listed:
            lines.append(
                f"  {len(self.near_misses)} softmax op(s) look like attention but were not matched "
                "(near_misses; sdpa-slicer inspect --explain lists them)"
            )
        for before, after in zip(self.memory_before, self.memory_after):
            uncounted = (
                f"; {len(before.uncounted)} -> {len(after.uncounted)} tensor(s) of symbolic shape not counted"
                if before.uncounted or after.uncounted
                else ""
            )
            lines.append(
                f"memory of '{before.function}': peak live {format_bytes(before.peak_live_bytes)} -> "
                f"{format_bytes(after.peak_live_bytes)}, largest tensor {format_bytes(before.largest_tensor_bytes)} -> "
                f"{format_bytes(after.largest_tensor_bytes)} (static estimate{uncounted})"
            )
        if self.nothing_gained:
            lines.append(NOTHING_GAINED)
        return "\n".join(lines)

    @property
    def nothing_gained(self) -> bool:
        """Every site rewritten runs as one chunk over every key (its scores fit the budget), and no
        function's estimated peak went down: the rewrite only wrote fused ops out as ops."""
        rewritten = [site for site in self.sites if site.rewritten]
        return (
            bool(rewritten)
            and bool(self.memory_after)
            and all(site.num_chunks == 1 and site.key_chunks in (None, 1) for site in rewritten)
            and all(
                after.peak_live_bytes >= before.peak_live_bytes
                for before, after in zip(self.memory_before, self.memory_after)
            )
        )

    def explain(self) -> str:
        """One paragraph per near miss: where, why, and the ops looked at."""
        if not self.near_misses:
            return "no near misses: every softmax that looks like attention was matched"
        lines = []
        for miss in self.near_misses:
            lines.append(f"{miss.function}/{miss.op_name} ({miss.pattern}): {miss.reason}")
            lines.append(f"  ops: {' -> '.join(miss.chain)}")
        return "\n".join(lines)


def _row(site: SiteReport, columns: Sequence[Column]) -> list[str]:
    cells = []
    for field in (column.field for column in columns):
        value = getattr(site, field)
        if field.startswith("scores_bytes"):
            cells.append(format_bytes(value))
        elif field == "matmul_work_after":
            cells.append(_work_share(site))
        elif field == "kv_heads":
            cells.append("-" if value is None else f"{value} (x{site.kv_repeats})")
        else:
            cells.append("?" if value is None else str(value))
    return cells


def _work_share(site: SiteReport) -> str:
    """Matmul work after the rewrite as a share of before: ``56%``."""
    if site.matmul_work_before is None or site.matmul_work_after is None or not site.matmul_work_before:
        return "?"
    return f"{100 * site.matmul_work_after / site.matmul_work_before:.0f}%"
