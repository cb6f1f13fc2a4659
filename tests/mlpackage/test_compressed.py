"""Compressed weights of every form survive slicing bit for bit: the same ``constexpr_*`` ops,
the same stored bytes (bit widths, block sizes, palettes, masks), the same decompressed values,
read by coremltools' own loader; and loading or saving never unpacks a sub-byte value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from coremltools.converters.mil.frontend.milproto import load as milproto
from coremltools.converters.mil.mil import types

from compressed import HIDDEN, KINDS, TOKENS, WEIGHTS, compressed_package
from packages import WEIGHT_FILE, model_spec, program_const_values
from sdpa_slicer import _coreml_compat as compat
from sdpa_slicer import estimate_memory, evaluate, slice_attention
from sdpa_slicer._graph import ops_in_block
from sdpa_slicer._mlpackage.blobs import BlobFile
from sdpa_slicer._mlpackage.package import load_package, save_package
from sdpa_slicer._mlpackage.weights import stored_value

INPUT = {"x": np.random.default_rng(7).standard_normal((1, TOKENS, HIDDEN)).astype(np.float32)}


@pytest.fixture(scope="module", params=list(KINDS))
def kind_package(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compressed_package(tmp_path_factory.mktemp("compressed") / "model.mlpackage", request.param)


@pytest.fixture(scope="module")
def sliced(kind_package: Path) -> Path:
    package = load_package(kind_package)
    report = slice_attention(package.program, num_chunks=2)
    assert [site.status for site in report.sites] == ["rewritten"]
    return save_package(package, kind_package.parent / "sliced.mlpackage")


def compressed_inputs(path: Path) -> dict[str, dict[str, object]]:
    """Per ``constexpr_*`` op of the package's spec, what each of its constant inputs holds, by
    input name: ``(data type code, size, bytes)`` of its blob record for a value in the weight
    file, the serialised value for one in the spec."""
    spec, blobs = model_spec(path), BlobFile(path / WEIGHT_FILE)
    function = spec.mlProgram.functions["main"]
    (block,) = function.block_specializations.values()
    values = {
        output.name: op.attributes["val"] for op in block.operations if op.type == "const" for output in op.outputs
    }
    stored = {}
    for op in block.operations:
        if not op.type.startswith("constexpr_"):
            continue
        arguments = dict(op.attributes)  # before iOS18, the stored values are attributes
        for name, argument in op.inputs.items():
            (binding,) = argument.arguments
            if binding.WhichOneof("binding") == "value":
                arguments[name] = binding.value
            elif binding.name in values:
                arguments[name] = values[binding.name]
        records: dict[str, object] = {}
        for name, value in arguments.items():
            if value.HasField("blobFileValue"):
                record = blobs.record(value.blobFileValue.offset)
                records[name] = (record.data_type, record.size, blobs.data(record, np.dtype(np.uint8)).tobytes())
            elif name != "name":
                records[name] = value.SerializeToString()
        stored[f"{op.type} {op.attributes['name'].immediateValue.tensor.strings.values[0]}"] = records
    return stored


def coremltools_program(path: Path) -> Any:
    """The package's program as coremltools' own loader reads it."""
    spec = model_spec(path)
    return milproto.load(spec, spec.specificationVersion, str(path / WEIGHT_FILE.parent))


def decompressed(path: Path) -> dict[str, list[bytes]]:
    """Every ``constexpr_*`` op's values as coremltools' own loader and op definitions decompress them."""
    program = coremltools_program(path)
    values: dict[str, list[bytes]] = {}
    for op in ops_in_block(program.functions["main"]):
        if op.op_type.startswith("constexpr_"):
            outputs: Any = op.materialized_val_inference()
            values[op.name] = [
                np.asarray(value).tobytes() for value in (outputs if isinstance(outputs, tuple) else (outputs,))
            ]
    return values


def test_the_stored_compressed_values_are_those_of_the_input(kind_package: Path, sliced: Path) -> None:
    before = compressed_inputs(kind_package)
    assert sum(len(records) for records in before.values()) >= 2 * len(
        WEIGHTS
    )  # codes and scales, indices and palettes, ...
    assert compressed_inputs(sliced) == before


def test_the_decompressed_values_are_those_of_the_input(kind_package: Path, sliced: Path) -> None:
    before = decompressed(kind_package)
    assert decompressed(sliced) == before


def test_the_weight_file_is_the_inputs_with_new_values_appended(kind_package: Path, sliced: Path) -> None:
    before = (kind_package / WEIGHT_FILE).read_bytes()
    after = (sliced / WEIGHT_FILE).read_bytes()
    assert after[64 : len(before)] == before[64:]


def test_compacting_keeps_every_compressed_value(kind_package: Path, tmp_path: Path) -> None:
    package = load_package(kind_package)
    slice_attention(package.program, num_chunks=2)
    compact = save_package(package, tmp_path / "compact.mlpackage", compact=True)
    assert compressed_inputs(compact) == compressed_inputs(kind_package)
    assert decompressed(compact) == decompressed(kind_package)


def test_loading_slicing_estimating_and_saving_unpack_no_sub_byte_value(kind_package: Path, tmp_path: Path) -> None:
    package = load_package(kind_package)
    slice_attention(package.program, num_chunks=2)
    estimate_memory(package.program)
    save_package(package, tmp_path / "sliced.mlpackage")
    sub_byte = [
        var
        for op in ops_in_block(package.program.functions["main"])
        if op.op_type.startswith("constexpr_")
        for var in op.inputs.values()
        if var.op is not None and var.op.op_type == "const" and types.is_sub_byte(var.dtype)
    ]
    assert all(stored_value(var) is not None for var in sub_byte)
    assert [compat.value_was_read(var) for var in sub_byte] == [False] * len(sub_byte)


def test_the_loaded_values_are_those_coremltools_loader_reads(kind_package: Path) -> None:
    package = load_package(kind_package)
    assert program_const_values(package.program) == program_const_values(coremltools_program(kind_package))
    expected = evaluate(coremltools_program(kind_package), INPUT)
    for name, value in evaluate(package.program, INPUT).items():
        np.testing.assert_array_equal(value, expected[name])


def test_the_sliced_package_computes_what_the_input_does(kind_package: Path, sliced: Path) -> None:
    expected = evaluate(load_package(kind_package).program, INPUT)
    got = evaluate(load_package(sliced).program, INPUT)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-4)
