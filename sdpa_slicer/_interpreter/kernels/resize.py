"""Image resizing kernels: ``upsample_*``, ``resize_*``, ``resize``, ``crop_resize``, ``crop``,
``resample`` and ``affine``.

Bilinear ops sample each output position at a grid point of the input axis, as the
``resize_bilinear`` op documents for each ``sampling_mode``, and interpolate linearly between the
two neighbouring input positions; an axis at a time, in fp32 for fp16.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from sdpa_slicer._interpreter.kernels import kernel
from sdpa_slicer._interpreter.kernels._common import as_bool, as_int, as_ints, as_str, upcast

SAMPLING_MODES = ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS", "DEFAULT", "OFFSET_CORNERS", "UNALIGN_CORNERS")
BOX_COORDINATE_MODES = (
    "CORNERS_HEIGHT_FIRST",
    "CORNERS_WIDTH_FIRST",
    "CENTER_SIZE_HEIGHT_FIRST",
    "CENTER_SIZE_WIDTH_FIRST",
)
INTERPOLATION_MODES = ("LINEAR", "NEAREST_NEIGHBOR")
RESAMPLE_SAMPLING_MODES = ("bilinear", "nearest")
RESAMPLE_PADDING_MODES = ("constant", "border", "reflection", "symmetric")
COORDINATES_MODES = ("unnormalized", "normalized_minus_one_to_one", "normalized_zero_to_one")


def sampling_grid(size_in: float, size_out: int, mode: str) -> np.ndarray:
    """The input coordinates sampled for each of ``size_out`` outputs, before clipping to the input.

    ``size_in`` is the length of the sampled interval plus one (the input size for a resize).
    """
    if mode not in SAMPLING_MODES:
        raise ValueError(f"unknown sampling_mode {mode!r}; expected one of {', '.join(SAMPLING_MODES)}")
    i = np.arange(size_out, dtype=np.float64)
    if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS"):
        if size_out == 1:
            return np.full(1, (size_in - 1) / 2 if mode == "ALIGN_CORNERS" else 0.0)
        return i * (size_in - 1) / (size_out - 1)
    if mode == "DEFAULT":
        return i * size_in / size_out
    if mode == "OFFSET_CORNERS":
        delta = max(1.0, size_in - 1) / size_out
        return 0.5 * delta + i * delta
    return (i + 0.5) * size_in / size_out - 0.5


def _interpolate(x: np.ndarray, axis: int, points: np.ndarray) -> np.ndarray:
    """``x`` sampled along ``axis`` at ``points`` (clipped to the axis), linearly between neighbours."""
    size = x.shape[axis]
    points = np.clip(points, 0, size - 1)
    low = np.floor(points).astype(np.intp)
    high = np.minimum(low + 1, size - 1)
    shape = [1] * x.ndim
    shape[axis] = len(points)
    weight = (points - low).astype(np.float32).reshape(shape)
    below = np.take(x, low, axis=axis)
    return below + (np.take(x, high, axis=axis) - below) * weight


def _nearest(x: np.ndarray, axis: int, indices: np.ndarray) -> np.ndarray:
    return np.take(x, np.clip(indices, 0, x.shape[axis] - 1), axis=axis)


def _bilinear(x: np.ndarray, heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
    return _interpolate(_interpolate(upcast(x), -2, heights), -1, widths)


@kernel("upsample_nearest_neighbor")
def _upsample_nearest_neighbor(x: np.ndarray, scale_factor_height: Any = 1, scale_factor_width: Any = 1) -> np.ndarray:
    """Output ``i`` takes input ``floor(i / scale)``; the output is ``floor(size * scale)`` long."""
    for axis, scale in ((-2, scale_factor_height), (-1, scale_factor_width)):
        scale = float(np.asarray(scale))
        out_size = int(np.floor(x.shape[axis] * scale))
        x = _nearest(x, axis, np.floor(np.arange(out_size) / scale).astype(np.intp))
    return x


@kernel("resize_nearest_neighbor")
def _resize_nearest_neighbor(x: np.ndarray, target_size_height: Any, target_size_width: Any) -> np.ndarray:
    """Output ``i`` takes input ``floor(i * size / target)``."""
    for axis, target in ((-2, target_size_height), (-1, target_size_width)):
        out_size = as_int(target)
        x = _nearest(x, axis, np.floor(np.arange(out_size) * x.shape[axis] / out_size).astype(np.intp))
    return x


@kernel("upsample_bilinear")
def _upsample_bilinear(
    x: np.ndarray,
    scale_factor_height: Any = 1,
    scale_factor_width: Any = 1,
    align_corners: Any = True,
    half_pixel_centers: Optional[Any] = None,
) -> np.ndarray:
    """The scale is recomputed from the sizes: ``align_corners`` samples as ``STRICT_ALIGN_CORNERS``,
    else ``half_pixel_centers`` (default: not ``align_corners``) as ``UNALIGN_CORNERS``, else ``DEFAULT``."""
    aligned = as_bool(align_corners)
    half_pixel = not aligned if half_pixel_centers is None else as_bool(half_pixel_centers)
    mode = "STRICT_ALIGN_CORNERS" if aligned else "UNALIGN_CORNERS" if half_pixel else "DEFAULT"
    sizes = [
        int(np.floor(x.shape[axis] * float(np.asarray(scale))))
        for axis, scale in ((-2, scale_factor_height), (-1, scale_factor_width))
    ]
    return _bilinear(x, sampling_grid(x.shape[-2], sizes[0], mode), sampling_grid(x.shape[-1], sizes[1], mode))


@kernel("resize_bilinear")
def _resize_bilinear(
    x: np.ndarray, target_size_height: Any = 1, target_size_width: Any = 1, sampling_mode: Any = "DEFAULT"
) -> np.ndarray:
    mode = as_str(sampling_mode)
    heights = sampling_grid(x.shape[-2], as_int(target_size_height), mode)
    return _bilinear(x, heights, sampling_grid(x.shape[-1], as_int(target_size_width), mode))


@kernel("resize")
def _resize(
    x: np.ndarray,
    shape: np.ndarray,
    resized_dims: Any,
    interpolation_mode: Any = "LINEAR",
    sampling_mode: Any = "DEFAULT",
) -> np.ndarray:
    """The last ``resized_dims`` dims take the last sizes of ``shape`` (0 keeps the dim of ``x``)."""
    count = as_int(resized_dims)
    interpolation, mode = as_str(interpolation_mode), as_str(sampling_mode)
    if interpolation not in INTERPOLATION_MODES:
        raise ValueError(
            f"unknown interpolation_mode {interpolation!r}; expected one of {', '.join(INTERPOLATION_MODES)}"
        )
    targets = as_ints(shape)[len(as_ints(shape)) - count :] if count else ()
    out = upcast(x) if interpolation == "LINEAR" else x
    for offset, target in enumerate(targets):
        axis = x.ndim - count + offset
        size = x.shape[axis]
        target = target or size
        if interpolation == "LINEAR":
            out = _interpolate(out, axis, sampling_grid(size, target, mode))
        else:
            # Each grid point takes the nearest input position (halves up), as Core ML does.
            points = np.clip(sampling_grid(size, target, mode), 0, size - 1)
            out = _nearest(out, axis, np.floor(points + 0.5).astype(np.intp))
    return out


def _box_corners(boxes: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(h_start, w_start, h_end, w_end)`` of each box."""
    a, b, c, d = (boxes[:, i].astype(np.float64) for i in range(4))
    if mode == "CORNERS_HEIGHT_FIRST":
        return a, b, c, d
    if mode == "CORNERS_WIDTH_FIRST":
        return b, a, d, c
    if mode == "CENTER_SIZE_HEIGHT_FIRST":
        return a - c / 2, b - d / 2, a + c / 2, b + d / 2
    if mode == "CENTER_SIZE_WIDTH_FIRST":
        return b - d / 2, a - c / 2, b + d / 2, a + c / 2
    raise ValueError(f"unknown box_coordinate_mode {mode!r}; expected one of {', '.join(BOX_COORDINATE_MODES)}")


def _box_points(start: float, end: float, size_out: int, mode: str) -> np.ndarray:
    """The grid of ``sampling_grid`` laid over ``[start, end]`` instead of ``[0, size - 1]``, and
    clipped to the box as a resize clips it to the input."""
    extent = end - start
    return start + np.clip(sampling_grid(extent + 1, size_out, mode), min(0.0, extent), max(0.0, extent))


def _sample_box(image: np.ndarray, heights: np.ndarray, widths: np.ndarray, pad_value: float) -> np.ndarray:
    """Bilinear samples of ``image`` (C, H, W); points outside the image take ``pad_value``."""
    rows, cols = image.shape[-2:]
    out = _bilinear(image, heights, widths)
    outside = ((heights < 0) | (heights > rows - 1))[:, None] | ((widths < 0) | (widths > cols - 1))[None, :]
    return np.where(outside, np.float32(pad_value), out)


@kernel("crop_resize")
def _crop_resize(
    x: np.ndarray,
    boxes: np.ndarray,
    box_indices: Optional[np.ndarray] = None,
    target_height: Any = 1,
    target_width: Any = 1,
    normalized_coordinates: Any = False,
    spatial_scale: Any = 1.0,
    box_coordinate_mode: Any = "CORNERS_HEIGHT_FIRST",
    sampling_mode: Any = "DEFAULT",
    pad_value: Any = 0.0,
) -> np.ndarray:
    """iOS17: box ``i`` of image ``box_indices[i]``, resized to ``(target_height, target_width)``."""
    rows, cols = x.shape[-2:]
    h0, w0, h1, w1 = _box_corners(upcast(boxes), as_str(box_coordinate_mode))
    scale = float(np.asarray(spatial_scale))
    if as_bool(normalized_coordinates):
        h0, h1, w0, w1 = h0 * (rows - 1), h1 * (rows - 1), w0 * (cols - 1), w1 * (cols - 1)
    h0, h1, w0, w1 = h0 * scale, h1 * scale, w0 * scale, w1 * scale
    indices = np.arange(len(boxes)) if box_indices is None else np.asarray(box_indices).astype(np.intp)
    mode, pad = as_str(sampling_mode), float(np.asarray(pad_value))
    crops = [
        _sample_box(
            x[index],
            _box_points(h0[i], h1[i], as_int(target_height), mode),
            _box_points(w0[i], w1[i], as_int(target_width), mode),
            pad,
        )
        for i, index in enumerate(indices)
    ]
    return np.stack(crops)


@kernel("crop")
def _crop(x: np.ndarray, crop_height: Any, crop_width: Any) -> np.ndarray:
    """Drop ``crop_height[0]`` rows at the top and ``crop_height[1]`` at the bottom; columns alike."""
    top, bottom = as_ints(crop_height)
    left, right = as_ints(crop_width)
    return x[..., top : x.shape[-2] - bottom, left : x.shape[-1] - right]


def _pixel_coordinates(values: np.ndarray, size: int, mode: str, align_corners: bool) -> np.ndarray:
    """Coordinates in ``mode`` as positions along an input axis of ``size`` (0 is the first pixel's
    centre); with ``align_corners`` the ends of the normalized range are the corner pixels' centres,
    else their outer edges."""
    if mode == "unnormalized":
        return values
    if mode == "normalized_minus_one_to_one":
        return (values + 1) / 2 * (size - 1) if align_corners else ((values + 1) * size - 1) / 2
    if mode == "normalized_zero_to_one":
        return values * (size - 1) if align_corners else values * size - 0.5
    raise ValueError(f"unknown coordinates_mode {mode!r}; expected one of {', '.join(COORDINATES_MODES)}")


def _reflect(points: np.ndarray, low: float, high: float) -> np.ndarray:
    """``points`` folded back and forth into ``[low, high]``."""
    span = high - low
    if span <= 0:
        return np.full_like(points, low)
    folded = np.mod(np.abs(points - low), 2 * span)
    return np.where(folded > span, 2 * span - folded, folded) + low


def _padded_points(points: np.ndarray, size: int, padding_mode: str) -> np.ndarray:
    """Where each point reads from: clamped (border), reflected without the edge pixel
    (reflection), reflected with it (symmetric), or as it is (constant: read as ``padding_value``)."""
    if padding_mode == "constant":
        return points
    if padding_mode == "border":
        return np.clip(points, 0, size - 1)
    if padding_mode == "reflection":
        return _reflect(points, 0.0, size - 1.0)
    if padding_mode == "symmetric":
        return np.clip(_reflect(points, -0.5, size - 0.5), 0, size - 1)
    raise ValueError(f"unknown padding_mode {padding_mode!r}; expected one of {', '.join(RESAMPLE_PADDING_MODES)}")


def _sample(x: np.ndarray, rows: np.ndarray, cols: np.ndarray, fill: float) -> np.ndarray:
    """``x[b, :, rows, cols]`` for integer ``rows``, ``cols`` of shape ``(B, H2, W2)``; outside: ``fill``."""
    height, width = x.shape[-2:]
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    batch = np.arange(x.shape[0]).reshape(-1, 1, 1)
    values = x[batch, :, np.clip(rows, 0, height - 1), np.clip(cols, 0, width - 1)]  # (B, H2, W2, C)
    return np.moveaxis(np.where(inside[..., None], values, np.float32(fill)), -1, 1)


def resample_points(
    x: np.ndarray, rows: np.ndarray, cols: np.ndarray, sampling_mode: str, padding_mode: str, fill: float
) -> np.ndarray:
    """``x`` (B, C, H, W) read at pixel positions ``rows``, ``cols`` (B, H2, W2) -> (B, C, H2, W2)."""
    height, width = x.shape[-2:]
    rows, cols = _padded_points(rows, height, padding_mode), _padded_points(cols, width, padding_mode)
    if sampling_mode == "nearest":
        return _sample(x, np.rint(rows).astype(np.intp), np.rint(cols).astype(np.intp), fill)
    if sampling_mode != "bilinear":
        raise ValueError(
            f"unknown sampling_mode {sampling_mode!r}; expected one of {', '.join(RESAMPLE_SAMPLING_MODES)}"
        )
    top, left = np.floor(rows), np.floor(cols)
    down, right = (rows - top)[:, None], (cols - left)[:, None]
    top, left = top.astype(np.intp), left.astype(np.intp)
    upper = _sample(x, top, left, fill) * (1 - right) + _sample(x, top, left + 1, fill) * right
    lower = _sample(x, top + 1, left, fill) * (1 - right) + _sample(x, top + 1, left + 1, fill) * right
    return (upper * (1 - down) + lower * down).astype(np.float32)


@kernel("resample")
def _resample(
    x: np.ndarray,
    coordinates: np.ndarray,
    sampling_mode: Any,
    padding_mode: Any,
    padding_value: Any,
    coordinates_mode: Any,
    align_corners: Any,
) -> np.ndarray:
    """Output ``[b, c, h, w]`` is ``x[b, c]`` read at ``coordinates[b, h, w] = (x, y)`` (PyTorch's grid_sample)."""
    x = upcast(x)
    height, width = x.shape[-2:]
    mode, aligned = as_str(coordinates_mode), as_bool(align_corners)
    points = upcast(np.asarray(coordinates)).astype(np.float64)
    cols = _pixel_coordinates(points[..., 0], width, mode, aligned)
    rows = _pixel_coordinates(points[..., 1], height, mode, aligned)
    return resample_points(x, rows, cols, as_str(sampling_mode), as_str(padding_mode), float(np.asarray(padding_value)))


@kernel("affine")
def _affine(
    x: np.ndarray,
    transform_matrix: np.ndarray,
    output_height: Any,
    output_width: Any,
    sampling_mode: Any,
    padding_mode: Any,
    padding_value: Any,
    coordinates_mode: Any,
    align_corners: Any,
) -> np.ndarray:
    """``resample`` at ``(x', y') = (a0 x + a1 y + a2, b0 x + b1 y + b2)`` for each output position
    ``(x, y)`` in ``coordinates_mode`` (PyTorch's affine_grid, then grid_sample)."""
    x = upcast(x)
    mode, aligned = as_str(coordinates_mode), as_bool(align_corners)
    out_h, out_w = as_int(output_height), as_int(output_width)
    ys, xs = (_output_grid(n, mode, aligned) for n in (out_h, out_w))
    matrix = upcast(np.asarray(transform_matrix)).astype(np.float64).reshape(-1, 1, 1, 6)
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    source_x = matrix[..., 0] * grid_x + matrix[..., 1] * grid_y + matrix[..., 2]
    source_y = matrix[..., 3] * grid_x + matrix[..., 4] * grid_y + matrix[..., 5]
    batch = (x.shape[0], out_h, out_w)
    cols = _pixel_coordinates(np.broadcast_to(source_x, batch), x.shape[-1], mode, aligned)
    rows = _pixel_coordinates(np.broadcast_to(source_y, batch), x.shape[-2], mode, aligned)
    return resample_points(x, rows, cols, as_str(sampling_mode), as_str(padding_mode), float(np.asarray(padding_value)))


def _output_grid(size: int, mode: str, align_corners: bool) -> np.ndarray:
    """Each output position along an axis of ``size``, in ``mode``'s coordinates (the inverse of
    ``_pixel_coordinates``)."""
    positions = np.arange(size, dtype=np.float64)
    if mode == "unnormalized":
        return positions
    if mode == "normalized_minus_one_to_one":
        return positions * 2 / (size - 1) - 1 if align_corners and size > 1 else (2 * positions + 1) / size - 1
    if mode == "normalized_zero_to_one":
        return positions / (size - 1) if align_corners and size > 1 else (positions + 0.5) / size
    raise ValueError(f"unknown coordinates_mode {mode!r}; expected one of {', '.join(COORDINATES_MODES)}")
