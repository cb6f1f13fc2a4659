"""``scaled_dot_product_attention`` against coremltools' value inference and PyTorch."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes

from interpreter.kernels._oracle import SEEDS, assert_close, check_against_value_inference, random_array, run

OP_TYPE = "scaled_dot_product_attention"
FLOAT_DTYPES = (np.float16, np.float32)
MASK_KINDS = ("none", "bool", "float")
TORCH_TOLERANCE = (1e-5, 1e-6)

sizes = st.integers(min_value=1, max_value=6)


@st.composite
def attention_case(draw: st.DrawFn) -> tuple[tuple[int, ...], int, int, int, int, Optional[tuple[int, ...]]]:
    """Batch dims, L, S, E, EV and a mask shape broadcastable to [*batch, L, S] (None: no mask)."""
    batch = draw(array_shapes(min_dims=1, max_dims=2, max_side=3))
    length, source, embed, value_embed = draw(sizes), draw(sizes), draw(sizes), draw(sizes)
    if not draw(st.booleans()):
        return batch, length, source, embed, value_embed, None
    leading = batch + (length,)
    kept = draw(st.integers(min_value=0, max_value=len(leading)))
    mask_leading = tuple(size if draw(st.booleans()) else 1 for size in leading[len(leading) - kept :])
    return batch, length, source, embed, value_embed, mask_leading + (source,)


def _operands(case: Any, dtype: Any, mask_kind: str, seed: int) -> dict[str, np.ndarray]:
    batch, length, source, embed, value_embed, mask_shape = case
    rng = np.random.default_rng(seed)
    operands = {
        "query": random_array(rng, batch + (length, embed), dtype),
        "key": random_array(rng, batch + (source, embed), dtype),
        "value": random_array(rng, batch + (source, value_embed), dtype),
    }
    if mask_shape is not None and mask_kind == "bool":
        # Keep column 0 so that no row is fully masked (those are NaN; tested separately).
        mask = random_array(rng, mask_shape, np.bool_)
        mask[..., 0] = True
        operands["attn_mask"] = mask
    elif mask_shape is not None and mask_kind == "float":
        operands["attn_mask"] = random_array(rng, mask_shape, dtype, -4.0, 0.0)
    return operands


@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@given(dtype=st.sampled_from(FLOAT_DTYPES), case=attention_case(), seed=SEEDS)
def test_attention_matches_value_inference(mask_kind: str, dtype: Any, case: Any, seed: int) -> None:
    check_against_value_inference(OP_TYPE, _operands(case, dtype, mask_kind, seed))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # from coremltools' softmax
def test_fully_masked_rows_are_nan() -> None:
    """A bool mask row with no True sends every score to -inf, so softmax gives NaN, as in coremltools."""
    operands = _operands(((1, 2), 3, 4, 5, 5, (3, 4)), np.float32, "bool", seed=0)
    operands["attn_mask"][1] = False
    (got,) = check_against_value_inference(OP_TYPE, operands)
    assert np.isnan(got[:, :, 1]).all()
    assert np.isfinite(np.delete(got, 1, axis=2)).all()


@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@given(case=attention_case(), seed=SEEDS)
def test_attention_matches_torch(mask_kind: str, case: Any, seed: int) -> None:
    torch = pytest.importorskip("torch", reason="PyTorch is an optional second reference for attention")
    operands = _operands(case, np.float32, mask_kind, seed)
    tensors = {name: torch.from_numpy(array) for name, array in operands.items()}
    mask = tensors.get("attn_mask")
    if mask is not None and mask.ndim == 1:
        mask = mask[None, :]  # PyTorch wants at least [L, S]; a leading 1 broadcasts the same way
    want = torch.nn.functional.scaled_dot_product_attention(
        tensors["query"], tensors["key"], tensors["value"], attn_mask=mask
    ).numpy()
    (got,) = run(OP_TYPE, operands)
    assert_close(got, want, TORCH_TOLERANCE)
