"""Normalization kernels: ``layer_norm``, ``instance_norm``, ``batch_norm``, ``l2_norm`` and ``local_response_norm``."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from sdpa_slicer._interpreter.kernels import kernel
from sdpa_slicer._interpreter.kernels._common import as_axes, as_int, per_channel, upcast

DEFAULT_EPSILON = 1e-5
DEFAULT_L2_EPSILON = 1e-6
DEFAULT_LRN_ALPHA, DEFAULT_LRN_BETA, DEFAULT_LRN_K = 1e-4, 0.75, 1.0
L2_NORM_INNER_RANK = 3


def _normalize(x: np.ndarray, axes: tuple[int, ...], epsilon: Any) -> np.ndarray:
    """``(x - mean) / sqrt(var + epsilon)`` over ``axes`` (population variance)."""
    centered = x - np.mean(x, axis=axes, keepdims=True)
    variance = np.mean(np.square(centered), axis=axes, keepdims=True)
    return centered / np.sqrt(variance + epsilon)


@kernel("layer_norm")
def _layer_norm(
    x: np.ndarray,
    axes: Any = None,
    gamma: Optional[np.ndarray] = None,
    beta: Optional[np.ndarray] = None,
    epsilon: Any = DEFAULT_EPSILON,
) -> np.ndarray:
    x = upcast(x)
    norm_axes = as_axes(axes, x.ndim)
    if norm_axes is None:
        norm_axes = tuple(range(x.ndim))
    out = _normalize(x, norm_axes, epsilon)
    # gamma and beta hold the normalized dims in increasing axis order, whatever the order of ``axes``.
    parameter_shape = tuple(size if axis in norm_axes else 1 for axis, size in enumerate(x.shape))
    if gamma is not None:
        out *= np.reshape(upcast(gamma), parameter_shape)
    if beta is not None:
        out += np.reshape(upcast(beta), parameter_shape)
    return out


@kernel("instance_norm")
def _instance_norm(
    x: np.ndarray,
    gamma: Optional[np.ndarray] = None,
    beta: Optional[np.ndarray] = None,
    epsilon: Any = DEFAULT_EPSILON,
) -> np.ndarray:
    x = upcast(x)
    out = _normalize(x, tuple(range(2, x.ndim)), epsilon)
    if gamma is not None:
        out *= per_channel(gamma, x.ndim)
    if beta is not None:
        out += per_channel(beta, x.ndim)
    return out


@kernel("batch_norm")
def _batch_norm(
    x: np.ndarray,
    mean: np.ndarray,
    variance: np.ndarray,
    gamma: Optional[np.ndarray] = None,
    beta: Optional[np.ndarray] = None,
    epsilon: Any = DEFAULT_EPSILON,
) -> np.ndarray:
    x = upcast(x)
    rank = x.ndim
    out = (x - per_channel(mean, rank)) / np.sqrt(per_channel(variance, rank) + epsilon)
    if gamma is not None:
        out *= per_channel(gamma, rank)
    if beta is not None:
        out += per_channel(beta, rank)
    return out


@kernel("l2_norm")
def _l2_norm(x: np.ndarray, epsilon: Any = DEFAULT_L2_EPSILON) -> np.ndarray:
    """Divide each batch item (the last three axes) by the root of its sum of squares plus ``epsilon``."""
    x = upcast(x)
    inner_axes = tuple(range(x.ndim - L2_NORM_INNER_RANK, x.ndim))
    return x / np.sqrt(np.sum(np.square(x), axis=inner_axes, keepdims=True) + epsilon)


@kernel("local_response_norm")
def _local_response_norm(
    x: np.ndarray,
    size: Any,
    alpha: Any = DEFAULT_LRN_ALPHA,
    beta: Any = DEFAULT_LRN_BETA,
    k: Any = DEFAULT_LRN_K,
) -> np.ndarray:
    """``x_c / (k + alpha / size * sum_j x_j^2) ** beta`` over channels ``j`` from ``c - size // 2`` to
    ``c + (size - 1) // 2`` (PyTorch's window; the same either way for an odd size)."""
    x = upcast(x)
    window = as_int(size)
    squares = np.square(x)
    padded = np.pad(squares, ((0, 0), (window // 2, (window - 1) // 2)) + ((0, 0),) * (x.ndim - 2))
    totals = np.cumsum(np.concatenate((np.zeros_like(padded[:, :1]), padded), axis=1), axis=1)
    sums = totals[:, window:] - totals[:, :-window]
    return x / (float(np.asarray(k)) + float(np.asarray(alpha)) / window * sums) ** float(np.asarray(beta))
