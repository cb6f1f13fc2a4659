"""Elementwise kernels against coremltools' value inference."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, mutually_broadcastable_shapes

from interpreter.kernels._oracle import SEEDS, check_against_value_inference, per_op, random_array

ARITHMETIC = ("add", "sub", "mul", "real_div", "floor_div", "mod", "pow", "maximum", "minimum")
COMPARISONS = ("equal", "not_equal", "less", "less_equal", "greater", "greater_equal")
LOGICAL = ("logical_and", "logical_or", "logical_xor")
DIVISIONS = ("real_div", "floor_div", "mod")
NUMERIC_DTYPES = (np.float16, np.float32, np.int32)
FLOAT_DTYPES = (np.float16, np.float32)

# Input range per unary op, inside its domain and away from poles.
UNARY_FLOAT_DOMAINS = {
    "abs": (-3.0, 3.0),
    "acos": (-0.95, 0.95),
    "asin": (-0.95, 0.95),
    "atan": (-3.0, 3.0),
    "atanh": (-0.95, 0.95),
    "ceil": (-3.0, 3.0),
    "cos": (-3.0, 3.0),
    "cosh": (-3.0, 3.0),
    "exp": (-3.0, 3.0),
    "exp2": (-3.0, 3.0),
    "floor": (-3.0, 3.0),
    "round": (-3.0, 3.0),
    "sign": (-3.0, 3.0),
    "sin": (-3.0, 3.0),
    "sinh": (-3.0, 3.0),
    "sqrt": (0.0, 3.0),
    "square": (-3.0, 3.0),
    "tan": (-1.3, 1.3),
    "rsqrt": (0.05, 3.0),
    "inverse": (0.05, 3.0),
    "log": (0.01, 3.0),
}
UNARY_INT_OPS = ("abs", "sign", "square")
CAST_TARGETS = ("fp16", "fp32", "int32", "bool", "int8", "uint8", "int16", "uint16")
UNSIGNED_TARGETS = ("uint8", "uint16")
EPSILON_OPS = ("rsqrt", "inverse", "log")

broadcast_pairs = mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=4, max_side=4)
shapes = array_shapes(min_dims=0, max_dims=4, max_side=5)


def _binary_operands(
    op_type: str, dtype: Any, x_shape: tuple[int, ...], y_shape: tuple[int, ...], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Operands inside the op's domain: no division by zero, no negative integer powers."""
    rng = np.random.default_rng(seed)
    x = random_array(rng, x_shape, dtype)
    if op_type in DIVISIONS:
        y = random_array(rng, y_shape, dtype, 1, 3) * np.where(rng.random(y_shape) < 0.5, -1, 1).astype(dtype)
    elif op_type == "pow":
        x = np.abs(x) + np.asarray(1, dtype)
        y = random_array(rng, y_shape, dtype, 0, 3)
    else:
        y = random_array(rng, y_shape, dtype)
    return x, y


@pytest.mark.parametrize("op_type", ARITHMETIC + COMPARISONS)
@given(dtype=st.sampled_from(NUMERIC_DTYPES), shapes=broadcast_pairs, seed=SEEDS)
@per_op
def test_binary_ops_match_value_inference(op_type: str, dtype: Any, shapes: Any, seed: int) -> None:
    x, y = _binary_operands(op_type, dtype, *shapes.input_shapes, seed)
    check_against_value_inference(op_type, {"x": x, "y": y})


@pytest.mark.parametrize("op_type", LOGICAL)
@given(shapes=broadcast_pairs, seed=SEEDS)
@per_op
def test_logical_ops_match_value_inference(op_type: str, shapes: Any, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x, y = (random_array(rng, shape, np.bool_) for shape in shapes.input_shapes)
    check_against_value_inference(op_type, {"x": x, "y": y})


def test_integer_real_div_truncates_toward_zero() -> None:
    x = np.array([7, -7, 6, -1], dtype=np.int32)
    y = np.array([2, 2, -4, 3], dtype=np.int32)
    (got,) = check_against_value_inference("real_div", {"x": x, "y": y})
    np.testing.assert_array_equal(got, np.trunc(x / y).astype(np.int32))


@pytest.mark.parametrize("op_type", sorted(UNARY_FLOAT_DOMAINS))
@given(dtype=st.sampled_from(FLOAT_DTYPES), shape=shapes, seed=SEEDS)
@per_op
def test_unary_float_ops_match_value_inference(op_type: str, dtype: Any, shape: tuple[int, ...], seed: int) -> None:
    low, high = UNARY_FLOAT_DOMAINS[op_type]
    x = random_array(np.random.default_rng(seed), shape, dtype, low, high)
    check_against_value_inference(op_type, {"x": x})


@pytest.mark.parametrize("op_type", UNARY_INT_OPS)
@given(shape=shapes, seed=SEEDS)
@per_op
def test_unary_int_ops_match_value_inference(op_type: str, shape: tuple[int, ...], seed: int) -> None:
    x = random_array(np.random.default_rng(seed), shape, np.int32, -100, 100)
    check_against_value_inference(op_type, {"x": x})


@pytest.mark.parametrize("op_type", EPSILON_OPS)
@pytest.mark.parametrize("epsilon", [None, 0.5])
def test_epsilon_is_added_before_the_op(op_type: str, epsilon: Any) -> None:
    x = np.linspace(0.05, 3.0, 12, dtype=np.float32).reshape(3, 4)
    attributes = {} if epsilon is None else {"epsilon": np.float32(epsilon)}
    check_against_value_inference(op_type, {"x": x}, attributes)


@given(shape=shapes, seed=SEEDS)
def test_logical_not_matches_value_inference(shape: tuple[int, ...], seed: int) -> None:
    check_against_value_inference("logical_not", {"x": random_array(np.random.default_rng(seed), shape, np.bool_)})


@given(
    dtype=st.sampled_from(FLOAT_DTYPES),
    shape=shapes,
    seed=SEEDS,
    bounds=st.tuples(st.floats(-2, 0), st.floats(0.1, 2)),
)
def test_clip_matches_value_inference(dtype: Any, shape: tuple[int, ...], seed: int, bounds: Any) -> None:
    x = random_array(np.random.default_rng(seed), shape, dtype)
    alpha, beta = (dtype(bound) for bound in bounds)
    check_against_value_inference("clip", {"x": x}, {"alpha": alpha, "beta": beta})


@given(dtype=st.sampled_from(FLOAT_DTYPES), shape=shapes, seed=SEEDS, alpha=st.floats(-2, 2))
def test_threshold_matches_value_inference(dtype: Any, shape: tuple[int, ...], seed: int, alpha: float) -> None:
    x = random_array(np.random.default_rng(seed), shape, dtype)
    check_against_value_inference("threshold", {"x": x}, {"alpha": dtype(alpha)})


@given(
    dtype=st.sampled_from(NUMERIC_DTYPES + (np.bool_,)),
    shapes=mutually_broadcastable_shapes(num_shapes=3, min_dims=0, max_dims=3, max_side=3),
    seed=SEEDS,
)
def test_select_matches_value_inference(dtype: Any, shapes: Any, seed: int) -> None:
    cond_shape, a_shape, b_shape = shapes.input_shapes
    # coremltools types select's output from a and b alone, so cond must fit inside their broadcast.
    assume(np.broadcast_shapes(a_shape, b_shape) == shapes.result_shape)
    rng = np.random.default_rng(seed)
    runtime = {
        "cond": random_array(rng, cond_shape, np.bool_),
        "a": random_array(rng, a_shape, dtype),
        "b": random_array(rng, b_shape, dtype),
    }
    check_against_value_inference("select", runtime)


@pytest.mark.parametrize("target", CAST_TARGETS)
@given(source=st.sampled_from(NUMERIC_DTYPES + (np.bool_,)), shape=shapes, seed=SEEDS)
@per_op
def test_cast_matches_value_inference(source: Any, target: str, shape: tuple[int, ...], seed: int) -> None:
    low = 0.0 if target in UNSIGNED_TARGETS else -100.0
    x = random_array(np.random.default_rng(seed), shape, source, low, 100.0)
    check_against_value_inference("cast", {"x": x}, {"dtype": target})
