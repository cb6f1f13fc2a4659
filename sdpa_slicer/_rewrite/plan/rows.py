"""Where the query rows are in the tensors an operand is made from: shape arithmetic, no graph.

An operand of the score chain as large as the scores (SAM's relative-position bias, a mask
computed from positions) is often made by broadcasting ops from smaller tensors. To build it
per query chunk, each tensor of its recipe is looked at through its *rows*: the axes
``[start, end)`` whose flattened index is the query row (SAM's ``(B*heads, qh, qw, kh)`` has
the rows at ``(1, 3)``, ``qh * qw = L``). Merging those axes into one gives the tensor's
*merged form*, in which a query chunk is a plain cut of one axis, whatever the original rank::

    (B*heads, qh, qw, kh, 1)    rows (1, 3)    merged: (B*heads, L, kh, 1)    chunk: (B*heads, c, kh, 1)

Each function below says, for one op, where the rows of its inputs are given the rows of its
output, and how the op reads in merged forms. ``BROADCAST`` is an input that does not vary along
the rows (its row axes are all 1, or it does not reach them): it is used whole.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

Rows = tuple[int, int]
"""The axes ``[start, end)`` (non-negative) of a tensor whose flattened index is the query row."""
BROADCAST = "broadcast"
"""An input that does not vary along the query rows."""
InputRows = Union[Rows, str, None]
"""An input's rows, ``BROADCAST``, or ``None``: the op cannot be built per chunk from it."""


def merged_shape(shape: Sequence[int], rows: Rows, count: int) -> tuple[int, ...]:
    """``shape`` with its row axes merged into one axis of ``count`` rows.

    >>> merged_shape((2, 16, 16, 16, 1), (1, 3), 64)
    (2, 64, 16, 1)
    """
    start, end = rows
    return (*shape[:start], count, *shape[end:])


def merged_axis(axis: int, rank: int, rows: Rows) -> Optional[int]:
    """Axis ``axis`` (of a tensor of ``rank`` whose rows are ``rows``) in the merged form;
    ``None`` when it is one of the row axes.

    >>> merged_axis(4, 5, (1, 3)), merged_axis(-1, 5, (1, 3)), merged_axis(2, 5, (1, 3))
    (3, 3, None)
    """
    axis %= rank
    start, end = rows
    if axis < start:
        return axis
    if axis >= end:
        return axis - (end - start) + 1
    return None


def broadcast_rows(out_shape: Sequence[int], rows: Rows, in_shape: Sequence[int]) -> InputRows:
    """The rows of an input of an elementwise op (aligned right with its output of ``out_shape``).

    >>> broadcast_rows((2, 16, 16, 16, 16), (1, 3), (2, 16, 16, 1, 16))
    (1, 3)
    >>> broadcast_rows((1, 2, 256, 256), (2, 3), (256,))
    'broadcast'
    >>> broadcast_rows((1, 2, 256, 256), (2, 3), (1, 1, 1, 256)), broadcast_rows((2, 16, 16, 8), (1, 3), (16, 8))
    ('broadcast', None)
    """
    offset = len(out_shape) - len(in_shape)
    start, end = rows
    covered = [tuple(in_shape)[axis - offset] for axis in range(max(start, offset), end)]
    if all(size == 1 for size in covered):
        return BROADCAST
    if covered != list(out_shape[max(start, offset) : end]) or any(size != 1 for size in out_shape[start:offset]):
        return None
    return max(start - offset, 0), end - offset


def merged_input_shape(in_shape: Sequence[int], out_rank: int, rows: Rows) -> Optional[tuple[int, ...]]:
    """How a ``BROADCAST`` input of an elementwise op reads against the merged output: its row
    axes as one axis of 1; ``None`` when it needs no change (it does not reach the rows, or
    has one row axis).

    >>> merged_input_shape((2, 1, 1, 16), 4, (1, 3)), merged_input_shape((16,), 4, (1, 3))
    ((2, 1, 16), None)
    """
    offset = out_rank - len(in_shape)
    start, end = rows
    if end <= offset:
        return None
    first = max(start - offset, 0)
    last = end - offset
    if last - first == 1 and start >= offset:
        return None
    return (*in_shape[:first], 1, *in_shape[last:])


def expand_dims_rows(in_rank: int, axes: Sequence[int], rows: Rows) -> Optional[tuple[Rows, tuple[int, ...]]]:
    """The rows of ``expand_dims``'s input, and the axes it inserts in merged forms (the inserted
    axes among the rows are absorbed by the merged axis).

    >>> expand_dims_rows(4, [-1], (1, 3)), expand_dims_rows(4, [3], (1, 3))
    (((1, 3), (3,)), ((1, 3), (2,)))
    """
    out_rank = in_rank + len(axes)
    inserted = sorted(axis % out_rank for axis in axes)
    start, end = rows
    kept = [axis for axis in range(out_rank) if axis not in inserted]
    in_axes = [index for index, axis in enumerate(kept) if start <= axis < end]
    if not in_axes or in_axes != list(range(in_axes[0], in_axes[-1] + 1)):
        return None
    merged = tuple(axis if axis < start else axis - (end - start) + 1 for axis in inserted if not start <= axis < end)
    return (in_axes[0], in_axes[-1] + 1), merged


def reshape_rows(in_shape: Sequence[int], out_shape: Sequence[int], rows: Rows) -> Optional[Rows]:
    """The rows of ``reshape``'s input: the axes whose flattened range is that of the output's
    rows (the same product before them, and the same rows); ``None`` when no such axes exist.

    >>> reshape_rows((2, 16, 16, 16, 16), (1, 2, 256, 256), (2, 3))
    (1, 3)
    >>> reshape_rows((2, 256, 16), (2, 16, 256), (1, 2)) is None    # L = 16 rows of 256 do not line up
    True
    """
    before = math.prod(out_shape[: rows[0]])
    count = math.prod(out_shape[rows[0] : rows[1]])
    for start in range(len(in_shape)):
        if math.prod(in_shape[:start]) != before:
            continue
        for end in range(start + 1, len(in_shape) + 1):
            if math.prod(in_shape[start:end]) == count:
                return start, end
            if math.prod(in_shape[start:end]) > count:
                break
        return None
    return None


def tile_rows(in_shape: Sequence[int], reps: Sequence[int], rows: Rows) -> InputRows:
    """The rows of ``tile``'s input: the same axes when it repeats none of them, ``BROADCAST``
    when the input has one row that the tile repeats into all of them.

    >>> tile_rows((2, 16, 16), (1, 1, 4), (1, 2)), tile_rows((2, 1, 16), (1, 64, 1), (1, 2))
    ((1, 2), 'broadcast')
    """
    start, end = rows
    if all(rep == 1 for rep in reps[start:end]):
        return rows
    if all(size == 1 for size in in_shape[start:end]):
        return BROADCAST
    return None


def merged_reps(reps: Sequence[int], rows: Rows, count: Optional[int]) -> tuple[int, ...]:
    """``tile``'s reps in merged forms: ``count`` on the merged axis (``None``: 1, the input has the rows)."""
    start, end = rows
    return (*reps[:start], 1 if count is None else count, *reps[end:])
