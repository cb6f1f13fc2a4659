"""A tiny two-layer Llama-style model whose KV cache lives in registered buffers, exported the way
Apple's "On Device Llama 3.1 with Core ML" guide does: the buffers become Core ML states, written
with slice assignment at a position given as an input and read back whole.

Needs PyTorch; without it, collecting this module (for doctests) is skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import coremltools as ct
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is needed to export the Llama-style model")
nn = torch.nn
F = torch.nn.functional

from generation import DECODE, PREFILL, causal_mask  # noqa: E402
from packages import COMPRESSIONS, combine  # noqa: E402
from torch_layers import DIM, HEAD_DIM, KV_HEADS, LlamaWeights, RMSNorm, repeat_kv  # noqa: E402
from w8a8 import quantize_model_activations  # noqa: E402

VOCAB, LAYERS = 64, 2
CACHE_LENGTH = 128
PREFILL_LENGTH = 64
CACHE_SHAPE = (LAYERS, 1, KV_HEADS, CACHE_LENGTH, HEAD_DIM)
CACHE_NAMES = ("k_cache", "v_cache")
ROPE_BASE = 10000.0
LOGITS = "logits"
FUNCTION_LENGTHS = {PREFILL: PREFILL_LENGTH, DECODE: 1}


class TinyLlama(nn.Module):
    """``forward(input_ids (1, L) int32, position (1,) int32, mask (1, 1, L, S)) -> logits (1, L, VOCAB)``.

    Writes the new keys and values at ``position`` of ``k_cache``/``v_cache`` and attends over the
    whole cache; ``mask`` hides the positions not written yet.
    """

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList([LlamaWeights() for _ in range(LAYERS)])
        self.norm = RMSNorm()
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.register_buffer("inv_freq", ROPE_BASE ** -(torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
        for name in CACHE_NAMES:
            self.register_buffer(name, torch.zeros(CACHE_SHAPE))

    def forward(self, input_ids: torch.Tensor, position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[-1]
        start = position[0]
        angles = (position + torch.arange(length)).float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        x = self.embedding(input_ids)
        for index, block in enumerate(self.blocks):
            q, k, v = block.rotated_qkv(x, cos, sin)
            self.k_cache[index, :, :, start : start + length] = k
            self.v_cache[index, :, :, start : start + length] = v
            keys, values = repeat_kv(self.k_cache[index]), repeat_kv(self.v_cache[index])
            x = block.finish(x, F.scaled_dot_product_attention(q, keys, values, attn_mask=mask))
        return self.head(self.norm(x))

    def reset_cache(self) -> None:
        for name in CACHE_NAMES:
            setattr(self, name, torch.zeros(CACHE_SHAPE))


def tiny_llama(seed: int = 0) -> TinyLlama:
    torch.manual_seed(seed)
    return TinyLlama().eval()


def call_inputs(tokens: Sequence[int], position: int) -> dict[str, np.ndarray]:
    """The inputs of one call: ``tokens`` written from cache position ``position`` on."""
    return {
        "input_ids": np.array([tokens], np.int32),
        "position": np.array([position], np.int32),
        "mask": causal_mask(len(tokens), position, CACHE_LENGTH),
    }


def torch_inputs(inputs: Mapping[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
    """``inputs`` as the model's arguments; the fp16 mask in fp32, as the model computes."""
    return tuple(
        torch.from_numpy(value.astype(np.float32) if value.dtype == np.float16 else value) for value in inputs.values()
    )


def convert(model: TinyLlama, length: int) -> ct.models.MLModel:
    """An iOS18 ML program of ``model`` for ``length`` tokens per call, its caches as fp16 states."""
    example = call_inputs([0] * length, 0)
    with torch.no_grad():
        traced = torch.jit.trace(model, torch_inputs(example))
    model.reset_cache()  # tracing ran the model once
    return ct.convert(
        traced,
        inputs=[ct.TensorType(name=name, shape=value.shape, dtype=value.dtype.type) for name, value in example.items()],
        outputs=[ct.TensorType(name=LOGITS, dtype=np.float16)],
        states=[
            ct.StateType(wrapped_type=ct.TensorType(shape=CACHE_SHAPE, dtype=np.float16), name=name)
            for name in CACHE_NAMES
        ],
        minimum_deployment_target=ct.target.iOS18,
        convert_to="mlprogram",
        skip_model_load=True,
    )


CALIBRATION_CALLS = 3


def calibration_calls(model: ct.models.MLModel) -> list[dict[str, np.ndarray]]:
    """Sample calls for a converted function (its query length read from its ``input_ids``): random
    tokens written at random positions of a zeroed cache."""
    input_ids = model.get_spec().description.input[0]
    length = int(input_ids.type.multiArrayType.shape[-1])
    rng = np.random.default_rng(length)
    return [
        call_inputs(rng.integers(0, VOCAB, length).tolist(), int(rng.integers(0, CACHE_LENGTH - length + 1)))
        for _ in range(CALIBRATION_CALLS)
    ]


def w8a8(model: ct.models.MLModel) -> ct.models.MLModel:
    """int8 activations (calibrated with ``evaluate`` on ``calibration_calls``), then int8 weights."""
    return COMPRESSIONS["int8"](quantize_model_activations(model, calibration_calls(model)))


def save_prefill_decode(
    parts: Mapping[str, Path], destination: Path, compress: Callable[[ct.models.MLModel], ct.models.MLModel]
) -> Path:
    """Compress each single-function package in ``parts`` (by function name) and combine them into
    one package with ``save_multifunction``, ``prefill`` the default function."""
    compressed = {}
    for name, part in parts.items():
        compressed[name] = destination.parent / f"{destination.stem}.{name}.mlpackage"
        compress(ct.models.MLModel(str(part), skip_model_load=True)).save(str(compressed[name]))
    return combine(compressed, destination, PREFILL)


def torch_generate(
    model: TinyLlama, prefill: Mapping[str, np.ndarray], steps: Sequence[Mapping[str, np.ndarray]]
) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """PyTorch's logits for the prefill call and each decode step, and the caches after them."""
    model.reset_cache()
    logits = []
    with torch.no_grad():
        for inputs in (prefill, *steps):
            logits.append(model(*torch_inputs(inputs)).numpy())
    return logits, {name: getattr(model, name).numpy().copy() for name in CACHE_NAMES}
