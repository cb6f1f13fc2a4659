"""Convolution kernels: ``conv`` and ``conv_transpose`` over 1 to 3 spatial dims, in fp32 for fp16.

Both run one batched matmul per kernel position (``(groups, C_out/g, C_in/g) @ (N, groups, C_in/g,
positions)``) instead of building the whole im2col matrix: as fast with BLAS, and the largest
temporary is one shifted copy of the input rather than ``prod(kernel)`` of them.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np

from sdpa_slicer._interpreter.kernels import kernel
from sdpa_slicer._interpreter.kernels._common import as_int, as_ints, as_str, per_channel, upcast

PAD_TYPES = ("valid", "same", "same_lower", "custom")
Pads = tuple[tuple[int, int], ...]


def _spatial(value: Optional[Any], count: int, default: int) -> tuple[int, ...]:
    return (default,) * count if value is None else as_ints(value)


def effective_sizes(kernel_sizes: Sequence[int], dilations: Sequence[int]) -> tuple[int, ...]:
    """The extent of each dilated kernel dim: ``(K - 1) * d + 1``."""
    return tuple((k - 1) * d + 1 for k, d in zip(kernel_sizes, dilations))


def padding(
    pad_type: Any,
    sizes: Sequence[int],
    kernel_extents: Sequence[int],
    strides: Sequence[int],
    pad: Optional[Any],
) -> Pads:
    """(before, after) per spatial dim of ``conv`` and the pooling ops.

    ``same`` pads ``max(0, s * ceil(D / s) - D + K - s)`` in all, the odd one after (TensorFlow's
    SAME, Core ML's bottom-right-heavy padding); ``same_lower`` puts the odd one before.
    """
    kind = as_str(pad_type).lower()
    if kind == "valid":
        return tuple((0, 0) for _ in sizes)
    if kind == "custom":
        values = as_ints(pad) if pad is not None else (0,) * (2 * len(sizes))
        return tuple((values[2 * i], values[2 * i + 1]) for i in range(len(sizes)))
    if kind in ("same", "same_lower"):
        pads = []
        for size, extent, stride in zip(sizes, kernel_extents, strides):
            total = max(0, stride * math.ceil(size / stride) - size + extent - stride)
            small, large = total // 2, total - total // 2
            pads.append((small, large) if kind == "same" else (large, small))
        return tuple(pads)
    raise ValueError(f"unknown pad_type {kind!r}; expected one of {', '.join(PAD_TYPES)}")


def _grouped(x: np.ndarray, groups: int) -> np.ndarray:
    """``(N, C, *D)`` viewed as ``(N, groups, C / groups, *D)``."""
    return x.reshape((x.shape[0], groups, x.shape[1] // groups) + x.shape[2:])


@kernel("conv")
def _conv(
    x: np.ndarray,
    weight: np.ndarray,
    bias: Optional[np.ndarray] = None,
    strides: Optional[Any] = None,
    pad_type: Any = "valid",
    pad: Optional[Any] = None,
    dilations: Optional[Any] = None,
    groups: Any = 1,
) -> np.ndarray:
    """``out[n, o, y] = bias[o] + sum_{c in o's group, k} w[o, c, k] * x_padded[n, c, y * s + k * d]``."""
    x, weight = upcast(x), upcast(weight)
    rank = x.ndim - 2
    strides_, dilations_ = _spatial(strides, rank, 1), _spatial(dilations, rank, 1)
    kernel_sizes = weight.shape[2:]
    pads = padding(pad_type, x.shape[2:], effective_sizes(kernel_sizes, dilations_), strides_, pad)
    if any(before or after for before, after in pads):
        x = np.pad(x, ((0, 0), (0, 0)) + pads)
    count = as_int(groups)
    out_sizes = tuple(
        (size - extent) // stride + 1
        for size, extent, stride in zip(x.shape[2:], effective_sizes(kernel_sizes, dilations_), strides_)
    )
    if any(size <= 0 for size in out_sizes):
        raise ValueError(f"the kernel {kernel_sizes} does not fit the padded input {x.shape[2:]}")
    batch, channels_out = x.shape[0], weight.shape[0]
    grouped_x = _grouped(x, count)
    grouped_w = weight.reshape((count, channels_out // count) + weight.shape[1:])
    positions = math.prod(out_sizes)
    out = np.zeros((batch, count, channels_out // count, positions), dtype=np.result_type(x, weight))
    for offset in np.ndindex(*kernel_sizes):
        window = tuple(
            slice(k * d, k * d + (n - 1) * s + 1, s) for k, d, n, s in zip(offset, dilations_, out_sizes, strides_)
        )
        patch = grouped_x[(slice(None), slice(None), slice(None)) + window].reshape(grouped_x.shape[:3] + (positions,))
        out += np.matmul(grouped_w[(Ellipsis,) + offset], patch)
    out = out.reshape((batch, channels_out) + out_sizes)
    if bias is not None:
        out += per_channel(bias, out.ndim)
    return out


def _transposed_pads(
    pad_type: Any, full: Sequence[int], outputs: Sequence[int], custom: Sequence[int]
) -> tuple[int, ...]:
    """How many leading rows of the full transposed result each spatial dim drops."""
    kind = as_str(pad_type).lower()
    if kind == "valid":
        return (0,) * len(full)
    if kind == "custom":
        return tuple(custom[2 * i] for i in range(len(full)))
    if kind == "same":
        # TensorFlow's rule: the rows beyond the output are cut, the odd one at the end.
        return tuple(max(0, whole - out) // 2 for whole, out in zip(full, outputs))
    raise ValueError(f"unknown conv_transpose pad_type {kind!r}; expected one of valid, same, custom")


@kernel("conv_transpose")
def _conv_transpose(
    x: np.ndarray,
    weight: np.ndarray,
    bias: Optional[np.ndarray] = None,
    pad: Optional[Any] = None,
    output_shape: Optional[Any] = None,
    pad_type: Any = "valid",
    strides: Optional[Any] = None,
    dilations: Optional[Any] = None,
    groups: Any = 1,
) -> np.ndarray:
    """``full[n, o, i * s + k * d] += w[c, o, k] * x[n, c, i]`` (c in o's group); the output is
    ``full`` from the leading pad on, as long as the op's output (zeros past ``full``'s end)."""
    x, weight = upcast(x), upcast(weight)
    rank = x.ndim - 2
    strides_, dilations_ = _spatial(strides, rank, 1), _spatial(dilations, rank, 1)
    kernel_sizes = weight.shape[2:]
    count = as_int(groups)
    batch, sizes = x.shape[0], x.shape[2:]
    channels_out = weight.shape[1] * count
    full = tuple((n - 1) * s + e for n, s, e in zip(sizes, strides_, effective_sizes(kernel_sizes, dilations_)))
    custom = as_ints(pad) if pad is not None else (0,) * (2 * rank)
    if output_shape is not None:
        outputs = as_ints(output_shape)[2:]
    elif as_str(pad_type).lower() == "same":
        outputs = tuple(n * s for n, s in zip(sizes, strides_))
    elif as_str(pad_type).lower() == "custom":
        outputs = tuple(f - custom[2 * i] - custom[2 * i + 1] for i, f in enumerate(full))
    else:
        outputs = full
    leading = _transposed_pads(pad_type, full, outputs, custom)
    grouped_x = _grouped(x, count).reshape((batch, count, x.shape[1] // count, math.prod(sizes)))
    # (groups, C_out/g, C_in/g, *K): each kernel position is a (C_out/g, C_in/g) matrix per group.
    grouped_w = np.swapaxes(weight.reshape((count, x.shape[1] // count) + weight.shape[1:]), 1, 2)
    result = np.zeros((batch, count, channels_out // count) + full, dtype=np.result_type(x, weight))
    for offset in np.ndindex(*kernel_sizes):
        window = tuple(
            slice(k * d, k * d + (n - 1) * s + 1, s) for k, d, n, s in zip(offset, dilations_, sizes, strides_)
        )
        contribution = np.matmul(grouped_w[(Ellipsis,) + offset], grouped_x)
        result[(slice(None), slice(None), slice(None)) + window] += contribution.reshape(
            contribution.shape[:3] + tuple(sizes)
        )
    result = result.reshape((batch, channels_out) + full)
    out = np.zeros((batch, channels_out) + tuple(outputs), dtype=result.dtype)
    kept = tuple(slice(0, max(0, min(o, f - lead))) for o, f, lead in zip(outputs, full, leading))
    source = tuple(slice(lead, lead + k.stop) for lead, k in zip(leading, kept))
    out[(slice(None), slice(None)) + kept] = result[(slice(None), slice(None)) + source]
    if bias is not None:
        out += per_channel(bias, out.ndim)
    return out
