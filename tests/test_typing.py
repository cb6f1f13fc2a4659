"""The package's type hints hold: mypy finds no error in ``sdpa_slicer``."""

from __future__ import annotations

from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api", reason="mypy checks the type hints")

PACKAGE = Path(__file__).resolve().parent.parent / "sdpa_slicer"


def test_mypy_finds_no_error_in_the_package():
    out, err, status = mypy_api.run(
        [str(PACKAGE), "--ignore-missing-imports", "--no-incremental", "--cache-dir=/dev/null"]
    )
    assert status == 0, out + err
