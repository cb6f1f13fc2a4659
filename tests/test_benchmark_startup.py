"""``benchmarks/startup.py`` hides torch as it says, and docs/benchmarks.md quotes tables it printed
whose verdicts follow the target."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import startup as benchmark
from sdpa_slicer import load_package, slice_attention

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
BLOCK = re.compile(r"```\n(.*?)\n```", re.DOTALL)


def _quoted_table(header: str) -> list[list[str]]:
    """The rows (cells split at two or more spaces) of the docs' table that starts with ``header``."""
    for block in BLOCK.findall(DOCS.read_text()):
        lines = block.splitlines()
        for index, line in enumerate(lines):
            if line == header:
                rows = []
                for row in lines[index + 1 :]:
                    if not row.strip():
                        break
                    rows.append(re.split(r"\s{2,}", row.strip()))
                return rows
    raise AssertionError(f"docs/benchmarks.md quotes no table starting {header!r}")


def test_the_docs_quote_the_timing_table_and_its_verdicts_follow_the_target() -> None:
    header = benchmark.results_table(
        {(name, setting): 1.0 for name in benchmark.COMMANDS for setting in benchmark.SETTINGS}
    )[0]
    rows = _quoted_table(header)
    assert [row[0] for row in rows] == list(benchmark.COMMANDS)
    for name, hidden, installed, imported, difference, target, result in rows:
        assert float(difference) == pytest.approx(float(installed) - float(hidden), abs=0.011)
        assert result == benchmark.verdict(float(hidden), float(installed)) == "met", name
        assert float(imported) > float(installed)


def test_the_docs_quote_the_warnings_table_with_no_warning_and_no_torch() -> None:
    runs = {(name, setting): [] for name in benchmark.COMMANDS for setting in benchmark.SETTINGS}
    header = benchmark.warnings_table(runs, {name: False for name in benchmark.COMMANDS})[0]
    rows = _quoted_table(header)
    assert [row[0] for row in rows] == list(benchmark.COMMANDS)
    assert all(row[1].startswith("0/") and row[3] == "no" for row in rows)


def test_verdicts_follow_the_limit() -> None:
    assert benchmark.verdict(1.0, 1.0 + benchmark.LIMIT_SECONDS) == "met"
    assert benchmark.verdict(1.0, 1.01 + benchmark.LIMIT_SECONDS) == "NOT MET"


def test_the_hidden_setting_hides_torch_and_the_others_do_not(tmp_path: Path) -> None:
    (tmp_path / "torch.py").write_text(benchmark.HIDING_MODULE)
    probe = [sys.executable, "-c", "import torch"]
    hidden = subprocess.run(
        probe, capture_output=True, text=True, env=benchmark.environment(benchmark.HIDDEN, tmp_path, os.environ)
    )
    assert hidden.returncode == 1 and "hidden by benchmarks/startup.py" in hidden.stderr
    shown = benchmark.environment(benchmark.INSTALLED, tmp_path, os.environ)
    assert str(tmp_path) not in shown["PYTHONPATH"].split(os.pathsep)


def test_the_tiny_package_holds_one_attention_site(tmp_path: Path) -> None:
    package = load_package(benchmark.build_tiny_package(tmp_path / benchmark.TINY))
    assert [site.kind for site in slice_attention(package.program).sites] == ["fused"]
