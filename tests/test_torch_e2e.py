"""Small PyTorch layers converted by coremltools' torch frontend, evaluated against PyTorch itself,
as converted and sliced."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Optional, Sequence

import coremltools as ct
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is needed to convert and run the reference layers")
nn = torch.nn
F = torch.nn.functional

from coremltools.converters.mil.mil import Program  # noqa: E402

from sdpa_slicer import load_package, save_package, slice_attention  # noqa: E402
from sdpa_slicer._interpreter.evaluate import evaluate  # noqa: E402
from sdpa_slicer._interpreter.kernels import KERNELS  # noqa: E402
from torch_layers import DIM, HEAD_DIM, HEADS, HIDDEN, KV_HEADS, REPEATS, CachedAttention, LlamaWeights, repeat_kv  # noqa: E402

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


def _llama_inputs(generator: "torch.Generator", seq: int) -> dict[str, "torch.Tensor"]:
    causal = torch.triu(torch.full((1, 1, seq, seq), float("-inf")), diagonal=1)
    return {
        "x": torch.randn(BATCH, seq, DIM, generator=generator),
        "cos": torch.randn(1, 1, seq, HEAD_DIM, generator=generator),
        "sin": torch.randn(1, 1, seq, HEAD_DIM, generator=generator),
        "mask": causal,
    }


def _bert_inputs(generator: "torch.Generator", seq: int) -> dict[str, "torch.Tensor"]:
    keep = torch.ones(BATCH, seq)
    keep[1, seq // 2 :] = 0.0
    return {"x": torch.randn(BATCH, seq, DIM, generator=generator), "keep": keep}


def _attention_inputs(generator: "torch.Generator", seq: int) -> dict[str, "torch.Tensor"]:
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


def convert(model: "nn.Module", inputs: dict[str, "torch.Tensor"], precision: object) -> Program:
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


def make_layer(name: str, seq: int) -> tuple[str, "nn.Module", dict[str, "torch.Tensor"]]:
    model_class, make_inputs = LAYERS[name]
    torch.manual_seed(0)
    model = model_class().eval()
    return name, model, make_inputs(torch.Generator().manual_seed(1), seq)


def run_torch(model: "nn.Module", inputs: dict[str, "torch.Tensor"]) -> np.ndarray:
    with torch.no_grad():
        return model(*inputs.values()).numpy()


def assert_matches_torch(got: np.ndarray, want: np.ndarray, precision: object) -> None:
    limit = RELATIVE[precision] * np.abs(want).max()
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=0, atol=limit)


@pytest.fixture(scope="module", params=sorted(LAYERS))
def layer(request: pytest.FixtureRequest) -> tuple[str, "nn.Module", dict[str, "torch.Tensor"]]:
    return make_layer(request.param, SEQ)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("precision", PRECISIONS)
def test_converted_layer_matches_torch(
    layer: tuple[str, "nn.Module", dict[str, "torch.Tensor"]], precision: object
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


CACHE_LENGTH, PREFILL_LENGTH, DECODE_STEPS = 32, 16, 2
CACHE_NAMES = ("k_cache", "v_cache")


def _cached_call(generator: "torch.Generator", length: int, position: int) -> dict[str, "torch.Tensor"]:
    visible = torch.arange(CACHE_LENGTH) <= position + torch.arange(length)[:, None]
    return {
        "q": torch.randn(1, HEADS, length, HEAD_DIM, generator=generator),
        "k": torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=generator),
        "v": torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=generator),
        "position": torch.tensor([position], dtype=torch.int32),
        "mask": torch.where(visible, 0.0, float("-inf"))[None, None],
    }


def _convert_cached(model: "nn.Module", example: dict[str, "torch.Tensor"]) -> Program:
    traced = torch.jit.trace(model, tuple(example.values()))
    return ct.convert(
        traced,
        inputs=[
            ct.TensorType(name=name, shape=tuple(t.shape), dtype=np.int32 if t.dtype == torch.int32 else np.float32)
            for name, t in example.items()
        ],
        outputs=[ct.TensorType(name=OUTPUT_NAME)],
        states=[
            ct.StateType(
                wrapped_type=ct.TensorType(shape=(1, KV_HEADS, CACHE_LENGTH, HEAD_DIM), dtype=np.float16), name=name
            )
            for name in CACHE_NAMES
        ],
        convert_to="milinternal",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT16,
    )


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("repeat", sorted(REPEATS))
def test_grouped_query_attention_over_a_state_cache_reads_it_unrepeated_and_matches_torch(repeat: str) -> None:
    """Prefill (sliced into 4 chunks) then decode calls (only folded) over the cache as Core ML
    states, each converted from PyTorch: the repeat is gone, and the outputs and caches match
    PyTorch's, whose buffers carry the cache from call to call."""
    generator = torch.Generator().manual_seed(0)
    calls = [_cached_call(generator, PREFILL_LENGTH, 0)]
    calls += [_cached_call(generator, 1, PREFILL_LENGTH + step) for step in range(DECODE_STEPS)]
    torch.manual_seed(0)
    models = {length: CachedAttention(repeat, length, CACHE_LENGTH).eval() for length in (PREFILL_LENGTH, 1)}
    programs = {
        length: _convert_cached(model, calls[0 if length == PREFILL_LENGTH else 1]) for length, model in models.items()
    }
    for model in models.values():
        for name in CACHE_NAMES:
            getattr(model, name).zero_()  # tracing wrote into the buffers
    kv_heads = 1 if repeat == "expand" else KV_HEADS
    for length, program in programs.items():
        (site,) = slice_attention(program, num_chunks=4, min_seq_length=PREFILL_LENGTH).sites
        assert (site.status, site.num_chunks, site.kv_heads, site.kv_repeats) == (
            "rewritten",
            4 if length == PREFILL_LENGTH else 1,
            kv_heads,
            HEADS // kv_heads,
        ), str(site)
        assert "tile" not in op_types(program)
    states: dict[str, np.ndarray] = {}
    for inputs in calls:
        length = inputs["q"].shape[2]
        got = evaluate(programs[length], {name: value.numpy() for name, value in inputs.items()}, states=states)
        want = run_torch(models[length], inputs)
        for other in models.values():  # the PyTorch models share one cache, as the states do
            for name in CACHE_NAMES:
                getattr(other, name).copy_(getattr(models[length], name))
        assert_matches_torch(got[OUTPUT_NAME], want, ct.precision.FLOAT16)
    for name in CACHE_NAMES:
        assert_matches_torch(states[name], getattr(models[1], name).numpy(), ct.precision.FLOAT16)
