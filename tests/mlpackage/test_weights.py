"""Weights of a loaded package: the values coremltools' own loader reads, mapped or in memory,
read-only; saved by offset, new values appended once."""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.frontend.milproto import load as milproto

from generation import generate
from packages import WEIGHT_FILE, blob_values, model_spec, program_const_values
from programs import kv_cache_calls
from sdpa_slicer import estimate_memory
from sdpa_slicer._graph import ops_in_block
from sdpa_slicer._mlpackage.blobs import HEADER
from sdpa_slicer._mlpackage.package import load_package, save_package
from sdpa_slicer._mlpackage.weights import PackageWeights, reading_weights

NEW_VALUE = np.linspace(-1.0, 1.0, 100, dtype=np.float32)
"""Large enough to be stored in the weight file."""


def _coremltools_program(path: Path) -> Any:
    """The package's program as coremltools' own loader reads it."""
    spec = model_spec(path)
    return milproto.load(spec, spec.specificationVersion, str(path / WEIGHT_FILE.parent))


def _mapped(value: np.ndarray) -> bool:
    base = value
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "in memory"])
@pytest.mark.parametrize("name", ["single", "multi", "state"])
def test_values_are_those_of_coremltools_loader(name: str, lazy: bool, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(f"{name}_package")
    assert program_const_values(load_package(path, lazy=lazy).program) == program_const_values(
        _coremltools_program(path)
    )


def test_compressed_values_are_those_of_coremltools_loader(kv_package: Path) -> None:
    assert program_const_values(load_package(kv_package).program) == program_const_values(
        _coremltools_program(kv_package)
    )


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "in memory"])
def test_stored_values_are_read_only_and_mapped_only_when_lazy(lazy: bool, single_package: Path) -> None:
    package = load_package(single_package, lazy=lazy)
    stored = [
        op.outputs[0].val
        for op in ops_in_block(package.program.functions["main"])
        if op.op_type == "const" and package.weights.find(op.outputs[0].val) is not None
    ]
    assert len(stored) == sum(len(values) for values in blob_values(single_package).values())
    assert all(not value.flags.writeable for value in stored)
    assert [_mapped(value) for value in stored] == [lazy] * len(stored)


def test_the_loader_is_restored_after_a_failed_load(tmp_path: Path) -> None:
    originals = (milproto._load_value, milproto._load_operation)
    with pytest.raises(RuntimeError):
        with reading_weights(PackageWeights(None, lazy=True)):
            assert (milproto._load_value, milproto._load_operation) != originals
            raise RuntimeError("load failed")
    assert (milproto._load_value, milproto._load_operation) == originals


def _add_consts(package: Any, values: dict[str, np.ndarray]) -> None:
    """Append const ops holding ``values`` (by name) to the package's ``main`` function."""
    function = package.program.functions["main"]
    with function:
        for name, value in values.items():
            mb.const(val=value, name=name, before_op=function.operations[-1])


def _blob_count(weight_file: bytes) -> int:
    return HEADER.unpack_from(weight_file)[0]


def _offsets(path: Path) -> dict[str, int]:
    return {name: value.blobFileValue.offset for name, value in blob_values(path)["main"].items()}


def test_new_values_are_appended_once_and_stored_values_keep_their_offsets(
    single_package: Path, tmp_path: Path
) -> None:
    package = load_package(single_package)
    (key_weight,) = [
        op
        for op in ops_in_block(package.program.functions["main"])
        if op.name in _offsets(single_package) and op.op_type == "const"
    ]
    copies = {"new": NEW_VALUE, "new_again": NEW_VALUE.copy(), "key_copy": np.array(key_weight.outputs[0].val)}
    _add_consts(package, copies)
    output = save_package(package, tmp_path / "out.mlpackage")
    before, after = (single_package / WEIGHT_FILE).read_bytes(), (output / WEIGHT_FILE).read_bytes()
    assert _blob_count(after) == _blob_count(before) + 1
    assert after[HEADER.size : len(before)] == before[HEADER.size :]
    assert len(after) == -(-len(before) // 64) * 64 + 64 + NEW_VALUE.nbytes
    offsets = _offsets(output)
    assert offsets["new"] == offsets["new_again"] >= len(before)
    assert offsets["key_copy"] == offsets[key_weight.name]
    assert {name: offsets[name] for name in _offsets(single_package)} == _offsets(single_package)
    values = {op.name: op.outputs[0].val for op in ops_in_block(load_package(output).program.functions["main"])}
    np.testing.assert_array_equal(values["new_again"], NEW_VALUE)


def test_a_lazily_loaded_program_evaluates_as_one_in_memory(kv_package: Path) -> None:
    lazy, in_memory = (
        generate(load_package(kv_package, lazy=lazy).program, *kv_cache_calls()) for lazy in (True, False)
    )
    for name, cache in in_memory.states.items():
        np.testing.assert_array_equal(lazy.states[name], cache)
    for lazy_call, call in zip(lazy.outputs, in_memory.outputs):
        for output, value in call.items():
            np.testing.assert_array_equal(lazy_call[output], value)


def test_a_stored_value_two_constants_read_counts_once_in_the_weights(single_package: Path, tmp_path: Path) -> None:
    package = load_package(single_package)
    before = estimate_memory(package.program).weights_bytes
    _add_consts(package, {"new": NEW_VALUE, "new_again": NEW_VALUE.copy()})
    assert estimate_memory(package.program).weights_bytes == before + 2 * NEW_VALUE.nbytes  # two values in memory
    output = save_package(package, tmp_path / "out.mlpackage")
    assert len(set(_offsets(output).values())) == len(_offsets(output)) - 1  # stored once
    assert estimate_memory(load_package(output).program).weights_bytes == before + NEW_VALUE.nbytes
