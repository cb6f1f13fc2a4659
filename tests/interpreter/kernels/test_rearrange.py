"""Rearranging kernels against their documented index formulas, element by element (coremltools
has value inference for none of them but ``reverse_sequence``, whose inference is not written)."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import assume, given
from hypothesis import strategies as st

from interpreter.kernels._oracle import SEEDS, check_against_formula, random_array

FLOAT_DTYPES = (np.float16, np.float32)
dtypes = st.sampled_from(FLOAT_DTYPES)
blocks = st.integers(2, 3)
small = st.integers(1, 3)


def _blocks_to_space_formula(x: np.ndarray, b: int, block_major: bool) -> np.ndarray:
    """``out[n, c, h b + i, w b + j] = x[n, channel, h, w]``: channel ``(i b + j) C + c`` for
    depth_to_space (TensorFlow's DCR), ``c b^2 + i b + j`` for pixel_shuffle."""
    n, channels, height, width = x.shape
    c_out = channels // (b * b)
    out = np.zeros((n, c_out, height * b, width * b), dtype=x.dtype)
    for c, h, w, i, j in np.ndindex(c_out, height, width, b, b):
        channel = (i * b + j) * c_out + c if block_major else c * b * b + i * b + j
        out[:, c, h * b + i, w * b + j] = x[:, channel, h, w]
    return out


@given(dtype=dtypes, b=blocks, n=small, c=small, h=small, w=small, seed=SEEDS)
def test_depth_to_space_and_back(dtype: Any, b: int, n: int, c: int, h: int, w: int, seed: int) -> None:
    x = random_array(np.random.default_rng(seed), (n, c * b * b, h, w), dtype)
    expected = _blocks_to_space_formula(x, b, block_major=True)
    check_against_formula("depth_to_space", {"x": x}, expected, {"block_size": np.int32(b)})
    check_against_formula("space_to_depth", {"x": expected}, x, {"block_size": np.int32(b)})


@given(dtype=dtypes, b=blocks, n=small, c=small, h=small, w=small, seed=SEEDS)
def test_pixel_shuffle_and_back(dtype: Any, b: int, n: int, c: int, h: int, w: int, seed: int) -> None:
    x = random_array(np.random.default_rng(seed), (n, c * b * b, h, w), dtype)
    expected = _blocks_to_space_formula(x, b, block_major=False)
    check_against_formula("pixel_shuffle", {"x": x}, expected, {"upscale_factor": np.int32(b)})
    check_against_formula("pixel_unshuffle", {"x": expected}, x, {"downscale_factor": np.uint32(b)})


@given(
    dtype=dtypes,
    block=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    n=small,
    c=small,
    data=st.data(),
    seed=SEEDS,
)
def test_space_to_batch_and_back(dtype: Any, block, n: int, c: int, data: st.DataObject, seed: int) -> None:
    """``out[(i bw + j) N + n, c, h, w] = padded[n, c, h bh + i, w bw + j]``; batch_to_space undoes it
    and crops the padding."""
    bh, bw = block
    pads = [[data.draw(st.integers(0, 2)) for _ in range(2)] for _ in range(2)]
    height = data.draw(st.integers(1, 3)) * bh - sum(pads[0])
    width = data.draw(st.integers(1, 3)) * bw - sum(pads[1])
    assume(height >= 1 and width >= 1)
    x = random_array(np.random.default_rng(seed), (n, c, height, width), dtype)
    padded = np.pad(x, ((0, 0), (0, 0), tuple(pads[0]), tuple(pads[1])))
    out_h, out_w = padded.shape[2] // bh, padded.shape[3] // bw
    expected = np.zeros((bh * bw * n, c, out_h, out_w), dtype=x.dtype)
    for i, j, item, h, w in np.ndindex(bh, bw, n, out_h, out_w):
        expected[(i * bw + j) * n + item, :, h, w] = padded[item, :, h * bh + i, w * bw + j]
    spacing = {"block_shape": np.array(block, np.int32)}
    check_against_formula("space_to_batch", {"x": x}, expected, {**spacing, "paddings": np.array(pads, np.int32)})
    check_against_formula("batch_to_space", {"x": expected}, x, {**spacing, "crops": np.array(pads, np.int32)})


@given(dtype=st.sampled_from((np.float16, np.float32, np.int32)), data=st.data(), seed=SEEDS)
def test_sliding_windows_stack_each_window_after_the_axis(dtype: Any, data: st.DataObject, seed: int) -> None:
    rank = data.draw(st.integers(1, 3))
    shape = tuple(data.draw(st.lists(st.integers(1, 5), min_size=rank, max_size=rank)))
    axis = data.draw(st.integers(-rank, rank - 1))
    size = data.draw(st.integers(1, shape[axis]))
    stride = data.draw(st.integers(1, 3))
    x = random_array(np.random.default_rng(seed), shape, dtype)
    starts = range(0, shape[axis] - size + 1, stride)
    windows = [np.take(x, range(start, start + size), axis=axis) for start in starts]
    expected = np.stack(windows, axis=axis % rank)
    attributes = {"axis": np.int32(axis), "size": np.int32(size), "stride": np.int32(stride)}
    check_against_formula("sliding_windows", {"x": x}, expected, attributes)


@given(dtype=st.sampled_from((np.float32, np.int32)), data=st.data(), seed=SEEDS)
def test_reverse_sequence_reverses_the_first_lengths_of_each_item(dtype: Any, data: st.DataObject, seed: int) -> None:
    shape = tuple(data.draw(st.lists(st.integers(1, 4), min_size=2, max_size=3)))
    rank = len(shape)
    seq_axis, batch_axis = data.draw(st.permutations(range(rank)))[:2]
    lengths = [data.draw(st.integers(0, shape[seq_axis])) for _ in range(shape[batch_axis])]
    x = random_array(np.random.default_rng(seed), shape, dtype)
    expected = x.copy()
    for index in np.ndindex(*shape):
        length = lengths[index[batch_axis]]
        if index[seq_axis] < length:
            source = list(index)
            source[seq_axis] = length - 1 - index[seq_axis]
            expected[index] = x[tuple(source)]
    attributes = {"seq_axis": np.int32(seq_axis), "batch_axis": np.int32(batch_axis)}
    check_against_formula(
        "reverse_sequence", {"x": x}, expected, {"lengths": np.array(lengths, np.int32), **attributes}
    )


def test_reshape_like_takes_its_shape_from_slices_of_the_reference_shapes() -> None:
    """The example of the op's documentation: refs (2, 3, 4) and (1, 5, 6), [0:2] and [1:] -> (2, 3, 5, 6)."""
    x = np.arange(180, dtype=np.float32).reshape(6, 30)
    refs = (np.zeros((2, 3, 4), np.float32), np.zeros((1, 5, 6), np.float32))
    attributes = {"begins": (0, 1), "ends": (2, 0), "end_masks": (False, True)}
    check_against_formula("reshape_like", {"x": x, "ref_tensors": refs}, x.reshape(2, 3, 5, 6), attributes)
