"""match_decomposed_attention: chains written out as ops, in every supported form, and near misses."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb

from attention_cases import IOS18, AttentionCase, MaskCase
from programs import DecomposedForm, decomposed_program
from graph import signature
from sdpa_slicer import SliceConfig, slice_attention
from sdpa_slicer._match import DECOMPOSED
from sdpa_slicer._patterns import match_decomposed_attention
from sdpa_slicer._plan import ALREADY_ONE_CHUNK
from sdpa_slicer._walk import walk_blocks

CASE = AttentionCase(
    batch=(1, 2), query_length=16, key_length=12, head_dim=8, value_dim=4, mask=MaskCase("fp32", (1, 1, 16, 12))
)
SCALE = 0.25
FORMS = [
    DecomposedForm(scale_at, key_transpose, mask_first, positive_axis)
    for scale_at, key_transpose, mask_first, positive_axis in itertools.product(
        ("query", "scores", "scores_left", "divide", "none"), ("flag", "op"), (False, True), (False, True)
    )
]


def _sites(prog, config=SliceConfig()):
    ops = [op for visit in walk_blocks(prog) for op in visit.ops]
    return [site for site in (match_decomposed_attention(op, "main", config) for op in ops) if site is not None]


@pytest.mark.parametrize("form", FORMS, ids=str)
def test_every_written_out_form_is_one_site(form):
    prog = decomposed_program(CASE, form, SCALE)
    (site,) = _sites(prog)
    function = prog.functions["main"]
    q, k, v, mask = function.inputs.values()
    assert site.kind == DECOMPOSED and site.anchor.name == "attention"
    assert site.key is k and site.value is v and site.mask is mask
    assert site.key_transposed
    expected_scale = {"query": 1.0, "none": 1.0}.get(form.scale_at, SCALE)
    assert site.scale == pytest.approx(expected_scale)
    assert (site.query is q) == (form.scale_at != "query")
    chain_ops = {op.name for op in site.ops}
    assert "attention_scores" in chain_ops and "attention_weights" in chain_ops
    assert ("attention_kt" in chain_ops) == (form.key_transpose == "op")


def test_without_a_mask_the_site_has_none():
    case = AttentionCase(batch=(2,), query_length=16, key_length=12, head_dim=8, value_dim=4)
    (site,) = _sites(decomposed_program(case, DecomposedForm(scale_at="scores"), SCALE))
    assert site.mask is None and site.scale == pytest.approx(SCALE)


def test_match_decomposed_false_turns_the_pattern_off():
    prog = decomposed_program(CASE, DecomposedForm(), SCALE)
    assert _sites(prog, SliceConfig(match_decomposed=False)) == []


def _chain_program(tweak):
    """A chain where ``tweak(scores, weights)`` may add extra uses or change the softmax."""
    specs = CASE.input_specs()

    @mb.program(input_specs=specs, opset_version=IOS18)
    def prog(q, k, v, mask):
        scores = mb.matmul(x=q, y=k, transpose_y=True)
        masked = mb.add(x=scores, y=mask)
        return tweak(q, k, v, scores, masked)

    return prog


def _softmax_matmul(x, v, axis=-1):
    return mb.matmul(x=mb.softmax(x=x, axis=axis), y=v)


@pytest.mark.parametrize(
    "tweak",
    [
        pytest.param(lambda q, k, v, s, m: _softmax_matmul(m, v, axis=-2), id="softmax over the query axis"),
        pytest.param(lambda q, k, v, s, m: (_softmax_matmul(m, v), s), id="scores are also an output"),
        pytest.param(lambda q, k, v, s, m: (_softmax_matmul(m, v), mb.relu(x=m)), id="masked scores used elsewhere"),
        pytest.param(
            lambda q, k, v, s, m: _outputs_with_weights(m, v), id="weights are also an output"
        ),
        pytest.param(
            lambda q, k, v, s, m: _softmax_matmul(mb.mul(x=m, y=np.full((1, 1, 16, 12), 0.5, np.float32)), v),
            id="scaled by a tensor, not a scalar",
        ),
        pytest.param(
            lambda q, k, v, s, m: mb.matmul(
                x=mb.softmax(x=m, axis=-1), y=mb.transpose(x=v, perm=[0, 1, 3, 2]), transpose_y=True
            ),
            id="value transposed by the last matmul (not supported)",
        ),
    ],
)
def test_near_misses_are_not_sites(tweak):
    assert _sites(_chain_program(tweak)) == []


def _outputs_with_weights(masked, v):
    weights = mb.softmax(x=masked, axis=-1)
    return mb.matmul(x=weights, y=v), weights


def test_a_transpose_used_elsewhere_stays_and_is_used_as_the_transposed_key():
    @mb.program(input_specs=CASE.input_specs()[:3], opset_version=IOS18)
    def prog(q, k, v):
        kt = mb.transpose(x=k, perm=[0, 1, 3, 2])
        weights = mb.softmax(x=mb.matmul(x=q, y=kt), axis=-1)
        return mb.matmul(x=weights, y=v), mb.relu(x=kt)

    (site,) = _sites(prog)
    assert not site.key_transposed and site.key.op.op_type == "transpose"
    assert all(op.op_type != "transpose" for op in site.ops)


def test_a_chain_that_fits_in_one_chunk_is_reported_and_left_as_it_is():
    prog = decomposed_program(CASE, DecomposedForm(scale_at="scores"), SCALE)
    before = signature(prog)
    (site,) = slice_attention(prog, min_seq_length=1).sites
    assert (site.kind, site.status, site.reason) == (DECOMPOSED, "skipped", ALREADY_ONE_CHUNK)
    assert signature(prog) == before
