"""``conv`` and ``conv_transpose`` (no value inference in coremltools) against their documented
formulas, written as direct sums over each output (or input) position in float64."""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from interpreter.kernels._oracle import SEEDS, check_against_formula, random_array, run

FLOAT_DTYPES = (np.float16, np.float32)
CONV_PAD_TYPES = ("valid", "same", "same_lower", "custom")
TRANSPOSE_PAD_TYPES = ("valid", "same", "custom")


def _int32(values: Any) -> np.ndarray:
    return np.array(values, dtype=np.int32)


def _extent(kernel: int, dilation: int) -> int:
    return (kernel - 1) * dilation + 1


def _documented_pads(
    pad_type: str, sizes: tuple[int, ...], kernel: tuple[int, ...], strides: tuple[int, ...], dilations, pad
) -> list[tuple[int, int]]:
    """The conv docs: same pads ``max(0, s * ceil(D / s) - D + K - s)``, the odd one after (before for same_lower)."""
    if pad_type == "valid":
        return [(0, 0)] * len(sizes)
    if pad_type == "custom":
        return [(pad[2 * i], pad[2 * i + 1]) for i in range(len(sizes))]
    pads = []
    for d, k, s, dil in zip(sizes, kernel, strides, dilations):
        total = max(0, s * math.ceil(d / s) - d + _extent(k, dil) - s)
        small, large = total // 2, total - total // 2
        pads.append((small, large) if pad_type == "same" else (large, small))
    return pads


def conv_formula(x, weight, bias, strides, pads, dilations, groups) -> np.ndarray:
    """``out[n, o, y] = bias[o] + sum_{c, k} w[o, c, k] x_padded[n, g(o) * C_g + c, y * s + k * d]``."""
    x = np.pad(x.astype(np.float64), [(0, 0), (0, 0), *pads])
    w = weight.astype(np.float64)
    batch, channels = x.shape[:2]
    per_group_in, per_group_out = channels // groups, w.shape[0] // groups
    kernel = w.shape[2:]
    outs = [(n - _extent(k, d)) // s + 1 for n, k, d, s in zip(x.shape[2:], kernel, dilations, strides)]
    out = np.zeros([batch, w.shape[0], *outs])
    for y in np.ndindex(*outs):
        window = x[
            (slice(None), slice(None))
            + tuple(slice(i * s, i * s + _extent(k, d), d) for i, s, k, d in zip(y, strides, kernel, dilations))
        ]
        for g in range(groups):
            inputs = window[:, g * per_group_in : (g + 1) * per_group_in]
            filters = w[g * per_group_out : (g + 1) * per_group_out]
            out[(slice(None), slice(g * per_group_out, (g + 1) * per_group_out)) + y] = np.tensordot(
                inputs, filters, axes=(list(range(1, inputs.ndim)), list(range(1, filters.ndim)))
            )
    if bias is not None:
        out += bias.astype(np.float64).reshape([1, -1] + [1] * len(outs))
    return out


@st.composite
def conv_cases(draw: st.DrawFn, transposed: bool) -> dict[str, Any]:
    rank = draw(st.integers(1, 3), label="spatial dims")
    groups = draw(st.integers(1, 3), label="groups")
    per_group_in, per_group_out = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    max_side = 6 if rank < 3 else 4
    sizes = tuple(draw(st.lists(st.integers(1, max_side), min_size=rank, max_size=rank)))
    kernel = tuple(draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank)))
    strides = tuple(draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank)))
    dilations = tuple(draw(st.lists(st.integers(1, 2), min_size=rank, max_size=rank)))
    pad_type = draw(st.sampled_from(TRANSPOSE_PAD_TYPES if transposed else CONV_PAD_TYPES))
    pad = tuple(draw(st.lists(st.integers(0, 2), min_size=2 * rank, max_size=2 * rank)))
    return dict(
        batch=draw(st.integers(1, 2)),
        groups=groups,
        channels_in=groups * per_group_in,
        channels_out=groups * per_group_out,
        sizes=sizes,
        kernel=kernel,
        strides=strides,
        dilations=dilations,
        pad_type=pad_type,
        pad=pad,
        with_bias=draw(st.booleans()),
    )


def _attributes(case: dict[str, Any], weight: np.ndarray, bias: Optional[np.ndarray]) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "weight": weight,
        "strides": _int32(case["strides"]),
        "dilations": _int32(case["dilations"]),
        "pad_type": case["pad_type"],
        "groups": np.int32(case["groups"]),
    }
    if case["pad_type"] == "custom":
        attributes["pad"] = _int32(case["pad"])
    if bias is not None:
        attributes["bias"] = bias
    return attributes


@given(dtype=st.sampled_from(FLOAT_DTYPES), case=conv_cases(transposed=False), seed=SEEDS)
def test_conv_matches_formula(dtype: Any, case: dict[str, Any], seed: int) -> None:
    pads = _documented_pads(
        case["pad_type"], case["sizes"], case["kernel"], case["strides"], case["dilations"], case["pad"]
    )
    assume(
        all(
            n + a + b >= _extent(k, d)
            for n, (a, b), k, d in zip(case["sizes"], pads, case["kernel"], case["dilations"])
        )
    )
    rng = np.random.default_rng(seed)
    x = random_array(rng, (case["batch"], case["channels_in"], *case["sizes"]), dtype)
    weight = random_array(rng, (case["channels_out"], case["channels_in"] // case["groups"], *case["kernel"]), dtype)
    bias = random_array(rng, (case["channels_out"],), dtype) if case["with_bias"] else None
    expected = conv_formula(x, weight, bias, case["strides"], pads, case["dilations"], case["groups"])
    check_against_formula("conv", {"x": x}, expected, _attributes(case, weight, bias), _sum_tolerance(x, weight))


def _sum_tolerance(x: np.ndarray, weight: np.ndarray) -> tuple[float, float]:
    """Sums of products: fp32 rounding grows with the terms; fp16 adds its final rounding."""
    terms = weight[0].size
    scale = float(np.abs(x).max() * np.abs(weight).max()) * terms
    if x.dtype == np.float16:
        return 1e-3, 1e-3 * scale
    return 2e-5, 1e-6 * scale


def conv_transpose_formula(x, weight, bias, strides, dilations, groups, pad_type, pad, output_sizes) -> np.ndarray:
    """``full[n, o, i * s + k * d] += x[n, c, i] w[c, o - g(c) * C_out_g, k]``; the output is ``full``
    from the leading pad on (custom: ``pad[2i]``; same: half the excess, the odd row cut at the end)."""
    x64, w = x.astype(np.float64), weight.astype(np.float64)
    batch, channels = x.shape[:2]
    per_group_in, per_group_out = channels // groups, w.shape[1]
    kernel, sizes = w.shape[2:], x.shape[2:]
    full_sizes = [(n - 1) * s + _extent(k, d) for n, s, k, d in zip(sizes, strides, kernel, dilations)]
    full = np.zeros([batch, per_group_out * groups, *full_sizes])
    for i in np.ndindex(*sizes):
        for k in np.ndindex(*kernel):
            y = tuple(a * s + b * d for a, s, b, d in zip(i, strides, k, dilations))
            for c in range(channels):
                g = c // per_group_in
                full[(slice(None), slice(g * per_group_out, (g + 1) * per_group_out)) + y] += (
                    x64[(slice(None), c) + i][:, None] * w[(c, slice(None)) + k][None, :]
                )
    if pad_type == "custom":
        leading = [pad[2 * r] for r in range(len(sizes))]
    elif pad_type == "same":
        leading = [max(0, f - o) // 2 for f, o in zip(full_sizes, output_sizes)]
    else:
        leading = [0] * len(sizes)
    out = np.zeros([batch, full.shape[1], *output_sizes])
    kept = tuple(slice(0, max(0, min(o, f - lead))) for o, f, lead in zip(output_sizes, full_sizes, leading))
    out[(slice(None), slice(None)) + kept] = full[
        (slice(None), slice(None)) + tuple(slice(lead, lead + k.stop) for lead, k in zip(leading, kept))
    ]
    if bias is not None:
        out += bias.astype(np.float64).reshape([1, -1] + [1] * len(sizes))
    return out


def _transposed_output_sizes(case: dict[str, Any]) -> list[int]:
    """The sizes the conv_transpose docs give: valid ``(D - 1) s + K_eff``, same ``D s``, custom minus the pads."""
    sizes = []
    for r, (n, s, k, d) in enumerate(zip(case["sizes"], case["strides"], case["kernel"], case["dilations"])):
        full = (n - 1) * s + _extent(k, d)
        if case["pad_type"] == "same":
            sizes.append(n * s)
        elif case["pad_type"] == "custom":
            sizes.append(full - case["pad"][2 * r] - case["pad"][2 * r + 1])
        else:
            sizes.append(full)
    return sizes


@given(dtype=st.sampled_from(FLOAT_DTYPES), case=conv_cases(transposed=True), seed=SEEDS)
def test_conv_transpose_matches_formula(dtype: Any, case: dict[str, Any], seed: int) -> None:
    output_sizes = _transposed_output_sizes(case)
    assume(all(size > 0 for size in output_sizes))
    rng = np.random.default_rng(seed)
    x = random_array(rng, (case["batch"], case["channels_in"], *case["sizes"]), dtype)
    weight = random_array(rng, (case["channels_in"], case["channels_out"] // case["groups"], *case["kernel"]), dtype)
    bias = random_array(rng, (case["channels_out"],), dtype) if case["with_bias"] else None
    expected = conv_transpose_formula(
        x, weight, bias, case["strides"], case["dilations"], case["groups"], case["pad_type"], case["pad"], output_sizes
    )
    check_against_formula(
        "conv_transpose", {"x": x}, expected, _attributes(case, weight, bias), _sum_tolerance(x, weight)
    )


@pytest.mark.parametrize("pad_type", ["valid", "same", "custom"])
def test_conv_transpose_with_an_output_shape_keeps_the_leading_pad_and_fills_the_rest_with_zeros(pad_type: str) -> None:
    """PyTorch's ``output_padding``: the output is longer than the formula's, the extra rows at the end."""
    rng = np.random.default_rng(0)
    x = random_array(rng, (1, 2, 3), np.float32)
    weight = random_array(rng, (2, 1, 3), np.float32)
    case = dict(strides=(2,), dilations=(1,), groups=1, pad_type=pad_type, pad=(1, 1), sizes=(3,), kernel=(3,))
    attributes = _attributes(case, weight, None)
    attributes["output_shape"] = _int32([1, 1, 8])
    expected = conv_transpose_formula(x, weight, None, (2,), (1,), 1, pad_type, (1, 1), [8])
    check_against_formula("conv_transpose", {"x": x}, expected, attributes)


def test_a_kernel_larger_than_the_padded_input_is_refused_by_coremltools_before_the_kernel_runs() -> None:
    with pytest.raises(ValueError, match="invalid output size"):
        run("conv", {"x": np.zeros((1, 1, 2), np.float32)}, {"weight": np.zeros((1, 1, 3), np.float32)})
