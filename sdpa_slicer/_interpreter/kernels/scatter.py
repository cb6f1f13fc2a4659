"""Scatter kernels: ``scatter``, ``scatter_along_axis`` and ``scatter_nd``, in every ``mode``.

Updates that land on the same position combine in order for the arithmetic modes (NumPy's
unbuffered ``ufunc.at``); with ``update`` the last one wins (MIL leaves that case undefined).
A negative index counts from the end, as in iOS15; since iOS17 it is out of bounds, which
``validate_indices`` turns into an error (and so does the kernel).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from sdpa_slicer._interpreter.kernels import kernel
from sdpa_slicer._interpreter.kernels._common import as_bool, as_int, as_str, upcast

SCATTER_MODES: dict[str, Optional[np.ufunc]] = {
    "update": None,
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": np.divide,
    "max": np.maximum,
    "min": np.minimum,
}
DEFAULT_MODE = "add"


def _checked(indices: np.ndarray, size: int, validate: bool) -> np.ndarray:
    """``indices`` as non-negative positions in an axis of ``size``; out-of-bounds ones raise
    (MIL leaves them undefined unless validated: raising is the one safe reading)."""
    low = 0 if validate else -size
    if indices.size and (indices.min() < low or indices.max() >= size):
        raise IndexError(f"indices must lie in [{low}, {size}), got values from {indices.min()} to {indices.max()}")
    return np.where(indices < 0, indices + size, indices).astype(np.intp)


def _apply(out: np.ndarray, index: Any, updates: np.ndarray, mode: Any) -> np.ndarray:
    name = as_str(mode)
    if name not in SCATTER_MODES:
        raise ValueError(f"unknown scatter mode {name!r}; expected one of {', '.join(SCATTER_MODES)}")
    combine = SCATTER_MODES[name]
    if combine is None:
        out[index] = updates
    else:
        combine.at(out, index, updates)
    return out


def _start(data: np.ndarray, updates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A writable fp32 (for fp16) copy of ``data`` to scatter into, and the updates in its dtype."""
    out = np.array(upcast(data), copy=True)
    return out, upcast(updates).astype(out.dtype, copy=False)


@kernel("scatter")
def _scatter(
    data: np.ndarray,
    indices: np.ndarray,
    updates: np.ndarray,
    axis: Any = 0,
    mode: Any = DEFAULT_MODE,
    validate_indices: Any = False,
) -> np.ndarray:
    """``out[..., indices[i], ...] (mode)= updates[..., i, ...]`` along ``axis``."""
    axis_ = as_int(axis) % data.ndim
    positions = _checked(np.asarray(indices).reshape(-1), data.shape[axis_], as_bool(validate_indices))
    out, values = _start(data, updates)
    index = (slice(None),) * axis_ + (positions,)
    return _apply(out, index, values, mode)


@kernel("scatter_along_axis")
def _scatter_along_axis(
    data: np.ndarray,
    indices: np.ndarray,
    updates: np.ndarray,
    axis: Any = 0,
    mode: Any = DEFAULT_MODE,
    validate_indices: Any = False,
) -> np.ndarray:
    """``out[p with p[axis] = indices[p]] (mode)= updates[p]`` for every position ``p`` of ``indices``."""
    axis_ = as_int(axis) % data.ndim
    positions = _checked(np.asarray(indices), data.shape[axis_], as_bool(validate_indices))
    out, values = _start(data, updates)
    grid: list[Any] = list(np.indices(positions.shape, sparse=True))
    grid[axis_] = positions
    return _apply(out, tuple(grid), values, mode)


@kernel("scatter_nd")
def _scatter_nd(
    data: np.ndarray,
    indices: np.ndarray,
    updates: np.ndarray,
    mode: Any = DEFAULT_MODE,
    validate_indices: Any = False,
) -> np.ndarray:
    """``out[indices[i]] (mode)= updates[i]``, each ``indices[i]`` a vector of the leading coordinates."""
    indices = np.asarray(indices)
    depth = indices.shape[-1]
    validate = as_bool(validate_indices)
    coordinates = tuple(_checked(indices[..., k], data.shape[k], validate) for k in range(depth))
    out, values = _start(data, updates)
    return _apply(out, coordinates, values, mode)
