"""``sdpa-slicer examples DIR``: the packages docs/cli.md reads, all or none (tests/test_docs.py
runs the page's examples on what it writes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdpa_slicer._tools import examples
from sdpa_slicer._tools.cli import main


def _names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_a_folder_holding_one_of_them_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "near-misses.mlpackage").mkdir()
    assert main(["examples", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"sdpa-slicer: error: {tmp_path / 'near-misses.mlpackage'} already exists; remove it or choose another folder\n"
    )
    assert _names(tmp_path) == ["near-misses.mlpackage"]


def test_a_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(path: Path) -> Path:
        raise RuntimeError("injected failure")

    monkeypatch.setattr(examples, "EXAMPLES", {"near-misses.mlpackage": examples.near_miss_package, "x": fail})
    folder = tmp_path / "new"
    with pytest.raises(RuntimeError, match="injected failure"):
        examples.write_examples(folder)
    assert _names(folder) == []


def test_help_names_the_folder(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["examples", "--help"]) == 0
    assert "DIR" in capsys.readouterr().out


def test_the_command_list_names_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "examples" in capsys.readouterr().out
