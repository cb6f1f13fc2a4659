"""Small PyTorch layers converted by coremltools' torch frontend, evaluated against PyTorch itself, as converted and sliced."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import coremltools as ct
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is needed to convert and run the reference layers")
nn = torch.nn
F = torch.nn.functional

from coremltools.converters.mil.mil import Program  # noqa: E402

from sdpa_slicer import load_package, save_package, slice_attention  # noqa: E402
from sdpa_slicer._evaluate import evaluate  # noqa: E402
from sdpa_slicer._kernels import KERNELS  # noqa: E402
from torch_layers import DIM, HEAD_DIM, HEADS, HIDDEN, LlamaWeights, repeat_kv  # noqa: E402

CONST_OP_TYPES = {"const"}
OUTPUT_NAME = "out"
# max |got - want| <= RELATIVE * max |want|: fp32 programs must agree with PyTorch to 1e-4; fp16 ones
# round every intermediate to 11 bits.
RELATIVE = {ct.precision.FLOAT32: 1e-4, ct.precision.FLOAT16: 1e-2}
PRECISIONS = [
    pytest.param(ct.precision.FLOAT32, id="fp32"),
    pytest.param(ct.precision.FLOAT16, id="fp16"),
]

SEQ, BATCH = 8, 2
SLICED_SEQ, SLICED_CHUNKS = 64, 4
"""Long enough for the default min_seq_length; cut into this many query chunks."""
ATTENTION_SCALE = 0.3
PAD_BIAS = -10000.0


class LlamaLayer(LlamaWeights):
    """RMSNorm, RoPE with rotate_half, grouped-query attention via repeat_interleave, SiLU MLP.

    With a ``scale`` the torch frontend writes the attention out as ops instead of the fused op.
    """

    def __init__(self, scale: Optional[float] = None) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x, cos, sin, mask):  # type: ignore[no-untyped-def]
        q, k, v = self.rotated_qkv(x, cos, sin)
        attention = F.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v), attn_mask=mask, scale=self.scale)
        return self.finish(x, attention)


class BertLayer(nn.Module):
    """Post-norm encoder layer: fused QKV, explicit softmax attention with a padding bias, GELU MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.o = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.attention_norm, self.mlp_norm = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.up, self.down = nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM)

    def forward(self, x, keep):  # type: ignore[no-untyped-def]
        q, k, v = (t.unflatten(-1, (HEADS, HEAD_DIM)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        bias = (1.0 - keep[:, None, None, :]) * PAD_BIAS
        scores = q @ k.transpose(-1, -2) / HEAD_DIM**0.5 + bias
        attention = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
        x = self.attention_norm(x + self.o(attention))
        return self.mlp_norm(x + self.down(F.gelu(self.up(x))))


class ScaledAttention(nn.Module):
    """``F.scaled_dot_product_attention`` with an explicit scale and a bool mask made in the model."""

    def forward(self, q, k, v, mask):  # type: ignore[no-untyped-def]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask > 0, scale=ATTENTION_SCALE)


def _llama_inputs(generator: "torch.Generator", seq: int) -> Dict[str, "torch.Tensor"]:
    causal = torch.triu(torch.full((1, 1, seq, seq), float("-inf")), diagonal=1)
    return {
        "x": torch.randn(BATCH, seq, DIM, generator=generator),
        "cos": torch.randn(1, 1, seq, HEAD_DIM, generator=generator),
        "sin": torch.randn(1, 1, seq, HEAD_DIM, generator=generator),
        "mask": causal,
    }


def _bert_inputs(generator: "torch.Generator", seq: int) -> Dict[str, "torch.Tensor"]:
    keep = torch.ones(BATCH, seq)
    keep[1, seq // 2 :] = 0.0
    return {"x": torch.randn(BATCH, seq, DIM, generator=generator), "keep": keep}


def _attention_inputs(generator: "torch.Generator", seq: int) -> Dict[str, "torch.Tensor"]:
    shapes = {"q": (BATCH, HEADS, seq, HEAD_DIM), "k": (BATCH, HEADS, seq + 2, HEAD_DIM)}
    shapes.update(v=(BATCH, HEADS, seq + 2, HEAD_DIM), mask=(1, 1, seq, seq + 2))
    inputs = {name: torch.randn(*shape, generator=generator) for name, shape in shapes.items()}
    inputs["mask"][..., 0] = 1.0  # no fully masked row
    return inputs


LAYERS = {
    "llama": (LlamaLayer, _llama_inputs),
    "llama-scaled": (functools.partial(LlamaLayer, scale=ATTENTION_SCALE), _llama_inputs),
    "bert": (BertLayer, _bert_inputs),
    "sdpa": (ScaledAttention, _attention_inputs),
}
SLICED_LAYERS = {"llama": "fused", "llama-scaled": "decomposed", "bert": "decomposed"}
"""The layers sliced end to end, and the kind of attention site each has once converted."""


def convert(model: "nn.Module", inputs: Dict[str, "torch.Tensor"], precision: object) -> Program:
    traced = torch.jit.trace(model, tuple(inputs.values()))
    return ct.convert(
        traced,
        inputs=[ct.TensorType(name=name, shape=tuple(t.shape)) for name, t in inputs.items()],
        outputs=[ct.TensorType(name=OUTPUT_NAME)],
        convert_to="milinternal",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=precision,
    )


def op_types(program: Program) -> Sequence[str]:
    return sorted({op.op_type for op in program.functions["main"].operations})


def make_layer(name: str, seq: int) -> Tuple[str, "nn.Module", Dict[str, "torch.Tensor"]]:
    model_class, make_inputs = LAYERS[name]
    torch.manual_seed(0)
    model = model_class().eval()
    return name, model, make_inputs(torch.Generator().manual_seed(1), seq)


def run_torch(model: "nn.Module", inputs: Dict[str, "torch.Tensor"]) -> np.ndarray:
    with torch.no_grad():
        return model(*inputs.values()).numpy()


def assert_matches_torch(got: np.ndarray, want: np.ndarray, precision: object) -> None:
    limit = RELATIVE[precision] * np.abs(want).max()
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=0, atol=limit)


@pytest.fixture(scope="module", params=sorted(LAYERS))
def layer(request: pytest.FixtureRequest) -> Tuple[str, "nn.Module", Dict[str, "torch.Tensor"]]:
    return make_layer(request.param, SEQ)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("precision", PRECISIONS)
def test_converted_layer_matches_torch(
    layer: Tuple[str, "nn.Module", Dict[str, "torch.Tensor"]], precision: object
) -> None:
    name, model, inputs = layer
    program = convert(model, inputs, precision)
    missing = set(op_types(program)) - set(KERNELS) - CONST_OP_TYPES
    assert not missing, f"the {name} program uses op types without a kernel: {sorted(missing)}"
    got = evaluate(program, {key: value.numpy() for key, value in inputs.items()})[OUTPUT_NAME]
    assert_matches_torch(got, run_torch(model, inputs), precision)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", sorted(SLICED_LAYERS))
def test_a_sliced_layer_matches_torch_and_survives_a_package(name: str, precision: object, tmp_path: Path) -> None:
    """Convert at a length that is sliced, slice into several chunks, compare with PyTorch; then
    load the unsliced layer from an .mlpackage, slice it, save and load it again: same values."""
    _, model, inputs = make_layer(name, SLICED_SEQ)
    program = convert(model, inputs, precision)
    source = tmp_path / "layer.mlpackage"
    _to_mlprogram(copy.deepcopy(program)).save(str(source))

    report = slice_attention(program, num_chunks=SLICED_CHUNKS, min_seq_length=SLICED_SEQ)
    assert [(site.kind, site.status, site.num_chunks) for site in report.sites] == [
        (SLICED_LAYERS[name], "rewritten", SLICED_CHUNKS)
    ], str(report)
    feeds = {key: value.numpy() for key, value in inputs.items()}
    got = evaluate(program, feeds)[OUTPUT_NAME]
    assert_matches_torch(got, run_torch(model, inputs), precision)

    package = load_package(source)
    assert slice_attention(package.program, num_chunks=SLICED_CHUNKS, min_seq_length=SLICED_SEQ).num_rewritten == 1
    sliced = save_package(package, tmp_path / "sliced.mlpackage")
    np.testing.assert_array_equal(evaluate(load_package(sliced).program, feeds)[OUTPUT_NAME], got)


def _to_mlprogram(program: Program) -> ct.models.MLModel:
    return ct.convert(
        program,
        convert_to="mlprogram",
        pass_pipeline=ct.PassPipeline.EMPTY,
        minimum_deployment_target=ct.target.iOS18,
        skip_model_load=True,
    )
