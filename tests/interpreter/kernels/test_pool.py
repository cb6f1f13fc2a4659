"""``avg_pool``, ``max_pool`` and ``l2_pool`` (no value inference in coremltools) against their
documented formulas, one window at a time in float64."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from hypothesis import assume, given
from hypothesis import strategies as st

from interpreter.kernels._oracle import SEEDS, check_against_formula, random_array

FLOAT_DTYPES = (np.float16, np.float32)
PAD_TYPES = ("valid", "same", "same_lower", "custom")


def _pads(pad_type: str, sizes, kernel, strides, pad) -> list[tuple[int, int]]:
    if pad_type == "valid":
        return [(0, 0)] * len(sizes)
    if pad_type == "custom":
        return [(pad[2 * i], pad[2 * i + 1]) for i in range(len(sizes))]
    pads = []
    for d, k, s in zip(sizes, kernel, strides):
        total = max(0, s * math.ceil(d / s) - d + k - s)
        pads.append((total // 2, total - total // 2) if pad_type == "same" else (total - total // 2, total // 2))
    return pads


def _out_size(size: int, pads: tuple[int, int], kernel: int, stride: int, ceil_mode: bool) -> int:
    """The avg_pool docs: floor (or ceil) of the window count; in ceil mode no window starting in the trailing pad."""
    total = size + sum(pads) - kernel
    if not ceil_mode:
        return total // stride + 1
    out = -(-total // stride) + 1
    return out - 1 if (out - 1) * stride >= size + pads[0] and sum(pads) > 0 else out


def pool_formula(x: np.ndarray, kind: str, kernel, strides, pads, ceil_mode: bool, exclude_padding: bool) -> np.ndarray:
    """Each window starts at ``y * s - pad_before``: max over its input positions, sum of squares'
    root, or the sum over its count (input and padding positions up to the padded end, or input alone)."""
    x = x.astype(np.float64)
    sizes = x.shape[2:]
    outs = [_out_size(n, p, k, s, ceil_mode) for n, p, k, s in zip(sizes, pads, kernel, strides)]
    out = np.zeros(x.shape[:2] + tuple(outs))
    for y in np.ndindex(*outs):
        starts = [i * s - p[0] for i, s, p in zip(y, strides, pads)]
        inside = tuple(slice(max(0, a), min(n, a + k)) for a, n, k in zip(starts, sizes, kernel))
        window = x[(slice(None), slice(None)) + inside]
        axes = tuple(range(2, x.ndim))
        if kind == "max_pool":
            value = window.max(axis=axes)
        elif kind == "l2_pool":
            value = np.sqrt(np.square(window).sum(axis=axes))
        else:
            if exclude_padding:
                count = math.prod(w.stop - w.start for w in inside)
            else:
                count = math.prod(min(n + p[1], a + k) - a for a, n, p, k in zip(starts, sizes, pads, kernel))
            value = window.sum(axis=axes) / count
        out[(slice(None), slice(None)) + y] = value
    return out


@st.composite
def pool_cases(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    rank = draw(st.integers(1, 2 if kind == "l2_pool" else 3))
    sizes = tuple(draw(st.lists(st.integers(1, 6), min_size=rank, max_size=rank)))
    kernel = tuple(draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank)))
    strides = tuple(draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank)))
    pad_type = draw(st.sampled_from(PAD_TYPES))
    # ceil_mode wants symmetric custom pads, 1 or 2 spatial dims and no same padding.
    ceil_mode = rank <= 2 and pad_type in ("valid", "custom") and draw(st.booleans())
    halves = draw(st.lists(st.integers(0, 1), min_size=rank, max_size=rank))
    pad = (
        tuple(v for h in halves for v in (h, h))
        if ceil_mode
        else tuple(draw(st.lists(st.integers(0, 1), min_size=2 * rank, max_size=2 * rank)))
    )
    return dict(
        shape=(draw(st.integers(1, 2)), draw(st.integers(1, 3)), *sizes),
        kernel=kernel,
        strides=strides,
        pad_type=pad_type,
        pad=pad,
        ceil_mode=ceil_mode,
        exclude_padding=draw(st.booleans()),
    )


def _check_pool(kind: str, dtype: Any, case: dict[str, Any], seed: int) -> None:
    sizes = case["shape"][2:]
    pads = _pads(case["pad_type"], sizes, case["kernel"], case["strides"], case["pad"])
    # A window must fit the padded input and hold an input position (padding alone has no max):
    # coremltools' ceil-mode shape keeps a last window past an unpadded input, see docs/numerics.md.
    assume(all(k > max(p) and n + sum(p) >= k for n, p, k in zip(sizes, pads, case["kernel"])))
    outs = [
        _out_size(n, p, k, s, case["ceil_mode"]) for n, p, k, s in zip(sizes, pads, case["kernel"], case["strides"])
    ]
    assume(all((o - 1) * s - p[0] < n for o, s, p, n in zip(outs, case["strides"], pads, sizes)))
    x = random_array(np.random.default_rng(seed), case["shape"], dtype)
    attributes: dict[str, Any] = {
        "kernel_sizes": np.array(case["kernel"], np.int32),
        "strides": np.array(case["strides"], np.int32),
        "pad_type": case["pad_type"],
        "ceil_mode": case["ceil_mode"],
    }
    if case["pad_type"] == "custom":
        attributes["pad"] = np.array(case["pad"], np.int32)
    if kind == "avg_pool":
        attributes["exclude_padding_from_average"] = case["exclude_padding"]
    expected = pool_formula(x, kind, case["kernel"], case["strides"], pads, case["ceil_mode"], case["exclude_padding"])
    check_against_formula(kind, {"x": x}, expected, attributes)


@given(dtype=st.sampled_from(FLOAT_DTYPES), case=pool_cases("max_pool"), seed=SEEDS)
def test_max_pool_matches_formula(dtype: Any, case: dict[str, Any], seed: int) -> None:
    _check_pool("max_pool", dtype, case, seed)


@given(dtype=st.sampled_from(FLOAT_DTYPES), case=pool_cases("avg_pool"), seed=SEEDS)
def test_avg_pool_matches_formula(dtype: Any, case: dict[str, Any], seed: int) -> None:
    _check_pool("avg_pool", dtype, case, seed)


@given(dtype=st.sampled_from(FLOAT_DTYPES), case=pool_cases("l2_pool"), seed=SEEDS)
def test_l2_pool_matches_formula(dtype: Any, case: dict[str, Any], seed: int) -> None:
    _check_pool("l2_pool", dtype, case, seed)


def test_a_ceil_mode_window_past_the_padding_averages_only_what_it_covers() -> None:
    """PyTorch's avg_pool2d(ceil_mode=True, count_include_pad=True): [0..4], k=2, s=2, pad 1 ->
    windows (pad, 0), (1, 2), (3, 4), and none starting in the trailing pad."""
    x = np.arange(5, dtype=np.float32).reshape(1, 1, 5)
    attributes = {
        "kernel_sizes": np.array([2], np.int32),
        "strides": np.array([2], np.int32),
        "pad_type": "custom",
        "pad": np.array([1, 1], np.int32),
        "ceil_mode": True,
    }
    check_against_formula("avg_pool", {"x": x}, np.array([[[0.0, 1.5, 3.5]]]), attributes)
