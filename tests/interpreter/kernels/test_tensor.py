"""Tensor kernels against coremltools' value inference (formulas where it has none or is wrong)."""

from __future__ import annotations

from typing import Any

import coremltools as ct
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes

from interpreter.kernels._oracle import (
    SEEDS,
    check_against_formula,
    check_against_value_inference,
    per_op,
    random_array,
    run,
)
from sdpa_slicer import EvaluationError

DTYPES = (np.float16, np.float32, np.int32, np.bool_)
NUMERIC_DTYPES = (np.float16, np.float32, np.int32)
FLOAT_DTYPES = (np.float16, np.float32)
PAD_MODES = ("constant", "reflect", "replicate")
STRIDES = (-3, -2, -1, 1, 2, 3)
junk = st.integers(-9, 9)

dtypes = st.sampled_from(DTYPES)
numeric_dtypes = st.sampled_from(NUMERIC_DTYPES)
shapes = array_shapes(min_dims=1, max_dims=4, max_side=4)


def _int32(values: Any) -> np.ndarray:
    return np.array(values, dtype=np.int32)


def _array(seed: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    return random_array(np.random.default_rng(seed), shape, dtype)


def _axis(data: st.DataObject, rank: int, label: str = "axis") -> int:
    """An axis in [-rank, rank)."""
    return data.draw(st.integers(-rank, rank - 1), label=label)


@st.composite
def factorizations(draw: st.DrawFn, total: int) -> list[int]:
    """Dims (some of them 1) whose product is ``total``."""
    dims: list[int] = []
    remaining = total
    while remaining > 1:
        divisors = [d for d in range(2, remaining + 1) if remaining % d == 0]
        dim = draw(st.sampled_from(divisors))
        dims.append(dim)
        remaining //= dim
    for _ in range(draw(st.integers(0, 2))):
        dims.insert(draw(st.integers(0, len(dims))), 1)
    return dims


@st.composite
def reshape_targets(draw: st.DrawFn, shape: tuple[int, ...]) -> list[int]:
    """A new shape for ``shape``: its prefix refactored (maybe with one -1), its suffix kept, maybe as 0s."""
    keep = draw(st.integers(0, len(shape)))
    prefix, suffix = shape[: len(shape) - keep], shape[len(shape) - keep :]
    head = draw(factorizations(int(np.prod(prefix))))
    if head and draw(st.booleans()):
        head[draw(st.integers(0, len(head) - 1))] = -1
    tail = [0 if draw(st.booleans()) else size for size in suffix]
    return head + tail


@given(dtype=dtypes, shape=shapes, seed=SEEDS, data=st.data())
@per_op
def test_reshape_matches_value_inference(dtype: Any, shape: tuple[int, ...], seed: int, data: st.DataObject) -> None:
    target = data.draw(reshape_targets(shape), label="shape")
    assume(target)
    check_against_value_inference("reshape", {"x": _array(seed, shape, dtype)}, {"shape": _int32(target)})


def test_reshape_zero_past_the_left_end_is_one() -> None:
    """iOS17 rule: 0s match x's dims from the right; one with no dim left becomes 1."""
    x = np.arange(100, dtype=np.float32).reshape(2, 50)
    (got,) = check_against_value_inference("reshape", {"x": x}, {"shape": _int32([1, 0, -1, 0])})
    assert got.shape == (1, 1, 2, 50)


@pytest.mark.parametrize("opset", [ct.target.iOS15, ct.target.iOS18])
def test_reshape_zero_copies_the_matching_dim(opset: Any) -> None:
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    (got,) = check_against_value_inference("reshape", {"x": x}, {"shape": _int32([0, -1, 2])}, opset=opset)
    assert got.shape == (2, 6, 2)


@given(dtype=dtypes, shape=shapes, seed=SEEDS, data=st.data())
@per_op
def test_transpose_matches_value_inference(dtype: Any, shape: tuple[int, ...], seed: int, data: st.DataObject) -> None:
    rank = len(shape)
    perm = [axis - rank if data.draw(st.booleans()) else axis for axis in data.draw(st.permutations(range(rank)))]
    check_against_value_inference("transpose", {"x": _array(seed, shape, dtype)}, {"perm": _int32(perm)})


@given(dtype=dtypes, shape=shapes, seed=SEEDS, data=st.data())
@per_op
def test_tile_matches_value_inference(dtype: Any, shape: tuple[int, ...], seed: int, data: st.DataObject) -> None:
    reps = data.draw(st.lists(st.integers(1, 3), min_size=len(shape), max_size=len(shape)), label="reps")
    check_against_value_inference("tile", {"x": _array(seed, shape, dtype)}, {"reps": _int32(reps)})


@st.composite
def concat_inputs(draw: st.DrawFn, equal: bool) -> tuple[tuple[tuple[int, ...], ...], int]:
    """Shapes of 1-4 tensors equal except along the axis (entirely equal if ``equal``), and the axis."""
    shape = draw(shapes)
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    count = draw(st.integers(1, 4))
    result = []
    for _ in range(count):
        item = list(shape)
        if not equal:
            item[axis] = draw(st.integers(1, 4))
        result.append(tuple(item))
    return tuple(result), axis


def _concat_values(seed: int, item_shapes: tuple[tuple[int, ...], ...], dtype: Any) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    return tuple(random_array(rng, shape, dtype) for shape in item_shapes)


@given(dtype=dtypes, case=concat_inputs(equal=False), seed=SEEDS)
@per_op
def test_concat_matches_value_inference(dtype: Any, case: Any, seed: int) -> None:
    item_shapes, axis = case
    values = _concat_values(seed, item_shapes, dtype)
    check_against_value_inference("concat", {"values": values}, {"axis": np.int32(axis), "interleave": False})


@given(dtype=dtypes, case=concat_inputs(equal=True), seed=SEEDS)
@per_op
def test_concat_interleave_matches_formula(dtype: Any, case: Any, seed: int) -> None:
    """coremltools' value inference ignores ``interleave``: compare with slices taken in turn."""
    item_shapes, axis = case
    values = _concat_values(seed, item_shapes, dtype)
    moved = [np.moveaxis(value, axis, 0) for value in values]
    turns = [item[i] for i in range(moved[0].shape[0]) for item in moved]
    expected = np.moveaxis(np.stack(turns), 0, axis)
    check_against_formula("concat", {"values": values}, expected, {"axis": np.int32(axis), "interleave": True})


@given(dtype=dtypes, seed=SEEDS, count=st.integers(1, 4))
@per_op
def test_concat_of_scalars_stacks_them(dtype: Any, seed: int, count: int) -> None:
    values = tuple(_array(seed + i, (), dtype) for i in range(count))
    check_against_value_inference("concat", {"values": values}, {"axis": np.int32(0)})


@given(
    dtype=dtypes,
    shape=array_shapes(min_dims=0, max_dims=3, max_side=4),
    seed=SEEDS,
    count=st.integers(1, 4),
    data=st.data(),
)
@per_op
def test_stack_matches_value_inference(
    dtype: Any, shape: tuple[int, ...], seed: int, count: int, data: st.DataObject
) -> None:
    values = tuple(_array(seed + i, shape, dtype) for i in range(count))
    axis = data.draw(st.integers(-len(shape) - 1, len(shape)), label="axis")
    check_against_value_inference("stack", {"values": values}, {"axis": np.int32(axis)})


@given(dtype=dtypes, shape=shapes, seed=SEEDS, data=st.data())
@per_op
def test_split_matches_value_inference(dtype: Any, shape: tuple[int, ...], seed: int, data: st.DataObject) -> None:
    axis = _axis(data, len(shape))
    length = shape[axis]
    if data.draw(st.booleans(), label="by sizes"):
        cuts = sorted(data.draw(st.sets(st.integers(1, length - 1)), label="cuts")) if length > 1 else []
        sizes = np.diff([0] + cuts + [length])
        attributes: dict[str, Any] = {"split_sizes": _int32(sizes)}
    else:
        divisors = [d for d in range(1, length + 1) if length % d == 0]
        attributes = {"num_splits": np.int32(data.draw(st.sampled_from(divisors), label="num_splits"))}
    attributes["axis"] = np.int32(axis)
    check_against_value_inference("split", {"x": _array(seed, shape, dtype)}, attributes)


@st.composite
def index_slices(draw: st.DrawFn, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """slice_by_index arguments selecting a non-empty part of each dim (ends may be masked)."""
    begin, end, stride, begin_mask, end_mask, squeeze_mask = [], [], [], [], [], []
    for size in shape:
        step = draw(st.sampled_from(STRIDES))
        first = draw(st.integers(0, size - 1))
        count = draw(st.integers(1, (first if step < 0 else size - 1 - first) // abs(step) + 1))
        last = first + step * (count - 1)
        stop = last + (1 if step > 0 else -1)
        open_begin = draw(st.booleans()) and first == (0 if step > 0 else size - 1)
        open_end = stop < 0 or (draw(st.booleans()) and stop >= size)
        # A masked bound is ignored, so it gets an arbitrary value.
        begin.append(draw(junk) if open_begin else first - size if draw(st.booleans()) else first)
        end.append(draw(junk) if open_end else stop)
        stride.append(step)
        begin_mask.append(open_begin)
        end_mask.append(open_end)
        squeeze_mask.append(draw(st.booleans()) and step == 1 and count == 1)
    return {
        "begin": _int32(begin),
        "end": _int32(end),
        "stride": _int32(stride),
        "begin_mask": np.array(begin_mask),
        "end_mask": np.array(end_mask),
        "squeeze_mask": np.array(squeeze_mask),
    }


@given(dtype=dtypes, shape=shapes, seed=SEEDS, data=st.data())
@per_op
def test_slice_by_index_matches_value_inference(
    dtype: Any, shape: tuple[int, ...], seed: int, data: st.DataObject
) -> None:
    attributes = data.draw(index_slices(shape), label="slices")
    # Squeezing every dim gives a scalar, which coremltools' value inference only builds for fp32/int32.
    attributes["squeeze_mask"][0] = False
    check_against_value_inference("slice_by_index", {"x": _array(seed, shape, dtype)}, attributes)


@given(dtype=dtypes, shape=shapes, seed=SEEDS, data=st.data())
@per_op
def test_slice_by_index_squeezing_every_dim_gives_a_scalar(
    dtype: Any, shape: tuple[int, ...], seed: int, data: st.DataObject
) -> None:
    position = tuple(data.draw(st.integers(-size, size - 1), label="index") for size in shape)
    rank = len(shape)
    attributes = {
        "begin": _int32(position),
        "end": _int32([p + 1 for p in position]),
        "squeeze_mask": np.ones(rank, dtype=bool),
    }
    x = _array(seed, shape, dtype)
    check_against_formula("slice_by_index", {"x": x}, x[position], attributes)


@given(dtype=dtypes, shape=shapes, seed=SEEDS, data=st.data())
@per_op
def test_slice_update_matches_value_inference(
    dtype: Any, shape: tuple[int, ...], seed: int, data: st.DataObject
) -> None:
    attributes = data.draw(index_slices(shape), label="slices")
    attributes["squeeze_mask"] = np.zeros(len(shape), dtype=bool)  # coremltools refuses rank-0 updates
    x = _array(seed, shape, dtype)
    (target,) = run("slice_by_index", {"x": x}, attributes)
    runtime = {"x": x, "update": _array(seed + 1, target.shape, dtype)}
    check_against_value_inference("slice_update", runtime, attributes)


@pytest.mark.parametrize("position", [0, 5, 7])
def test_slice_update_writes_a_kv_cache_row_at_a_run_time_position(position: int) -> None:
    """What a converted ``cache[layer, :, :, pos:pos + L] = k`` becomes: begin and end computed at
    run time, the layer axis squeezed, the last axis taken whole."""
    cache = _array(0, (2, 1, 2, 8, 4), np.float16)
    update = _array(1, (1, 2, 1, 4), np.float16)
    begin, end = _int32([1, 0, 0, position, 0]), _int32([2, 1, 2, position + 1, 4])
    attributes = {
        "begin_mask": np.array([False, True, True, False, True]),
        "end_mask": np.array([False, True, True, False, True]),
        "squeeze_mask": np.array([True, False, False, False, False]),
    }
    expected = cache.copy()
    expected[1, :, :, position : position + 1] = update
    runtime = {"x": cache, "update": update, "begin": begin, "end": end}
    check_against_formula("slice_update", runtime, expected, attributes)


@given(dtype=dtypes, shape=shapes, seed=SEEDS, data=st.data())
@per_op
def test_slice_by_size_matches_value_inference(
    dtype: Any, shape: tuple[int, ...], seed: int, data: st.DataObject
) -> None:
    begin, size = [], []
    for dim in shape:
        start = data.draw(st.integers(0, dim - 1), label="begin")
        length = data.draw(st.sampled_from([-1, data.draw(st.integers(1, dim - start))]), label="size")
        # A negative begin with size -1 gets a wrong declared shape (see the test below).
        negative = length != -1 and data.draw(st.booleans(), label="negative begin")
        begin.append(start - dim if negative else start)
        size.append(length)
    attributes = {"begin": _int32(begin), "size": _int32(size)}
    check_against_value_inference("slice_by_size", {"x": _array(seed, shape, dtype)}, attributes)


def test_slice_by_size_shape_contradicting_its_values_is_reported() -> None:
    """For a negative begin and size -1, coremltools declares dim - begin elements (it does not
    wrap begin first), while the op, and its value inference, take the last -begin elements."""
    x = np.arange(4, dtype=np.float32)
    attributes = {"begin": _int32([-1]), "size": _int32([-1])}
    with pytest.raises(EvaluationError, match=r"shape \(1,\), but the program declares \(5,\)"):
        run("slice_by_size", {"x": x}, attributes)


@given(dtype=dtypes, shape=array_shapes(min_dims=0, max_dims=3, max_side=4), seed=SEEDS, data=st.data())
@per_op
def test_expand_dims_matches_value_inference(
    dtype: Any, shape: tuple[int, ...], seed: int, data: st.DataObject
) -> None:
    count = data.draw(st.integers(1, 3), label="count")
    out_rank = len(shape) + count
    chosen = data.draw(st.lists(st.integers(0, out_rank - 1), min_size=count, max_size=count, unique=True))
    axes = [axis - out_rank if data.draw(st.booleans()) else axis for axis in chosen]
    check_against_value_inference("expand_dims", {"x": _array(seed, shape, dtype)}, {"axes": _int32(axes)})


unit_heavy_shapes = array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=3).filter(lambda s: 1 in s)


@given(dtype=dtypes, shape=unit_heavy_shapes, seed=SEEDS, data=st.data())
@per_op
def test_squeeze_matches_value_inference(dtype: Any, shape: tuple[int, ...], seed: int, data: st.DataObject) -> None:
    assume(any(size != 1 for size in shape))  # coremltools' value inference mishandles squeezing to a scalar
    attributes = {}
    if data.draw(st.booleans(), label="with axes"):
        units = [axis for axis, size in enumerate(shape) if size == 1]
        chosen = data.draw(st.lists(st.sampled_from(units), min_size=1, unique=True), label="axes")
        attributes["axes"] = _int32([axis - len(shape) if data.draw(st.booleans()) else axis for axis in chosen])
    check_against_value_inference("squeeze", {"x": _array(seed, shape, dtype)}, attributes)


@given(dtype=dtypes, shape=unit_heavy_shapes, seed=SEEDS, data=st.data())
@per_op
def test_squeeze_keeps_larger_axes_it_is_given(
    dtype: Any, shape: tuple[int, ...], seed: int, data: st.DataObject
) -> None:
    """PyTorch-style squeeze (which coremltools' value inference does not follow): axes of size > 1 stay."""
    axes = data.draw(st.lists(st.integers(0, len(shape) - 1), min_size=1, unique=True), label="axes")
    x = _array(seed, shape, dtype)
    expected = x.reshape([size for axis, size in enumerate(shape) if not (axis in axes and size == 1)])
    check_against_formula("squeeze", {"x": x}, expected, {"axes": _int32(axes)})


@given(dtype=numeric_dtypes, shape=shapes, seed=SEEDS, data=st.data())
@per_op
def test_flatten2d_matches_value_inference(dtype: Any, shape: tuple[int, ...], seed: int, data: st.DataObject) -> None:
    # At axis 0 or rank one side is empty, and coremltools' value inference reshapes by a float 1.0.
    assume(len(shape) > 1)
    axis = data.draw(st.integers(1, len(shape) - 1), label="axis")
    axis = axis - len(shape) if data.draw(st.booleans()) else axis
    check_against_value_inference("flatten2d", {"x": _array(seed, shape, dtype)}, {"axis": np.int32(axis)})


@given(dtype=numeric_dtypes, shape=shapes, seed=SEEDS, at_end=st.booleans())
@per_op
def test_flatten2d_at_the_ends_matches_formula(dtype: Any, shape: tuple[int, ...], seed: int, at_end: bool) -> None:
    x = _array(seed, shape, dtype)
    axis = len(shape) if at_end else 0
    expected = x.reshape((-1, 1) if at_end else (1, -1))
    check_against_formula("flatten2d", {"x": x}, expected, {"axis": np.int32(axis)})


@given(dtype=dtypes, shape=shapes, seed=SEEDS, data=st.data())
@per_op
def test_reverse_matches_value_inference(dtype: Any, shape: tuple[int, ...], seed: int, data: st.DataObject) -> None:
    attributes = {}
    if data.draw(st.booleans(), label="with axes"):
        attributes["axes"] = _int32(data.draw(st.lists(st.integers(0, len(shape) - 1), unique=True), label="axes"))
    check_against_value_inference("reverse", {"x": _array(seed, shape, dtype)}, attributes)


@st.composite
def gather_case(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[int, ...], int, int]:
    """x shape, indices shape, axis and batch_dims for gather."""
    x_shape = draw(array_shapes(min_dims=1, max_dims=4, max_side=4))
    batch_dims = draw(st.integers(0, len(x_shape) - 1))
    axis = draw(st.integers(batch_dims, len(x_shape) - 1))
    indices_shape = x_shape[:batch_dims] + draw(array_shapes(min_dims=0, max_dims=2, max_side=3))
    # coremltools' value inference mishandles a negative axis with batch dims, so those stay positive.
    negative = batch_dims == 0 and draw(st.booleans())
    return x_shape, indices_shape, axis - len(x_shape) if negative else axis, batch_dims


@pytest.mark.parametrize(
    "opset,negative",
    [
        pytest.param(ct.target.iOS16, True, id="iOS16-negative-indices"),
        pytest.param(ct.target.iOS18, False, id="iOS18-validated-indices"),
    ],
)
@given(dtype=numeric_dtypes, case=gather_case(), validate=st.booleans(), seed=SEEDS)
@per_op
def test_gather_matches_value_inference(
    opset: Any, negative: bool, dtype: Any, case: Any, validate: bool, seed: int
) -> None:
    """iOS16 gather wraps negative indices; iOS17+ adds validate_indices and only takes [0, D)."""
    x_shape, indices_shape, axis, batch_dims = case
    rng = np.random.default_rng(seed)
    size = x_shape[axis]
    indices = rng.integers(-size if negative else 0, size, size=indices_shape).astype(np.int32)
    attributes = {"axis": np.int32(axis), "batch_dims": np.int32(batch_dims)}
    if opset >= ct.target.iOS17:
        attributes["validate_indices"] = validate
    runtime = {"x": random_array(rng, x_shape, dtype), "indices": indices}
    check_against_value_inference("gather", runtime, attributes, opset=opset)


def test_gather_out_of_range_index_is_an_error() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    indices = np.array([0, 3], dtype=np.int32)
    with pytest.raises(EvaluationError, match=r"gather op .*indices must lie in \[0, 3\)"):
        run("gather", {"x": x, "indices": indices}, {"axis": np.int32(1), "validate_indices": True})


@given(dtype=numeric_dtypes, shape=shapes, seed=SEEDS, data=st.data())
@per_op
def test_gather_along_axis_matches_value_inference(
    dtype: Any, shape: tuple[int, ...], seed: int, data: st.DataObject
) -> None:
    axis = _axis(data, len(shape))
    indices_shape = list(shape)
    indices_shape[axis] = data.draw(st.integers(1, 4), label="count")
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, shape[axis], size=indices_shape).astype(np.int32)
    runtime = {"x": random_array(rng, shape, dtype), "indices": indices}
    check_against_value_inference("gather_along_axis", runtime, {"axis": np.int32(axis)})


@given(dtype=numeric_dtypes, shape=shapes, seed=SEEDS, data=st.data())
@per_op
def test_gather_nd_matches_formula(dtype: Any, shape: tuple[int, ...], seed: int, data: st.DataObject) -> None:
    """coremltools has no value inference for gather_nd: compare with an element-by-element loop."""
    batch_dims = data.draw(st.integers(0, len(shape) - 1), label="batch_dims")
    depth = data.draw(st.integers(1, len(shape) - batch_dims), label="depth")
    rows = data.draw(array_shapes(min_dims=0, max_dims=2, max_side=3), label="rows")
    rng = np.random.default_rng(seed)
    coordinates = [rng.integers(0, shape[batch_dims + k], size=shape[:batch_dims] + rows) for k in range(depth)]
    indices = np.stack(coordinates, axis=-1).astype(np.int32)
    x = random_array(rng, shape, dtype)
    expected = np.empty(indices.shape[:-1] + shape[batch_dims + depth :], dtype=dtype)
    for position in np.ndindex(*indices.shape[:-1]):
        expected[position] = x[position[:batch_dims] + tuple(indices[position])]
    check_against_formula("gather_nd", {"x": x, "indices": indices}, expected, {"batch_dims": np.int32(batch_dims)})


@given(dtype=dtypes, shape=shapes, seed=SEEDS)
@per_op
def test_fill_matches_value_inference(dtype: Any, shape: tuple[int, ...], seed: int) -> None:
    value = _array(seed, (), dtype)
    check_against_value_inference("fill", {}, {"shape": _int32(shape), "value": value[()]})


@given(dtype=dtypes, value_dtype=dtypes, shape=shapes, seed=SEEDS)
@per_op
def test_fill_like_matches_value_inference(dtype: Any, value_dtype: Any, shape: tuple[int, ...], seed: int) -> None:
    runtime = {"ref_tensor": _array(seed, shape, dtype)}
    check_against_value_inference("fill_like", runtime, {"value": _array(seed + 1, (), value_dtype)[()]})


@given(dtype=dtypes, shape=array_shapes(min_dims=0, max_dims=4, max_side=4), seed=SEEDS)
@per_op
def test_shape_and_identity_match_value_inference(dtype: Any, shape: tuple[int, ...], seed: int) -> None:
    x = _array(seed, shape, dtype)
    check_against_value_inference("shape", {"x": x})
    check_against_value_inference("identity", {"x": x})


# coremltools compares the fp16 length with a large constant, which NumPy reports as an overflow.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@given(
    dtype=numeric_dtypes,
    start=st.integers(-5, 5),
    count=st.integers(1, 6),
    step=st.sampled_from([-2, -1, 1, 3]),
    fraction=st.sampled_from([0.0, 0.5]),
)
@per_op
def test_range_1d_matches_value_inference(dtype: Any, start: int, count: int, step: int, fraction: float) -> None:
    step_value = step + (fraction if dtype != np.int32 else 0.0)
    end = start + count * step_value - np.sign(step_value) * 0.25 * (dtype != np.int32)
    values = {"start": dtype(start), "end": dtype(end), "step": dtype(step_value)}
    check_against_value_inference("range_1d", {}, values)


@given(
    dtype=dtypes,
    shape=array_shapes(min_dims=2, max_dims=4, max_side=5),
    seed=SEEDS,
    lower=st.integers(-1, 3),
    upper=st.integers(-1, 3),
)
@per_op
def test_band_part_matches_value_inference(
    dtype: Any, shape: tuple[int, ...], seed: int, lower: int, upper: int
) -> None:
    attributes = {"lower": np.int32(lower), "upper": np.int32(upper)}
    check_against_value_inference("band_part", {"x": _array(seed, shape, dtype)}, attributes)


@pytest.mark.parametrize("mode", PAD_MODES)
@given(
    dtype=st.sampled_from(FLOAT_DTYPES),
    shape=array_shapes(min_dims=1, max_dims=4, min_side=2, max_side=4),
    seed=SEEDS,
    data=st.data(),
)
@per_op
def test_pad_matches_value_inference(
    mode: str, dtype: Any, shape: tuple[int, ...], seed: int, data: st.DataObject
) -> None:
    padded = data.draw(st.integers(1, len(shape)), label="padded dims")
    # reflect pads at most dim - 1 per side, replicate at most dim.
    widths = [
        data.draw(st.integers(0, size - 1 if mode == "reflect" else size), label="width")
        for size in shape[len(shape) - padded :]
        for _ in range(2)
    ]
    attributes = {"pad": _int32(widths), "mode": mode, "constant_val": dtype(1.5)}
    check_against_value_inference("pad", {"x": _array(seed, shape, dtype)}, attributes)


@given(
    dtype=dtypes,
    shape=array_shapes(min_dims=0, max_dims=3, max_side=4),
    depth=st.integers(1, 5),
    seed=SEEDS,
    data=st.data(),
)
@per_op
def test_one_hot_matches_formula(
    dtype: Any, shape: tuple[int, ...], depth: int, seed: int, data: st.DataObject
) -> None:
    """coremltools has no value inference for one_hot: compare with a comparison against arange."""
    axis = data.draw(st.integers(-len(shape) - 1, len(shape)), label="axis")
    indices = np.random.default_rng(seed).integers(-1, depth + 1, size=shape).astype(np.int32)
    on_value, off_value = _array(seed, (), dtype)[()], _array(seed + 1, (), dtype)[()]
    hits = np.moveaxis(indices[..., None] == np.arange(depth), -1, axis % (len(shape) + 1))
    expected = np.where(hits, on_value, off_value)
    attributes = {
        "one_hot_vector_size": np.int32(depth),
        "axis": np.int32(axis),
        "on_value": on_value,
        "off_value": off_value,
    }
    check_against_formula("one_hot", {"indices": indices}, expected, attributes)


@given(dtype=numeric_dtypes, shape=shapes, reverse=st.booleans(), seed=SEEDS, data=st.data())
@per_op
def test_cumsum_matches_value_inference(
    dtype: Any, shape: tuple[int, ...], reverse: bool, seed: int, data: st.DataObject
) -> None:
    axis = data.draw(st.integers(-1, len(shape) - 1), label="axis")  # coremltools accepts axis >= -1 only
    attributes = {"axis": np.int32(axis), "reverse": reverse, "exclusive": False}
    check_against_value_inference("cumsum", {"x": _array(seed, shape, dtype)}, attributes)


@given(dtype=numeric_dtypes, shape=shapes, reverse=st.booleans(), seed=SEEDS, data=st.data())
@per_op
def test_exclusive_cumsum_matches_formula(
    dtype: Any, shape: tuple[int, ...], reverse: bool, seed: int, data: st.DataObject
) -> None:
    """coremltools' value inference crashes on exclusive cumsum: compare with the inclusive sum minus x."""
    axis = data.draw(st.integers(-1, len(shape) - 1), label="axis")
    x = _array(seed, shape, dtype)
    wide = x.astype(np.float64)
    inclusive = np.flip(np.cumsum(np.flip(wide, axis), axis), axis) if reverse else np.cumsum(wide, axis)
    attributes = {"axis": np.int32(axis), "reverse": reverse, "exclusive": True}
    check_against_formula("cumsum", {"x": x}, inclusive - wide, attributes)


def _distinct(seed: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Distinct values: sorting ops leave the order of ties unspecified."""
    return np.random.default_rng(seed).permutation(int(np.prod(shape))).reshape(shape).astype(dtype)


@given(dtype=numeric_dtypes, shape=shapes, ascending=st.booleans(), seed=SEEDS, data=st.data())
@per_op
def test_argsort_matches_value_inference(
    dtype: Any, shape: tuple[int, ...], ascending: bool, seed: int, data: st.DataObject
) -> None:
    attributes = {"axis": np.int32(_axis(data, len(shape))), "ascending": ascending}
    check_against_value_inference("argsort", {"x": _distinct(seed, shape, dtype)}, attributes)


@given(
    dtype=numeric_dtypes,
    shape=shapes,
    ascending=st.booleans(),
    indices_dtype=st.sampled_from([None, "int32", "uint16"]),
    seed=SEEDS,
    data=st.data(),
)
@per_op
def test_topk_matches_value_inference(
    dtype: Any, shape: tuple[int, ...], ascending: bool, indices_dtype: Any, seed: int, data: st.DataObject
) -> None:
    """``indices_dtype`` None means no indices output (``return_indices=False``)."""
    axis = _axis(data, len(shape))
    attributes = {"k": np.int32(data.draw(st.integers(1, shape[axis]), label="k")), "axis": np.int32(axis)}
    attributes.update(ascending=ascending, return_indices=indices_dtype is not None)
    if indices_dtype is not None:
        attributes["output_indices_dtype"] = indices_dtype
    outputs = check_against_value_inference("topk", {"x": _distinct(seed, shape, dtype)}, attributes)
    if indices_dtype is not None:
        assert outputs[1].dtype == np.dtype(indices_dtype)


@given(dtype=dtypes, shape=shapes, seed=SEEDS)
@per_op
def test_non_zero_matches_value_inference(dtype: Any, shape: tuple[int, ...], seed: int) -> None:
    x = random_array(np.random.default_rng(seed), shape, dtype, -1.0, 1.0)
    check_against_value_inference("non_zero", {"x": x})
