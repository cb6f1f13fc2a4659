"""``benchmarks/grouped_query.py`` builds the layer it describes, and docs/benchmarks.md shows its table."""

from __future__ import annotations

import math
from pathlib import Path

import grouped_query as benchmark
from graph import op_counts
from sdpa_slicer._tools.demo import HEAD_DIM, KV_HEADS, QUERY_HEADS

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
LONGEST = max(benchmark.CACHE_LENGTHS)
MIB = 1024 * 1024


def test_the_layer_repeats_its_cache_heads_for_the_query_heads_and_keeps_the_cache_in_states():
    prog = benchmark.llama_layer(benchmark.PREFILL_LENGTH, 1024)
    counts = op_counts(prog)
    assert (counts["read_state"], counts["coreml_update_state"], counts["tile"]) == (2, 2, 2)
    main = prog.functions["main"]
    (attention,) = [op for op in main.operations if op.op_type == "scaled_dot_product_attention"]
    assert attention.inputs["query"].shape == (1, QUERY_HEADS, benchmark.PREFILL_LENGTH, HEAD_DIM)
    assert attention.inputs["key"].shape == (1, QUERY_HEADS, 1024, HEAD_DIM)
    assert op_counts(benchmark.llama_layer(1, 1024, query_heads=KV_HEADS))["tile"] == 0


def test_the_docs_show_the_table_the_script_prints():
    table = "\n".join(benchmark.table(benchmark.CACHE_LENGTHS))
    assert f"```\n{table}\n```" in DOCS.read_text()


def test_at_the_longest_cache_every_call_stays_within_half_a_gib_and_no_tensor_exceeds_the_cache():
    cache_bytes = math.prod((1, KV_HEADS, LONGEST, HEAD_DIM)) * 2
    for call in benchmark.CALLS:
        row = benchmark.measure(LONGEST, call)
        assert row.peak_after <= 512 * MIB < row.peak_before, call
        assert row.largest_after <= cache_bytes, call
