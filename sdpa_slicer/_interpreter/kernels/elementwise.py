"""Elementwise kernels: binary math, comparisons, logical ops, unary math, select and cast."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from sdpa_slicer._interpreter.kernels import KernelFn, kernel, register
from sdpa_slicer._interpreter.kernels._common import as_nptype, upcast

Ufunc = Callable[..., np.ndarray]

# fp16 operands are computed in fp32: one rounding at the end gives the same result as NumPy's fp16
# loops, which are slower even counting the widening.
ARITHMETIC_UFUNCS: dict[str, Ufunc] = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    # int32 real_div truncates toward zero when the engine casts the float quotient back to int32,
    # as coremltools' own value inference does.
    "real_div": np.true_divide,
    "floor_div": np.floor_divide,
    "mod": np.remainder,
    "pow": np.power,
    "maximum": np.maximum,
    "minimum": np.minimum,
}
COMPARISON_UFUNCS: dict[str, Ufunc] = {
    "equal": np.equal,
    "not_equal": np.not_equal,
    "less": np.less,
    "less_equal": np.less_equal,
    "greater": np.greater,
    "greater_equal": np.greater_equal,
    "logical_and": np.logical_and,
    "logical_or": np.logical_or,
    "logical_xor": np.logical_xor,
}

# Exact for integers (they stay integers); floats go through fp32 when they are fp16.
UNARY_UFUNCS: dict[str, Ufunc] = {
    "abs": np.abs,
    "acos": np.arccos,
    "asin": np.arcsin,
    "atan": np.arctan,
    "atanh": np.arctanh,
    "ceil": np.ceil,
    "cos": np.cos,
    "cosh": np.cosh,
    "exp": np.exp,
    "exp2": np.exp2,
    "floor": np.floor,
    "round": np.round,  # halves to even, as coremltools' value inference
    "sign": np.sign,
    "sin": np.sin,
    "sinh": np.sinh,
    "sqrt": np.sqrt,
    "square": np.square,
    "tan": np.tan,
}

DEFAULT_RSQRT_EPSILON = 1e-12
DEFAULT_INVERSE_EPSILON = 1e-4
DEFAULT_LOG_EPSILON = 1e-45


def _arithmetic(ufunc: Ufunc) -> KernelFn:
    def arithmetic(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        wide_x, wide_y = upcast(x), upcast(y)
        # An fp32 copy made here can take the result: one large allocation fewer per op.
        shape = np.broadcast_shapes(wide_x.shape, wide_y.shape)
        if wide_x is not x and wide_x.shape == shape:
            return ufunc(wide_x, wide_y, out=wide_x)
        if wide_y is not y and wide_y.shape == shape:
            return ufunc(wide_x, wide_y, out=wide_y)
        return ufunc(wide_x, wide_y)

    arithmetic.__qualname__ = f"arithmetic_{ufunc.__name__}"
    return arithmetic


def _comparison(ufunc: Ufunc) -> KernelFn:
    def comparison(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return ufunc(x, y)

    comparison.__qualname__ = f"comparison_{ufunc.__name__}"
    return comparison


def _unary(ufunc: Ufunc) -> KernelFn:
    def unary(x: np.ndarray) -> np.ndarray:
        return ufunc(upcast(x))

    unary.__qualname__ = f"unary_{ufunc.__name__}"
    return unary


for _family, _make in ((ARITHMETIC_UFUNCS, _arithmetic), (COMPARISON_UFUNCS, _comparison), (UNARY_UFUNCS, _unary)):
    for _op_type, _ufunc in _family.items():
        register(_op_type, _make(_ufunc))


@kernel("rsqrt")
def _rsqrt(x: np.ndarray, epsilon: Any = DEFAULT_RSQRT_EPSILON) -> np.ndarray:
    return 1.0 / np.sqrt(upcast(x) + epsilon)


@kernel("inverse")
def _inverse(x: np.ndarray, epsilon: Any = DEFAULT_INVERSE_EPSILON) -> np.ndarray:
    return 1.0 / (upcast(x) + epsilon)


@kernel("log")
def _log(x: np.ndarray, epsilon: Any = DEFAULT_LOG_EPSILON) -> np.ndarray:
    return np.log(upcast(x) + epsilon)


@kernel("logical_not")
def _logical_not(x: np.ndarray) -> np.ndarray:
    return np.logical_not(x)


@kernel("clip")
def _clip(x: np.ndarray, alpha: Any, beta: Any) -> np.ndarray:
    return np.minimum(np.maximum(x, alpha), beta)


@kernel("threshold")
def _threshold(x: np.ndarray, alpha: Any) -> np.ndarray:
    return np.maximum(x, alpha)


@kernel("select")
def _select(cond: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.where(cond, a, b)


@kernel("cast")
def _cast(x: np.ndarray, dtype: Any) -> np.ndarray:
    return x.astype(as_nptype(dtype))
