"""Attention problems for tests: a plain description, the MIL program for it, inputs, a float64 reference."""

from __future__ import annotations

from typing import Optional

import attrs
import coremltools as ct
import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Program, get_new_symbol, types

NUMPY_DTYPES = {"bool": np.bool_, "fp16": np.float16, "fp32": np.float32}
MIL_DTYPES = {"bool": types.bool, "fp16": types.fp16, "fp32": types.fp32}
MASKED_FLOAT = -1e4
"""A float mask's 'masked' value; finite in fp16, and exp() of it is 0 in fp32."""
IOS18 = ct.target.iOS18


@attrs.frozen
class MaskCase:
    dtype: str
    shape: tuple[int, ...]
    """Broadcastable to the scores shape ``batch + (L, S)``; the last dim is S."""


@attrs.frozen
class AttentionCase:
    """One ``scaled_dot_product_attention`` problem."""

    batch: tuple[int, ...]
    query_length: int
    key_length: int
    head_dim: int
    value_dim: int
    dtype: str = "fp32"
    mask: Optional[MaskCase] = None
    dynamic_query: bool = False
    dynamic_key: bool = False

    @property
    def input_names(self) -> tuple[str, ...]:
        return ("q", "k", "v") + (("mask",) if self.mask else ())

    def input_specs(self) -> list:
        """Placeholders for q, k, v (and the mask), with symbolic L or S where asked."""
        query_length = get_new_symbol() if self.dynamic_query else self.query_length
        key_length = get_new_symbol() if self.dynamic_key else self.key_length
        dtype = MIL_DTYPES[self.dtype]
        specs = [
            mb.TensorSpec(self.batch + (query_length, self.head_dim), dtype=dtype),
            mb.TensorSpec(self.batch + (key_length, self.head_dim), dtype=dtype),
            mb.TensorSpec(self.batch + (key_length, self.value_dim), dtype=dtype),
        ]
        if self.mask is not None:
            mask_shape = self.mask.shape[:-1] + (key_length,)
            if self.dynamic_query and len(mask_shape) >= 2 and mask_shape[-2] != 1:
                mask_shape = mask_shape[:-2] + (query_length, key_length)
            specs.append(mb.TensorSpec(mask_shape, dtype=MIL_DTYPES[self.mask.dtype]))
        return specs

    def inputs(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        dtype = NUMPY_DTYPES[self.dtype]
        values = {
            "q": rng.standard_normal(self.batch + (self.query_length, self.head_dim)).astype(dtype),
            "k": rng.standard_normal(self.batch + (self.key_length, self.head_dim)).astype(dtype),
            "v": rng.standard_normal(self.batch + (self.key_length, self.value_dim)).astype(dtype),
        }
        if self.mask is not None:
            values["mask"] = random_mask(self.mask, rng)
        return values


def random_mask(mask: MaskCase, rng: np.random.Generator) -> np.ndarray:
    """A bool mask that keeps about 70% of keys, or a float mask with a few masked entries."""
    keep = rng.random(mask.shape) < 0.7
    if mask.dtype == "bool":
        return keep
    soft = rng.uniform(-2.0, 0.0, mask.shape)
    return np.where(keep, soft, MASKED_FLOAT).astype(NUMPY_DTYPES[mask.dtype])


def sdpa_program(case: AttentionCase, opset: ct.target = IOS18, constant_mask: Optional[np.ndarray] = None) -> Program:
    """``main(q, k, v[, mask]) -> scaled_dot_product_attention(q, k, v[, mask])``; with
    ``constant_mask``, the mask is that constant instead of an input."""
    specs = case.input_specs()
    if constant_mask is not None:

        @mb.program(input_specs=specs[:3], opset_version=opset)
        def prog(q, k, v):
            mask = mb.const(val=constant_mask, name="constant_mask")
            return mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=mask, name="attention")

    elif case.mask is None:

        @mb.program(input_specs=specs, opset_version=opset)
        def prog(q, k, v):
            return mb.scaled_dot_product_attention(query=q, key=k, value=v, name="attention")

    else:

        @mb.program(input_specs=specs, opset_version=opset)
        def prog(q, k, v, mask):
            return mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=mask, name="attention")

    return prog


def reference_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: Optional[np.ndarray] = None, scale: Optional[float] = None
) -> np.ndarray:
    """Attention in float64; a row with every key masked is NaN.

    A bool mask's False is -inf. A float mask's ``MASKED_FLOAT`` is finite, so a row masked by it
    everywhere still has values, but they depend on score differences far below the rounding of
    ``scores + MASKED_FLOAT`` in fp16 or fp32: such rows are as undefined as all-False rows.
    """
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ np.swapaxes(k, -1, -2)) * scale
    if mask is not None:
        if mask.dtype == np.bool_:
            scores = scores + np.where(mask, 0.0, -np.inf)
        else:
            scores = scores + mask.astype(np.float64)
            fully_masked = np.broadcast_to(mask <= MASKED_FLOAT, scores.shape).all(axis=-1, keepdims=True)
            scores = np.where(fully_masked, -np.inf, scores)
    with np.errstate(invalid="ignore"):
        scores = scores - scores.max(axis=-1, keepdims=True)
        weights = np.exp(scores)
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights @ v


def tolerance(dtype: str) -> float:
    """Relative tolerance of attention computed in ``dtype`` against float64."""
    return {"fp32": 1e-5, "fp16": 5e-3}[dtype]


def assert_attention_close(actual: np.ndarray, expected: np.ndarray, dtype: str) -> None:
    """Close within the dtype's tolerance, relative to the output's magnitude; rows that are
    NaN in ``expected`` (every key masked) must be finite in ``actual``."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    actual = actual.astype(np.float64)
    undefined = np.isnan(expected)
    assert np.isfinite(actual).all(), "rewritten attention produced NaN or inf"
    defined = ~undefined
    if not defined.any():
        return
    rtol = tolerance(dtype)
    scale = max(1.0, float(np.abs(expected[defined]).max()))
    np.testing.assert_allclose(actual[defined], expected[defined], rtol=rtol, atol=rtol * scale)


UNSLICED_RELATIVE = {"fp32": 1e-5, "fp16": 1e-2}
"""Allowed difference between a sliced and the unsliced program, relative to an output's
magnitude: fp16 programs round every op's result, and the two round at different places."""


def assert_close_to_unsliced(actual: np.ndarray, expected: np.ndarray, dtype: str, what: str = "") -> None:
    """``actual`` (a sliced program's output) equals ``expected`` (the unsliced one's) within
    ``UNSLICED_RELATIVE``, with the same shape, dtype and finiteness."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    np.testing.assert_array_equal(np.isfinite(actual), np.isfinite(expected), err_msg=f"{what}: finite where")
    rtol = UNSLICED_RELATIVE[dtype]
    scale = max(1.0, float(np.abs(expected.astype(np.float64)).max(initial=0.0)))
    np.testing.assert_allclose(
        actual.astype(np.float64), expected.astype(np.float64), rtol=rtol, atol=rtol * scale, err_msg=what
    )
