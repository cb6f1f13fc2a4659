"""Reduction kernels: ``reduce_*`` over ``axes`` (all axes when absent) and ``reduce_argmax``/``argmin``."""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np

from sdpa_slicer._interpreter.kernels import KernelFn, kernel, register
from sdpa_slicer._interpreter.kernels._common import DEFAULT_INDEX_DTYPE, as_axes, as_bool, as_int, as_nptype, upcast

Reducer = Callable[[np.ndarray, Optional[tuple], bool], np.ndarray]


def _sum(x: np.ndarray, axis: Optional[tuple], keepdims: bool) -> np.ndarray:
    return np.sum(x, axis=axis, keepdims=keepdims)


def _log_sum_exp(x: np.ndarray, axis: Optional[tuple], keepdims: bool) -> np.ndarray:
    peak = np.max(x, axis=axis, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0)
    total = np.sum(np.exp(x - peak), axis=axis, keepdims=True)
    result = np.log(total) + peak
    return result if keepdims else np.squeeze(result, axis=axis)


# Each reducer gets x in fp32 when it was fp16: NumPy would otherwise accumulate in fp16.
REDUCERS = {
    "reduce_sum": _sum,
    "reduce_mean": lambda x, axis, keepdims: np.mean(x, axis=axis, keepdims=keepdims),
    "reduce_max": lambda x, axis, keepdims: np.max(x, axis=axis, keepdims=keepdims),
    "reduce_min": lambda x, axis, keepdims: np.min(x, axis=axis, keepdims=keepdims),
    "reduce_prod": lambda x, axis, keepdims: np.prod(x, axis=axis, keepdims=keepdims),
    "reduce_l1_norm": lambda x, axis, keepdims: _sum(np.abs(x), axis, keepdims),
    "reduce_l2_norm": lambda x, axis, keepdims: np.sqrt(_sum(np.square(x), axis, keepdims)),
    "reduce_sum_square": lambda x, axis, keepdims: _sum(np.square(x), axis, keepdims),
    "reduce_log_sum": lambda x, axis, keepdims: np.log(_sum(x, axis, keepdims)),
    "reduce_log_sum_exp": _log_sum_exp,
}


def _reduction(reducer: Reducer) -> KernelFn:
    def reduce(x: np.ndarray, axes: Any = None, keep_dims: Any = False) -> np.ndarray:
        x = upcast(x)
        return reducer(x, as_axes(axes, x.ndim), as_bool(keep_dims))

    return reduce


for _op_type, _reducer in REDUCERS.items():
    register(_op_type, _reduction(_reducer))


@kernel("reduce_argmax")
def _reduce_argmax(
    x: np.ndarray, axis: Any = -1, keep_dims: Any = False, output_dtype: Any = DEFAULT_INDEX_DTYPE
) -> np.ndarray:
    return np.argmax(x, axis=as_int(axis), keepdims=as_bool(keep_dims)).astype(as_nptype(output_dtype))


@kernel("reduce_argmin")
def _reduce_argmin(
    x: np.ndarray, axis: Any = -1, keep_dims: Any = False, output_dtype: Any = DEFAULT_INDEX_DTYPE
) -> np.ndarray:
    return np.argmin(x, axis=as_int(axis), keepdims=as_bool(keep_dims)).astype(as_nptype(output_dtype))
