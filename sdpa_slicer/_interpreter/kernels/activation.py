"""Activation kernels: softmax, sigmoid family, GELU (all modes), erf, tanh and the ReLU family."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from sdpa_slicer._interpreter.kernels import kernel
from sdpa_slicer._interpreter.kernels._common import as_int, as_str, per_channel, upcast

GELU_MODES = ("EXACT", "TANH_APPROXIMATION", "SIGMOID_APPROXIMATION")
GELU_TANH_COEFFICIENT = 0.044715
GELU_SIGMOID_SCALE = 1.702
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
SQRT_HALF = math.sqrt(0.5)

# erf(x) = 2/sqrt(pi) * sum_n (-1)^n x^(2n+1) / (n! (2n+1)); 18 terms reach double precision for |x| < 1.
ERF_SERIES_TERMS = 18
ERF_SERIES_LIMIT = 1.0
_ERF_SERIES = [
    (-1) ** n * 2.0 / math.sqrt(math.pi) / (math.factorial(n) * (2 * n + 1)) for n in range(ERF_SERIES_TERMS)
]
# Chebyshev fit of erfc (Numerical Recipes' erfcc), fractional error < 1.2e-7; used for |x| >= 1,
# where erfc <= 0.16 so erf is off by < 2e-8.
_ERFC_EXPONENT = -1.26551223
_ERFC_COEFFICIENTS = (
    1.00002368,
    0.37409196,
    0.09678418,
    -0.18628806,
    0.27886807,
    -1.13520398,
    1.48851587,
    -0.82215223,
    0.17087277,
)


def erf(x: np.ndarray) -> np.ndarray:
    """The error function, elementwise, in float64 (NumPy has none and ``math.erf`` is per element)."""
    z = np.abs(np.asarray(x, dtype=np.float64))
    with np.errstate(over="ignore", invalid="ignore"):
        z2 = z * z
        series = np.zeros_like(z)
        for coefficient in reversed(_ERF_SERIES):
            series = series * z2 + coefficient
        series *= z
        t = 1.0 / (1.0 + 0.5 * z)
        poly = np.zeros_like(z)
        for coefficient in reversed(_ERFC_COEFFICIENTS):
            poly = (poly + coefficient) * t
        erfc = t * np.exp(-z2 + _ERFC_EXPONENT + poly)
    magnitude = np.where(z < ERF_SERIES_LIMIT, series, 1.0 - erfc)
    return np.copysign(magnitude, x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@kernel("erf")
def _erf(x: np.ndarray) -> np.ndarray:
    return erf(x)


@kernel("softmax")
def _softmax(x: np.ndarray, axis: Any = -1) -> np.ndarray:
    axis = as_int(axis)
    if x.dtype == np.float16:
        # Widened first: NumPy's fp16 max is an order of magnitude slower than its fp32 max.
        shifted = x.astype(np.float32)
        shifted -= np.max(shifted, axis=axis, keepdims=True)
    else:
        shifted = x - np.max(x, axis=axis, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= np.sum(shifted, axis=axis, keepdims=True)
    return shifted


@kernel("sigmoid")
def _sigmoid_kernel(x: np.ndarray) -> np.ndarray:
    return _sigmoid(upcast(x))


@kernel("silu")
def _silu(x: np.ndarray) -> np.ndarray:
    x = upcast(x)
    return x * _sigmoid(x)


@kernel("gelu")
def _gelu(x: np.ndarray, mode: Any = "EXACT") -> np.ndarray:
    mode = as_str(mode)
    x = upcast(x)
    if mode == "EXACT":
        return (0.5 * x * (1.0 + erf(x * SQRT_HALF))).astype(x.dtype)
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(SQRT_2_OVER_PI * (x + GELU_TANH_COEFFICIENT * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x * _sigmoid(GELU_SIGMOID_SCALE * x)
    raise ValueError(f"unknown gelu mode {mode!r}; expected one of {', '.join(GELU_MODES)}")


@kernel("tanh")
def _tanh(x: np.ndarray) -> np.ndarray:
    return np.tanh(upcast(x))


@kernel("relu")
def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


@kernel("relu6")
def _relu6(x: np.ndarray) -> np.ndarray:
    return np.minimum(np.maximum(x, 0), 6)


@kernel("leaky_relu")
def _leaky_relu(x: np.ndarray, alpha: Any) -> np.ndarray:
    x = upcast(x)
    return np.where(x < 0, x * alpha, x)


@kernel("elu")
def _elu(x: np.ndarray, alpha: Any) -> np.ndarray:
    x = upcast(x)
    return np.where(x < 0, alpha * np.expm1(np.minimum(x, 0)), x)


@kernel("thresholded_relu")
def _thresholded_relu(x: np.ndarray, alpha: Any) -> np.ndarray:
    return np.where(x < alpha, np.zeros_like(x), x)


@kernel("clamped_relu")
def _clamped_relu(x: np.ndarray, alpha: Any, beta: Any) -> np.ndarray:
    x = upcast(x)
    return np.minimum(np.maximum(x, 0), beta) + np.minimum(np.minimum(x, 0) * alpha, beta)


@kernel("linear_activation")
def _linear_activation(x: np.ndarray, alpha: Any, beta: Any) -> np.ndarray:
    return alpha * upcast(x) + beta


@kernel("scaled_tanh")
def _scaled_tanh(x: np.ndarray, alpha: Any, beta: Any) -> np.ndarray:
    return alpha * np.tanh(upcast(x) * beta)


@kernel("sigmoid_hard")
def _sigmoid_hard(x: np.ndarray, alpha: Any, beta: Any) -> np.ndarray:
    return np.clip(alpha * upcast(x) + beta, 0, 1)


@kernel("softplus")
def _softplus(x: np.ndarray) -> np.ndarray:
    x = upcast(x)
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)


@kernel("softsign")
def _softsign(x: np.ndarray) -> np.ndarray:
    x = upcast(x)
    return x / (1 + np.abs(x))


@kernel("prelu")
def _prelu(x: np.ndarray, alpha: Any) -> np.ndarray:
    x = upcast(x)
    return np.maximum(x, 0) + np.minimum(x, 0) * per_channel(alpha, x.ndim)


@kernel("softplus_parametric")
def _softplus_parametric(x: np.ndarray, alpha: Any, beta: Any) -> np.ndarray:
    x = upcast(x)
    scaled = x * per_channel(beta, x.ndim)
    softplus = np.log1p(np.exp(-np.abs(scaled))) + np.maximum(scaled, 0)
    return per_channel(alpha, x.ndim) * softplus
