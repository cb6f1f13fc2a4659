"""The programs ``benchmarks/rewrite.py`` times are the ones its tables describe."""

from __future__ import annotations

import ast
import importlib.util
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from coremltools.converters.mil.mil import types

from graph import op_counts
from sdpa_slicer import evaluate

BENCHMARK_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "rewrite.py"
SMALL_SHAPE = (1, 2, 64, 8)


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("rewrite_benchmark", BENCHMARK_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


benchmark = _load_benchmark()


def _rewritten_chain(num_sites: int):
    prog = benchmark.attention_chain(num_sites, SMALL_SHAPE)
    benchmark.rewrite_ours(prog)
    return prog


def test_the_chain_holds_attention_ops_and_nothing_else():
    assert op_counts(benchmark.attention_chain(3, SMALL_SHAPE)) == Counter({"scaled_dot_product_attention": 3})


def test_the_builder_floor_builds_exactly_the_ops_the_rewrite_leaves():
    prog = _rewritten_chain(2)
    rebuilt = benchmark.rebuild(prog)
    assert [(op.op_type, op.name) for op in rebuilt.functions["main"].operations] == [
        (op.op_type, op.name) for op in prog.functions["main"].operations
    ]


def test_graph_metrics_of_one_site_count_three_ops_per_chunk_and_one_concat_of_the_output():
    metrics = benchmark.graph_metrics(_rewritten_chain(1))
    assert metrics.non_const_ops == 3 * benchmark.NUM_CHUNKS + 3
    assert metrics.concat_bytes == math.prod(SMALL_SHAPE) * 2  # fp16


@pytest.mark.parametrize("dtype", [types.fp16, types.fp32])
def test_the_same_math_numpy_baseline_computes_exactly_what_the_rewritten_graph_computes(dtype):
    prog = benchmark.attention_chain(1, SMALL_SHAPE, dtype)
    benchmark.rewrite_ours(prog)
    rng = np.random.default_rng(0)
    nptype = types.nptype_from_builtin(dtype)
    inputs = {name: rng.standard_normal(SMALL_SHAPE).astype(nptype) for name in ("q", "k", "v")}
    (result,) = evaluate(prog, inputs).values()
    direct = benchmark.numpy_chunked_attention(**inputs)
    assert direct.dtype == result.dtype
    np.testing.assert_array_equal(direct, result)


BENCHMARKS = sorted(BENCHMARK_PATH.parent.glob("*.py"))


def _first_import(path: Path) -> str:
    """The first module a script imports, after ``from __future__``."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            return node.names[0].name
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            return node.module or ""
    return ""


@pytest.mark.parametrize("path", BENCHMARKS, ids=[path.name for path in BENCHMARKS])
def test_a_benchmark_that_uses_coremltools_imports_sdpa_slicer_first(path: Path) -> None:
    """Found by a user: the scripts printed coremltools' eight "Failed to load" lines, which
    importing ``sdpa_slicer`` first keeps quiet (off macOS they are always true)."""
    tree = ast.parse(path.read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported = {name.split(".")[0] for name in imported}
    if imported & {"coremltools", "machine"}:
        assert _first_import(path) == "sdpa_slicer"
