"""Progress of a command on stderr: one bar over its stages, and the work a long stage has done.

Loading reports the ops built, saving the bytes of weights written; the bar shows them beside
the stage's name (``saving out.mlpackage: 1.2 GiB/4.0 GiB``), redrawn at most ten times a second.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from typing import Iterator, Optional, TextIO

from tqdm import tqdm

from sdpa_slicer._mlpackage.package import ProgressCallback
from sdpa_slicer._text import format_bytes

BYTES = "bytes"
REDRAW_INTERVAL = 0.1
"""Seconds between two redraws of a stage's count."""


def work_text(done: int, total: int, unit: str) -> str:
    """``done`` of ``total`` units: sizes for bytes, else the numbers and the unit.

    >>> work_text(1536, 4096, BYTES), work_text(1200, 3400, "ops")
    ('1.5 KiB/4.0 KiB', '1200/3400 ops')
    """
    if unit == BYTES:
        return f"{format_bytes(done)}/{format_bytes(total)}"
    return f"{done}/{total} {unit}".rstrip()


class StageProgress:
    """One tqdm bar over the stages of a command; draws nothing when disabled."""

    def __init__(self, stages: int, enabled: bool, file: Optional[TextIO] = None) -> None:
        self._bar = tqdm(
            total=stages,
            file=file or sys.stderr,
            disable=not enabled,
            leave=False,
            bar_format="{desc}  {bar:20} {n}/{total}",
        )
        self._enabled = enabled

    @contextlib.contextmanager
    def stage(self, description: str, unit: str = "") -> Iterator[ProgressCallback]:
        """Show ``description`` for the stage; the callback yielded shows its work done of ``unit``."""
        self._bar.set_description_str(description)
        last_drawn = [-math.inf]

        def report(done: int, total: int) -> None:
            now = time.monotonic()
            if self._enabled and (done >= total or now - last_drawn[0] >= REDRAW_INTERVAL):
                last_drawn[0] = now
                self._bar.set_description_str(f"{description}: {work_text(done, total, unit)}")

        yield report
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()
