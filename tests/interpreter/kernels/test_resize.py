"""Image resizing kernels (no value inference in coremltools) against the documented sampling
grids, point by point in float64, and against the outputs coremltools' own op tests expect from
Core ML."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from interpreter.kernels._oracle import SEEDS, check_against_formula, random_array

FLOAT_DTYPES = (np.float16, np.float32)
SAMPLING_MODES = ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS", "DEFAULT", "OFFSET_CORNERS", "UNALIGN_CORNERS")
images = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 5), st.integers(1, 5))


def grid_point(i: int, size_in: int, size_out: int, mode: str) -> float:
    """``resize_bilinear``'s Notes, one grid point, clipped to ``[0, size_in - 1]``."""
    if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS"):
        if size_out == 1:
            point = (size_in - 1) / 2 if mode == "ALIGN_CORNERS" else 0.0
        else:
            point = i * (size_in - 1) / (size_out - 1)
    elif mode == "DEFAULT":
        point = i * (size_in - size_in / size_out) / (size_out - 1) if size_out > 1 else 0.0
    elif mode == "OFFSET_CORNERS":
        delta = max(1, size_in - 1) / size_out
        point = 0.5 * delta + i * delta
    else:
        spacing = size_in / size_out
        point = i * spacing + 0.5 * spacing - 0.5
    return min(size_in - 1, max(0.0, point))


def bilinear_formula(x: np.ndarray, rows: list[float], cols: list[float]) -> np.ndarray:
    """Each output blends the four input positions around its (row, column) grid point."""
    x = x.astype(np.float64)
    height, width = x.shape[-2:]
    out = np.zeros(x.shape[:-2] + (len(rows), len(cols)))
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            r0, c0 = math.floor(r), math.floor(c)
            r1, c1 = min(r0 + 1, height - 1), min(c0 + 1, width - 1)
            dr, dc = r - r0, c - c0
            out[..., i, j] = (
                x[..., r0, c0] * (1 - dr) * (1 - dc)
                + x[..., r0, c1] * (1 - dr) * dc
                + x[..., r1, c0] * dr * (1 - dc)
                + x[..., r1, c1] * dr * dc
            )
    return out


@given(
    dtype=st.sampled_from(FLOAT_DTYPES),
    shape=images,
    target=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    mode=st.sampled_from(SAMPLING_MODES),
    seed=SEEDS,
)
def test_resize_bilinear_matches_the_documented_grid(dtype: Any, shape, target, mode: str, seed: int) -> None:
    x = random_array(np.random.default_rng(seed), shape, dtype)
    rows = [grid_point(i, shape[-2], target[0], mode) for i in range(target[0])]
    cols = [grid_point(j, shape[-1], target[1], mode) for j in range(target[1])]
    attributes = {"target_size_height": target[0], "target_size_width": target[1], "sampling_mode": mode}
    check_against_formula("resize_bilinear", {"x": x}, bilinear_formula(x, rows, cols), attributes)


@given(
    dtype=st.sampled_from(FLOAT_DTYPES),
    shape=images,
    scales=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    align_corners=st.booleans(),
    half_pixel_centers=st.sampled_from([None, False, True]),
    seed=SEEDS,
)
def test_upsample_bilinear_matches_the_documented_grid(
    dtype: Any, shape, scales, align_corners: bool, half_pixel_centers, seed: int
) -> None:
    """align_corners samples as STRICT_ALIGN_CORNERS, half_pixel_centers (default: not align_corners)
    as UNALIGN_CORNERS, neither as DEFAULT; the scale is recomputed from the sizes."""
    if align_corners and half_pixel_centers:
        half_pixel_centers = False  # coremltools refuses both
    half = not align_corners if half_pixel_centers is None else half_pixel_centers
    mode = "STRICT_ALIGN_CORNERS" if align_corners else "UNALIGN_CORNERS" if half else "DEFAULT"
    x = random_array(np.random.default_rng(seed), shape, dtype)
    out_h, out_w = shape[-2] * scales[0], shape[-1] * scales[1]
    rows = [grid_point(i, shape[-2], out_h, mode) for i in range(out_h)]
    cols = [grid_point(j, shape[-1], out_w, mode) for j in range(out_w)]
    attributes: dict[str, Any] = {
        "scale_factor_height": scales[0],
        "scale_factor_width": scales[1],
        "align_corners": align_corners,
    }
    if half_pixel_centers is not None:
        attributes["half_pixel_centers"] = half_pixel_centers
    check_against_formula("upsample_bilinear", {"x": x}, bilinear_formula(x, rows, cols), attributes)


# resize_bilinear's Notes: the grid points for an input [0, 1] are the outputs themselves.
DOCUMENTED_GRIDS = [
    (5, "UNALIGN_CORNERS", [0.0, 0.1, 0.5, 0.9, 1.0]),
    (5, "STRICT_ALIGN_CORNERS", [0.0, 0.25, 0.5, 0.75, 1.0]),
    (5, "ALIGN_CORNERS", [0.0, 0.25, 0.5, 0.75, 1.0]),
    (5, "DEFAULT", [0.0, 0.4, 0.8, 1.0, 1.0]),
    (5, "OFFSET_CORNERS", [0.1, 0.3, 0.5, 0.7, 0.9]),
    (6, "UNALIGN_CORNERS", [0.0, 0.0, 1 / 3, 2 / 3, 1.0, 1.0]),
    (6, "STRICT_ALIGN_CORNERS", [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
    (6, "DEFAULT", [0.0, 1 / 3, 2 / 3, 1.0, 1.0, 1.0]),
    (6, "OFFSET_CORNERS", [1 / 12, 0.25, 5 / 12, 7 / 12, 0.75, 11 / 12]),
]


@pytest.mark.parametrize("size, mode, grid", DOCUMENTED_GRIDS)
def test_resize_bilinear_gives_the_grids_of_its_documentation(size: int, mode: str, grid: list[float]) -> None:
    x = np.array([0.0, 1.0], dtype=np.float32).reshape(1, 1, 1, 2)
    attributes = {"target_size_height": 1, "target_size_width": size, "sampling_mode": mode}
    check_against_formula("resize_bilinear", {"x": x}, np.array(grid).reshape(1, 1, 1, size), attributes)


@given(
    dtype=st.sampled_from(FLOAT_DTYPES),
    shape=images,
    scales=st.tuples(st.sampled_from([1, 2, 3, 0.5, 1.5, 2.5]), st.sampled_from([1, 2, 0.5, 1.5])),
    seed=SEEDS,
)
def test_upsample_nearest_neighbor_takes_input_floor_of_i_over_the_scale(dtype: Any, shape, scales, seed: int) -> None:
    x = random_array(np.random.default_rng(seed), shape, dtype)
    rows = [min(shape[-2] - 1, math.floor(i / scales[0])) for i in range(math.floor(shape[-2] * scales[0]))]
    cols = [min(shape[-1] - 1, math.floor(j / scales[1])) for j in range(math.floor(shape[-1] * scales[1]))]
    attributes = {"scale_factor_height": np.float32(scales[0]), "scale_factor_width": np.float32(scales[1])}
    check_against_formula("upsample_nearest_neighbor", {"x": x}, x[..., rows, :][..., cols], attributes)


@given(
    dtype=st.sampled_from(FLOAT_DTYPES),
    shape=images,
    target=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    seed=SEEDS,
)
def test_resize_nearest_neighbor_takes_input_floor_of_i_times_size_over_target(
    dtype: Any, shape, target, seed: int
) -> None:
    x = random_array(np.random.default_rng(seed), shape, dtype)
    rows = [i * shape[-2] // target[0] for i in range(target[0])]
    cols = [j * shape[-1] // target[1] for j in range(target[1])]
    attributes = {"target_size_height": target[0], "target_size_width": target[1]}
    check_against_formula("resize_nearest_neighbor", {"x": x}, x[..., rows, :][..., cols], attributes)


def test_resize_gives_what_coremltools_tests_expect_from_core_ml() -> None:
    """coremltools' iOS17 ``resize`` tests: nearest neighbour rounds each DEFAULT grid point to the
    nearest input position; linear interpolates along the last dims only."""
    nearest = np.array([-6.174, 9.371], dtype=np.float32).reshape(1, 1, 1, 2, 1)
    check_against_formula(
        "resize",
        {"x": nearest},
        np.array([-6.174, -6.174, 9.371, 9.371, 9.371, 9.371]).reshape(1, 1, 1, 3, 2),
        {
            "shape": np.array([1, 1, 3, 2], np.int32),
            "resized_dims": np.uint32(2),
            "interpolation_mode": "NEAREST_NEIGHBOR",
        },
    )
    linear = np.array([0.0, 1.0], dtype=np.float32).reshape(1, 1, 2)
    check_against_formula(
        "resize",
        {"x": linear},
        np.array([0, 0.4, 0.8, 1, 1]).reshape(1, 1, 5),
        {"shape": np.array([5], np.int32), "resized_dims": np.uint32(1), "interpolation_mode": "LINEAR"},
    )


@pytest.mark.parametrize("mode", SAMPLING_MODES)
def test_resize_linear_of_the_last_two_dims_is_resize_bilinear(mode: str) -> None:
    x = random_array(np.random.default_rng(0), (1, 2, 3, 4), np.float32)
    rows = [grid_point(i, 3, 5, mode) for i in range(5)]
    cols = [grid_point(j, 4, 7, mode) for j in range(7)]
    attributes = {"shape": np.array([5, 7], np.int32), "resized_dims": np.uint32(2), "sampling_mode": mode}
    check_against_formula("resize", {"x": x}, bilinear_formula(x, rows, cols), attributes)


IMAGE_4X4 = np.arange(1, 17, dtype=np.float32).reshape(1, 1, 4, 4)
CROP_RESIZE_CASES = [
    ({"boxes": np.array([[1, 1, 2, 2]], np.float32)}, [6, 7, 10, 11], (1, 1, 2, 2)),
    (
        {
            "boxes": np.array([[0.1, 0.3, 1.3, 1.0], [0.5, 1.8, 1.0, 0.3], [0.0, 0.4, 0.6, 0.7]], np.float32),
            "box_indices": np.zeros(3, np.int32),
            "normalized_coordinates": True,
        },
        [3.1, 5.2, 10.0, 10.0, 10.0, 7.899, 10.0, 13.9, 2.2, 3.1, 9.4, 10.3],
        (3, 1, 2, 2),
    ),
]
"""coremltools' iOS17 ``crop_resize`` test: its boxes, and the outputs it expects from Core ML."""


@pytest.mark.parametrize("boxes, expected, shape", CROP_RESIZE_CASES)
def test_crop_resize_gives_what_coremltools_tests_expect_from_core_ml(boxes: dict, expected, shape) -> None:
    """ALIGN_CORNERS over each box; grid points outside the image take pad_value (10)."""
    attributes = {
        "target_height": 2,
        "target_width": 2,
        "box_coordinate_mode": "CORNERS_HEIGHT_FIRST",
        "sampling_mode": "ALIGN_CORNERS",
        "pad_value": np.float32(10.0),
        **boxes,
    }
    check_against_formula("crop_resize", {"x": IMAGE_4X4}, np.array(expected).reshape(shape), attributes, (1e-3, 1e-6))


@pytest.mark.parametrize(
    "mode, box",
    [
        ("CORNERS_WIDTH_FIRST", [0.5, 1.0, 3.0, 2.5]),
        ("CENTER_SIZE_HEIGHT_FIRST", [1.75, 1.75, 1.5, 2.5]),
        ("CENTER_SIZE_WIDTH_FIRST", [1.75, 1.75, 2.5, 1.5]),
    ],
)
def test_every_box_coordinate_mode_names_the_same_box(mode: str, box: list[float]) -> None:
    """The box rows 1 to 2.5, columns 0.5 to 3, in each convention, sampled like resize_bilinear over it."""
    x = random_array(np.random.default_rng(0), (1, 2, 4, 4), np.float32)
    rows = [1.0 + grid_point(i, 2.5, 3, "UNALIGN_CORNERS") for i in range(3)]
    cols = [0.5 + grid_point(j, 3.5, 4, "UNALIGN_CORNERS") for j in range(4)]
    attributes = {
        "boxes": np.array([box], np.float32),
        "target_height": 3,
        "target_width": 4,
        "box_coordinate_mode": mode,
        "sampling_mode": "UNALIGN_CORNERS",
    }
    check_against_formula("crop_resize", {"x": x}, bilinear_formula(x[0], rows, cols)[None], attributes)


@given(dtype=st.sampled_from(FLOAT_DTYPES), shape=images, data=st.data(), seed=SEEDS)
def test_crop_drops_rows_and_columns_from_each_side(dtype: Any, shape, data: st.DataObject, seed: int) -> None:
    top = data.draw(st.integers(0, shape[-2] - 1))
    bottom = data.draw(st.integers(0, shape[-2] - 1 - top))
    left = data.draw(st.integers(0, shape[-1] - 1))
    right = data.draw(st.integers(0, shape[-1] - 1 - left))
    x = random_array(np.random.default_rng(seed), shape, dtype)
    attributes = {"crop_height": np.array([top, bottom], np.int32), "crop_width": np.array([left, right], np.int32)}
    expected = x[..., top : shape[-2] - bottom, left : shape[-1] - right]
    check_against_formula("crop", {"x": x}, expected, attributes)


RESAMPLE_ATTRIBUTES = {"sampling_mode": "nearest", "padding_value": np.float32(0.0), "align_corners": True}
DOCUMENTED_PADDING = {
    "constant": [0, 0, 0, 1, 2, 3, 0, 0, 0],
    "border": [1, 1, 1, 1, 2, 3, 3, 3, 3],
    "reflection": [2, 3, 2, 1, 2, 3, 2, 1, 2],
    "symmetric": [3, 2, 1, 1, 2, 3, 3, 2, 1],
}
"""resample's documentation: the row |1, 2, 3| read from 3 pixels before it to 3 after it."""


@pytest.mark.parametrize("padding_mode", sorted(DOCUMENTED_PADDING))
def test_resample_pads_as_its_documentation_shows(padding_mode: str) -> None:
    x = np.array([1, 2, 3], dtype=np.float32).reshape(1, 1, 1, 3)
    columns = np.arange(-3, 6, dtype=np.float32)
    coordinates = np.stack([columns, np.zeros_like(columns)], axis=-1).reshape(1, 1, 9, 2)
    attributes = {**RESAMPLE_ATTRIBUTES, "padding_mode": padding_mode, "coordinates_mode": "unnormalized"}
    expected = np.array(DOCUMENTED_PADDING[padding_mode], dtype=np.float64).reshape(1, 1, 1, 9)
    check_against_formula("resample", {"x": x, "coordinates": coordinates}, expected, attributes)


def _normalized(points: np.ndarray, size: int, mode: str, align_corners: bool) -> np.ndarray:
    """Pixel positions in ``mode``: align_corners maps the corner pixels' centres to the range's ends."""
    if mode == "unnormalized":
        return points
    low, high = (0.0, size - 1.0) if align_corners else (-0.5, size - 0.5)
    unit = (points - low) / (high - low) if high > low else np.zeros_like(points)
    return unit * 2 - 1 if mode == "normalized_minus_one_to_one" else unit


@given(
    dtype=st.sampled_from(FLOAT_DTYPES),
    shape=images,
    points=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    coordinates_mode=st.sampled_from(["unnormalized", "normalized_minus_one_to_one", "normalized_zero_to_one"]),
    align_corners=st.booleans(),
    seed=SEEDS,
)
def test_resample_bilinear_reads_each_point_between_its_four_neighbours(
    dtype: Any, shape, points, coordinates_mode: str, align_corners: bool, seed: int
) -> None:
    """Points inside the image, given in every coordinate mode, blend the pixels around them."""
    rng = np.random.default_rng(seed)
    x = random_array(rng, shape, dtype)
    height, width = shape[-2:]
    rows = rng.uniform(0, height - 1, size=(shape[0],) + points)
    cols = rng.uniform(0, width - 1, size=(shape[0],) + points)
    coordinates = np.stack(
        [
            _normalized(cols, width, coordinates_mode, align_corners),
            _normalized(rows, height, coordinates_mode, align_corners),
        ],
        axis=-1,
    ).astype(dtype)
    # The points as the kernel sees them, after the coordinates' rounding to their dtype.
    rows = _pixels(coordinates[..., 1], height, coordinates_mode, align_corners)
    cols = _pixels(coordinates[..., 0], width, coordinates_mode, align_corners)
    expected = np.stack(
        [
            np.stack([bilinear_point(x[b], r, c) for r, c in zip(rows[b].ravel(), cols[b].ravel())], axis=-1).reshape(
                (shape[1],) + points
            )
            for b in range(shape[0])
        ]
    )
    attributes = {
        "sampling_mode": "bilinear",
        "padding_mode": "border",
        "padding_value": dtype(0.0),
        "coordinates_mode": coordinates_mode,
        "align_corners": align_corners,
    }
    check_against_formula("resample", {"x": x, "coordinates": coordinates}, expected, attributes, (1e-3, 1e-3))


def _pixels(values: np.ndarray, size: int, mode: str, align_corners: bool) -> np.ndarray:
    values = values.astype(np.float64)
    if mode == "unnormalized":
        points = values
    else:
        unit = (values + 1) / 2 if mode == "normalized_minus_one_to_one" else values
        low, high = (0.0, size - 1.0) if align_corners else (-0.5, size - 0.5)
        points = low + unit * (high - low)
    return np.clip(points, 0, size - 1)


def bilinear_point(image: np.ndarray, row: float, col: float) -> np.ndarray:
    """``image`` (C, H, W) at one point, from the four pixels around it."""
    return bilinear_formula(image[None], [row], [col])[0, :, 0, 0]


@pytest.mark.parametrize("align_corners", [True, False])
def test_affine_with_the_identity_matrix_gives_the_image_back(align_corners: bool) -> None:
    x = random_array(np.random.default_rng(0), (2, 3, 4, 5), np.float32)
    attributes = {
        "transform_matrix": np.array([[1, 0, 0, 0, 1, 0]], np.float32),
        "output_height": 4,
        "output_width": 5,
        "sampling_mode": "bilinear",
        "padding_mode": "constant",
        "padding_value": np.float32(0.0),
        "coordinates_mode": "normalized_minus_one_to_one",
        "align_corners": align_corners,
    }
    check_against_formula("affine", {"x": x}, x, attributes)
