"""Pooling kernels: ``avg_pool``, ``max_pool`` and ``l2_pool`` over 1 to 3 spatial dims, in fp32 for fp16.

Windows are laid as ``conv`` lays them (``pad_type``, ``pad``, ``strides``). With ``ceil_mode`` the
last window may run past the padded input; the part past it holds nothing: it is not in the max,
and not in an average's count, as in PyTorch's pooling.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np

from sdpa_slicer._interpreter.kernels import KernelFn, kernel, register
from sdpa_slicer._interpreter.kernels._common import as_bool, as_ints, upcast
from sdpa_slicer._interpreter.kernels.conv import Pads, padding

Combine = Callable[..., np.ndarray]
"""A ufunc such as ``np.maximum``, called with ``out=``."""


def _out_size(size: int, pads: tuple[int, int], extent: int, stride: int, ceil_mode: bool) -> int:
    """``spatial_dimensions_out_shape`` of coremltools: floor (or ceil) of the window count, and with
    ``ceil_mode`` no window that starts in the trailing padding."""
    total = size + pads[0] + pads[1]
    if not ceil_mode:
        return (total - extent) // stride + 1
    count = (total - extent + stride - 1) // stride + 1
    if (count - 1) * stride >= size + pads[0] and pads[0] + pads[1] > 0:
        count -= 1
    return count


def _windows(
    x: np.ndarray,
    kernel_sizes: tuple[int, ...],
    strides: tuple[int, ...],
    pads: Pads,
    ceil_mode: bool,
    fill: float,
    combine: Combine,
    overflow_fill: Optional[float] = None,
) -> np.ndarray:
    """``combine`` folded over every kernel position of each window of ``x`` padded with ``fill``
    (and past the padding with ``overflow_fill``, by default ``fill`` too)."""
    sizes = x.shape[2:]
    outs = tuple(_out_size(n, p, k, s, ceil_mode) for n, p, k, s in zip(sizes, pads, kernel_sizes, strides))
    if any(out <= 0 for out in outs):
        raise ValueError(f"the window {kernel_sizes} does not fit the padded input {sizes}")
    # Past the trailing pad, as far as the last window reaches.
    overflow = tuple(
        max(0, (out - 1) * s + k - (n + p[0] + p[1]))
        for out, s, k, n, p in zip(outs, strides, kernel_sizes, sizes, pads)
    )
    padded = x
    if any(before or after for before, after in pads):
        padded = np.pad(padded, ((0, 0), (0, 0)) + pads, constant_values=fill)
    if any(overflow):
        extra = fill if overflow_fill is None else overflow_fill
        padded = np.pad(padded, ((0, 0), (0, 0)) + tuple((0, n) for n in overflow), constant_values=extra)
    result: Optional[np.ndarray] = None
    for offset in np.ndindex(*kernel_sizes):
        view = padded[
            (slice(None), slice(None))
            + tuple(slice(k, k + (o - 1) * s + 1, s) for k, o, s in zip(offset, outs, strides))
        ]
        result = np.array(view) if result is None else combine(result, view, out=result)
    assert result is not None
    return result


def _layout(
    x: np.ndarray, kernel_sizes: Any, strides: Optional[Any], pad_type: Any, pad: Optional[Any]
) -> tuple[tuple[int, ...], tuple[int, ...], Pads]:
    sizes = as_ints(kernel_sizes)
    steps = as_ints(strides) if strides is not None else (1,) * len(sizes)
    return sizes, steps, padding(pad_type, x.shape[2:], sizes, steps, pad)


def _window_kernel(
    prepare: Callable[[np.ndarray], np.ndarray],
    fill: float,
    combine: Combine,
    finish: Callable[[np.ndarray], np.ndarray],
) -> KernelFn:
    """A pooling kernel: ``finish`` of ``combine`` folded over each window of ``prepare(x)``."""

    def pool(
        x: np.ndarray,
        kernel_sizes: Any,
        strides: Optional[Any] = None,
        pad_type: Any = "valid",
        pad: Optional[Any] = None,
        ceil_mode: Any = False,
    ) -> np.ndarray:
        x = upcast(x)
        sizes, steps, pads = _layout(x, kernel_sizes, strides, pad_type, pad)
        return finish(_windows(prepare(x), sizes, steps, pads, as_bool(ceil_mode), fill, combine))

    return pool


def _unchanged(x: np.ndarray) -> np.ndarray:
    return x


# max: the largest value of each window (padding is -inf, so it never wins); l2: the root of the
# sum of squares of each window (padding adds nothing).
register("max_pool", _window_kernel(_unchanged, -np.inf, np.maximum, _unchanged))
register("l2_pool", _window_kernel(np.square, 0.0, np.add, np.sqrt))


@kernel("avg_pool")
def _avg_pool(
    x: np.ndarray,
    kernel_sizes: Any,
    strides: Optional[Any] = None,
    pad_type: Any = "valid",
    pad: Optional[Any] = None,
    exclude_padding_from_average: Any = False,
    ceil_mode: Any = False,
) -> np.ndarray:
    """The sum of each window over its count: the input and padding positions it covers, or with
    ``exclude_padding_from_average`` the input positions alone."""
    x = upcast(x)
    sizes, steps, pads = _layout(x, kernel_sizes, strides, pad_type, pad)
    ceil = as_bool(ceil_mode)
    total = _windows(x, sizes, steps, pads, ceil, 0.0, np.add)
    padding_counts = 0.0 if as_bool(exclude_padding_from_average) else 1.0
    ones = np.ones((1, 1) + x.shape[2:], dtype=np.float32)
    return total / _windows(ones, sizes, steps, pads, ceil, padding_counts, np.add, overflow_fill=0.0)
