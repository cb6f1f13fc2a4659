"""Activation quantization kernels: iOS17 ``quantize`` and ``dequantize``, the run-time ops that
``coremltools.optimize.coreml.linear_quantize_activations`` puts around activations (W8A8).

As coremltools 9.0's op definitions state them::

    quantize:    clip(round(input / scale) + zero_point)    saturating to int8 or uint8
    dequantize:  scale * (input - zero_point)               in the scale's dtype

``scale`` and ``zero_point`` are each a scalar, or a vector along ``axis`` of the input. The
arithmetic follows coremltools' value inference step by step (``quantize_by_scale_and_zp`` and
``dequantize_by_scale_and_zp``): the division is rounded to the input's dtype before ``round``,
which rounds half to even, and the clip happens before the cast. An fp16 quotient is computed in
fp32 and rounded once to fp16, which is the correctly rounded fp16 quotient NumPy's fp16
division gives.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from sdpa_slicer._interpreter.kernels import kernel
from sdpa_slicer._interpreter.kernels._common import as_int, as_nptype


def _along_axis(parameter: np.ndarray, rank: int, axis: Optional[Any]) -> np.ndarray:
    """A scalar as it is; a vector shaped to broadcast along ``axis`` of a rank-``rank`` tensor."""
    parameter = np.asarray(parameter)
    if parameter.ndim == 0 or axis is None:
        return parameter
    shape = [1] * rank
    shape[as_int(axis) % rank] = parameter.size
    return parameter.reshape(shape)


@kernel("quantize")
def _quantize(
    input: np.ndarray,
    scale: np.ndarray,
    output_dtype: Any,
    zero_point: Optional[np.ndarray] = None,
    axis: Optional[Any] = None,
) -> np.ndarray:
    target = np.dtype(as_nptype(output_dtype))
    scale = _along_axis(scale, input.ndim, axis)
    quotient = np.divide(input.astype(np.float32), scale.astype(np.float32)).astype(input.dtype)
    levels = np.around(quotient.astype(np.float32))
    if zero_point is not None:
        levels = levels + _along_axis(zero_point, input.ndim, axis).astype(np.float32)
    limits = np.iinfo(target.name)
    return np.clip(levels, limits.min, limits.max).astype(target)


@kernel("dequantize")
def _dequantize(
    input: np.ndarray, scale: np.ndarray, zero_point: Optional[np.ndarray] = None, axis: Optional[Any] = None
) -> np.ndarray:
    values = input.astype(np.float32)
    if zero_point is not None:
        values = values - _along_axis(zero_point, input.ndim, axis).astype(np.float32)
    return (values * _along_axis(scale, input.ndim, axis)).astype(np.asarray(scale).dtype)
