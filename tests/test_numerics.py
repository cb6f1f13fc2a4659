"""The core proof: every rewrite computes what the original attention computed.

Each property builds an attention program, rewrites it with a random configuration,
evaluates it with the NumPy interpreter and compares with a float64 reference: fp32 within
1e-5 relative, fp16 within 5e-3 relative to the output's magnitude, and rows whose keys are
all masked finite.
"""

from __future__ import annotations

import copy
from typing import Optional

import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb
from hypothesis import given
from hypothesis import strategies as st

from attention_cases import (
    IOS18,
    MASKED_FLOAT,
    MIL_DTYPES,
    NUMPY_DTYPES,
    AttentionCase,
    MaskCase,
    assert_attention_close,
    assert_close_to_unsliced,
    reference_attention,
    sdpa_program,
)
from graph import op_counts
from programs import QUANTIZED, DecomposedForm, Modifier, ScoreChain, decomposed_program, modifier_inputs
from sdpa_slicer import SliceConfig, evaluate, slice_attention
from sdpa_slicer._graph import ops_in_block
from sdpa_slicer._rewrite.plan.planning import ALREADY_ONE_CHUNK
from strategies import attention_cases, constant_masks, decomposed_forms, grouped_cases, score_chains, slice_configs


def _rewrite_and_evaluate(prog, case: AttentionCase, config, seed: int = 0, inputs=None):
    """Rewrite a copy of ``prog``; evaluate both on random inputs. The original must agree with
    the reference too (on rows with an unmasked key), which checks the oracle itself."""
    rewritten = copy.deepcopy(prog)
    report = slice_attention(rewritten, config)
    (site,) = report.sites
    assert site.rewritten or site.reason == ALREADY_ONE_CHUNK, str(report)
    if inputs is None:
        inputs = case.inputs(np.random.default_rng(seed))
    original = evaluate(prog, inputs)["attention"]
    output = evaluate(rewritten, inputs)["attention"]
    return report, inputs, original, output


def _assert_both_close(original, output, expected, dtype: str) -> None:
    defined = ~np.isnan(expected)
    assert_attention_close(np.where(defined, original, 0.0), np.where(defined, expected, 0.0), dtype)
    assert_attention_close(output, expected, dtype)


@given(case=attention_cases(), data=st.data())
def test_rewritten_fused_attention_matches_the_reference(case, data):
    config = data.draw(slice_configs(case))
    _, inputs, original, output = _rewrite_and_evaluate(
        sdpa_program(case), case, config, data.draw(st.integers(0, 2**32 - 1))
    )
    _assert_both_close(original, output, reference_attention(**inputs), case.dtype)


@given(case=attention_cases(masks=False), data=st.data())
def test_rewritten_attention_with_a_constant_mask_matches_the_reference(case, data):
    mask = data.draw(constant_masks(case))
    config = data.draw(slice_configs(case))
    prog = sdpa_program(case, constant_mask=mask)
    _, inputs, original, output = _rewrite_and_evaluate(prog, case, config, data.draw(st.integers(0, 2**32 - 1)))
    _assert_both_close(original, output, reference_attention(mask=mask, **inputs), case.dtype)


@given(case=attention_cases(mask_dtype_follows=True), form=decomposed_forms(), data=st.data())
def test_rewritten_decomposed_attention_matches_the_reference(case, form, data):
    scale = data.draw(st.floats(0.05, 2.0))
    config = data.draw(slice_configs(case))
    prog = decomposed_program(case, form, scale)
    _, inputs, original, output = _rewrite_and_evaluate(prog, case, config, data.draw(st.integers(0, 2**32 - 1)))
    _assert_both_close(original, output, reference_attention(scale=form.applied_scale(scale), **inputs), case.dtype)


@given(case=attention_cases(mask_dtype_follows=True, dynamic_key=False), form=decomposed_forms(), data=st.data())
def test_rewritten_attention_with_score_modifiers_computes_what_the_unsliced_program_computes(case, form, data):
    chain = data.draw(score_chains(len(case.batch) + 2, mask_rank=len(case.mask.shape) if case.mask else 0))
    _check_modifiers(
        case,
        form,
        chain,
        data.draw(slice_configs(case)),
        data.draw(st.floats(0.05, 2.0)),
        data.draw(st.integers(0, 2**32 - 1)),
    )


def _check_modifiers(
    case: AttentionCase, form, chain: ScoreChain, config: SliceConfig, scale: float, seed: int
) -> None:
    prog = decomposed_program(case, form, scale, chain=chain)
    inputs = {**case.inputs(np.random.default_rng(seed)), **modifier_inputs(case, chain)}
    report, _, original, output = _rewrite_and_evaluate(prog, case, config, inputs=inputs)
    scores_shape = case.batch + (case.query_length, case.key_length)
    assert report.sites[0].score_ops == _score_ops(chain, case.mask is not None, scores_shape)
    assert report.sites[0].weight_ops == chain.weight_ops
    assert_close_to_unsliced(output, original, case.dtype)


def test_fp16_scores_multiplied_by_operands_stay_within_rounding_of_the_unsliced_program():
    """Found by the fuzz profile: fp16 scores scaled by 1.96, then multiplied by two run-time operands
    of up to 2, rounded differently (scale on the query, not the scores) by 1.0 relative in one weight.
    Operands that enlarge the scores compare two roundings, not the rewrite: multipliers are now at
    most 1 (divisors at least 1)."""
    case = AttentionCase(batch=(2, 2, 2), query_length=29, key_length=35, head_dim=11, value_dim=6, dtype="fp16")
    chain = ScoreChain(
        modifiers=(
            Modifier(op="mul", shape=(None,), constant=False, scores_first=False, seed=86),
            Modifier(op="mul", shape=(1, None, None), constant=False, scores_first=False, seed=0),
        )
    )
    config = SliceConfig(min_seq_length=1, chunk_size=1, prune_masked_keys=False)
    _check_modifiers(case, DecomposedForm(scale_at="scores"), chain, config, 1.9553275602658184, 9565)


def _score_ops(chain: ScoreChain, masked: bool, scores_shape: tuple[int, ...]) -> tuple[str, ...]:
    """The ops a site reports between its scale and its softmax: the modifiers and the mask's add,
    but for constant one-element multipliers right after the scale, which join it."""

    def joins_the_scale(step: Optional[Modifier]) -> bool:
        return (
            step is not None
            and step.op in ("mul", "real_div")
            and step.constant
            and set(step.operand_shape(scores_shape)) <= {1}
        )

    steps: list[Optional[Modifier]] = list(chain.modifiers)
    if masked:
        steps.insert(chain.mask_at, None)
    while steps and joins_the_scale(steps[0]):
        steps.pop(0)

    def ops_of(step: Optional[Modifier]) -> tuple[str, ...]:
        if step is None:
            return ("add",)
        return ("quantize", "dequantize") if step.op == QUANTIZED else (step.op,)

    return tuple(op for step in steps for op in ops_of(step))


@given(case=grouped_cases(), data=st.data())
def test_grouped_query_attention_reading_the_kv_heads_unrepeated_matches_the_reference(case, data):
    config = data.draw(slice_configs(case.attention_case()))
    if data.draw(st.booleans()):
        config = config.with_options(min_seq_length=case.query_length + 1)  # not chunked: only folded
    prog = case.program()
    rewritten = copy.deepcopy(prog)
    (site,) = slice_attention(rewritten, config).sites
    assert (site.status, site.kv_heads, site.kv_repeats) == ("rewritten", case.kv_heads, case.repeats)
    assert max(var.rank for op in ops_in_block(rewritten.functions["main"]) for var in op.outputs) <= 4
    inputs = case.inputs(np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))))
    original, output = (evaluate(program, inputs)["attention"] for program in (prog, rewritten))
    _assert_both_close(original, output, reference_attention(**case.reference_inputs(inputs)), case.dtype)


@given(case=attention_cases(), data=st.data())
def test_the_rewritten_graph_has_one_concat_and_every_query_row_once(case, data):
    config = data.draw(slice_configs(case))
    prog = sdpa_program(case)
    (site,) = slice_attention(prog, config).sites
    counts = op_counts(prog)
    assert counts["scaled_dot_product_attention"] == 0
    assert counts["concat"] == (site.num_chunks > 1)
    query_splits = [op for op in prog.functions["main"].operations if op.name == "attention_query_chunk"]
    if site.num_chunks == 1:
        assert query_splits == []
    else:
        (split,) = query_splits
        rows = [out.shape[-2] for out in split.outputs]
        assert len(rows) == site.num_chunks and sum(rows) == case.query_length
        assert max(rows) == site.chunk_size and min(rows) >= 1


def test_fp16_rows_masked_everywhere_by_a_float_mask_stay_finite_in_one_row_chunks():
    """Regression: with one query row per chunk and every key masked by -1e4 in fp16, the chunk's
    scores round to the mask value; the rows must stay finite, the others exact."""
    case = AttentionCase(
        batch=(1,),
        query_length=35,
        key_length=2,
        head_dim=2,
        value_dim=1,
        dtype="fp16",
        mask=MaskCase(dtype="fp16", shape=(2,)),
    )
    prog = sdpa_program(case)
    inputs = case.inputs(np.random.default_rng(1))
    inputs["mask"] = np.array([MASKED_FLOAT, MASKED_FLOAT], dtype=np.float16)
    report = slice_attention(prog, chunk_size=1, min_seq_length=1, prune_masked_keys=False)
    assert report.sites[0].num_chunks == 35
    output = evaluate(prog, inputs)["attention"]
    assert np.isnan(reference_attention(**inputs)).all()
    assert np.isfinite(output).all()


def _blocked_mask() -> np.ndarray:
    """Visible keys (64 rows, 48 keys): rows 0-19 lose the first 16-key block, rows 40+ the last,
    row 30 sees nothing."""
    visible = np.ones((64, 48), dtype=bool)
    visible[:20, :16] = False
    visible[30, :] = False
    visible[40:, 32:] = False
    return visible


MASK_KINDS = {"bool": "bool", "minus_inf": None, "minus_inf_in_the_other_dtype": "other"}
"""Mask dtype per kind: bool, the attention's dtype (None), or the other float dtype."""


@pytest.mark.parametrize("kv_chunk_size", [None, 16, 7])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_key_blocks_masked_for_some_rows(mask_kind, dtype, kv_chunk_size):
    """Whole key chunks masked for some rows never give exp(-inf - -inf). A row with no visible key
    is finite with a bool mask, and with a float mask clipped into fp16; with a float mask of -inf
    otherwise it is NaN, exactly as the op gives."""
    mask_dtype = {"bool": "bool", None: dtype, "other": "fp16" if dtype == "fp32" else "fp32"}[MASK_KINDS[mask_kind]]
    case = AttentionCase(
        batch=(2,),
        query_length=64,
        key_length=48,
        head_dim=8,
        value_dim=4,
        dtype=dtype,
        mask=MaskCase(dtype=mask_dtype, shape=(64, 48)),
    )
    prog = sdpa_program(case)
    inputs = case.inputs(np.random.default_rng(0))
    visible = _blocked_mask()
    inputs["mask"] = (
        visible if mask_kind == "bool" else np.where(visible, 0.0, -np.inf).astype(NUMPY_DTYPES[mask_dtype])
    )
    config = SliceConfig(num_chunks=4, kv_chunk_size=kv_chunk_size)
    _, inputs, original, output = _rewrite_and_evaluate(prog, case, config, inputs=inputs)
    expected = reference_attention(**inputs)
    unseeing = ~visible.any(axis=-1)
    if mask_kind == "bool" or (mask_dtype == "fp32" and dtype == "fp16"):
        assert np.isfinite(output).all()
        assert_attention_close(output[:, ~unseeing], expected[:, ~unseeing], dtype)
    else:
        np.testing.assert_array_equal(np.isnan(output).any(axis=-1), np.broadcast_to(unseeing, (2, 64)))
        np.testing.assert_array_equal(np.isnan(original), np.isnan(output))
        assert_attention_close(output[:, ~unseeing], expected[:, ~unseeing], dtype)


def _lowest_masked_program(fused: bool, mask: np.ndarray):
    """fp16 attention of q (1, 1, 2, 4) over 8 keys under the constant ``mask``, fused or written out."""
    specs = [mb.TensorSpec(shape, dtype=MIL_DTYPES["fp16"]) for shape in ((1, 1, 2, 4), (1, 1, 8, 4), (1, 1, 8, 4))]

    @mb.program(input_specs=specs, opset_version=IOS18)
    def prog(q, k, v):
        if fused:
            return mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=mask, name="attention")
        scores = mb.add(x=mb.matmul(x=q, y=k, transpose_y=True), y=mask)
        return mb.matmul(x=mb.softmax(x=scores, axis=-1), y=v, name="attention")

    return prog


@pytest.mark.parametrize("fused", [True, False])
def test_an_fp16_mask_of_the_lowest_value_that_overflows_with_a_score_gives_no_nan_under_key_chunks(fused):
    """Found in review: finfo(fp16).min (what exports use to mask) plus a score below -16
    overflows to -inf; a row whose first key chunk held only such keys then gave NaN."""
    case = AttentionCase(batch=(1, 1), query_length=2, key_length=8, head_dim=4, value_dim=4, dtype="fp16")
    mask = np.zeros((2, 8), np.float16)
    mask[:, :4] = np.finfo(np.float16).min
    keys = np.ones((1, 1, 8, 4), np.float16)
    keys[..., :4, :] = -4.0  # scores of -32 where the mask is lowest
    inputs = {
        "q": np.full((1, 1, 2, 4), 4.0, np.float16),
        "k": keys,
        "v": (np.arange(32).reshape(1, 1, 8, 4) / 32).astype(np.float16),
    }
    config = SliceConfig(min_seq_length=1, num_chunks=1, kv_chunk_size=4, prune_masked_keys=False)
    _, _, original, output = _rewrite_and_evaluate(_lowest_masked_program(fused, mask), case, config, inputs=inputs)
    assert np.isfinite(original).all()
    assert_close_to_unsliced(output, original, "fp16")
