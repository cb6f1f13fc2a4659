"""Blobs a sliced program no longer refers to: counted by ``weight_usage``, kept by default (the
weight file stays the input's, byte for byte), left out by ``save_package(..., compact=True)``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from coremltools.converters.mil.frontend.milproto import load as milproto

from packages import MASK, WEIGHT_FILE, const_values, masked_package, model_spec
from programs import SHAPE
from sdpa_slicer import evaluate, slice_attention
from sdpa_slicer._mlpackage.blobs import BlobFile
from sdpa_slicer._mlpackage.package import load_package, save_package, weight_usage

INPUTS = {name: np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32) for name in ("q", "k", "v")}


@pytest.fixture(scope="module")
def masked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return masked_package(tmp_path_factory.mktemp("masked") / "masked.mlpackage")


def _sliced(source: Path, output: Path, compact: bool) -> Path:
    package = load_package(source)
    report = slice_attention(package.program, num_chunks=2, prune_masked_keys=False)
    assert [site.status for site in report.sites] == ["rewritten"]
    return save_package(package, output, compact=compact)


def test_an_input_refers_to_all_its_blobs(masked: Path) -> None:
    usage = weight_usage(masked)
    assert (usage.unreferenced_blobs, usage.unreferenced_bytes) == (0, 0)
    assert usage.referenced_bytes == (masked / WEIGHT_FILE).stat().st_size - 64


def test_the_mask_a_slice_no_longer_reads_stays_by_default_and_is_counted(masked: Path, tmp_path: Path) -> None:
    output = _sliced(masked, tmp_path / "sliced.mlpackage", compact=False)
    before = (masked / WEIGHT_FILE).read_bytes()
    assert (output / WEIGHT_FILE).read_bytes()[64 : len(before)] == before[64:]
    usage = weight_usage(output)
    assert usage.unreferenced_blobs == 1
    assert usage.unreferenced_bytes == 64 + MASK.nbytes  # its record and its data, 64-byte aligned


def test_compact_writes_only_what_the_program_refers_to(masked: Path, tmp_path: Path) -> None:
    kept = _sliced(masked, tmp_path / "kept.mlpackage", compact=False)
    compact = _sliced(masked, tmp_path / "compact.mlpackage", compact=True)
    usage = weight_usage(compact)
    assert (usage.unreferenced_blobs, usage.unreferenced_bytes) == (0, 0)
    assert usage.referenced_bytes == weight_usage(kept).referenced_bytes
    size = (compact / WEIGHT_FILE).stat().st_size
    assert size == (kept / WEIGHT_FILE).stat().st_size - weight_usage(kept).unreferenced_bytes
    assert BlobFile(compact / WEIGHT_FILE).blob_count == len(BlobFile(compact / WEIGHT_FILE).records())
    assert const_values(compact) == const_values(kept)
    spec = model_spec(compact)
    milproto.load(spec, spec.specificationVersion, str(compact / WEIGHT_FILE.parent))  # coremltools reads it
    for name, value in evaluate(load_package(kept).program, INPUTS).items():
        np.testing.assert_array_equal(evaluate(load_package(compact).program, INPUTS)[name], value)
