"""``benchmarks/packages.py`` builds the package its table describes, samples a child's heap and
judges the targets by their formulas."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from graph import op_counts
from sdpa_slicer import load_package, slice_attention

BENCHMARK_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "packages.py"
LAYERS = 2
MIB = 1024 * 1024


def _load_benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("packages_benchmark", BENCHMARK_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


benchmark = _load_benchmark()


def test_the_synthetic_package_holds_the_layers_and_one_attention_op(tmp_path: Path) -> None:
    path = benchmark.build_package(tmp_path / "synthetic.mlpackage", LAYERS, benchmark.TINY_HIDDEN)
    package = load_package(path)
    counts = op_counts(package.program)
    assert {op: counts[op] for op in ("linear", "scaled_dot_product_attention")} == {
        "linear": LAYERS,
        "scaled_dot_product_attention": 1,
    }
    weight_bytes = LAYERS * benchmark.TINY_HIDDEN**2 * 2  # fp16
    assert weight_bytes <= (path / benchmark.WEIGHT_FILE).stat().st_size < 2 * weight_bytes
    report = slice_attention(package.program, num_chunks=int(benchmark.NUM_CHUNKS))
    assert [site.status for site in report.sites] == ["rewritten"]


@pytest.mark.parametrize("megabytes", [0, 200])
def test_measure_samples_the_heap_of_the_child(megabytes: int, tmp_path: Path) -> None:
    touch = f"import time; block = bytearray({megabytes} * 2**20); time.sleep(0.3)"
    run = benchmark.measure([sys.executable, "-c", touch], tmp_path)
    assert run.seconds >= 0.3
    assert megabytes * MIB <= run.heap < (megabytes + 50) * MIB
    assert run.resident >= run.heap


def test_a_failing_command_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="failed \\(3\\): broken"):
        benchmark.measure([sys.executable, "-c", "import sys; sys.stderr.write('broken'); sys.exit(3)"], tmp_path)


def _results(slice_seconds: float, inspect_heap: int) -> dict[tuple[str, str, str], object]:
    """Tiny runs of 2 s and 200 MiB, a copy of 1 s, and the 1 GiB runs given."""
    run = benchmark.Run
    return {
        (benchmark.TINY, "after", "slice"): run(seconds=2.0, heap=200 * MIB, resident=0),
        (benchmark.TINY, "after", "inspect"): run(seconds=2.0, heap=200 * MIB, resident=0),
        ("1 GiB", "-", benchmark.COPY): run(seconds=1.0, heap=0, resident=0),
        ("1 GiB", "after", "slice"): run(seconds=slice_seconds, heap=200 * MIB, resident=0),
        ("1 GiB", "after", "inspect"): run(seconds=2.5, heap=inspect_heap, resident=0),
    }


@pytest.mark.parametrize(
    "slice_seconds, inspect_heap, verdicts",
    [
        (5.9, 349 * MIB, ["met", "met", "met", "met"]),
        (6.1, 351 * MIB, ["NOT MET", "met", "met", "NOT MET"]),
    ],
)
def test_targets_follow_their_formulas(slice_seconds: float, inspect_heap: int, verdicts: list[str]) -> None:
    lines = benchmark.targets_table(_results(slice_seconds, inspect_heap), "1 GiB", "after")
    assert [line.rsplit("  ", 1)[-1] for line in lines[2:]] == verdicts
    assert "2.00 + 3 x 1.00 + 1 = 6.00 s" in lines[2]
