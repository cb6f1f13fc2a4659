"""The core proof: every rewrite computes what the original attention computed.

Each property builds an attention program, rewrites it with a random configuration,
evaluates it with the NumPy interpreter and compares with a float64 reference: fp32 within
1e-5 relative, fp16 within 5e-3 relative to the output's magnitude, and rows whose keys are
all masked finite.
"""

from __future__ import annotations

import copy

import numpy as np
from hypothesis import given, strategies as st

from attention_cases import (
    MASKED_FLOAT,
    AttentionCase,
    MaskCase,
    assert_attention_close,
    reference_attention,
    sdpa_program,
)
from graph import op_counts
from programs import decomposed_program
from sdpa_slicer import evaluate, slice_attention
from strategies import attention_cases, constant_masks, decomposed_forms, slice_configs


def _rewrite_and_evaluate(prog, case: AttentionCase, config, seed: int):
    """Rewrite a copy of ``prog``; evaluate both on random inputs. The original must agree with
    the reference too (on rows with an unmasked key), which checks the oracle itself."""
    rewritten = copy.deepcopy(prog)
    report = slice_attention(rewritten, config)
    assert report.num_rewritten == 1, str(report)
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
    _, inputs, original, output = _rewrite_and_evaluate(sdpa_program(case), case, config, data.draw(st.integers(0, 2**32 - 1)))
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
        batch=(1,), query_length=35, key_length=2, head_dim=2, value_dim=1, dtype="fp16",
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
