"""Tensor kernels: shape changes, slicing, joining and splitting, gathers, fills, ranges and bands."""

from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np

from sdpa_slicer._interpreter.kernels import kernel
from sdpa_slicer._interpreter.kernels._common import (
    DEFAULT_INDEX_DTYPE,
    as_bool,
    as_int,
    as_ints,
    as_nptype,
    as_str,
    upcast,
)

Index = Union[int, slice]

PAD_MODES: dict[str, Any] = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}


@kernel("identity")
def _identity(x: np.ndarray) -> np.ndarray:
    return x


@kernel("shape")
def _shape(x: np.ndarray) -> np.ndarray:
    return np.array(x.shape, dtype=np.int32)


@kernel("reshape")
def _reshape(x: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """``-1`` is inferred; each ``0`` copies the dim of ``x`` at the same place counted from the right,
    or is 1 past the left end of ``x.shape`` (iOS17 rule; iOS15 only allows 0 when the ranks match,
    where both rules agree)."""
    target = list(as_ints(shape))
    offset = x.ndim - len(target)
    for i, size in enumerate(target):
        if size == 0:
            target[i] = x.shape[i + offset] if i + offset >= 0 else 1
    return np.reshape(x, target)


@kernel("transpose")
def _transpose(x: np.ndarray, perm: np.ndarray) -> np.ndarray:
    return np.transpose(x, as_ints(perm))


@kernel("expand_dims")
def _expand_dims(x: np.ndarray, axes: np.ndarray) -> np.ndarray:
    return np.expand_dims(x, as_ints(axes))


@kernel("squeeze")
def _squeeze(x: np.ndarray, axes: Optional[np.ndarray] = None) -> np.ndarray:
    """Without ``axes`` drop every size-1 dim; with ``axes`` drop those of them that have size 1
    (PyTorch-style: larger dims in ``axes`` are kept)."""
    if axes is None:
        return np.squeeze(x)
    unit_axes = tuple(axis for axis in (a % x.ndim for a in as_ints(axes)) if x.shape[axis] == 1)
    return np.squeeze(x, axis=unit_axes)


@kernel("flatten2d")
def _flatten2d(x: np.ndarray, axis: Any = 1) -> np.ndarray:
    split = as_int(axis)
    return np.reshape(x, (int(np.prod(x.shape[:split])), int(np.prod(x.shape[split:]))))


@kernel("tile")
def _tile(x: np.ndarray, reps: np.ndarray) -> np.ndarray:
    return np.tile(x, as_ints(reps))


@kernel("reverse")
def _reverse(x: np.ndarray, axes: Optional[np.ndarray] = None) -> np.ndarray:
    return np.flip(x, axis=None if axes is None else as_ints(axes))


@kernel("concat")
def _concat(values: tuple[np.ndarray, ...], axis: Any, interleave: Any = False) -> np.ndarray:
    """Join along ``axis``; ``interleave`` takes one slice from each input in turn. Scalars are stacked."""
    if values[0].ndim == 0:
        return np.stack(values)
    axis = as_int(axis) % values[0].ndim
    if not as_bool(interleave):
        return np.concatenate(values, axis=axis)
    stacked = np.stack(values, axis=axis + 1)
    shape = list(values[0].shape)
    shape[axis] *= len(values)
    return stacked.reshape(shape)


@kernel("stack")
def _stack(values: tuple[np.ndarray, ...], axis: Any) -> np.ndarray:
    return np.stack(values, axis=as_int(axis))


@kernel("split")
def _split(
    x: np.ndarray, axis: Any, num_splits: Any = None, split_sizes: Optional[np.ndarray] = None
) -> tuple[np.ndarray, ...]:
    axis = as_int(axis)
    length = x.shape[axis]
    if split_sizes is not None:
        sizes = as_ints(split_sizes)
        if sum(sizes) != length:
            raise ValueError(f"split_sizes {list(sizes)} do not add up to the split dim {length}")
    else:
        count = as_int(num_splits)
        if length % count:
            raise ValueError(f"num_splits {count} does not divide the split dim {length}")
        sizes = (length // count,) * count
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


def _index_slices(
    rank: int,
    begin: np.ndarray,
    end: np.ndarray,
    stride: Optional[np.ndarray],
    begin_mask: Optional[np.ndarray],
    end_mask: Optional[np.ndarray],
    squeeze_mask: Optional[np.ndarray],
) -> tuple[Index, ...]:
    """NumPy indices for ``x[begin:end:stride, ...]``; a masked begin/end is open (like an omitted
    NumPy bound, so it is the far end for negative strides) and a squeezed axis is the index
    ``begin`` (0 when begin is masked)."""
    begins, ends = as_ints(begin), as_ints(end)
    strides = as_ints(stride) if stride is not None else (1,) * rank
    no_mask = (False,) * rank
    begin_open = tuple(np.asarray(begin_mask).reshape(-1)) if begin_mask is not None else no_mask
    end_open = tuple(np.asarray(end_mask).reshape(-1)) if end_mask is not None else no_mask
    squeezed = tuple(np.asarray(squeeze_mask).reshape(-1)) if squeeze_mask is not None else no_mask
    index: list[Index] = []
    for axis in range(rank):
        if squeezed[axis]:
            index.append(0 if begin_open[axis] else begins[axis])
        else:
            start = None if begin_open[axis] else begins[axis]
            stop = None if end_open[axis] else ends[axis]
            index.append(slice(start, stop, strides[axis]))
    return tuple(index)


@kernel("slice_by_index")
def _slice_by_index(
    x: np.ndarray,
    begin: np.ndarray,
    end: np.ndarray,
    stride: Optional[np.ndarray] = None,
    begin_mask: Optional[np.ndarray] = None,
    end_mask: Optional[np.ndarray] = None,
    squeeze_mask: Optional[np.ndarray] = None,
) -> np.ndarray:
    return x[_index_slices(x.ndim, begin, end, stride, begin_mask, end_mask, squeeze_mask)]


@kernel("slice_update")
def _slice_update(
    x: np.ndarray,
    update: np.ndarray,
    begin: np.ndarray,
    end: np.ndarray,
    stride: Optional[np.ndarray] = None,
    begin_mask: Optional[np.ndarray] = None,
    end_mask: Optional[np.ndarray] = None,
    squeeze_mask: Optional[np.ndarray] = None,
) -> np.ndarray:
    index = _index_slices(x.ndim, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    target_shape = x[index].shape
    if update.shape != target_shape:
        raise ValueError(f"update has shape {update.shape}, but the slice it replaces has shape {target_shape}")
    out = np.array(x, copy=True)
    out[index] = update
    return out


@kernel("slice_by_size")
def _slice_by_size(x: np.ndarray, begin: np.ndarray, size: np.ndarray) -> np.ndarray:
    """``x[begin:begin+size]`` per axis; a negative begin counts from the end; size -1 takes the rest."""
    index = []
    for start, length, dim in zip(as_ints(begin), as_ints(size), x.shape):
        start = start + dim if start < 0 else start
        index.append(slice(start, dim if length == -1 else start + length))
    return x[tuple(index)]


def _check_indices(indices: np.ndarray, size: int, validate: bool) -> None:
    """Indices must lie in ``[0, size)`` when validated, else in ``[-size, size)`` (negatives wrap)."""
    low = 0 if validate else -size
    if indices.size and (indices.min() < low or indices.max() >= size):
        raise IndexError(f"indices must lie in [{low}, {size}), got values from {indices.min()} to {indices.max()}")


@kernel("gather")
def _gather(
    x: np.ndarray, indices: np.ndarray, axis: Any = 0, batch_dims: Any = 0, validate_indices: Any = False
) -> np.ndarray:
    """Take ``indices`` along ``axis``; the first ``batch_dims`` dims of ``x`` and ``indices`` pair up."""
    axis = as_int(axis) % x.ndim
    batch = as_int(batch_dims)
    _check_indices(indices, x.shape[axis], as_bool(validate_indices))
    if batch == 0:
        return np.take(x, indices, axis=axis)
    batch_shape = x.shape[:batch]
    flat_x = x.reshape((-1,) + x.shape[batch:])
    flat_indices = indices.reshape((-1,) + indices.shape[batch:])
    taken = [np.take(item, item_indices, axis=axis - batch) for item, item_indices in zip(flat_x, flat_indices)]
    return np.stack(taken).reshape(batch_shape + taken[0].shape)


@kernel("gather_along_axis")
def _gather_along_axis(x: np.ndarray, indices: np.ndarray, axis: Any = 0, validate_indices: Any = False) -> np.ndarray:
    axis = as_int(axis) % x.ndim
    _check_indices(indices, x.shape[axis], as_bool(validate_indices))
    return np.take_along_axis(x, indices.astype(np.intp), axis=axis)


@kernel("gather_nd")
def _gather_nd(x: np.ndarray, indices: np.ndarray, batch_dims: Any = 0, validate_indices: Any = False) -> np.ndarray:
    """Index ``x`` (after ``batch_dims`` paired dims) by the coordinate vectors in ``indices[..., :]``."""
    batch = as_int(batch_dims)
    depth = indices.shape[-1]
    for k in range(depth):
        _check_indices(indices[..., k], x.shape[batch + k], as_bool(validate_indices))
    batch_count = int(np.prod(x.shape[:batch]))
    flat_x = x.reshape((batch_count,) + x.shape[batch:])
    flat_indices = indices.reshape((batch_count,) + indices.shape[batch:])
    batch_index = np.arange(batch_count).reshape((batch_count,) + (1,) * (flat_indices.ndim - 2))
    coordinates = tuple(flat_indices[..., k] for k in range(depth))
    gathered = flat_x[(batch_index,) + coordinates]
    return gathered.reshape(indices.shape[:-1] + x.shape[batch + depth :])


@kernel("fill")
def _fill(shape: np.ndarray, value: Any = 0.0) -> np.ndarray:
    return np.full(as_ints(shape), value)


@kernel("fill_like")
def _fill_like(ref_tensor: np.ndarray, value: Any = 0.0) -> np.ndarray:
    return np.full(ref_tensor.shape, value)


@kernel("range_1d")
def _range_1d(end: Any, start: Any, step: Any) -> np.ndarray:
    return np.arange(np.asarray(start).item(), np.asarray(end).item(), np.asarray(step).item())


@kernel("band_part")
def _band_part(x: np.ndarray, lower: Any = -1, upper: Any = -1) -> np.ndarray:
    """Keep entries with ``m - n <= lower`` and ``n - m <= upper`` in the last two dims (negative: no limit)."""
    lower, upper = as_int(lower), as_int(upper)
    rows = np.arange(x.shape[-2])[:, None]
    cols = np.arange(x.shape[-1])[None, :]
    keep = ((lower < 0) | (rows - cols <= lower)) & ((upper < 0) | (cols - rows <= upper))
    return np.where(keep, x, np.zeros((), dtype=x.dtype))


@kernel("cumsum")
def _cumsum(x: np.ndarray, axis: Any = 0, exclusive: Any = False, reverse: Any = False) -> np.ndarray:
    axis = as_int(axis)
    data = upcast(x)
    if as_bool(reverse):
        data = np.flip(data, axis=axis)
    out = np.cumsum(data, axis=axis)
    if as_bool(exclusive):
        out = np.concatenate((np.zeros_like(np.take(out, [0], axis=axis)), np.delete(out, -1, axis=axis)), axis=axis)
    if as_bool(reverse):
        out = np.flip(out, axis=axis)
    return out


@kernel("pad")
def _pad(x: np.ndarray, pad: np.ndarray, mode: Any = "constant", constant_val: Any = 0.0) -> np.ndarray:
    """``pad`` holds (before, after) pairs for the last ``len(pad) // 2`` dims."""
    pairs = np.asarray(as_ints(pad)).reshape(-1, 2).tolist()
    widths = [(0, 0)] * (x.ndim - len(pairs)) + [tuple(pair) for pair in pairs]
    mode = as_str(mode)
    if mode not in PAD_MODES:
        raise ValueError(f"unknown pad mode {mode!r}; expected one of {', '.join(PAD_MODES)}")
    if mode == "constant":
        return np.pad(x, widths, mode="constant", constant_values=np.asarray(constant_val).item())
    return np.pad(x, widths, mode=PAD_MODES[mode])


@kernel("one_hot")
def _one_hot(
    indices: np.ndarray, one_hot_vector_size: Any, axis: Any = -1, on_value: Any = 1, off_value: Any = 0
) -> np.ndarray:
    """A new axis of length ``one_hot_vector_size`` at ``axis``, ``on_value`` where it equals the index."""
    depth = as_int(one_hot_vector_size)
    out_axis = as_int(axis) % (indices.ndim + 1)
    hits = np.expand_dims(indices, -1) == np.arange(depth)
    return np.where(np.moveaxis(hits, -1, out_axis), on_value, off_value)


def _sort_order(x: np.ndarray, axis: int, ascending: bool) -> np.ndarray:
    """Indices sorting ``x`` along ``axis``; ties keep their original order."""
    return np.argsort(x if ascending else -upcast(x), axis=axis, kind="stable")


@kernel("argsort")
def _argsort(x: np.ndarray, axis: Any = -1, ascending: Any = False) -> np.ndarray:
    return _sort_order(x, as_int(axis), as_bool(ascending))


@kernel("topk")
def _topk(
    x: np.ndarray,
    k: Any = 1,
    axis: Any = -1,
    ascending: Any = False,
    sort: Any = True,
    return_indices: Any = True,
    output_indices_dtype: Any = DEFAULT_INDEX_DTYPE,
) -> Union[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """The ``k`` largest (smallest if ``ascending``) values along ``axis``, always sorted."""
    axis = as_int(axis)
    order = _sort_order(x, axis, as_bool(ascending))
    indices = np.take(order, np.arange(as_int(k)), axis=axis)
    values = np.take_along_axis(x, indices, axis=axis)
    if not as_bool(return_indices):
        return values
    return values, indices.astype(as_nptype(output_indices_dtype))


@kernel("non_zero")
def _non_zero(x: np.ndarray) -> np.ndarray:
    return np.transpose(np.nonzero(x))
