"""Normalization kernels: ``layer_norm`` and ``l2_norm`` against coremltools' value inference,
``instance_norm``, ``batch_norm`` and ``local_response_norm`` (which have none) against float64 formulas."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes

from interpreter.kernels._oracle import (
    SEEDS,
    TOLERANCES,
    check_against_formula,
    check_against_value_inference,
    random_array,
)

FLOAT_DTYPES = (np.float16, np.float32)

dtypes = st.sampled_from(FLOAT_DTYPES)
epsilons = st.sampled_from([1e-5, 1e-3, 0.5])
channel_shapes = array_shapes(min_dims=3, max_dims=4, max_side=5)
# (with gamma, with beta): coremltools' layer_norm type inference reads gamma's shape to check beta,
# so beta without gamma cannot be built.
LAYER_NORM_AFFINE = ((False, False), (True, False), (True, True))


def _affine_parameters(
    rng: np.random.Generator, shape: tuple[int, ...], dtype: Any, with_gamma: bool, with_beta: bool
) -> dict[str, np.ndarray]:
    parameters = {}
    if with_gamma:
        parameters["gamma"] = random_array(rng, shape, dtype, 0.5, 2.0)
    if with_beta:
        parameters["beta"] = random_array(rng, shape, dtype)
    return parameters


def _normalized(x: np.ndarray, axes: tuple[int, ...], epsilon: float) -> np.ndarray:
    wide = x.astype(np.float64)
    mean = wide.mean(axis=axes, keepdims=True)
    return (wide - mean) / np.sqrt(wide.var(axis=axes, keepdims=True) + epsilon)


def _centering_tolerance(
    x: np.ndarray, axes: tuple[int, ...], epsilon: float, gamma: Optional[np.ndarray]
) -> tuple[float, float]:
    """The default tolerance, widened by what rounding ``x - mean`` in fp32 costs: up to a few
    fp32 ulps of ``max |x|``, divided by ``sqrt(variance + epsilon)`` (large when a slice's
    values are close together) and scaled by gamma."""
    rtol, atol = TOLERANCES[np.dtype(x.dtype)]
    spread = np.sqrt(x.astype(np.float64).var(axis=axes) + epsilon).min()
    scale = 1.0 if gamma is None else float(np.abs(gamma).max())
    return rtol, max(atol, 4 * float(np.finfo(np.float32).eps) * float(np.abs(x).max()) * scale / spread)


def _per_channel(parameter: Optional[np.ndarray], rank: int, default: float) -> Any:
    if parameter is None:
        return default
    return parameter.astype(np.float64).reshape((1, -1) + (1,) * (rank - 2))


@given(
    dtype=dtypes,
    shape=array_shapes(min_dims=1, max_dims=4, max_side=5),
    epsilon=epsilons,
    affine=st.sampled_from(LAYER_NORM_AFFINE),
    seed=SEEDS,
    data=st.data(),
)
def test_layer_norm_matches_value_inference(
    dtype: Any,
    shape: tuple[int, ...],
    epsilon: float,
    affine: tuple[bool, bool],
    seed: int,
    data: st.DataObject,
) -> None:
    rank = len(shape)
    axes = data.draw(st.lists(st.integers(-rank, rank - 1), min_size=1, max_size=rank, unique_by=lambda a: a % rank))
    normalized_shape = tuple(shape[axis] for axis in sorted(axis % rank for axis in axes))
    rng = np.random.default_rng(seed)
    attributes: dict[str, Any] = {"axes": np.array(axes, dtype=np.int32), "epsilon": dtype(epsilon)}
    attributes.update(_affine_parameters(rng, normalized_shape, dtype, *affine))
    check_against_value_inference("layer_norm", {"x": random_array(rng, shape, dtype)}, attributes)


per_channel_cases = given(
    dtype=dtypes,
    shape=channel_shapes,
    epsilon=epsilons,
    with_gamma=st.booleans(),
    with_beta=st.booleans(),
    seed=SEEDS,
)
"""Inputs of a normalization with optional per-channel gamma and beta."""


@per_channel_cases
def test_instance_norm_matches_formula(
    dtype: Any, shape: tuple[int, ...], epsilon: float, with_gamma: bool, with_beta: bool, seed: int
) -> None:
    """Each (n, c) slice normalized over the spatial dims, then scaled and shifted per channel."""
    rng = np.random.default_rng(seed)
    x = random_array(rng, shape, dtype)
    parameters = _affine_parameters(rng, (shape[1],), dtype, with_gamma, with_beta)
    rank = len(shape)
    axes = tuple(range(2, rank))
    expected = _normalized(x, axes, epsilon) * _per_channel(parameters.get("gamma"), rank, 1.0) + _per_channel(
        parameters.get("beta"), rank, 0.0
    )
    tolerance = _centering_tolerance(x, axes, epsilon, parameters.get("gamma"))
    check_against_formula("instance_norm", {"x": x}, expected, {"epsilon": dtype(epsilon), **parameters}, tolerance)


def test_instance_norm_of_values_close_together_is_within_fp32_rounding_of_centering_them():
    """Found by the quick profile: -2.9204 and -2.9031 (variance 7.5e-5, below epsilon 1e-3) lose
    digits when centered in fp32; the formula's tolerance accounts for it."""
    test_instance_norm_matches_formula.hypothesis.inner_test(
        dtype=np.float32, shape=(3, 1, 2), epsilon=0.001, with_gamma=True, with_beta=True, seed=488
    )


@per_channel_cases
def test_batch_norm_matches_formula(
    dtype: Any, shape: tuple[int, ...], epsilon: float, with_gamma: bool, with_beta: bool, seed: int
) -> None:
    """(x - mean_c) / sqrt(variance_c + epsilon) * gamma_c + beta_c along axis 1."""
    rng = np.random.default_rng(seed)
    x = random_array(rng, shape, dtype)
    channels = (shape[1],)
    statistics = {
        "mean": random_array(rng, channels, dtype),
        "variance": random_array(rng, channels, dtype, 0.1, 2.0),
    }
    parameters = _affine_parameters(rng, channels, dtype, with_gamma, with_beta)
    rank = len(shape)
    expected = (x.astype(np.float64) - _per_channel(statistics["mean"], rank, 0.0)) / np.sqrt(
        _per_channel(statistics["variance"], rank, 0.0) + epsilon
    ) * _per_channel(parameters.get("gamma"), rank, 1.0) + _per_channel(parameters.get("beta"), rank, 0.0)
    attributes = {"epsilon": dtype(epsilon), **statistics, **parameters}
    check_against_formula("batch_norm", {"x": x}, expected, attributes)


@given(dtype=dtypes, shape=array_shapes(min_dims=3, max_dims=5, max_side=4), epsilon=epsilons, seed=SEEDS)
def test_l2_norm_matches_value_inference(dtype: Any, shape: tuple[int, ...], epsilon: float, seed: int) -> None:
    x = random_array(np.random.default_rng(seed), shape, dtype)
    check_against_value_inference("l2_norm", {"x": x}, {"epsilon": dtype(epsilon)})


@given(
    dtype=dtypes,
    shape=channel_shapes,
    size=st.integers(1, 6),
    alpha=st.sampled_from([1e-4, 0.1, 1.0]),
    beta=st.sampled_from([0.5, 0.75, 1.0]),
    k=st.sampled_from([1.0, 2.0]),
    seed=SEEDS,
)
def test_local_response_norm_matches_formula(
    dtype: Any, shape: tuple[int, ...], size: int, alpha: float, beta: float, k: float, seed: int
) -> None:
    """``x_c / (k + alpha / size * sum_j x_j^2) ** beta``, ``j`` from ``c - size // 2`` to ``c + (size - 1) // 2``."""
    x = random_array(np.random.default_rng(seed), shape, dtype)
    wide = x.astype(np.float64)
    expected = np.empty_like(wide)
    for c in range(shape[1]):
        window = wide[:, max(0, c - size // 2) : c + (size - 1) // 2 + 1]
        expected[:, c] = wide[:, c] / (k + alpha / size * np.square(window).sum(axis=1)) ** beta
    attributes = {"size": np.int32(size), "alpha": dtype(alpha), "beta": dtype(beta), "k": dtype(k)}
    check_against_formula("local_response_norm", {"x": x}, expected, attributes)
