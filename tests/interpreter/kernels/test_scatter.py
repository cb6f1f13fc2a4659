"""Scatter kernels: ``scatter_along_axis`` in ``update`` mode against coremltools' value inference
(which applies ``update`` whatever the mode), every mode of every scatter against the documented
rule applied one update at a time, in order."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from interpreter.kernels._oracle import (
    SEEDS,
    check_against_formula,
    check_against_value_inference,
    random_array,
    run,
)
from sdpa_slicer import EvaluationError

DTYPES = (np.float16, np.float32, np.int32)
MODES: dict[str, Callable[[Any, Any], Any]] = {
    "update": lambda old, new: new,
    "add": lambda old, new: old + new,
    "sub": lambda old, new: old - new,
    "mul": lambda old, new: old * new,
    "div": lambda old, new: old / new,
    "max": max,
    "min": min,
}
dtypes = st.sampled_from(DTYPES)
modes = st.sampled_from(sorted(MODES))
shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)


def _updates(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any, mode: str) -> np.ndarray:
    """Updates away from 0, so that div is defined; integers divide only in float dtypes here."""
    values = random_array(rng, shape, dtype, 1, 3)
    return values * np.where(rng.random(shape) < 0.5, -1, 1).astype(values.dtype)


def _apply(data: np.ndarray, writes: list[tuple[tuple[int, ...], Any]], mode: str) -> np.ndarray:
    """``data`` (in float64 for floats) with each ``(position, value)`` combined by ``mode``, in order."""
    out = data.astype(np.float64) if data.dtype.kind == "f" else data.astype(np.int64)
    for position, value in writes:
        out[position] = MODES[mode](out[position], value)
    return out


@given(dtype=dtypes, shape=shapes, mode=modes, seed=SEEDS, data=st.data())
def test_scatter_along_axis_matches_formula(dtype: Any, shape, mode: str, seed: int, data: st.DataObject) -> None:
    """``out[p with p[axis] = indices[p]] (mode)= updates[p]``."""
    if mode == "div" and dtype == np.int32:
        mode = "mul"
    rank = len(shape)
    axis = data.draw(st.integers(-rank, rank - 1))
    index_shape = list(shape)
    index_shape[axis] = data.draw(st.integers(1, 4))
    rng = np.random.default_rng(seed)
    x = random_array(rng, shape, dtype)
    indices = rng.integers(0, shape[axis], size=index_shape).astype(np.int32)
    updates = _updates(rng, tuple(index_shape), dtype, mode)
    writes = []
    for p in np.ndindex(*index_shape):
        target = list(p)
        target[axis % rank] = int(indices[p])
        writes.append((tuple(target), updates[p].astype(np.float64 if dtype != np.int32 else np.int64)))
    expected = _apply(x, writes, mode)
    attributes = {"indices": indices, "axis": np.int32(axis), "mode": mode}
    check_against_formula("scatter_along_axis", {"data": x, "updates": updates}, expected, attributes)


@given(dtype=dtypes, shape=shapes, seed=SEEDS, data=st.data())
def test_scatter_along_axis_update_matches_value_inference(dtype: Any, shape, seed: int, data: st.DataObject) -> None:
    """Distinct indices along the axis: where two updates land on one place, the order is undefined."""
    rank = len(shape)
    axis = data.draw(st.integers(0, rank - 1))
    rng = np.random.default_rng(seed)
    index_shape = list(shape)
    index_shape[axis] = data.draw(st.integers(1, shape[axis]))
    indices = np.argsort(rng.random(shape), axis=axis).take(range(index_shape[axis]), axis=axis).astype(np.int32)
    x, updates = random_array(rng, shape, dtype), random_array(rng, tuple(index_shape), dtype)
    attributes = {"indices": indices, "axis": np.int32(axis), "mode": "update"}
    check_against_value_inference("scatter_along_axis", {"data": x, "updates": updates}, attributes)


@given(dtype=dtypes, shape=shapes, mode=modes, seed=SEEDS, data=st.data())
def test_scatter_matches_formula(dtype: Any, shape, mode: str, seed: int, data: st.DataObject) -> None:
    """``out[..., indices[i], ...] (mode)= updates[..., i, ...]`` along ``axis``; negative indices count back."""
    if mode == "div" and dtype == np.int32:
        mode = "mul"
    rank = len(shape)
    axis = data.draw(st.integers(-rank, rank - 1)) % rank
    count = data.draw(st.integers(1, 4))
    rng = np.random.default_rng(seed)
    x = random_array(rng, shape, dtype)
    indices = rng.integers(-shape[axis], shape[axis], size=count).astype(np.int32)
    update_shape = shape[:axis] + (count,) + shape[axis + 1 :]
    updates = _updates(rng, update_shape, dtype, mode)
    writes = []
    for p in np.ndindex(*update_shape):
        target = list(p)
        target[axis] = int(indices[p[axis]]) % shape[axis]
        writes.append((tuple(target), updates[p].astype(np.float64 if dtype != np.int32 else np.int64)))
    attributes = {"indices": indices, "axis": np.int32(axis), "mode": mode}
    check_against_formula("scatter", {"data": x, "updates": updates}, _apply(x, writes, mode), attributes)


@given(dtype=dtypes, shape=shapes, mode=modes, seed=SEEDS, data=st.data())
def test_scatter_nd_matches_formula(dtype: Any, shape, mode: str, seed: int, data: st.DataObject) -> None:
    """``out[indices[i]] (mode)= updates[i]``: each index vector names a slice of the trailing dims."""
    if mode == "div" and dtype == np.int32:
        mode = "mul"
    depth = data.draw(st.integers(1, len(shape)))
    count = data.draw(st.integers(1, 4))
    rng = np.random.default_rng(seed)
    x = random_array(rng, shape, dtype)
    indices = np.stack([rng.integers(0, shape[k], size=count) for k in range(depth)], axis=-1).astype(np.int32)
    updates = _updates(rng, (count,) + shape[depth:], dtype, mode)
    writes = []
    for i in range(count):
        for rest in np.ndindex(*shape[depth:]):
            value = updates[(i,) + rest].astype(np.float64 if dtype != np.int32 else np.int64)
            writes.append((tuple(int(v) for v in indices[i]) + rest, value))
    attributes = {"indices": indices, "mode": mode}
    check_against_formula("scatter_nd", {"data": x, "updates": updates}, _apply(x, writes, mode), attributes)


@pytest.mark.parametrize("op_type", ["scatter", "scatter_along_axis"])
def test_a_validated_out_of_range_index_is_an_error(op_type: str) -> None:
    """The indices are an input: coremltools refuses constant ones itself."""
    data = np.zeros((3, 2), np.float32)
    indices = np.array([3], np.int32) if op_type == "scatter" else np.full((1, 2), 3, np.int32)
    updates = np.ones((1, 2), np.float32)
    with pytest.raises(EvaluationError, match=r"indices must lie in \[0, 3\)"):
        run(op_type, {"data": data, "updates": updates, "indices": indices}, {"validate_indices": True})
