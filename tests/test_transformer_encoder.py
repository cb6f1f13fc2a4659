"""``torch.nn.TransformerEncoderLayer`` as the docs say to convert it: traced, coremltools 9.0 has
no converter for the fused op torch runs it as (``_transformer_encoder_layer_fwd``); exported
with ``torch.export`` it converts, and ``pass_pipeline`` slices its attention inside ``ct.convert``."""

from __future__ import annotations

from pathlib import Path

import coremltools as ct
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is needed to convert the encoder layer")

import sdpa_slicer  # noqa: E402
from generation import max_differences  # noqa: E402
from graph import op_counts  # noqa: E402
from sdpa_slicer import evaluate, load_package  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.export's own deprecations
TOKENS, WIDTH, HEADS = 128, 64, 4
NUM_CHUNKS = 4
FP16_RELATIVE = 1e-2


def encoder_layer() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=WIDTH, nhead=HEADS, dim_feedforward=2 * WIDTH, batch_first=True)
    return layer.eval(), torch.randn(1, TOKENS, WIDTH)


def test_a_traced_encoder_layer_does_not_convert() -> None:
    layer, example = encoder_layer()
    with torch.no_grad():
        traced = torch.jit.trace(layer, example)
    with pytest.raises(NotImplementedError, match="'_transformer_encoder_layer_fwd' not implemented"):
        ct.convert(
            traced,
            inputs=[ct.TensorType(name="x", shape=example.shape)],
            minimum_deployment_target=ct.target.iOS18,
            skip_model_load=True,
        )


def test_an_exported_encoder_layer_converts_and_is_sliced_inside_convert(tmp_path: Path) -> None:
    layer, example = encoder_layer()
    with torch.no_grad():
        exported = torch.export.export(layer, (example,)).run_decompositions({})
        want = layer(example).numpy()
    mlmodel = ct.convert(
        exported,
        minimum_deployment_target=ct.target.iOS18,
        pass_pipeline=sdpa_slicer.pass_pipeline(num_chunks=NUM_CHUNKS),
        skip_model_load=True,
    )
    mlmodel.save(str(tmp_path / "encoder.mlpackage"))
    prog = load_package(tmp_path / "encoder.mlpackage").program
    counts = op_counts(prog)
    assert counts.get("scaled_dot_product_attention", 0) == 0
    assert counts["softmax"] == NUM_CHUNKS
    (name,) = prog.functions["main"].inputs
    (got,) = evaluate(prog, {name: example.numpy()}).values()
    _, share = max_differences(got, want)
    assert share <= FP16_RELATIVE
