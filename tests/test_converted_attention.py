"""Attention as coremltools' torch frontend writes it, found, rewritten and checked against PyTorch.

The frontend emits the fused op for ``F.scaled_dot_product_attention`` without a scale, a chain
``mul -> matmul -> add -> softmax -> matmul`` when a scale is given, the same chain for attention
written by hand, and a constant mask for ``is_causal=True``. Real exports put more elementwise
ops between the scores and the softmax: Gemma 2's softcapping, MPT's bias then ``masked_fill``
(a ``select``), ALiBi's per-head position bias.
"""

from __future__ import annotations

import math
from typing import Callable

import coremltools as ct
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is needed to convert the attention modules")
F = torch.nn.functional

from graph import op_counts  # noqa: E402
from sdpa_slicer import evaluate, pass_pipeline, slice_attention  # noqa: E402

BATCH, HEADS, SEQ, HEAD_DIM = 1, 2, 64, 16
NUM_CHUNKS = 4
SCALE = 0.3
INPUT_NAMES = ("q", "k", "v", "mask")
OUTPUT_NAME = "out"
# max |got - want| <= RELATIVE * max |want|, as in the other end-to-end tests.
RELATIVE = {ct.precision.FLOAT32: 1e-4, ct.precision.FLOAT16: 1e-2}


def _fused(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _scaled(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=SCALE)


def _by_hand(q, k, v, mask):
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(HEAD_DIM) + mask, dim=-1) @ v


def _causal(q, k, v, mask):
    # The mask input is unused by the attention; adding a zero keeps it an input of the model.
    return F.scaled_dot_product_attention(q, k, v, is_causal=True) + 0.0 * mask[0, 0, 0, 0]


SOFTCAP = 5.0
ALIBI_SLOPES = torch.tensor([2.0**-1, 2.0**-4]).view(1, HEADS, 1, 1)


def _softcapped(q, k, v, mask):
    """Gemma 2: the scaled scores go through ``tanh(s / cap) * cap`` before the mask."""
    scores = (q @ k.transpose(-2, -1)) * HEAD_DIM**-0.5
    scores = torch.tanh(scores / SOFTCAP) * SOFTCAP
    return torch.softmax(scores + mask, dim=-1) @ v


def _biased_then_selected(q, k, v, mask):
    """MPT: a position bias (computed from positions, so a constant) is added, then the masked
    keys are filled with the lowest float. The mask input is unused, as in ``_causal``."""
    positions = torch.arange(SEQ, dtype=torch.float32)
    bias = 0.1 * (positions.view(1, SEQ) - positions.view(SEQ, 1)).abs().neg()
    keep = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-2, -1)) * SCALE + bias
    return torch.softmax(scores.masked_fill(~keep, torch.finfo(scores.dtype).min), dim=-1) @ v + 0.0 * mask[0, 0, 0, 0]


def _alibi(q, k, v, mask):
    """ALiBi: each head adds ``slope * (key position - query position)``, then a causal mask."""
    positions = torch.arange(SEQ, dtype=torch.float32)
    bias = ALIBI_SLOPES * (positions.view(1, 1, 1, SEQ) - positions.view(1, 1, SEQ, 1))
    causal = torch.full((SEQ, SEQ), -1e4).triu(1)
    scores = (q @ k.transpose(-2, -1)) * HEAD_DIM**-0.5 + bias
    return torch.softmax(scores + causal, dim=-1) @ v + 0.0 * mask[0, 0, 0, 0]


class _Attention(torch.nn.Module):
    def __init__(self, attend: Callable) -> None:
        super().__init__()
        self.attend = attend

    def forward(self, q, k, v, mask):
        return self.attend(q, k, v, mask)


CAUSAL_WORK = 10 / 16
"""Four causal chunks see 1, 2, 3 and 4 quarters of the keys: 10/16 of the work."""
ATTENTIONS = {
    "fused": (_fused, "fused", 1.0, ()),
    "scaled": (_scaled, "decomposed", 1.0, ("add",)),
    "by_hand": (_by_hand, "decomposed", 1.0, ("add",)),
    "causal": (_causal, "fused", CAUSAL_WORK, ()),
    "softcapped": (_softcapped, "decomposed", 1.0, ("tanh", "mul", "add")),
    "biased_then_selected": (_biased_then_selected, "decomposed", CAUSAL_WORK, ("add", "select")),
    "alibi": (_alibi, "decomposed", CAUSAL_WORK, ("add", "add")),
}
"""Per module: the site kind, the share of matmul work after slicing (a constant causal mask
prunes), and the ops between the scores and the softmax (the softcap's first ``mul`` joins the scale)."""


def _example_inputs() -> dict[str, "torch.Tensor"]:
    generator = torch.Generator().manual_seed(0)
    shape = (BATCH, HEADS, SEQ, HEAD_DIM)
    values = {name: torch.randn(shape, generator=generator) for name in ("q", "k", "v")}
    values["mask"] = torch.where(torch.rand(1, 1, SEQ, SEQ, generator=generator) < 0.8, 0.0, -1e4)
    return values


def _convert(attend: Callable, precision: ct.precision, **options):
    inputs = _example_inputs()
    traced = torch.jit.trace(_Attention(attend).eval(), tuple(inputs.values()))
    prog = ct.convert(
        traced,
        inputs=[ct.TensorType(name=name, shape=value.shape) for name, value in inputs.items()],
        outputs=[ct.TensorType(name=OUTPUT_NAME)],
        convert_to="milinternal",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=precision,
        **options,
    )
    with torch.no_grad():
        expected = attend(*inputs.values()).numpy()
    return prog, {name: value.numpy() for name, value in inputs.items()}, expected


def _assert_matches_torch(prog, inputs, expected, precision) -> None:
    got = evaluate(prog, inputs)[OUTPUT_NAME].astype(np.float64)
    assert np.abs(got - expected).max() <= RELATIVE[precision] * np.abs(expected).max()


# In fp16, coremltools casts MPT's fill (the lowest fp32) to -inf, and NumPy warns of it.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("precision", [ct.precision.FLOAT32, ct.precision.FLOAT16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", ATTENTIONS)
def test_converted_attention_is_found_rewritten_and_still_matches_torch(name, precision):
    attend, kind, work, score_ops = ATTENTIONS[name]
    prog, inputs, expected = _convert(attend, precision)

    report = slice_attention(prog, num_chunks=NUM_CHUNKS)

    (site,) = report.sites
    assert (site.kind, site.status, site.num_chunks, site.score_ops) == (kind, "rewritten", NUM_CHUNKS, score_ops)
    assert site.matmul_work_after / site.matmul_work_before == pytest.approx(work)
    assert op_counts(prog)["softmax"] == NUM_CHUNKS
    _assert_matches_torch(prog, inputs, expected, precision)


@pytest.mark.parametrize("name", ["fused", "scaled"])
def test_the_pass_pipeline_slices_attention_inside_convert(name):
    attend, *_ = ATTENTIONS[name]
    prog, inputs, expected = _convert(attend, ct.precision.FLOAT32, pass_pipeline=pass_pipeline(num_chunks=NUM_CHUNKS))

    counts = op_counts(prog)
    assert counts["scaled_dot_product_attention"] == 0
    assert counts["softmax"] == NUM_CHUNKS
    assert counts["concat"] == 1
    _assert_matches_torch(prog, inputs, expected, ct.precision.FLOAT32)
