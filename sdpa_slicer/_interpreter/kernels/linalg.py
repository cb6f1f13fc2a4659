"""Linear algebra kernels: ``matmul``, ``linear`` and ``einsum``, in fp32 for fp16 operands."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from sdpa_slicer._interpreter.kernels import EvalContext, kernel
from sdpa_slicer._interpreter.kernels._common import as_bool, as_str, upcast


@kernel("matmul")
def _matmul(
    x: np.ndarray, y: np.ndarray, transpose_x: Any = False, transpose_y: Any = False, ctx: Optional[EvalContext] = None
) -> np.ndarray:
    # The keys and values of a sliced attention are read by every chunk: widened once.
    widen = upcast if ctx is None else ctx.widened
    x = widen(x)
    y = widen(y)
    if as_bool(transpose_x) and x.ndim >= 2:
        x = np.swapaxes(x, -1, -2)
    if as_bool(transpose_y) and y.ndim >= 2:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@kernel("linear")
def _linear(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray] = None) -> np.ndarray:
    x = upcast(x)
    # One 2-D GEMM instead of NumPy's per-batch loop over leading dims.
    out = np.matmul(x.reshape(-1, x.shape[-1]), upcast(weight).T).reshape(x.shape[:-1] + (weight.shape[0],))
    if bias is not None:
        out += upcast(bias)
    return out


def _broadcast_batch(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Broadcast the dims einsum treats as batch: H (axis -2) and, at rank 4, B (axis 0)."""
    x_shape, y_shape = list(x.shape), list(y.shape)
    batch_axes = (0, 2) if x.ndim == 4 else (1,)
    for axis in batch_axes:
        size = max(x_shape[axis], y_shape[axis])
        x_shape[axis] = y_shape[axis] = size
    return np.broadcast_to(x, x_shape), np.broadcast_to(y, y_shape)


@kernel("einsum")
def _einsum(values: tuple[np.ndarray, np.ndarray], equation: Any) -> np.ndarray:
    x, y = _broadcast_batch(upcast(values[0]), upcast(values[1]))
    return np.einsum(as_str(equation), x, y)
