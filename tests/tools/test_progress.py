"""StageProgress: the stages of a command on one bar, a long stage's work beside its name, redraws limited."""

from __future__ import annotations

import io

import pytest

from sdpa_slicer._tools import progress as _progress
from sdpa_slicer._tools.progress import BYTES, StageProgress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _show(enabled: bool, reports: list[tuple[int, int]]) -> str:
    terminal = _Terminal()
    progress = StageProgress(2, enabled=enabled, file=terminal)
    with progress.stage("saving out.mlpackage", unit=BYTES) as report:
        for done, total in reports:
            report(done, total)
    with progress.stage("slicing"):
        pass
    progress.close()
    return terminal.getvalue()


def test_a_stage_shows_its_work_and_the_next_stage_its_name() -> None:
    shown = _show(True, [(1024, 2048), (2048, 2048)])
    assert "saving out.mlpackage: 2.0 KiB/2.0 KiB" in shown
    assert shown.index("2.0 KiB/2.0 KiB") < shown.index("slicing")


def test_reports_faster_than_the_redraw_interval_show_only_the_last(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_progress, "REDRAW_INTERVAL", 3600.0)
    shown = _show(True, [(1024, 4096), (2048, 4096), (4096, 4096)])
    assert "1.0 KiB/4.0 KiB" in shown  # the first report after the stage began
    assert "2.0 KiB/4.0 KiB" not in shown
    assert "4.0 KiB/4.0 KiB" in shown


def test_a_disabled_display_draws_nothing() -> None:
    assert _show(False, [(1, 1)]) == ""
