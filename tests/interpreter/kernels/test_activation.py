"""Activation kernels against coremltools' value inference (``silu`` and ``erf`` accuracy against formulas)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes

from interpreter.kernels._oracle import (
    SEEDS,
    check_against_formula,
    check_against_value_inference,
    per_op,
    random_array,
)
from sdpa_slicer._interpreter.kernels.activation import GELU_MODES, erf

FLOAT_DTYPES = (np.float16, np.float32)
PLAIN_ACTIVATIONS = ("sigmoid", "tanh", "relu", "relu6", "erf", "softplus", "softsign")
# Scalar parameters each op takes, drawn from [-2, 2] (alpha > 0 where the op needs it).
SCALAR_PARAMETERS: dict[str, tuple[str, ...]] = {
    "leaky_relu": ("alpha",),
    "elu": ("alpha",),
    "thresholded_relu": ("alpha",),
    "clamped_relu": ("alpha", "beta"),
    "linear_activation": ("alpha", "beta"),
    "scaled_tanh": ("alpha", "beta"),
    "sigmoid_hard": ("alpha", "beta"),
}
PER_CHANNEL_PARAMETERS: dict[str, tuple[str, ...]] = {
    "prelu": ("alpha",),
    "softplus_parametric": ("alpha", "beta"),
}
ERF_GRID = np.concatenate([np.linspace(-7.0, 7.0, 20001), np.geomspace(1e-30, 1e-2, 200)])
ERF_TOLERANCE = 3e-8

shapes = array_shapes(min_dims=1, max_dims=4, max_side=5)
# prelu takes rank 3 or 5 only with one shared alpha, so per-channel parameters are tested at rank 4.
channel_shapes = array_shapes(min_dims=4, max_dims=4, max_side=4)
dtypes = st.sampled_from(FLOAT_DTYPES)
parameters = st.floats(min_value=-2.0, max_value=2.0)


@pytest.mark.parametrize("op_type", PLAIN_ACTIVATIONS)
@given(dtype=dtypes, shape=shapes, seed=SEEDS)
@per_op
def test_plain_activations_match_value_inference(op_type: str, dtype: Any, shape: tuple[int, ...], seed: int) -> None:
    x = random_array(np.random.default_rng(seed), shape, dtype, -6.0, 6.0)
    check_against_value_inference(op_type, {"x": x})


@pytest.mark.parametrize("mode", GELU_MODES)
@given(dtype=dtypes, shape=shapes, seed=SEEDS)
@per_op
def test_gelu_matches_value_inference(mode: str, dtype: Any, shape: tuple[int, ...], seed: int) -> None:
    x = random_array(np.random.default_rng(seed), shape, dtype, -6.0, 6.0)
    check_against_value_inference("gelu", {"x": x}, {"mode": mode})


@given(dtype=dtypes, shape=shapes, seed=SEEDS, data=st.data())
def test_softmax_matches_value_inference(dtype: Any, shape: tuple[int, ...], seed: int, data: st.DataObject) -> None:
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    x = random_array(np.random.default_rng(seed), shape, dtype, -10.0, 10.0)
    check_against_value_inference("softmax", {"x": x}, {"axis": np.int32(axis)})


@given(dtype=dtypes, shape=shapes, seed=SEEDS)
def test_silu_matches_formula(dtype: Any, shape: tuple[int, ...], seed: int) -> None:
    """coremltools has no value inference for silu: compare with x * sigmoid(x) in float64."""
    x = random_array(np.random.default_rng(seed), shape, dtype, -10.0, 10.0)
    wide = x.astype(np.float64)
    check_against_formula("silu", {"x": x}, wide / (1.0 + np.exp(-wide)))


@pytest.mark.parametrize("op_type", sorted(SCALAR_PARAMETERS))
@given(dtype=dtypes, shape=shapes, seed=SEEDS, data=st.data())
@per_op
def test_scalar_parameter_activations_match_value_inference(
    op_type: str, dtype: Any, shape: tuple[int, ...], seed: int, data: st.DataObject
) -> None:
    attributes = {name: dtype(data.draw(parameters, label=name)) for name in SCALAR_PARAMETERS[op_type]}
    if op_type == "clamped_relu":
        attributes["beta"] = abs(attributes["beta"])
    x = random_array(np.random.default_rng(seed), shape, dtype)
    check_against_value_inference(op_type, {"x": x}, attributes)


@pytest.mark.parametrize("op_type", sorted(PER_CHANNEL_PARAMETERS))
@given(dtype=dtypes, shape=channel_shapes, seed=SEEDS)
@per_op
def test_per_channel_activations_match_value_inference(
    op_type: str, dtype: Any, shape: tuple[int, ...], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    attributes = {name: random_array(rng, (shape[1],), dtype, 0.1, 2.0) for name in PER_CHANNEL_PARAMETERS[op_type]}
    check_against_value_inference(op_type, {"x": random_array(rng, shape, dtype)}, attributes)


def test_erf_is_accurate_to_float32() -> None:
    """The kernels' own erf against ``math.erf`` on a dense grid, tiny arguments and the tails."""
    want = np.array([math.erf(v) for v in ERF_GRID])
    got = erf(ERF_GRID)
    np.testing.assert_allclose(got, want, rtol=ERF_TOLERANCE, atol=0.0)
    np.testing.assert_array_equal(erf(-ERF_GRID), -got)
