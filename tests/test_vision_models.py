"""Real diffusion, vision and speech models (tiny random configs of ``diffusers`` and ``transformers``
classes), converted by coremltools' torch frontend: ``evaluate`` runs them as converted and as
sliced, both agree with PyTorch and with each other, every attention site is rewritten and the
static peak falls.

Each model is converted once per precision per session (``converted``); the tests read the result.
"""

from __future__ import annotations

from typing import Any

import attrs
import coremltools as ct
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is needed to convert the models")
pytest.importorskip("diffusers", reason="diffusers is needed for the diffusion models")
pytest.importorskip("transformers", reason="transformers is needed for the vision and speech models")

import torch_converters  # noqa: E402,F401  (registers the converters the models need)
from sdpa_slicer import MemoryEstimate, SliceReport, estimate_memory, evaluate, slice_attention  # noqa: E402
from vision_models import BUILDERS, OUTPUT_NAME, VisionModel, build, convert, torch_output  # noqa: E402

# max |got - want| <= RELATIVE * max |want|, as in the other end-to-end tests.
RELATIVE = {ct.precision.FLOAT32: 1e-4, ct.precision.FLOAT16: 1e-2}
PRECISIONS = {"fp32": ct.precision.FLOAT32, "fp16": ct.precision.FLOAT16}
NUM_CHUNKS = 4
MIN_SEQ_LENGTH = 16
"""Every attention of these configs has at least 32 query rows: all are sliced."""


@attrs.frozen
class Converted:
    """One model converted at one precision, evaluated, sliced and evaluated again."""

    model: VisionModel
    precision: Any
    torch_output: np.ndarray
    unsliced: np.ndarray
    sliced: np.ndarray
    report: SliceReport
    before: MemoryEstimate
    after: MemoryEstimate


@pytest.fixture(scope="session", params=sorted(BUILDERS))
def model(request: pytest.FixtureRequest) -> VisionModel:
    return build(request.param)


@pytest.fixture(scope="session", params=sorted(PRECISIONS))
def converted(request: pytest.FixtureRequest, model: VisionModel) -> Converted:
    precision = PRECISIONS[request.param]
    feeds = {name: tensor.numpy() for name, tensor in model.inputs.items()}
    program = convert(model, precision)
    unsliced = evaluate(program, feeds)[OUTPUT_NAME]
    before = estimate_memory(program)
    report = slice_attention(program, num_chunks=NUM_CHUNKS, min_seq_length=MIN_SEQ_LENGTH)
    return Converted(
        model,
        precision,
        torch_output(model),
        unsliced,
        evaluate(program, feeds)[OUTPUT_NAME],
        report,
        before,
        estimate_memory(program),
    )


def _assert_close(got: np.ndarray, want: np.ndarray, precision: Any) -> None:
    assert got.shape == want.shape
    limit = RELATIVE[precision] * np.abs(want).max()
    np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=0, atol=limit)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_the_converted_model_computes_what_pytorch_computes(converted: Converted) -> None:
    assert np.abs(converted.torch_output).max() > 0.1, "a model whose output is near zero proves nothing"
    _assert_close(converted.unsliced, converted.torch_output, converted.precision)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_the_sliced_model_computes_what_the_converted_model_and_pytorch_compute(converted: Converted) -> None:
    _assert_close(converted.sliced, converted.unsliced, converted.precision)
    _assert_close(converted.sliced, converted.torch_output, converted.precision)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_every_attention_site_is_rewritten_into_chunks(converted: Converted) -> None:
    sites = converted.report.sites
    assert sites, f"no attention found in {converted.model.name}"
    assert [(site.status, site.num_chunks) for site in sites] == [("rewritten", NUM_CHUNKS)] * len(sites), str(
        converted.report
    )


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_the_static_peak_falls(converted: Converted) -> None:
    assert converted.after.peak_live_bytes < converted.before.peak_live_bytes, str(converted.report)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_the_largest_tensor_never_grows_and_sams_falls_by_the_chunk_count(converted: Converted) -> None:
    """SAM's largest tensor is its decomposed relative-position bias (rank 5, L x S, built before the
    global attention); built per chunk from ``rel_h`` and ``rel_w``, it falls with the scores."""
    before, after = converted.before.largest_tensor_bytes, converted.after.largest_tensor_bytes
    assert after <= before, str(converted.report)
    if converted.model.name == "sam-vision":
        assert converted.before.largest_tensor is not None
        assert converted.before.largest_tensor.name.startswith("decomposed_rel_pos")
        assert after * NUM_CHUNKS == before, str(converted.report)
