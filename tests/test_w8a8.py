"""Layers converted from PyTorch, their activations quantized to int8 (W8A8) by coremltools' own
passes (calibrated with ``evaluate``), then sliced: every site is rewritten, the sliced program
computes what the unsliced W8A8 program computes, and its static peak falls."""

from __future__ import annotations

import math
from typing import Callable

import attrs
import coremltools as ct
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is needed to convert the layers")
nn = torch.nn
F = torch.nn.functional

from attention_cases import assert_close_to_unsliced  # noqa: E402
from graph import copied  # noqa: E402
from sdpa_slicer import estimate_memory, evaluate, slice_attention  # noqa: E402
from sdpa_slicer._interpreter.kernels import KERNELS  # noqa: E402
from torch_layers import DIM, HEAD_DIM, HEADS, LlamaWeights, repeat_kv  # noqa: E402
from w8a8 import quantize_activations  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")

SEQ, MEMORY = 64, 48
"""Query length (the default min_seq_length) and, for cross-attention, the key length."""
NUM_CHUNKS = 4
SCALE = HEAD_DIM**-0.5
MASKED = -50.0
"""What a mask adds for a hidden key. With -1e4 (BERT's padding bias, kept below) the add's
calibrated levels are 79 apart, and every visible score rounds to 0."""
PAD_BIAS = -10000.0
SOFTCAP = 5.0
CALIBRATION_SAMPLES = 3
OUTPUT = "out"


def _heads(x: "torch.Tensor") -> "torch.Tensor":
    return x.unflatten(-1, (HEADS, HEAD_DIM)).transpose(1, 2)


def _merged(x: "torch.Tensor") -> "torch.Tensor":
    return x.transpose(1, 2).flatten(2)


class Decoder(LlamaWeights):
    """A Llama-style layer (RoPE, grouped-query heads) with an explicit scale and a mask input."""

    def forward(self, x, cos, sin, mask):  # type: ignore[no-untyped-def]
        q, k, v = self.rotated_qkv(x, cos, sin)
        attention = F.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v), attn_mask=mask, scale=SCALE)
        return self.finish(x, attention)


class Encoder(nn.Module):
    """BERT: fused QKV, attention with a padding bias computed from a keep mask, LayerNorm, GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.o = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.norm = nn.LayerNorm(DIM)

    def forward(self, x, keep):  # type: ignore[no-untyped-def]
        q, k, v = (_heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        bias = (1.0 - keep[:, None, None, :]) * PAD_BIAS
        scores = q @ k.transpose(-1, -2) * SCALE + bias
        return self.norm(x + self.o(_merged(scores.softmax(-1) @ v)))


class CrossAttention(nn.Module):
    """Two layers attending from ``x`` (L rows) to ``memory`` (S keys), sharing one additive bias."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({name: nn.Linear(DIM, DIM) for name in "qkvo"}) for _ in range(2))

    def forward(self, x, memory, bias):  # type: ignore[no-untyped-def]
        for layer in self.layers:
            q, k, v = _heads(layer["q"](x)), _heads(layer["k"](memory)), _heads(layer["v"](memory))
            scores = q @ k.transpose(-1, -2) * SCALE + bias
            x = x + layer["o"](_merged(scores.softmax(-1) @ v))
        return x


class Softcapped(nn.Module):
    """Gemma 2: the scaled scores go through ``tanh(s / cap) * cap`` before the mask."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.o = nn.Linear(DIM, 3 * DIM, bias=False), nn.Linear(DIM, DIM, bias=False)

    def forward(self, x, mask):  # type: ignore[no-untyped-def]
        q, k, v = (_heads(t) for t in self.qkv(x).chunk(3, dim=-1))
        scores = torch.tanh(q @ k.transpose(-1, -2) * SCALE / SOFTCAP) * SOFTCAP + mask
        return x + self.o(_merged(scores.softmax(-1) @ v))


def _causal(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"mask": np.triu(np.full((1, 1, SEQ, SEQ), MASKED, np.float32), 1)}


def _decoder_inputs(rng: np.random.Generator) -> dict[str, np.ndarray]:
    angles = rng.uniform(0, math.pi, (1, 1, SEQ, HEAD_DIM))
    return {"x": rng.standard_normal((1, SEQ, DIM)), "cos": np.cos(angles), "sin": np.sin(angles), **_causal(rng)}


def _encoder_inputs(rng: np.random.Generator) -> dict[str, np.ndarray]:
    keep = np.ones((2, SEQ))
    keep[1, rng.integers(SEQ // 4, SEQ) :] = 0.0
    return {"x": rng.standard_normal((2, SEQ, DIM)), "keep": keep}


def _cross_inputs(rng: np.random.Generator) -> dict[str, np.ndarray]:
    distance = np.abs(np.arange(SEQ)[:, None] * MEMORY / SEQ - np.arange(MEMORY))
    slopes = 2.0 ** -np.arange(1, HEADS + 1)
    return {
        "x": rng.standard_normal((1, SEQ, DIM)),
        "memory": rng.standard_normal((1, MEMORY, DIM)),
        "bias": (-slopes[:, None, None] * distance)[None] + rng.uniform(-0.5, 0.5, (1, HEADS, SEQ, MEMORY)),
    }


def _softcapped_inputs(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"x": rng.standard_normal((1, SEQ, DIM)), **_causal(rng)}


@attrs.frozen
class Layer:
    model: Callable[[], "nn.Module"]
    inputs: Callable[[np.random.Generator], dict[str, np.ndarray]]
    sites: int = 1


LAYERS = {
    "decoder": Layer(Decoder, _decoder_inputs),
    "encoder": Layer(Encoder, _encoder_inputs),
    "cross_attention": Layer(CrossAttention, _cross_inputs, sites=2),
    "softcapped": Layer(Softcapped, _softcapped_inputs),
}


def w8a8_program(name: str):
    """The fp16 program of layer ``name``, its activations quantized; and inputs to evaluate it on."""
    layer = LAYERS[name]
    torch.manual_seed(0)
    model = layer.model().eval()
    samples = [
        {key: value.astype(np.float32) for key, value in layer.inputs(np.random.default_rng(seed)).items()}
        for seed in range(CALIBRATION_SAMPLES + 1)
    ]
    traced = torch.jit.trace(model, tuple(torch.from_numpy(value) for value in samples[0].values()))
    prog = ct.convert(
        traced,
        inputs=[ct.TensorType(name=key, shape=value.shape) for key, value in samples[0].items()],
        outputs=[ct.TensorType(name=OUTPUT)],
        convert_to="milinternal",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT16,
    )
    return quantize_activations(prog, samples[:CALIBRATION_SAMPLES]), samples[CALIBRATION_SAMPLES]


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_a_w8a8_layer_is_sliced_and_computes_what_it_computed(name: str) -> None:
    prog, inputs = w8a8_program(name)
    missing = {op.op_type for op in prog.functions["main"].operations} - set(KERNELS) - {"const"}
    assert not missing
    sliced = copied(prog)
    report = slice_attention(sliced, num_chunks=NUM_CHUNKS)
    assert [(site.status, site.num_chunks) for site in report.sites] == [("rewritten", NUM_CHUNKS)] * LAYERS[
        name
    ].sites, str(report)
    assert all(site.score_ops.count("quantize") >= 1 for site in report.sites), str(report)
    assert report.near_misses == ()
    for site in report.sites:  # the scores as the matmul holds them: fp16, not the int8 levels
        assert site.scores_bytes_before == math.prod(site.query_shape[:-1]) * site.key_shape[-2] * 2
    want, got = (evaluate(program, inputs)[OUTPUT] for program in (prog, sliced))
    assert_close_to_unsliced(got, want, "fp16")
    assert estimate_memory(sliced).peak_live_bytes < estimate_memory(prog).peak_live_bytes
