"""Rearranging kernels: blocks between space, depth and batch, sliding windows, partial reversal
and ``reshape_like``. Values are moved, never computed, so every dtype stays as it is."""

from __future__ import annotations

from typing import Any

import numpy as np

from sdpa_slicer._interpreter.kernels import kernel
from sdpa_slicer._interpreter.kernels._common import as_bool, as_int, as_ints


def _blocks_to_space(x: np.ndarray, block: int, block_major: bool) -> np.ndarray:
    """``(N, C * b * b, H, W) -> (N, C, H * b, W * b)``: channel ``(i * b + j) * C + c`` (block-major,
    TensorFlow's DCR) or ``c * b * b + i * b + j`` (PyTorch's pixel shuffle) goes to ``(h * b + i, w * b + j)``."""
    n, channels, h, w = x.shape
    c = channels // (block * block)
    split = x.reshape(n, block, block, c, h, w) if block_major else x.reshape(n, c, block, block, h, w)
    order = (0, 3, 4, 1, 5, 2) if block_major else (0, 1, 4, 2, 5, 3)
    return split.transpose(order).reshape(n, c, h * block, w * block)


def _space_to_blocks(x: np.ndarray, block: int, block_major: bool) -> np.ndarray:
    """The inverse of ``_blocks_to_space``."""
    n, c, height, width = x.shape
    h, w = height // block, width // block
    split = x.reshape(n, c, h, block, w, block)
    order = (0, 3, 5, 1, 2, 4) if block_major else (0, 1, 3, 5, 2, 4)
    return split.transpose(order).reshape(n, c * block * block, h, w)


@kernel("depth_to_space")
def _depth_to_space(x: np.ndarray, block_size: Any) -> np.ndarray:
    return _blocks_to_space(x, as_int(block_size), block_major=True)


@kernel("space_to_depth")
def _space_to_depth(x: np.ndarray, block_size: Any) -> np.ndarray:
    return _space_to_blocks(x, as_int(block_size), block_major=True)


@kernel("pixel_shuffle")
def _pixel_shuffle(x: np.ndarray, upscale_factor: Any) -> np.ndarray:
    return _blocks_to_space(x, as_int(upscale_factor), block_major=False)


@kernel("pixel_unshuffle")
def _pixel_unshuffle(x: np.ndarray, downscale_factor: Any) -> np.ndarray:
    return _space_to_blocks(x, as_int(downscale_factor), block_major=False)


@kernel("space_to_batch")
def _space_to_batch(x: np.ndarray, block_shape: Any, paddings: Any) -> np.ndarray:
    """TensorFlow's SpaceToBatch on NCHW:
    ``out[(i * bw + j) * N + n, c, h, w] = padded[n, c, h * bh + i, w * bw + j]``."""
    bh, bw = as_ints(block_shape)
    (top, bottom), (left, right) = np.asarray(as_ints(paddings)).reshape(2, 2).tolist()
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    n, c, height, width = padded.shape
    split = padded.reshape(n, c, height // bh, bh, width // bw, bw)
    return split.transpose(3, 5, 0, 1, 2, 4).reshape(bh * bw * n, c, height // bh, width // bw)


@kernel("batch_to_space")
def _batch_to_space(x: np.ndarray, block_shape: Any, crops: Any) -> np.ndarray:
    """The inverse of ``space_to_batch``, then ``crops`` rows and columns cut from each side."""
    bh, bw = as_ints(block_shape)
    (top, bottom), (left, right) = np.asarray(as_ints(crops)).reshape(2, 2).tolist()
    batch, c, h, w = x.shape
    n = batch // (bh * bw)
    full = x.reshape(bh, bw, n, c, h, w).transpose(2, 3, 4, 0, 5, 1).reshape(n, c, h * bh, w * bw)
    return full[:, :, top : h * bh - bottom, left : w * bw - right]


@kernel("sliding_windows")
def _sliding_windows(x: np.ndarray, axis: Any, size: Any, stride: Any = 1) -> np.ndarray:
    """Windows of ``size`` along ``axis``, ``stride`` apart: a new axis of the window's positions after it."""
    axis_ = as_int(axis) % x.ndim
    windows = np.lib.stride_tricks.sliding_window_view(x, as_int(size), axis=axis_)
    windows = windows[(slice(None),) * axis_ + (slice(None, None, as_int(stride)),)]
    return np.moveaxis(windows, -1, axis_ + 1)


@kernel("reverse_sequence")
def _reverse_sequence(x: np.ndarray, lengths: np.ndarray, seq_axis: Any = 0, batch_axis: Any = 0) -> np.ndarray:
    """Along ``batch_axis``, item ``b`` has its first ``lengths[b]`` elements on ``seq_axis`` reversed."""
    seq, batch = as_int(seq_axis) % x.ndim, as_int(batch_axis) % x.ndim
    out = np.array(x, copy=True)
    for item, length in enumerate(as_ints(lengths)):
        index: list[Any] = [slice(None)] * x.ndim
        index[batch] = item
        index[seq] = slice(0, length)
        target = tuple(index)
        out[target] = np.flip(x[target], axis=seq - (1 if batch < seq else 0))
    return out


@kernel("reshape_like")
def _reshape_like(
    x: np.ndarray,
    ref_tensors: tuple[np.ndarray, ...],
    begins: tuple[Any, ...],
    ends: tuple[Any, ...],
    end_masks: tuple[Any, ...],
) -> np.ndarray:
    """The shape is the concatenation of ``ref.shape[begin:end]`` (``[begin:]`` where end-masked)."""
    shape: list[int] = []
    for ref, begin, end, open_end in zip(ref_tensors, begins, ends, end_masks):
        stop = None if as_bool(open_end) else as_int(end)
        shape.extend(ref.shape[as_int(begin) : stop])
    return np.reshape(x, shape)
