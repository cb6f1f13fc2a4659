"""Where the query rows are, op by op (``plan/rows.py``): pure shape arithmetic, checked against
NumPy: building an op in merged forms from its inputs' chunk rows gives the chunk rows of its
full result."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdpa_slicer._rewrite.plan.rows import (
    BROADCAST,
    broadcast_rows,
    expand_dims_rows,
    merged_axis,
    merged_input_shape,
    merged_reps,
    merged_shape,
    reshape_rows,
    tile_rows,
)

DIMS = st.lists(st.integers(1, 3), min_size=0, max_size=2)
ROW_DIMS = st.lists(st.integers(1, 4), min_size=1, max_size=3).filter(lambda dims: math.prod(dims) > 1)


def _cut(x: np.ndarray, rows: tuple[int, int], span: tuple[int, int]) -> np.ndarray:
    """The chunk ``span`` of ``x``'s query rows, in merged form."""
    merged = x.reshape(merged_shape(x.shape, rows, math.prod(x.shape[rows[0] : rows[1]])))
    return merged[(slice(None),) * rows[0] + (slice(*span),)]


def _span(draw: st.DrawFn, length: int) -> tuple[int, int]:
    start = draw(st.integers(0, length - 1))
    return start, draw(st.integers(start + 1, length))


@st.composite
def reshapes(draw: st.DrawFn):
    """Two shapes of the same rows, each its own factorization of the dims before and after them."""
    before, rows, after = draw(DIMS), draw(ROW_DIMS), draw(DIMS)

    def factored(dims: list[int]) -> list[int]:
        total = math.prod(dims)
        out = []
        while total > 1:
            factor = draw(st.sampled_from([f for f in range(2, total + 1) if total % f == 0]))
            out.append(factor)
            total //= factor
        return out + [1] * draw(st.integers(0, 1))

    in_before, in_rows, in_after = factored(before), draw(st.permutations(rows)), factored(after)
    out_before, out_rows, out_after = factored(before), [math.prod(rows)], factored(after)
    in_shape = (*in_before, *in_rows, *in_after)
    out_shape = (*out_before, *out_rows, *out_after)
    return in_shape, out_shape, (len(out_before), len(out_before) + 1), draw(st.data())


@given(reshapes())
def test_a_reshape_built_on_a_chunk_of_rows_gives_the_chunk_of_its_result(case):
    in_shape, out_shape, out_rows, data = case
    in_rows = reshape_rows(in_shape, out_shape, out_rows)
    assert in_rows is not None
    x = np.arange(math.prod(in_shape)).reshape(in_shape)
    span = _span(data.draw, out_shape[out_rows[0]])
    piece = _cut(x, in_rows, span).reshape(merged_shape(out_shape, out_rows, span[1] - span[0]))
    np.testing.assert_array_equal(piece, _cut(x.reshape(out_shape), out_rows, span))


def test_a_reshape_whose_rows_do_not_line_up_has_no_input_rows():
    assert reshape_rows((2, 256, 16), (2, 16, 256), (1, 2)) is None  # rows of 16 would be 16 of the 256
    assert reshape_rows((4, 64), (2, 128), (1, 2)) is None  # the dims before the rows differ


@st.composite
def broadcasts(draw: st.DrawFn):
    """An output shape with its rows, and an input that broadcasts to it."""
    before, rows, after = draw(DIMS), draw(ROW_DIMS), draw(DIMS)
    out_shape = (*before, *rows, *after)
    start = len(before)
    in_shape = tuple(draw(st.sampled_from([1, dim])) for dim in out_shape)
    if draw(st.booleans()):  # all rows or none, so that the input has rows or broadcasts over them
        in_shape = (*in_shape[:start], *rows, *in_shape[start + len(rows) :])
    else:
        in_shape = (*in_shape[:start], *(1,) * len(rows), *in_shape[start + len(rows) :])
    drop = draw(st.integers(0, len(in_shape) - 1))
    if all(dim == 1 for dim in in_shape[:drop]):
        in_shape = in_shape[drop:]
    return out_shape, (start, start + len(rows)), in_shape, draw(st.data())


@given(broadcasts())
def test_an_elementwise_op_built_on_a_chunk_of_rows_gives_the_chunk_of_its_result(case):
    out_shape, rows, in_shape, data = case
    length = math.prod(out_shape[rows[0] : rows[1]])
    span = _span(data.draw, length)
    x = np.arange(math.prod(in_shape), dtype=np.float64).reshape(in_shape)
    y = np.ones(out_shape)
    in_rows = broadcast_rows(out_shape, rows, in_shape)
    assert in_rows is not None
    if in_rows == BROADCAST:
        shape = merged_input_shape(in_shape, len(out_shape), rows)
        piece = x if shape is None else x.reshape(shape)
    else:
        piece = _cut(x, in_rows, span)
    want = _cut(x + y, rows, span)
    np.testing.assert_array_equal(piece + _cut(y, rows, span), want)


def test_an_input_that_has_some_of_the_rows_only_cannot_be_built_per_chunk():
    assert broadcast_rows((2, 16, 16, 8), (1, 3), (16, 8)) is None  # qw without qh
    assert broadcast_rows((2, 16, 16, 8), (1, 3), (2, 16, 1, 8)) is None


@given(ROW_DIMS, DIMS, st.integers(1, 2), st.data())
def test_an_expand_dims_built_on_a_chunk_of_rows_gives_the_chunk_of_its_result(rows, after, count, data):
    in_shape = (2, *rows, *after)
    out_rank = len(in_shape) + count
    axes = sorted(data.draw(st.lists(st.integers(0, out_rank - 1), min_size=count, max_size=count, unique=True)))
    given_axes = [axis - out_rank if data.draw(st.booleans()) else axis for axis in axes]
    x = np.arange(math.prod(in_shape)).reshape(in_shape)
    full = np.expand_dims(x, tuple(axes))
    kept = [axis for axis in range(out_rank) if axis not in axes]
    out_rows = (kept[1], kept[len(rows)] + 1)
    found = expand_dims_rows(len(in_shape), given_axes, out_rows)
    assert found is not None and found[0] == (1, 1 + len(rows))
    span = _span(data.draw, math.prod(rows))
    piece = np.expand_dims(_cut(x, found[0], span), found[1]) if found[1] else _cut(x, found[0], span)
    np.testing.assert_array_equal(piece, _cut(full, out_rows, span))


@pytest.mark.parametrize(
    "in_shape, reps, want",
    [((2, 16, 8), (1, 1, 3), (1, 2)), ((2, 1, 8), (1, 16, 1), BROADCAST), ((2, 4, 8), (1, 4, 1), None)],
)
def test_a_tile_repeats_the_rows_of_an_input_with_one_row_or_none(in_shape, reps, want):
    assert tile_rows(in_shape, reps, (1, 2)) == want
    if want is None:
        return
    x = np.arange(math.prod(in_shape)).reshape(in_shape)
    full = np.tile(x, reps)
    span = (3, 9)
    source = x if want == BROADCAST else x[:, slice(*span)]
    piece = np.tile(source, merged_reps(reps, (1, 2), 6 if want == BROADCAST else None))
    np.testing.assert_array_equal(piece, full[:, slice(*span)])


def test_an_axis_keeps_its_place_around_the_merged_rows():
    assert [merged_axis(axis, 5, (1, 3)) for axis in range(5)] == [0, None, None, 2, 3]


def test_an_input_that_does_not_reach_a_row_axis_of_size_1_still_has_the_rows():
    """Found by the property above: out (1, 2) with its rows at (0, 2) (a row axis of 1, then 2),
    and an input (2,) that reaches only the second, has the rows (0, 1)."""
    assert broadcast_rows((1, 2), (0, 2), (2,)) == (0, 1)
    assert broadcast_rows((1, 16, 64), (0, 2), (16, 64)) == (0, 1)
