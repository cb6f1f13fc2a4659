"""visible_keys: a key is hidden only when it adds exactly nothing, whatever the ops before the softmax."""

from __future__ import annotations

from typing import Optional

import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Var
from hypothesis import given
from hypothesis import strategies as st

from attention_cases import AttentionCase
from sdpa_slicer import evaluate, slice_attention
from sdpa_slicer._graph import QUANTIZATION_OPS
from sdpa_slicer._interpreter.kernels import KERNELS
from sdpa_slicer._rewrite.plan.pruning import (
    BOUNDS,
    SCORE_BOUND,
    SOFTMAX_MARGIN,
    StepValues,
    visible_keys,
)

ROWS, KEYS = 4, 6
CAUSAL = np.tril(np.ones((ROWS, KEYS), dtype=bool))
MASKED = np.where(CAUSAL, 0.0, -1e4)


def _add(values: Optional[np.ndarray], is_mask: bool = False) -> StepValues:
    return StepValues("add", "x", (("y", values),), is_mask)


def test_a_bool_mask_hides_its_false_keys_and_a_float_mask_its_far_lower_ones():
    np.testing.assert_array_equal(visible_keys([_add(CAUSAL, is_mask=True)]), CAUSAL)
    np.testing.assert_array_equal(visible_keys([_add(MASKED)]), CAUSAL)


def test_a_key_only_a_little_lower_than_the_best_is_kept():
    """Within the assumed score range, -1000 below another key is not enough to add nothing."""
    near = np.where(CAUSAL, 0.0, -1000.0)
    assert visible_keys([_add(near)]).all()


def test_a_row_whose_every_key_is_minus_infinity_sees_none():
    mask = MASKED.copy()
    mask[2] = -np.inf
    visible = visible_keys([_add(mask)])
    assert not visible[2].any()
    np.testing.assert_array_equal(visible[3], CAUSAL[3])


def test_masks_after_a_run_time_operand_prove_nothing():
    assert visible_keys([_add(None), _add(MASKED)]) is None


def _pair(step: float, levels: str = "int8") -> list[StepValues]:
    """``quantize -> dequantize`` with a scalar scale, as pruning sees them."""
    scale = np.float32(step)
    return [
        StepValues("quantize", "input", (("scale", scale), ("output_dtype", np.array(levels)))),
        StepValues("dequantize", "input", (("scale", scale),)),
    ]


def test_a_quantized_pair_before_a_mask_bounds_the_scores():
    """Levels of 1/32 saturate at 4: the scores are within 4, far above a -1e4 mask."""
    np.testing.assert_array_equal(visible_keys([*_pair(1 / 32), _add(MASKED)]), CAUSAL)


def test_a_mask_quantized_after_it_is_added_hides_what_stays_far_below():
    """Quantized in levels of 80, as calibrated on a -1e4 mask, masked scores stay near -1e4."""
    np.testing.assert_array_equal(visible_keys([_add(MASKED), *_pair(80.0)]), CAUSAL)


@pytest.mark.parametrize("levels", ["int8", "uint8"])
def test_a_mask_quantized_in_fine_levels_saturates_next_to_the_scores_and_hides_nothing(levels):
    """Levels of 1/32 bring -1e4 back to -4 (int8) or 0 (uint8): every key then counts."""
    assert visible_keys([_add(MASKED), *_pair(1 / 32, levels)]).all()


def test_masks_that_are_not_at_the_end_prove_nothing():
    assert visible_keys([_add(MASKED), StepValues("tanh", "x", ())]) is None


def test_several_masks_are_judged_by_their_sum_per_row():
    """-1e4 on key 0 and -6000 + -6000 on the others: key 0 is the best of every row."""
    first = np.full((ROWS, KEYS), -6000.0)
    first[:, 0] = -1e4
    second = np.full((ROWS, KEYS), -6000.0)
    second[:, 0] = 0.0
    visible = visible_keys([_add(first), _add(second)])
    assert visible.all()  # -12000 vs -10000: within the assumed range of two scores


def test_a_large_multiplier_before_a_mask_leaves_every_key():
    scaled = StepValues("mul", "x", (("y", np.float32(1e4)),))
    assert visible_keys([scaled, _add(MASKED)]).all()


def test_a_bounded_op_before_a_mask_lets_a_smaller_margin_hide_keys():
    """After tanh the scores are within 1, so a mask of -200 hides for sure."""
    mask = np.where(CAUSAL, 0.0, -2 * SOFTMAX_MARGIN)
    np.testing.assert_array_equal(visible_keys([StepValues("tanh", "x", ()), _add(mask)]), CAUSAL)
    assert visible_keys([_add(mask)]).all()  # without it, the scores may differ by 2 * SCORE_BOUND


def test_a_select_with_a_constant_condition_hides_what_it_replaces():
    select = StepValues("select", "a", (("cond", CAUSAL), ("b", np.float32(-1e4))))
    np.testing.assert_array_equal(visible_keys([select]), CAUSAL)
    inverted = StepValues("select", "b", (("cond", ~CAUSAL), ("a", np.float32(-1e4))))
    np.testing.assert_array_equal(visible_keys([inverted]), CAUSAL)


def _chain_program(*steps):
    """Attention of ``(1, 2, ROWS, 8)`` queries over ``KEYS`` keys through ``steps`` (functions of the scores)."""

    @mb.program(
        input_specs=[mb.TensorSpec((1, 2, ROWS, 8)), mb.TensorSpec((1, 2, KEYS, 8)), mb.TensorSpec((1, 2, KEYS, 8))],
        opset_version=ct.target.iOS17,
    )
    def prog(q, k, v):
        scores: Var = mb.matmul(x=q, y=k, transpose_y=True)
        for step in steps:
            scores = step(scores)
        return mb.matmul(x=mb.softmax(x=scores, axis=-1), y=v, name="out")

    return prog


SUM_FIRST = np.full((ROWS, KEYS), -6000.0, np.float32)
SUM_FIRST[:, 0] = -1e4
SUM_SECOND = np.where(np.arange(KEYS) > 0, -6000.0, 0.0).astype(np.float32) * np.ones((ROWS, 1), np.float32)
LAST_KEY_ONLY = (np.arange(KEYS) == KEYS - 1).astype(np.float32)[None]
LAST_KEY_LOWERED = LAST_KEY_ONLY * np.float32(-2200.0)


@pytest.mark.parametrize(
    "steps",
    [
        pytest.param((lambda s: mb.add(x=s, y=SUM_FIRST), lambda s: mb.add(x=s, y=SUM_SECOND)), id="two masks"),
        pytest.param(
            (
                lambda s: mb.add(x=s, y=np.float32(0.0)),  # so that the multiplier is a step, not the scale
                lambda s: mb.mul(x=s, y=np.float32(1e4)),
                lambda s: mb.add(x=s, y=MASKED.astype(np.float32)),
            ),
            id="a large multiplier, then a causal mask",
        ),
        pytest.param(
            (
                lambda s: mb.clip(x=s, alpha=np.float32(5000.0), beta=np.float32(6000.0)),  # 5000 everywhere
                lambda s: mb.mul(x=s, y=LAST_KEY_ONLY),
                lambda s: mb.add(x=s, y=LAST_KEY_LOWERED),  # the last key: 2800, far above the others' 0
            ),
            id="a clip to a range beyond the bound, then a per-key multiplier",
        ),
    ],
)
def test_chains_whose_masks_prove_nothing_keep_every_key_and_compute_what_they_did(steps):
    """Found in review: each mask judged on its own against -1e4 pruned keys that were the best of
    their row; and clip(s, 5000, 6000) was taken to stay within the score bound."""
    inputs = AttentionCase(batch=(1, 2), query_length=ROWS, key_length=KEYS, head_dim=8, value_dim=8).inputs(
        np.random.default_rng(0)
    )
    want = evaluate(_chain_program(*steps), inputs)["out"]
    prog = _chain_program(*steps)
    (site,) = slice_attention(prog, min_seq_length=1, num_chunks=2).sites
    assert site.rewritten and site.matmul_work_after == site.matmul_work_before
    np.testing.assert_allclose(evaluate(prog, inputs)["out"], want, rtol=1e-5, atol=1e-6)


def test_the_bounds_assume_scores_within_the_score_bound():
    assert SCORE_BOUND == 1e3 and SOFTMAX_MARGIN > -np.log(np.finfo(np.float32).smallest_subnormal)


def test_a_run_time_divisor_before_a_mask_proves_nothing():
    """Found by the property suite: dividing by an operand computed at run time raised (it counted as 0)."""
    divided = StepValues("real_div", "x", (("y", None),))
    assert visible_keys([divided, _add(MASKED)]) is None
    assert visible_keys([StepValues("real_div", "x", (("y", np.float32(0.0)),)), _add(MASKED)]) is None


SCORES_INPUTS = {"select": ("a", "b"), "sub": ("x", "y"), "real_div": ("x", "y")}
"""Ops whose rule depends on which input takes the scores; every other op takes them as ``x``."""


LEVELS = {"int8": np.int8, "uint8": np.uint8}


@st.composite
def quantization_steps(draw: st.DrawFn, op_type: str) -> tuple[StepValues, dict[str, np.ndarray]]:
    """``quantize`` or ``dequantize`` with a scale (of either sign) and maybe a zero point, per tensor
    or along the last axis, and the kernel's arguments besides the scores."""
    levels = draw(st.sampled_from(sorted(LEVELS)))
    shape = draw(st.sampled_from([(), (5,)]))
    magnitudes = st.floats(2**-10, 2**7, width=32)
    scale = np.array(draw(st.lists(magnitudes, min_size=5, max_size=5))[: 5 if shape else 1], np.float32)
    scale = (scale * draw(st.sampled_from((1, -1)))).reshape(shape)
    arguments: dict[str, np.ndarray] = {"scale": scale}
    if shape:
        arguments["axis"] = np.int32(-1)
    if draw(st.booleans()):
        info = np.iinfo(LEVELS[levels])
        arguments["zero_point"] = np.full(shape, draw(st.integers(info.min, info.max)), LEVELS[levels])
    if op_type == "quantize":
        arguments["output_dtype"] = np.array(levels)
    return StepValues(op_type, "input", tuple(arguments.items())), arguments


@st.composite
def bounded_steps(draw: st.DrawFn, op_type: str) -> tuple[StepValues, dict[str, np.ndarray]]:
    """A step of ``op_type`` with drawn operands, and the kernel's arguments besides the scores."""
    if op_type in QUANTIZATION_OPS:
        return draw(quantization_steps(op_type))
    values = st.floats(-1e4, 1e4, allow_nan=False, width=32)
    scores_input = draw(st.sampled_from(SCORES_INPUTS.get(op_type, ("x",))))
    names = sorted(KERNELS[op_type].inputs - {scores_input, "mode"})
    arguments = {}
    for name in names:
        if name == "cond":
            arguments[name] = np.array(draw(st.lists(st.booleans(), min_size=5, max_size=5)))
        else:
            shape = draw(st.sampled_from([(), (5,)])) if op_type not in ("clip", "sigmoid_hard", "scaled_tanh") else ()
            arguments[name] = np.array(draw(st.lists(values, min_size=5, max_size=5))[: 5 if shape else 1]).reshape(
                shape
            )
    if op_type == "clip":
        arguments["alpha"], arguments["beta"] = sorted((arguments["alpha"], arguments["beta"]))
    return StepValues(op_type, scores_input, tuple(arguments.items())), arguments


@pytest.mark.parametrize("op_type", sorted(BOUNDS))
@given(data=st.data(), bound=st.floats(1e-2, 2 * SCORE_BOUND))
def test_every_bound_holds_for_scores_within_the_bound_before_it(op_type, data, bound):
    """Each rule of ``BOUNDS`` against the op's kernel, over scores spread across ``[-bound, bound]``."""
    step, arguments = data.draw(bounded_steps(op_type))
    assert_bound_holds(op_type, step, arguments, bound)


def test_a_quantized_bound_allows_for_the_quotient_rounded_to_the_input_dtype():
    """Found by the property above: ``0.5 / 0.33333334`` is 1.49999998, which fp32 rounds to 1.5
    and ``round`` then to level 2, past ``round`` of the exact quotient."""
    arguments = {
        "scale": np.array([1, 1, 1, 1, 0.33333334], np.float32),
        "axis": np.int32(-1),
        "output_dtype": np.array("int8"),
    }
    step = StepValues("quantize", "input", tuple(arguments.items()))
    assert_bound_holds("quantize", step, arguments, 0.5)


def test_a_dequantized_bound_allows_for_the_product_rounded_to_the_scale_dtype():
    """Found by the bounds property: ``11.137827 * (-1 - 2)`` is 33.4134827 in fp32, 2e-6 above
    the exact product."""
    arguments = {"scale": np.array(11.137827, np.float32), "zero_point": np.array(2, np.int8)}
    step = StepValues("dequantize", "input", tuple(arguments.items()))
    assert_bound_holds("dequantize", step, arguments, 1.0)


def assert_bound_holds(op_type: str, step: StepValues, arguments: dict[str, np.ndarray], bound: float) -> None:
    claimed = BOUNDS[op_type](bound, step)
    if claimed == np.inf:
        return  # no claim: pruning then proves nothing
    scores = np.linspace(-bound, bound, 401)[:, None]
    if op_type == "dequantize":  # it reads levels, within the bound and their dtype's range
        zero_point = step.value("zero_point")
        info = np.iinfo(np.int8 if zero_point is None else zero_point.dtype)
        scores = np.clip(np.trunc(scores), info.min, info.max).astype(info.dtype)
    with np.errstate(all="ignore"):
        result = np.asarray(KERNELS[op_type].fn(**{step.scores_input: scores}, **arguments), np.float64)
    assert np.abs(result).max() <= claimed * (1 + 1e-9), (
        f"{op_type}: |result| up to {np.abs(result).max()}, bound {claimed}"
    )
