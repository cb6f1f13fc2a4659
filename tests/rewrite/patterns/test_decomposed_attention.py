"""DECOMPOSED_ATTENTION: chains written out as ops in every supported form, score modifiers,
and near misses with their reasons."""

from __future__ import annotations

import itertools
from typing import Callable

import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Var

from attention_cases import IOS18, AttentionCase, MaskCase
from graph import signature
from programs import QUANTIZED, DecomposedForm, Modifier, QuantizedPair, ScoreChain, decomposed_program
from sdpa_slicer import SliceConfig, slice_attention
from sdpa_slicer._rewrite.find import Found, find_sites
from sdpa_slicer._rewrite.patterns import DECOMPOSED_ATTENTION
from sdpa_slicer._rewrite.plan.planning import ALREADY_ONE_CHUNK
from sdpa_slicer._rewrite.sites import DECOMPOSED, AttentionSite, NearMiss
from sdpa_slicer._rewrite.walk import walk_blocks

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


def _found(prog, config=SliceConfig()) -> Found:
    results = [find_sites(visit.ops, config, [DECOMPOSED_ATTENTION]) for visit in walk_blocks(prog)]
    return Found(
        tuple(site for found in results for site in found.sites),
        tuple(miss for found in results for miss in found.near_misses),
    )


def _sites(prog, config=SliceConfig()) -> list[AttentionSite]:
    return list(_found(prog, config).sites)


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
    (step,) = site.steps
    assert (step.op_type, step.scores_input) == ("add", "y" if form.mask_first else "x")


def test_without_a_mask_the_site_has_no_step():
    case = AttentionCase(batch=(2,), query_length=16, key_length=12, head_dim=8, value_dim=4)
    (site,) = _sites(decomposed_program(case, DecomposedForm(scale_at="scores"), SCALE))
    assert site.mask is None and site.steps == () and site.scale == pytest.approx(SCALE)


def test_match_decomposed_false_turns_the_pattern_off():
    prog = decomposed_program(CASE, DecomposedForm(), SCALE)
    assert _found(prog, SliceConfig(match_decomposed=False)) == Found((), ())


def _chain_program(tweak: Callable[..., object]):
    """``tweak(q, k, v, scores, masked)`` builds the rest of a chain: scores = q @ k^T, masked = scores + mask."""

    @mb.program(input_specs=CASE.input_specs(), opset_version=IOS18)
    def prog(q, k, v, mask):
        scores = mb.matmul(x=q, y=k, transpose_y=True, name="scores")
        masked = mb.add(x=scores, y=mask, name="masked")
        return tweak(q, k, v, scores, masked)

    return prog


def _softmax_matmul(x: Var, v: Var, axis: int = -1) -> Var:
    return mb.matmul(x=mb.softmax(x=x, axis=axis, name="weights"), y=v, name="attention")


def _outputs_with_weights(masked: Var, v: Var):
    weights = mb.softmax(x=masked, axis=-1, name="weights")
    return mb.matmul(x=weights, y=v), weights


HALVES = np.full((1, 1, 16, 12), 0.5, np.float32)


@pytest.mark.parametrize(
    "tweak, ops",
    [
        pytest.param(
            lambda q, k, v, s, m: _softmax_matmul(mb.mul(x=m, y=HALVES, name="halved"), v),
            ["add", "mul"],
            id="mul by a tensor",
        ),
        pytest.param(
            lambda q, k, v, s, m: _softmax_matmul(
                mb.mul(
                    x=mb.tanh(x=mb.mul(x=m, y=np.float32(1 / 30), name="capped_in"), name="capped"),
                    y=np.float32(30.0),
                    name="capped_out",
                ),
                v,
            ),
            ["add", "mul", "tanh", "mul"],
            id="softcapping after the mask",
        ),
        pytest.param(
            lambda q, k, v, s, m: _softmax_matmul(
                mb.select(cond=np.tril(np.ones((16, 12), bool)), a=m, b=np.float32(-1e4), name="selected"),
                v,
            ),
            ["add", "select"],
            id="select with a constant condition",
        ),
        pytest.param(
            lambda q, k, v, s, m: _softmax_matmul(
                mb.clip(x=m, alpha=np.float32(-5), beta=np.float32(5), name="clipped"), v
            ),
            ["add", "clip"],
            id="clip",
        ),
        pytest.param(
            lambda q, k, v, s, m: _softmax_matmul(mb.maximum(x=np.float32(-3), y=m, name="floored"), v),
            ["add", "maximum"],
            id="maximum, scores second",
        ),
    ],
)
def test_elementwise_ops_between_the_scores_and_the_softmax_are_steps_of_the_site(tweak, ops):
    (site,) = _sites(_chain_program(tweak))
    assert [step.op_type for step in site.steps] == ops
    assert site.ops[-1].name == "attention" and all(step.op in site.ops for step in site.steps)


@pytest.mark.parametrize(
    "tweak, reason",
    [
        pytest.param(
            lambda q, k, v, s, m: _softmax_matmul(m, v, axis=-2),
            "softmax over axis -2, not the last",
            id="softmax over the query axis",
        ),
        pytest.param(
            lambda q, k, v, s, m: (_softmax_matmul(m, v), s),
            "'scores' between the scores and the softmax is also an output of its block",
            id="scores are also an output",
        ),
        pytest.param(
            lambda q, k, v, s, m: (_softmax_matmul(m, v), mb.relu(x=m, name="elsewhere")),
            "'masked' between the scores and the softmax is also read by 'elsewhere'",
            id="masked scores read elsewhere",
        ),
        pytest.param(
            lambda q, k, v, s, m: _outputs_with_weights(m, v),
            "the softmax's result is also an output of its block",
            id="weights are also an output",
        ),
        pytest.param(
            lambda q, k, v, s, m: mb.matmul(
                x=mb.softmax(x=m, axis=-1, name="weights"),
                y=mb.transpose(x=v, perm=[0, 1, 3, 2]),
                transpose_y=True,
                name="attention",
            ),
            "the matmul after the softmax, 'attention', transposes an operand",
            id="value transposed by the last matmul",
        ),
        pytest.param(
            lambda q, k, v, s, m: _softmax_matmul(
                mb.gather(x=m, indices=np.arange(12, dtype=np.int32)[::-1].copy(), axis=-1, name="reordered"), v
            ),
            "gather 'reordered' between the scores and the softmax is not elementwise, "
            "so it cannot be cut by query rows",
            id="gather between the scores and the softmax",
        ),
        pytest.param(
            lambda q, k, v, s, m: mb.reduce_sum(x=mb.softmax(x=m, axis=-1, name="weights"), axes=[-1], name="summed"),
            "the softmax's result is not multiplied by values: it is read by reduce_sum 'summed'",
            id="weights not multiplied by values",
        ),
        pytest.param(
            lambda q, k, v, s, m: _softmax_matmul(mb.mul(x=m, y=m, name="squared"), v),
            "mul 'squared' reads the scores twice, so they cannot be cut once per chunk",
            id="a step that reads the scores twice",
        ),
    ],
)
def test_near_misses_are_not_sites_and_say_why(tweak, reason):
    found = _found(_chain_program(tweak))
    assert found.sites == ()
    (miss,) = found.near_misses
    assert isinstance(miss, NearMiss) and miss.reason == reason
    assert miss.start.op_type == "softmax" and miss.start in miss.ops


def test_a_softmax_that_has_nothing_to_do_with_attention_is_no_near_miss():
    @mb.program(input_specs=[mb.TensorSpec((2, 10))], opset_version=IOS18)
    def prog(x):
        return mb.softmax(x=mb.linear(x=x, weight=np.eye(10, dtype=np.float32)), axis=-1)

    assert _found(prog) == Found((), ())


def test_a_pattern_that_raises_gives_a_near_miss_and_no_site(monkeypatch):
    def broken(op):
        raise RuntimeError("broken pattern")

    monkeypatch.setattr(DECOMPOSED_ATTENTION, "match", broken)
    found = _found(decomposed_program(CASE, DecomposedForm(), SCALE))
    assert found.sites == () and found.near_misses
    assert all("RuntimeError (broken pattern)" in miss.reason and "bug" in miss.reason for miss in found.near_misses)


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


def test_attention_over_the_output_of_another_is_a_near_miss_of_the_later_one():
    """Found in review: the scores of the second attention are the first's output, so both chains
    hold its matmul; only the first is a site."""

    @mb.program(input_specs=CASE.input_specs()[:3], opset_version=IOS18)
    def prog(q, k, v):
        first = _softmax_matmul(mb.matmul(x=q, y=k, transpose_y=True, name="scores"), v)  # (1, 2, 16, 4)
        values = np.ones((1, 2, 4, 4), np.float32)
        return mb.matmul(x=mb.softmax(x=first, axis=-1, name="second_weights"), y=values, name="second")

    found = _found(prog)
    assert [site.anchor.name for site in found.sites] == ["attention"]
    (miss,) = found.near_misses
    assert miss.reason == "its op 'attention' belongs to the attention 'attention', rewritten on its own"


W8A8_CHAIN = ScoreChain(
    modifiers=(Modifier(op=QUANTIZED),),
    mask_at=1,
    mask_pair=QuantizedPair(step=80.0),
    weights_pair=QuantizedPair(step=1 / 255, levels="uint8", offset=-128),
)
"""Scores and mask quantized before their add, as activation quantization (W8A8) writes a
mask input's add, and the softmax's result quantized before the value matmul."""


@pytest.mark.parametrize("scale_at", ["query", "scores"])
def test_quantize_and_dequantize_are_steps_on_either_side_of_the_softmax(scale_at):
    prog = decomposed_program(CASE, DecomposedForm(scale_at=scale_at), SCALE, chain=W8A8_CHAIN)
    (site,) = _sites(prog)
    ops = {op.name: op for op in prog.functions["main"].operations}
    assert [step.op_type for step in site.steps] == ["quantize", "dequantize", "add"]
    assert site.mask is ops["attention_mask_quantized"].outputs[0]
    assert [step.op_type for step in site.weight_steps] == ["quantize", "dequantize"]
    assert site.anchor.name == "attention" and ops["attention_weights_quantized"] in site.ops
    kept = scale_at == "scores"
    assert [step.op.name for step in site.scale_steps] == (["attention_scaled"] if kept else [])
    assert site.notes == (
        "quantized scores: 1 quantize -> dequantize between the scores and the softmax, applied to each chunk's scores",
        "quantized weights: quantize -> dequantize between the softmax and the value matmul, applied to each "
        "chunk's weights",
        *(["the scale stays on the scores, where the program has it, so that they round to the same levels"] * kept),
    )


def test_without_quantization_the_scale_on_the_scores_moves_to_the_query():
    chain = ScoreChain(modifiers=(Modifier(op="tanh"),))
    (site,) = _sites(decomposed_program(CASE, DecomposedForm(scale_at="scores"), SCALE, chain=chain))
    assert site.scale_steps == () and site.notes == ()


@pytest.mark.parametrize("axis", [-1, -2, -3, 2, 3])
def test_a_per_axis_pair_knows_the_scores_axis_it_runs_along(axis):
    chain = ScoreChain(modifiers=(Modifier(op=QUANTIZED, pair=QuantizedPair(axis=axis)),))
    (site,) = _sites(decomposed_program(CASE, DecomposedForm(), SCALE, chain=chain))
    _, quantize, dequantize = site.steps  # the mask is added first
    (scale,) = [var for name, var in quantize.operands if name == "scale"]
    scores_axis = axis % 4 - 4
    assert quantize.axis == dequantize.axis == scores_axis
    assert quantize.broadcast_shape("scale", scale) == ((CASE.batch + (16, 12))[axis],) + (1,) * (-scores_axis - 1)
