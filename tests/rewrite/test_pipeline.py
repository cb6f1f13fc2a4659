"""slice_attention end to end on programs: what is rewritten, what is left, and what is reported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb

from attention_cases import AttentionCase, MaskCase, sdpa_program
from generation import DECODE, PREFILL, generate
from graph import function_outputs, op_counts, serialize, signature
from injection import fail_site
from packages import GROUPED_QUERY_CACHE, GROUPED_QUERY_LENGTHS
from programs import (
    CONTAINERS,
    OUTER_OPERANDS,
    OUTER_SHAPE,
    REPEAT_FORMS,
    STATE_OP_TYPES,
    DecomposedForm,
    GroupedCase,
    branch_over_an_outer_transpose_program,
    chained_attention_program,
    decomposed_program,
    kv_cache_calls,
    kv_cache_program,
    nested_attention_program,
    outer_operand_program,
    repeat_heads,
    two_function_program,
)
from sdpa_slicer import EmitError, SliceConfig, estimate_memory, evaluate, slice_attention
from sdpa_slicer._graph import NOT_A_PROGRAM, ops_in_block
from sdpa_slicer._rewrite.plan.planning import UNCHUNKED_DECOMPOSED, UNCHUNKED_GROUPS, UNCHUNKED_KEPT
from sdpa_slicer._tools.demo import grouped_query_program

SDPA = "scaled_dot_product_attention"
CASE = AttentionCase(batch=(1, 4), query_length=100, key_length=80, head_dim=16, value_dim=8)


def test_output_names_and_types_are_unchanged():
    prog = chained_attention_program(3)
    before = function_outputs(prog)
    slice_attention(prog, num_chunks=4)
    assert function_outputs(prog) == before
    assert op_counts(prog)[SDPA] == 0


def test_attention_in_nested_blocks_at_any_depth_is_rewritten():
    prog = nested_attention_program()
    before = function_outputs(prog)
    report = slice_attention(prog, num_chunks=2)
    assert report.num_rewritten == 6 and report.num_skipped == 0
    assert op_counts(prog)[SDPA] == 0 and op_counts(prog)["concat"] == 6
    assert function_outputs(prog) == before
    serialize(prog)


def _outer_operand_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    batch, length, _ = OUTER_SHAPE
    inputs = {name: rng.standard_normal(OUTER_SHAPE).astype(np.float32) for name in "qkv"}
    inputs["mask"] = rng.uniform(-2.0, 0.0, (batch, length, length)).astype(np.float32)
    return inputs


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("outer", OUTER_OPERANDS)
def test_a_site_whose_operand_comes_from_an_enclosing_block_is_rewritten_and_that_op_kept(container, outer):
    """An op of an enclosing block feeding a site (a hoisted key transpose, a scaled query, a value,
    a mask or a scale) is an input of the site, never one of its ops."""
    prog = outer_operand_program(container, outer)
    main = prog.functions["main"]
    outer_ops = [op.name for op in main.operations if op.op_type != "const"]
    want = evaluate(prog, _outer_operand_inputs())
    report = slice_attention(prog, num_chunks=4)
    assert [(site.status, site.reason) for site in report.sites] == [("rewritten", None)]
    # A constant scale outside is folded into the query's and, read no more, removed.
    assert [op.name for op in main.operations if op.op_type != "const"] == outer_ops
    assert op_counts(prog)["softmax"] == 4
    (name,) = want
    np.testing.assert_allclose(evaluate(prog, _outer_operand_inputs())[name], want[name], rtol=1e-5, atol=1e-6)
    serialize(prog)


SLICE_AND_PRINT = """
import sys
padding = [object() for _ in range(int(sys.argv[1]))]  # shifts where every later object lands
from graph import signature
from programs import (
    CONTAINERS, OUTER_OPERANDS, branch_over_an_outer_transpose_program, kv_cache_program, nested_attention_program,
    outer_operand_program,
)
from sdpa_slicer import slice_attention
cases = [(branch_over_an_outer_transpose_program(), {"num_chunks": 4})]
cases += [(outer_operand_program(c, o), {"num_chunks": 4}) for c in CONTAINERS for o in OUTER_OPERANDS]
cases += [(nested_attention_program(), {"num_chunks": 3, "kv_chunk_size": 24}), (kv_cache_program(), {})]
for prog, options in cases:
    print(slice_attention(prog, **options))
    print(signature(prog))
"""


def test_attention_in_a_branch_over_a_key_transposed_outside_is_rewritten_and_computes_what_it_did():
    prog = branch_over_an_outer_transpose_program()
    main = prog.functions["main"]
    rng = np.random.default_rng(0)
    calls = [
        {**{name: rng.standard_normal(OUTER_SHAPE).astype(np.float32) for name in "qkv"}, "flag": np.array([flag])}
        for flag in (True, False)
    ]
    wants = [evaluate(prog, inputs) for inputs in calls]
    (site,) = slice_attention(prog, num_chunks=4).sites
    assert (site.status, site.num_chunks) == ("rewritten", 4)
    assert [op.name for op in main.operations if op.op_type == "transpose"] == ["kt"]
    for inputs, want in zip(calls, wants):
        (name,) = want
        np.testing.assert_allclose(evaluate(prog, inputs)[name], want[name], rtol=1e-5, atol=1e-6)


def test_the_same_program_is_rewritten_the_same_whatever_the_hash_seed_or_memory_layout():
    printed = set()
    for seed, padding in ((0, 0), (1, 1000), (2, 77), (3, 5)):
        done = subprocess.run(
            [sys.executable, "-c", SLICE_AND_PRINT, str(padding)],
            cwd=Path(__file__).resolve().parents[1],
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            capture_output=True,
            text=True,
            check=True,
        )
        assert "rewritten" in done.stdout
        printed.add(done.stdout)
    assert len(printed) == 1


def test_every_function_is_rewritten():
    prog = two_function_program()
    report = slice_attention(prog, num_chunks=2)
    assert sorted(site.function for site in report.sites) == ["main", "second"]
    assert op_counts(prog, "main")[SDPA] == op_counts(prog, "second")[SDPA] == 0


@pytest.mark.parametrize(
    "mask",
    [
        MaskCase("bool", (1, 1, 100, 80)),
        MaskCase("bool", (80,)),
        MaskCase("fp16", (4, 1, 80)),
        MaskCase("fp32", (100, 80)),
        MaskCase("fp32", (1, 4, 100, 80)),
    ],
)
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_every_mask_form_rewrites_and_serializes(mask, dtype):
    prog = sdpa_program(
        AttentionCase(batch=(1, 4), query_length=100, key_length=80, head_dim=16, value_dim=8, dtype=dtype, mask=mask)
    )
    report = slice_attention(prog, num_chunks=3)
    assert report.num_rewritten == 1
    counts = op_counts(prog)
    sliced_rows = len(mask.shape) >= 2 and mask.shape[-2] != 1
    assert counts["split"] == (2 if sliced_rows else 1)
    assert counts["add"] == 3
    assert counts["cast"] == (mask.dtype != dtype)
    serialize(prog)


def test_a_static_query_with_a_dynamic_key_length_is_rewritten():
    prog = sdpa_program(
        AttentionCase(batch=(2,), query_length=64, key_length=64, head_dim=8, value_dim=8, dynamic_key=True)
    )
    report = slice_attention(prog, num_chunks=2)
    assert report.num_rewritten == 1 and report.sites[0].key_length is None
    serialize(prog)


@pytest.mark.parametrize(
    "case, reason",
    [
        (
            AttentionCase(batch=(1,), query_length=64, key_length=64, head_dim=8, value_dim=8, dynamic_query=True),
            "query length is dynamic",
        ),
        (AttentionCase(batch=(1,), query_length=63, key_length=64, head_dim=8, value_dim=8), "below min_seq_length"),
    ],
)
def test_unrewritable_sites_are_skipped_with_a_reason_and_left_unchanged(case, reason):
    prog = sdpa_program(case)
    before = signature(prog)
    report = slice_attention(prog)
    assert report.num_skipped == 1 and reason in report.sites[0].reason
    assert signature(prog) == before


def test_the_report_matches_the_program():
    prog = nested_attention_program()
    report = slice_attention(prog, num_chunks=2, min_seq_length=1)
    assert report.num_rewritten + report.num_skipped == len(report.sites) == 6
    assert {site.op_name for site in report.sites} == {"top", "in_true", "in_false", "depth2", "depth3", "in_loop"}
    text = str(report)
    assert "6 attention site(s) rewritten, 0 skipped" in text
    assert all(site.op_name in text for site in report.sites)


def test_a_program_without_attention_is_reported_as_such():
    @mb.program(input_specs=[mb.TensorSpec((2, 3))], opset_version=ct.target.iOS17)
    def prog(x):
        return mb.relu(x=x)

    report = slice_attention(prog)
    assert report.sites == ()
    assert report.notes == ("function 'main' (iOS17): no attention found",)


def test_not_a_program_is_a_type_error_naming_what_was_given():
    with pytest.raises(TypeError, match="got dict"):
        slice_attention({})


PROGRAM_TAKERS = {
    "slice_attention": slice_attention,
    "evaluate": lambda model: evaluate(model, {}),
    "estimate_memory": estimate_memory,
}


@pytest.mark.parametrize("caller", PROGRAM_TAKERS)
def test_an_mlmodel_is_refused_naming_the_ways_to_a_program(caller):
    """Found by a user: ``slice_attention(MLModel)`` said only that it expects a Program."""
    prog = sdpa_program(AttentionCase(batch=(1, 2), query_length=64, key_length=64, head_dim=8, value_dim=8))
    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18)
    with pytest.raises(TypeError) as raised:
        PROGRAM_TAKERS[caller](model)
    assert str(raised.value) == NOT_A_PROGRAM.format(caller=caller, given="MLModel")
    assert "load_package(path).program" in str(raised.value) and 'convert_to="milinternal"' in str(raised.value)


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"num_chunks": 0}, ValueError, "SliceConfig.num_chunks must be >= 1"),
        ({"max_scores_bytes": -1}, ValueError, "SliceConfig.max_scores_bytes must be >= 1"),
        ({"min_seq_length": 1.5}, TypeError, "SliceConfig.min_seq_length must be an int"),
        ({"prune_masked_keys": "yes"}, TypeError, "SliceConfig.prune_masked_keys must be a bool"),
        ({"chunks": 2}, TypeError, "unknown SliceConfig option.* chunks"),
        (
            {"num_chunks": 2, "chunk_size": 4},
            ValueError,
            "chunk_size and SliceConfig.num_chunks are mutually exclusive",
        ),
        ({"config": {"num_chunks": 2}}, TypeError, "config must be a SliceConfig, got dict"),
    ],
)
def test_invalid_options_raise_naming_the_field_before_the_program_is_touched(options, error, message):
    prog = sdpa_program(CASE)
    before = signature(prog)
    with pytest.raises(error, match=message):
        slice_attention(prog, **options)
    assert signature(prog) == before


@pytest.mark.parametrize("opset", [ct.target.iOS15, ct.target.iOS16, ct.target.iOS17], ids=lambda opset: opset.name)
def test_decomposed_attention_below_ios18_is_rewritten_for_its_own_target(opset):
    """The fused op needs iOS18, a written-out chain does not; its rewrite uses only ops every
    opset has, so the program still serializes for the deployment target it had."""
    case = AttentionCase(
        batch=(1, 2), query_length=64, key_length=48, head_dim=8, value_dim=8, mask=MaskCase("fp32", (64, 48))
    )
    prog = decomposed_program(case, DecomposedForm(scale_at="scores"), scale=0.3, opset=opset)
    inputs = case.inputs(np.random.default_rng(0))
    before = evaluate(prog, inputs)["attention"]
    report = slice_attention(prog, num_chunks=4, kv_chunk_size=16)
    assert [(site.kind, site.status) for site in report.sites] == [("decomposed", "rewritten")]
    assert prog.functions["main"].opset_version == opset
    np.testing.assert_allclose(evaluate(prog, inputs)["attention"], before, rtol=1e-5, atol=1e-5)
    serialize(prog, keep=False, target=opset)


def test_a_program_whose_attention_is_all_dynamic_is_left_unchanged_with_the_reasons():
    case = AttentionCase(
        batch=(1,), query_length=64, key_length=64, head_dim=8, value_dim=8, dynamic_query=True, dynamic_key=True
    )

    @mb.program(input_specs=case.input_specs(), opset_version=ct.target.iOS18)
    def prog(q, k, v):
        fused = mb.scaled_dot_product_attention(query=q, key=k, value=v, name="fused")
        return DecomposedForm().attend(fused, k, v, None, 0.3, "decomposed")

    before = signature(prog)
    report = slice_attention(prog, min_seq_length=1)
    assert [(site.kind, site.status, site.reason) for site in report.sites] == [
        ("fused", "skipped", "query length is dynamic"),
        ("decomposed", "skipped", "query length is dynamic"),
    ]
    assert signature(prog) == before


def test_options_override_the_config():
    prog = sdpa_program(CASE)
    report = slice_attention(prog, config=SliceConfig(num_chunks=2), chunk_size=10)
    assert report.sites[0].num_chunks == 10


def test_a_failing_site_is_left_exactly_as_it_was_and_the_others_are_rewritten(monkeypatch):
    prog = chained_attention_program(3)
    fail_site(monkeypatch, "attention_1")
    report = slice_attention(prog, num_chunks=2)
    statuses = {site.op_name: site.status for site in report.sites}
    assert statuses == {"attention_0": "rewritten", "attention_1": "skipped", "attention_2": "rewritten"}
    assert "injected failure" in report.sites[1].reason
    remaining = [op for op in ops_in_block(prog.functions["main"]) if op.op_type == SDPA]
    assert [op.name for op in remaining] == ["attention_1"]
    assert remaining[0].outputs[0].name == "attention_1"
    assert [op.name for op in remaining[0].outputs[0].child_ops] == ["attention_2_scaled_query"]
    serialize(prog)


def test_a_failed_site_leaves_the_program_unchanged_op_for_op(monkeypatch):
    prog = sdpa_program(
        AttentionCase(
            batch=(1, 2), query_length=64, key_length=64, head_dim=8, value_dim=8, mask=MaskCase("bool", (64, 64))
        )
    )
    before = signature(prog)
    fail_site(monkeypatch, "attention")
    report = slice_attention(prog, num_chunks=4)
    assert report.num_skipped == 1
    assert signature(prog) == before


def test_strict_raises_on_a_failing_site(monkeypatch):
    prog = chained_attention_program(2)
    fail_site(monkeypatch, "attention_1")
    with pytest.raises(EmitError, match="attention_1.*injected failure"):
        slice_attention(prog, num_chunks=2, strict=True)
    assert [op.name for op in ops_in_block(prog.functions["main"]) if op.op_type == SDPA] == ["attention_1"]


@pytest.mark.parametrize("scale_at, extra_muls", [("query", 1), ("scores", 1), ("divide", 1), ("none", 0)])
def test_a_decomposed_chain_is_rewritten_and_its_ops_removed(scale_at, extra_muls):
    case = AttentionCase(
        batch=(1, 2), query_length=64, key_length=48, head_dim=8, value_dim=8, mask=MaskCase("fp32", (64, 48))
    )
    prog = decomposed_program(case, DecomposedForm(scale_at=scale_at, key_transpose="op"), scale=0.3)
    before = function_outputs(prog)
    report = slice_attention(prog, num_chunks=4)
    assert [(site.kind, site.status) for site in report.sites] == [("decomposed", "rewritten")]
    counts = op_counts(prog)
    assert (counts["softmax"], counts["concat"], counts["transpose"], counts["real_div"]) == (4, 1, 0, 0)
    assert counts["mul"] == extra_muls
    assert function_outputs(prog) == before
    unused = [
        op.name for op in ops_in_block(prog.functions["main"]) if op.op_type == "const" and not op.outputs[0].child_ops
    ]
    assert unused == []
    serialize(prog)


def test_decomposed_chains_are_left_alone_when_matching_is_off():
    case = AttentionCase(batch=(1, 2), query_length=64, key_length=48, head_dim=8, value_dim=8)
    prog = decomposed_program(case, DecomposedForm(), scale=0.3)
    before = signature(prog)
    report = slice_attention(prog, match_decomposed=False)
    assert report.sites == () and signature(prog) == before


def _state_ops(prog, function_name: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """The state reads, cache writes and state updates of a function, in order, with their inputs."""
    return [
        (op.op_type, op.name, tuple(var.name for var in op.inputs.values()))
        for op in ops_in_block(prog.functions[function_name])
        if op.op_type in STATE_OP_TYPES
    ]


KV_FORMS = {"fused": None, "decomposed": DecomposedForm(scale_at="scores")}


@pytest.mark.parametrize("form", KV_FORMS)
def test_attention_over_a_kv_cache_state_is_rewritten_and_the_state_ops_are_untouched(form):
    prog = kv_cache_program(KV_FORMS[form])
    before = {name: _state_ops(prog, name) for name in prog.functions}
    report = slice_attention(prog, num_chunks=4)
    assert [(site.function, site.rewritten) for site in report.sites] == [("prefill", True), ("decode", False)]
    assert report.sites[1].reason == "query length 1 is below min_seq_length 64"
    assert {name: _state_ops(prog, name) for name in prog.functions} == before
    assert op_counts(prog, "prefill")["softmax"] == 4 and op_counts(prog, "decode")["softmax"] == (form != "fused")


@pytest.mark.parametrize("form", KV_FORMS)
def test_prefill_then_decode_over_the_sliced_program_matches_the_original(form):
    original, sliced = kv_cache_program(KV_FORMS[form]), kv_cache_program(KV_FORMS[form])
    slice_attention(sliced, num_chunks=4)
    want, got = generate(original, *kv_cache_calls()), generate(sliced, *kv_cache_calls())
    assert sorted(got.states) == ["k_cache", "v_cache"]
    for name, cache in want.states.items():
        np.testing.assert_array_equal(got.states[name], cache)
    np.testing.assert_allclose(got.outputs[0]["attention"], want.outputs[0]["attention"], rtol=0, atol=2e-3)
    for got_step, want_step in zip(got.outputs[1:], want.outputs[1:]):
        np.testing.assert_array_equal(got_step["attention"], want_step["attention"])


GROUPED_REPEATS = 4


def _max_rank(prog) -> int:
    return max(var.rank for function in prog.functions.values() for op in ops_in_block(function) for var in op.outputs)


@pytest.mark.parametrize("form", KV_FORMS)
@pytest.mark.parametrize("repeat_form", REPEAT_FORMS)
def test_grouped_query_prefill_and_decode_over_states_read_the_cache_unrepeated(repeat_form, form):
    """The cache's 2 heads serve 8 query heads; prefill is chunked, decode only folded. Every tensor
    of the rewritten functions has rank 4 or less, the repeat ops are gone, and a prefill then three
    decode calls give the caches bit for bit and the outputs within fp16 rounding."""
    repeat = (repeat_form, GROUPED_REPEATS)
    original, sliced = kv_cache_program(KV_FORMS[form], repeat), kv_cache_program(KV_FORMS[form], repeat)
    before = {name: _state_ops(sliced, name) for name in sliced.functions}
    report = slice_attention(sliced, num_chunks=4)
    layout = "tiled" if repeat_form == "tile" else "interleaved"
    assert [
        (site.function, site.status, site.num_chunks, site.kv_heads, site.kv_repeats, site.kv_layout)
        for site in report.sites
    ] == [
        ("prefill", "rewritten", 4, 2, GROUPED_REPEATS, layout),
        ("decode", "rewritten", 1, 2, GROUPED_REPEATS, layout),
    ]
    assert {name: _state_ops(sliced, name) for name in sliced.functions} == before
    if repeat_form == "repeat_interleave":
        assert _max_rank(original) == 5  # the export's own repeat goes through rank 5
    assert _max_rank(sliced) <= 4
    assert all(op_counts(sliced, name)["tile"] == 0 for name in sliced.functions)
    calls = kv_cache_calls(repeats=GROUPED_REPEATS)
    want, got = generate(original, *calls), generate(sliced, *calls)
    for name, cache in want.states.items():
        np.testing.assert_array_equal(got.states[name], cache)
    for got_call, want_call in zip(got.outputs, want.outputs):
        np.testing.assert_allclose(got_call["attention"], want_call["attention"], rtol=0, atol=2e-3)


def test_grouped_keys_and_values_stay_repeated_when_folding_is_off():
    prog = kv_cache_program(repeat=("repeat_kv", GROUPED_REPEATS))
    report = slice_attention(prog, num_chunks=4, fold_repeated_kv=False)
    assert [(site.function, site.status, site.kv_heads) for site in report.sites] == [
        ("prefill", "rewritten", None),
        ("decode", "skipped", None),
    ]
    assert op_counts(prog, "prefill")["tile"] == op_counts(prog, "decode")["tile"] == 2


def test_a_repeat_of_the_keys_made_outside_a_loop_is_removed_once_the_attention_in_the_loop_reads_them_unrepeated():
    shapes = [mb.TensorSpec((1, 8, 64, 8)), mb.TensorSpec((1, 2, 64, 8)), mb.TensorSpec((1, 2, 64, 8))]

    @mb.program(input_specs=shapes, opset_version=ct.target.iOS18)
    def prog(q, k, v):
        keys, values = (repeat_heads(x, "repeat_kv", 4, f"{name}_repeated") for x, name in ((k, "k"), (v, "v")))

        def body(x, i):
            return mb.scaled_dot_product_attention(query=x, key=keys, value=values, name="attention"), mb.add(x=i, y=1)

        looped, _ = mb.while_loop(_cond=lambda x, i: mb.less(x=i, y=2), _body=body, loop_vars=(q, 0), name="loop")
        return mb.identity(x=looped, name="out")

    rng = np.random.default_rng(0)
    inputs = {"q": rng.standard_normal((1, 8, 64, 8)), **{name: rng.standard_normal((1, 2, 64, 8)) for name in "kv"}}
    want = evaluate(prog, inputs)["out"]
    (site,) = slice_attention(prog, num_chunks=2).sites
    assert (site.status, site.kv_heads) == ("rewritten", 2)
    assert op_counts(prog)["tile"] == op_counts(prog)["expand_dims"] == 0
    np.testing.assert_allclose(evaluate(prog, inputs)["out"], want, rtol=1e-5, atol=1e-6)


FITS = AttentionCase(batch=(1, 8), query_length=512, key_length=512, head_dim=64, value_dim=64, dtype="fp16")
"""Scores of 4 MiB: one chunk under the default budget."""


def test_a_fused_op_that_fits_is_written_out_and_its_estimate_rises_as_its_note_says():
    prog = sdpa_program(FITS)
    report = slice_attention(prog)
    (site,) = report.sites
    assert (site.status, site.num_chunks, site.notes) == ("rewritten", 1, (UNCHUNKED_DECOMPOSED,))
    assert op_counts(prog)[SDPA] == 0
    (before,), (after,) = report.memory_before, report.memory_after
    assert after.largest_tensor_bytes == before.largest_tensor_bytes
    assert after.peak_live_bytes > before.peak_live_bytes


def test_decompose_unchunked_off_leaves_the_fused_op_that_fits_as_it_was():
    prog = sdpa_program(FITS)
    before = signature(prog)
    (site,) = slice_attention(prog, decompose_unchunked=False).sites
    assert (site.status, site.reason) == ("skipped", UNCHUNKED_KEPT)
    assert signature(prog) == before


def test_decompose_unchunked_off_still_folds_a_grouped_query_site_in_one_chunk():
    prog = grouped_query_program(GROUPED_QUERY_LENGTHS, GROUPED_QUERY_CACHE)
    report = slice_attention(prog, decompose_unchunked=False, max_scores_bytes=2**30)
    assert [site.status for site in report.sites] == ["rewritten", "rewritten"]
    notes = {site.function: site.notes for site in report.sites}
    assert notes[PREFILL][-1] == UNCHUNKED_GROUPS  # its mask has a row per query: one chunk per group
    assert notes[DECODE][-1].endswith(": not chunked")  # one query row: one fused op on stacked heads
    assert op_counts(prog, PREFILL)[SDPA] == 0 and op_counts(prog, DECODE)[SDPA] == 1
    assert op_counts(prog, PREFILL)["tile"] == op_counts(prog, DECODE)["tile"] == 0


@pytest.mark.parametrize("fused", [True, False])
def test_a_decode_over_keys_kept_as_columns_reads_them_unrepeated_and_computes_what_it_did(fused):
    """Found in review: keys stored as (B, KVH, E, S), repeated, then transposed back, left the fold
    with a key to read transposed; the one fused op on grouped heads read it as (..., S, E)."""
    case = GroupedCase(
        batch=1, kv_heads=2, repeats=4, query_length=1, key_length=8, head_dim=8, fused=fused, keys_as_columns=True
    )
    prog = case.program()
    inputs = case.inputs(np.random.default_rng(0))
    want = evaluate(prog, inputs)["attention"]
    (site,) = slice_attention(prog).sites
    assert (site.status, site.kv_heads) == ("rewritten", 2)
    np.testing.assert_allclose(evaluate(prog, inputs)["attention"], want, rtol=1e-5, atol=1e-6)
