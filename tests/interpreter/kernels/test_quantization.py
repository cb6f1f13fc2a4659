"""``quantize`` and ``dequantize`` (iOS17) against coremltools: ``quantize`` bit for bit against its
value inference, ``dequantize`` against its ``materialized_val_inference`` (it has no value
inference) and against the formula of its op definition."""

from __future__ import annotations

from typing import Any, Optional

import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Function
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes

from interpreter.kernels._oracle import EXACT, SEEDS, assert_close, reference, run

IOS17 = ct.target.iOS17
LEVELS = {"int8": np.int8, "uint8": np.uint8}
FLOATS = (np.float16, np.float32)
shapes = array_shapes(min_dims=1, max_dims=4, max_side=5)


@st.composite
def parameters(draw: st.DrawFn, shape: tuple[int, ...], dtype: Any, levels: str) -> dict[str, Any]:
    """``scale`` (and maybe ``zero_point``) per tensor, or vectors along an axis of ``shape``
    (``axis`` given positive or negative)."""
    rng = np.random.default_rng(draw(SEEDS))
    axis = draw(st.none() | st.integers(-len(shape), len(shape) - 1))
    size = () if axis is None else (shape[axis],)
    scale = rng.uniform(0.01, 0.5, size) * np.where(rng.random(size) < 0.1, -1.0, 1.0)
    result: dict[str, Any] = {"scale": np.asarray(scale, dtype)}
    if draw(st.booleans()):
        low, high = (-20, 20) if levels == "int8" else (100, 156)
        result["zero_point"] = np.asarray(rng.integers(low, high, size), LEVELS[levels])
    if axis is not None:
        result["axis"] = np.int32(axis)
    return result


def _floats(seed: int, shape: tuple[int, ...], dtype: Any, scale: np.ndarray) -> np.ndarray:
    """Values spread over the levels and past them (saturating), some exactly half-way between two."""
    rng = np.random.default_rng(seed)
    magnitude = float(np.abs(scale).max())
    values = rng.uniform(-200, 200, shape) * magnitude
    halves = (rng.integers(-130, 130, shape) + 0.5) * magnitude
    return np.where(rng.random(shape) < 0.2, halves, values).astype(dtype)


@given(shape=shapes, dtype=st.sampled_from(FLOATS), levels=st.sampled_from(sorted(LEVELS)), data=st.data())
def test_quantize_matches_value_inference_bit_for_bit(shape, dtype, levels, data) -> None:
    attributes = {**data.draw(parameters(shape, dtype, levels)), "output_dtype": levels}
    x = _floats(data.draw(SEEDS), shape, dtype, attributes["scale"])
    (got,) = run("quantize", {"input": x}, attributes, opset=IOS17)
    (want,) = reference("quantize", IOS17, input=x, **attributes)
    assert got.dtype == LEVELS[levels]
    assert_close(got, want, EXACT)


@given(shape=shapes, dtype=st.sampled_from(FLOATS), levels=st.sampled_from(sorted(LEVELS)), data=st.data())
def test_dequantize_matches_coremltools_and_the_formula(shape, dtype, levels, data) -> None:
    attributes = data.draw(parameters(shape, dtype, levels))
    info = np.iinfo(LEVELS[levels])
    x = np.random.default_rng(data.draw(SEEDS)).integers(info.min, info.max, shape, endpoint=True).astype(levels)
    (got,) = run("dequantize", {"input": x}, attributes, opset=IOS17)
    assert_close(got, _materialized("dequantize", input=x, **attributes), EXACT)
    assert_close(got, _dequantized(x, **attributes), EXACT)


def test_quantize_rounds_half_to_even_and_saturates() -> None:
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 1000.0, -1000.0], np.float16)
    (got,) = run("quantize", {"input": x}, {"scale": np.float16(1.0), "output_dtype": "int8"}, opset=IOS17)
    np.testing.assert_array_equal(got, np.array([0, 2, 2, 0, -2, 127, -128], np.int8))
    zero_point = {"scale": np.float16(1.0), "zero_point": np.uint8(128), "output_dtype": "uint8"}
    (shifted,) = run("quantize", {"input": x}, zero_point, opset=IOS17)
    np.testing.assert_array_equal(shifted, np.array([128, 130, 130, 128, 126, 255, 0], np.uint8))


def test_a_per_axis_scale_applies_along_its_axis() -> None:
    x = np.ones((2, 3), np.float32)
    attributes = {"scale": np.array([0.5, 0.25, 1.0], np.float32), "axis": np.int32(-1), "output_dtype": "int8"}
    (got,) = run("quantize", {"input": x}, attributes, opset=IOS17)
    np.testing.assert_array_equal(got, np.array([[2, 4, 1], [2, 4, 1]], np.int8))


def _materialized(op_type: str, **inputs: Any) -> np.ndarray:
    with Function({}, opset_version=IOS17):
        var = getattr(mb, op_type)(**inputs)
    value = var.op.materialized_val_inference()
    assert value is not None
    return np.asarray(value)


def _dequantized(x: np.ndarray, scale: np.ndarray, zero_point: Optional[np.ndarray] = None, axis: Any = None):
    """``scale * (x - zero_point)`` in float64, rounded once to the scale's dtype."""
    shape = [1] * x.ndim
    if axis is not None:
        shape[int(axis)] = -1
    scale64 = np.reshape(scale, shape if axis is not None else ()).astype(np.float64)
    shift = 0.0 if zero_point is None else np.reshape(zero_point, shape if axis is not None else ()).astype(np.float64)
    return ((x.astype(np.float64) - shift) * scale64).astype(scale.dtype)


@pytest.mark.parametrize("levels", sorted(LEVELS))
def test_a_quantize_dequantize_pair_keeps_values_within_half_a_step(levels) -> None:
    scale = np.float32(0.125)
    zero_point = {"zero_point": np.asarray(0 if levels == "int8" else 128, LEVELS[levels])}
    x = np.linspace(-15.0, 15.0, 241, dtype=np.float32)
    (codes,) = run("quantize", {"input": x}, {"scale": scale, "output_dtype": levels, **zero_point}, opset=IOS17)
    (back,) = run("dequantize", {"input": codes}, {"scale": scale, **zero_point}, opset=IOS17)
    assert np.abs(back - x).max() <= scale / 2
