"""``benchmarks/packages.py`` builds the package its table describes, samples a child's heap and
judges the targets by their formulas."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

import compressed_weights
import llama_package
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


def _results(slice_seconds: float, inspect_heap: int, slice_cpu: float) -> dict[tuple[str, str, str], object]:
    """Tiny runs of 2 s (1.5 s of CPU) and 200 MiB, a copy of 1 s, and the 1 GiB runs given."""
    run = benchmark.Run
    return {
        (benchmark.TINY, "after", "slice"): run(seconds=2.0, heap=200 * MIB, resident=0, cpu=1.5),
        (benchmark.TINY, "after", "inspect"): run(seconds=2.0, heap=200 * MIB, resident=0, cpu=1.5),
        ("1 GiB", "-", benchmark.COPY): run(seconds=1.0, heap=0, resident=0),
        ("1 GiB", "after", "slice"): run(seconds=slice_seconds, heap=200 * MIB, resident=0, cpu=slice_cpu),
        ("1 GiB", "after", "inspect"): run(seconds=2.5, heap=inspect_heap, resident=0, cpu=2.0),
    }


@pytest.mark.parametrize(
    "slice_seconds, inspect_heap, slice_cpu, verdicts",
    [
        (5.9, 349 * MIB, 5.4, ["met"] * 6),
        (6.1, 351 * MIB, 5.6, ["NOT MET", "NOT MET", "met", "met", "met", "NOT MET"]),
    ],
)
def test_targets_follow_their_formulas(
    slice_seconds: float, inspect_heap: int, slice_cpu: float, verdicts: list[str]
) -> None:
    lines = benchmark.targets_table(_results(slice_seconds, inspect_heap, slice_cpu), "1 GiB", "after")
    assert [line.rsplit("  ", 1)[-1] for line in lines[2:]] == verdicts
    assert "2.00 + 3 x 1.00 + 1 = 6.00 s" in lines[2]
    assert "1.50 + 3 x 1.00 + 1 = 5.50 s" in lines[3]


@pytest.mark.parametrize("kind", list(compressed_weights.KINDS))
def test_each_compressed_package_holds_its_kinds_ops_and_is_sliced(kind: str, tmp_path: Path) -> None:
    path = benchmark.build_package(tmp_path / "compressed.mlpackage", LAYERS, benchmark.TINY_HIDDEN, kind)
    found = benchmark.compressed_ops(path)
    assert sorted({op_type for op_type, _ in found}) == sorted(set(compressed_weights.KINDS[kind].op_types))
    assert sum(found.values()) == LAYERS * len(compressed_weights.KINDS[kind].op_types)
    package = load_package(path)
    report = slice_attention(package.program, num_chunks=int(benchmark.NUM_CHUNKS))
    assert [site.status for site in report.sites] == ["rewritten"]


def test_the_output_check_compares_the_weight_file_and_the_compressed_ops(tmp_path: Path) -> None:
    path = benchmark.build_package(tmp_path / "int4.mlpackage", LAYERS, benchmark.TINY_HIDDEN, "int4 per-block")
    check = benchmark.check_output(benchmark.Version("this", benchmark.REPO), path, tmp_path / "out.mlpackage")
    assert check == benchmark.OutputCheck(weights_identical=True, compressed_kept=True)
    other = benchmark.build_package(tmp_path / "int8.mlpackage", LAYERS, benchmark.TINY_HIDDEN, "int8 per-channel")
    assert benchmark.compressed_ops(other) != benchmark.compressed_ops(path)


TINY_LLAMA = llama_package.LlamaShape(
    layers=2, hidden=128, query_heads=4, kv_heads=2, head_dim=32, mlp=256, vocabulary=512, context=256
)


def test_the_llama_package_has_both_functions_its_states_and_each_weight_once(tmp_path: Path) -> None:
    path = llama_package.build_llama_package(tmp_path / "llama.mlpackage", TINY_LLAMA)
    package = load_package(path)
    assert package.function_names == tuple(llama_package.FUNCTIONS) and package.default_function_name == "prefill"
    for name, length in llama_package.FUNCTIONS.items():
        function = package.program.functions[name]
        states = [var for var in function.inputs.values() if var.sym_type.__name__.startswith("state")]
        assert len(states) == 2 * TINY_LLAMA.layers
        assert function.inputs["causal_mask"].shape == (1, 1, length, TINY_LLAMA.context)
        assert op_counts(package.program, name)["constexpr_blockwise_shift_scale"] == 1 + 7 * TINY_LLAMA.layers
    weight_file = (path / benchmark.WEIGHT_FILE).stat().st_size
    assert TINY_LLAMA.parameters / 2 <= weight_file < TINY_LLAMA.parameters  # int4 codes, stored once
    report = slice_attention(package.program, num_chunks=int(benchmark.NUM_CHUNKS))
    assert [site.status for site in report.sites] == ["rewritten"] * 2 * TINY_LLAMA.layers


def test_the_llama_report_shows_each_function_and_what_the_output_keeps(tmp_path: Path) -> None:
    path = llama_package.build_llama_package(tmp_path / "llama.mlpackage", TINY_LLAMA)
    lines = benchmark.llama_report(path, tmp_path / "out.mlpackage")
    assert [line.split()[0] for line in lines[2:4]] == ["prefill", "decode"]
    text = "\n".join(lines)
    assert "(the input's: True)" in text and "every function: True (8 states)" in text
    assert "new constants + the spec's growth: True; the output's weight file is the input's with the new" in text
    assert not (tmp_path / "out.mlpackage").exists()


DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def _bytes(text: str) -> int:
    number, unit = text.split()
    return round(float(number) * UNITS[unit])


COMPRESSED_RUNS = [block for block in DOCS.read_text().split("```") if "compressed packages, this:" in block]
"""The blocks of docs/benchmarks.md that show runs of the compressed packages."""


def test_the_docs_show_runs_of_the_compressed_packages() -> None:
    assert len(COMPRESSED_RUNS) == 2


@pytest.mark.parametrize("block", COMPRESSED_RUNS, ids=[f"run {index}" for index in range(len(COMPRESSED_RUNS))])
def test_the_docs_show_the_tables_the_script_makes_of_the_runs_they_show(block: str) -> None:
    """The targets and the compressed packages' table of docs/benchmarks.md are what the script
    makes of the runs and sizes its results table there shows."""
    lines = block.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("package ") and "command" in line))
    results = {}
    for line in lines[header + 1 : lines.index("", header)]:
        name, version, command, seconds, cpu, heap, resident = re.split(r"\s{2,}", line.strip())
        results[(name, version, command)] = benchmark.Run(float(seconds), _bytes(heap), _bytes(resident), float(cpu))
    sizes_line = next(line for line in lines if "; packages: " in line).split("; packages: ")[1]
    sizes = {item.rsplit(" ", 2)[0]: _bytes(" ".join(item.rsplit(" ", 2)[1:])) for item in sizes_line.split(", ")}
    checks = {}
    for line in lines:
        found = re.match(r"(.+), this: the output's weight file .*: (True|False); .* types: (True|False)$", line)
        if found:
            checks[found[1]] = benchmark.OutputCheck(found[2] == "True", found[3] == "True")
    kinds = [name for name in checks if name in compressed_weights.KINDS]
    assert kinds == list(compressed_weights.KINDS)
    for name in checks:
        assert "\n".join(benchmark.targets_table(results, name, "this")) in block
    assert "\n".join(benchmark.kinds_table(results, sizes, kinds, "this", checks)) in block
