"""Plain-text formatting shared by reports and the command line."""

from __future__ import annotations

from typing import Optional, Sequence


def format_bytes(count: Optional[int]) -> str:
    """``16.0 MiB``-style text; ``?`` when unknown.

    >>> format_bytes(16 * 1024 * 1024), format_bytes(512), format_bytes(None)
    ('16.0 MiB', '512 B', '?')
    """
    if count is None:
        return "?"
    if count < 1024:
        return f"{count} B"
    size = count / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned text columns separated by two spaces."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]


def first_line(error: BaseException) -> str:
    """The first line of an error's message, or its type's name when it has none."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
