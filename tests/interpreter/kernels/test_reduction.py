"""Reduction kernels against coremltools' value inference."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes

from interpreter.kernels._oracle import SEEDS, check_against_value_inference, per_op, random_array

REDUCTIONS = (
    "reduce_sum",
    "reduce_mean",
    "reduce_max",
    "reduce_min",
    "reduce_prod",
    "reduce_l1_norm",
    "reduce_l2_norm",
    "reduce_sum_square",
    "reduce_log_sum",
    "reduce_log_sum_exp",
)
ARG_REDUCTIONS = ("reduce_argmax", "reduce_argmin")
# reduce_log_sum takes the log of a sum, so it gets positive inputs.
POSITIVE_ONLY = ("reduce_log_sum",)
DTYPES = (np.float16, np.float32, np.int32)
INDEX_DTYPES = ("int32", "uint16")
FLOAT_ONLY = ("reduce_l2_norm", "reduce_log_sum", "reduce_log_sum_exp")

shapes = array_shapes(min_dims=1, max_dims=4, max_side=4)


@st.composite
def axes_for(draw: st.DrawFn, rank: int) -> Any:
    """None (all axes) or a non-empty set of distinct axes, some negative."""
    if draw(st.booleans()):
        return None
    chosen = draw(st.lists(st.integers(0, rank - 1), min_size=1, max_size=rank, unique=True))
    return np.array([axis - rank if draw(st.booleans()) else axis for axis in chosen], dtype=np.int32)


@pytest.mark.parametrize("op_type", REDUCTIONS)
@given(dtype=st.sampled_from(DTYPES), shape=shapes, keep_dims=st.booleans(), seed=SEEDS, data=st.data())
@per_op
def test_reductions_match_value_inference(
    op_type: str, dtype: Any, shape: tuple[int, ...], keep_dims: bool, seed: int, data: st.DataObject
) -> None:
    if op_type in FLOAT_ONLY and dtype == np.int32:
        dtype = np.float32
    low = 0.5 if op_type in POSITIVE_ONLY else -2.0
    x = random_array(np.random.default_rng(seed), shape, dtype, low, 2.0)
    attributes = {"keep_dims": keep_dims}
    axes = data.draw(axes_for(len(shape)), label="axes")
    if axes is not None:
        attributes["axes"] = axes
    check_against_value_inference(op_type, {"x": x}, attributes)


@pytest.mark.parametrize("op_type", ARG_REDUCTIONS)
@given(
    dtype=st.sampled_from(DTYPES),
    shape=shapes,
    keep_dims=st.booleans(),
    output_dtype=st.sampled_from(INDEX_DTYPES),
    seed=SEEDS,
    data=st.data(),
)
@per_op
def test_arg_reductions_match_value_inference(
    op_type: str,
    dtype: Any,
    shape: tuple[int, ...],
    keep_dims: bool,
    output_dtype: str,
    seed: int,
    data: st.DataObject,
) -> None:
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    # Distinct values: the op leaves the winner among ties unspecified.
    x = np.random.default_rng(seed).permutation(int(np.prod(shape))).reshape(shape).astype(dtype)
    attributes = {"axis": np.int32(axis), "keep_dims": keep_dims, "output_dtype": output_dtype}
    (got,) = check_against_value_inference(op_type, {"x": x}, attributes)
    assert got.dtype == np.dtype(output_dtype)
