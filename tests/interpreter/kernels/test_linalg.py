"""``matmul``, ``linear`` and ``einsum`` against coremltools' value inference."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, mutually_broadcastable_shapes

from interpreter.kernels._oracle import SEEDS, check_against_value_inference, random_array, run
from sdpa_slicer import EvaluationError

DTYPES = (np.float16, np.float32, np.int32)
EINSUM_EQUATIONS = {4: "nchw,nwhu->nchu", 3: "chw,whr->chr"}

dims = st.integers(min_value=1, max_value=5)
batch_pairs = mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=2, max_side=3)


@st.composite
def matmul_operands(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[int, ...], bool, bool]:
    """Shapes of x (rank 1, or batched matrices) and y (batched matrices) and transpose flags.

    coremltools' matmul type inference indexes ``y.shape[-2]`` before promoting a rank-1 ``y``,
    so a rank-1 ``y`` cannot be built, although its documentation allows it; and for a rank-1
    ``x`` it declares a wrong shape when ``y`` has batch dims (see the test below), so a rank-1
    ``x`` only meets a plain matrix.
    """
    m, k, n = draw(dims), draw(dims), draw(dims)
    x_batch, y_batch = draw(batch_pairs).input_shapes
    x_vector = draw(st.booleans())
    if x_vector:
        y_batch = ()
    transpose_x = not x_vector and draw(st.booleans())
    transpose_y = draw(st.booleans())
    x_shape = (k,) if x_vector else x_batch + ((k, m) if transpose_x else (m, k))
    y_shape = y_batch + ((n, k) if transpose_y else (k, n))
    return x_shape, y_shape, transpose_x, transpose_y


@given(dtype=st.sampled_from(DTYPES), operands=matmul_operands(), seed=SEEDS)
def test_matmul_matches_value_inference(dtype: Any, operands: Any, seed: int) -> None:
    x_shape, y_shape, transpose_x, transpose_y = operands
    rng = np.random.default_rng(seed)
    runtime = {"x": random_array(rng, x_shape, dtype), "y": random_array(rng, y_shape, dtype)}
    attributes = {"transpose_x": transpose_x, "transpose_y": transpose_y}
    check_against_value_inference("matmul", runtime, attributes)


def test_matmul_shape_contradicting_numpy_is_reported() -> None:
    """For x [K] and y [B, K, N] coremltools' type inference drops B instead of the promoted row,
    so the true result [B, N] contradicts the declared [1, N] and evaluation must say so."""
    x = np.ones((1,), dtype=np.float32)
    y = np.ones((2, 1, 3), dtype=np.float32)
    with pytest.raises(EvaluationError, match=r"matmul op .* shape \(2, 3\), but the program declares \(1, 3\)"):
        run("matmul", {"x": x, "y": y})


@given(
    dtype=st.sampled_from(DTYPES),
    leading=array_shapes(min_dims=0, max_dims=2, max_side=4),
    d_in=dims,
    d_out=dims,
    with_bias=st.booleans(),
    seed=SEEDS,
)
def test_linear_matches_value_inference(
    dtype: Any, leading: tuple[int, ...], d_in: int, d_out: int, with_bias: bool, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    attributes = {"weight": random_array(rng, (d_out, d_in), dtype)}
    if with_bias:
        attributes["bias"] = random_array(rng, (d_out,), dtype)
    x = random_array(rng, leading + (d_in,), dtype)
    check_against_value_inference("linear", {"x": x}, attributes)


@pytest.mark.parametrize("rank", sorted(EINSUM_EQUATIONS))
@given(
    dtype=st.sampled_from((np.float16, np.float32)),
    sizes=st.tuples(dims, dims, dims, dims, dims),
    seed=SEEDS,
    data=st.data(),
)
def test_einsum_matches_value_inference(
    rank: int, dtype: Any, sizes: tuple[int, ...], seed: int, data: st.DataObject
) -> None:
    """x [B, C, H, W1] times y [B, W1, H, W2] (B absent at rank 3); B and H may broadcast from 1."""
    b, c, h, w1, w2 = sizes
    x_h, y_h = data.draw(st.sampled_from([(h, h), (1, h), (h, 1)]), label="H")
    x_shape, y_shape = (c, x_h, w1), (w1, y_h, w2)
    if rank == 4:
        x_b, y_b = data.draw(st.sampled_from([(b, b), (1, b), (b, 1)]), label="B")
        x_shape, y_shape = (x_b,) + x_shape, (y_b,) + y_shape
    rng = np.random.default_rng(seed)
    values = (random_array(rng, x_shape, dtype), random_array(rng, y_shape, dtype))
    check_against_value_inference("einsum", {"values": values}, {"equation": EINSUM_EQUATIONS[rank]})
