"""What ``slice_attention`` did: one ``SiteReport`` per attention site found, in a ``SliceReport``."""

from __future__ import annotations

from typing import Any, Optional

import attrs

from sdpa_slicer._memory import MemoryEstimate
from sdpa_slicer._text import format_bytes, format_table

REWRITTEN = "rewritten"
SKIPPED = "skipped"

_COLUMNS = (
    ("function", "function"),
    ("op", "op_name"),
    ("kind", "kind"),
    ("status", "status"),
    ("L", "query_length"),
    ("S", "key_length"),
    ("chunks", "num_chunks"),
    ("rows", "chunk_size"),
    ("key chunks", "key_chunks"),
    ("scores before", "scores_bytes_before"),
    ("scores after", "scores_bytes_after"),
    ("work after", "matmul_work_after"),
)


@attrs.frozen(kw_only=True)
class SiteReport:
    """One attention site: where it is, what was done, and why not if nothing was."""

    function: str
    op_name: str
    kind: str
    """``"fused"`` for a ``scaled_dot_product_attention`` op, ``"decomposed"`` for a matched chain."""
    status: str
    """``"rewritten"`` or ``"skipped"``."""
    reason: Optional[str] = None
    query_length: Optional[int] = None
    key_length: Optional[int] = None
    """``None`` when the length is dynamic."""
    num_chunks: Optional[int] = None
    chunk_size: Optional[int] = None
    """Query rows of the largest chunk."""
    key_chunks: Optional[int] = None
    """Key chunks of the query chunk that has the most; 1 without key chunking."""
    scores_bytes_before: Optional[int] = None
    scores_bytes_after: Optional[int] = None
    """The largest scores tensor: one query chunk by one key chunk."""
    matmul_work_before: Optional[int] = None
    """Multiply-adds of the two attention matmuls; key pruning lowers them."""
    matmul_work_after: Optional[int] = None
    notes: tuple[str, ...] = ()

    @property
    def rewritten(self) -> bool:
        return self.status == REWRITTEN

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


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
            "memory_before": [attrs.asdict(estimate) for estimate in self.memory_before],
            "memory_after": [attrs.asdict(estimate) for estimate in self.memory_after],
        }

    def __str__(self) -> str:
        lines = [f"{self.num_rewritten} attention site(s) rewritten, {self.num_skipped} skipped"]
        if self.sites:
            lines += format_table([title for title, _ in _COLUMNS], [_row(site) for site in self.sites])
        for site in self.sites:
            for remark in ([site.reason] if site.reason else []) + list(site.notes):
                lines.append(f"  {site.function}/{site.op_name}: {remark}")
        lines += [f"  {note}" for note in self.notes]
        for before, after in zip(self.memory_before, self.memory_after):
            lines.append(
                f"memory of '{before.function}': peak live {format_bytes(before.peak_live_bytes)} -> "
                f"{format_bytes(after.peak_live_bytes)}, largest tensor {format_bytes(before.largest_tensor_bytes)} -> "
                f"{format_bytes(after.largest_tensor_bytes)} (static estimate)"
            )
        return "\n".join(lines)


def _row(site: SiteReport) -> list[str]:
    cells = []
    for _, field in _COLUMNS:
        value = getattr(site, field)
        if field.startswith("scores_bytes"):
            cells.append(format_bytes(value))
        elif field == "matmul_work_after":
            cells.append(_work_share(site))
        else:
            cells.append("?" if value is None else str(value))
    return cells


def _work_share(site: SiteReport) -> str:
    """Matmul work after the rewrite as a share of before: ``56%``."""
    if site.matmul_work_before is None or site.matmul_work_after is None or not site.matmul_work_before:
        return "?"
    return f"{100 * site.matmul_work_after / site.matmul_work_before:.0f}%"
