"""load_package / save_package: nothing lost, weights bit-exact, every function kept, atomic writes."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Callable

import attrs
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types
from coremltools.libmodelpackage import ModelPackage
from coremltools.models.utils import _create_mlpackage

from graph import op_counts
from packages import (
    BAD_INPUTS,
    DEFAULT_FUNCTION,
    FUNCTIONS,
    METADATA,
    NOT_PACKAGES,
    WEIGHT_FILE,
    blob_offsets,
    const_values,
    model_spec,
    tree_digest,
    tree_times,
)
from sdpa_slicer import PackageError, SliceReport, slice_attention
from sdpa_slicer._graph import ops_in_block
from sdpa_slicer._mlpackage import package as _package
from sdpa_slicer._mlpackage.package import load_package, package_size, save_package

SDPA = "scaled_dot_product_attention"
COMPRESSED_WEIGHT = "constexpr_blockwise_shift_scale"
PACKAGES = ("single", "multi", "state")
NEW_VALUE = np.linspace(-1.0, 1.0, 100, dtype=np.float32)
"""Large enough to be stored in the weight file."""
EXTRA_ITEM = {"name": "notes.txt", "author": "com.example.tool", "description": "notes of another tool"}


@attrs.frozen
class RoundTrip:
    source: Path
    output: Path
    report: SliceReport
    source_digest: str
    source_times: dict[str, int]


def _round_trip(source: Path, output: Path, lazy: bool = True) -> RoundTrip:
    digest, times = tree_digest(source), tree_times(source)
    package = load_package(source, lazy=lazy)
    report = slice_attention(package.program, num_chunks=2)
    save_package(package, output)
    return RoundTrip(source, output, report, digest, times)


@pytest.fixture(scope="module", params=PACKAGES)
def round_trip(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> RoundTrip:
    source = request.getfixturevalue(f"{request.param}_package")
    return _round_trip(source, tmp_path_factory.mktemp(request.param) / "sliced.mlpackage")


@pytest.fixture
def own_copy(single_package: Path, tmp_path: Path) -> Path:
    """A private copy of the single-function package, for tests that might damage their input."""
    return Path(shutil.copytree(single_package, tmp_path / "input.mlpackage"))


def test_every_site_reported_rewritten_is_gone(round_trip: RoundTrip) -> None:
    program = load_package(round_trip.output).program
    assert round_trip.report.num_rewritten == len(program.functions)
    for name in program.functions:
        assert op_counts(program, name)[SDPA] == 0
        assert op_counts(program, name)["softmax"] == 2


def test_the_description_and_metadata_are_kept(round_trip: RoundTrip) -> None:
    before, after = model_spec(round_trip.source), model_spec(round_trip.output)
    assert after.description == before.description
    assert after.description.metadata.author == METADATA["author"]


def test_the_spec_version_and_build_info_are_kept(round_trip: RoundTrip) -> None:
    before, after = model_spec(round_trip.source), model_spec(round_trip.output)
    assert after.specificationVersion == before.specificationVersion
    assert after.mlProgram.attributes == before.mlProgram.attributes


def test_weights_are_bit_exact(round_trip: RoundTrip) -> None:
    before, after = const_values(round_trip.source), const_values(round_trip.output)
    assert before.keys() == after.keys()
    assert all(not before[name] - after[name] for name in before)
    source_weights, output_weights = round_trip.source / WEIGHT_FILE, round_trip.output / WEIGHT_FILE
    assert source_weights.exists() == output_weights.exists()
    if source_weights.exists():
        assert output_weights.read_bytes() == source_weights.read_bytes()


def test_the_input_is_untouched(round_trip: RoundTrip) -> None:
    assert tree_digest(round_trip.source) == round_trip.source_digest
    assert tree_times(round_trip.source) == round_trip.source_times


@pytest.mark.parametrize("name", PACKAGES)
def test_lazy_and_in_memory_loads_save_the_same_package(
    name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    source = request.getfixturevalue(f"{name}_package")
    lazy, in_memory = (
        _round_trip(source, tmp_path / f"{kind}.mlpackage", lazy=kind == "lazy").output
        for kind in ("lazy", "in_memory")
    )
    assert tree_digest(lazy) == tree_digest(in_memory)
    assert blob_offsets(lazy) == blob_offsets(in_memory)


def test_slicing_a_package_twice_in_one_process_writes_the_same_bytes(kv_package: Path, tmp_path: Path) -> None:
    """Found by a user: the names coremltools' loader makes up (``coreml_update_state_0``) came
    from one counter per process, so a second load of the same package named them anew."""
    first, second = (_round_trip(kv_package, tmp_path / f"{run}.mlpackage").output for run in ("first", "second"))
    assert tree_digest(first) == tree_digest(second)


def test_weights_shared_by_functions_stay_stored_once(multi_package: Path, tmp_path: Path) -> None:
    output = _round_trip(multi_package, tmp_path / "sliced.mlpackage").output
    offsets = blob_offsets(output)
    assert offsets == blob_offsets(multi_package)
    assert offsets["first"] & offsets["second"]
    assert (output / WEIGHT_FILE).read_bytes() == (multi_package / WEIGHT_FILE).read_bytes()


def test_a_weight_file_changed_after_loading_is_refused(own_copy: Path, tmp_path: Path) -> None:
    package = load_package(own_copy)
    os.utime(own_copy / WEIGHT_FILE, ns=(0, 0))
    with pytest.raises(PackageError, match="weight.bin changed after .* was loaded; load the package again"):
        save_package(package, tmp_path / "out.mlpackage")
    assert not (tmp_path / "out.mlpackage").exists()


def test_a_package_without_weights_gets_them_for_new_values(state_package: Path, tmp_path: Path) -> None:
    source = Path(_create_mlpackage(model_spec(state_package), None, str(tmp_path / "bare.mlpackage")))
    package = load_package(source)
    assert package.layout.weights_folder is None
    function = package.program.functions["main"]
    with function:
        mb.const(val=NEW_VALUE, name="new", before_op=function.operations[-1])
    output = save_package(package, tmp_path / "out.mlpackage")
    (new,) = [op for op in ops_in_block(load_package(output).program.functions["main"]) if op.name == "new"]
    np.testing.assert_array_equal(new.outputs[0].val, NEW_VALUE)


def test_a_damaged_weight_file_the_program_does_not_read_fails_when_values_are_appended(
    state_package: Path, tmp_path: Path
) -> None:
    """Found in review: appending to a weight file whose header is garbage raised coremltools' RuntimeError."""
    junk = tmp_path / "weights"
    junk.mkdir()
    (junk / "weight.bin").write_bytes(bytes(500))
    source = Path(_create_mlpackage(model_spec(state_package), str(junk), str(tmp_path / "junk.mlpackage")))
    package = load_package(source)
    function = package.program.functions["main"]
    with function:
        mb.const(val=NEW_VALUE, name="new", before_op=function.operations[-1])
    with pytest.raises(PackageError, match="weight file weight.bin has format version 0"):
        save_package(package, tmp_path / "out.mlpackage")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["junk.mlpackage", "weights"]


def test_every_function_and_the_default_are_kept(multi_package: Path, tmp_path: Path) -> None:
    trip = _round_trip(multi_package, tmp_path / "sliced.mlpackage")
    package = load_package(trip.output)
    assert package.function_names == FUNCTIONS
    assert package.default_function_name == DEFAULT_FUNCTION
    assert model_spec(trip.output).description.defaultFunctionName == DEFAULT_FUNCTION
    assert (trip.output / WEIGHT_FILE).stat().st_size <= (multi_package / WEIGHT_FILE).stat().st_size


def test_compressed_weights_stay_compressed(single_package: Path, tmp_path: Path) -> None:
    trip = _round_trip(single_package, tmp_path / "sliced.mlpackage")
    program = load_package(trip.output).program
    (compressed,) = [op for op in ops_in_block(program.functions["main"]) if op.op_type == COMPRESSED_WEIGHT]
    assert types.builtin_to_string(compressed.inputs["data"].dtype) == "int8"


def test_saving_leaves_the_program_as_it_was(multi_package: Path, tmp_path: Path) -> None:
    package = load_package(multi_package)
    for name in ("once", "twice"):
        save_package(package, tmp_path / f"{name}.mlpackage")
    consts = [
        op for function in package.program.functions.values() for op in ops_in_block(function) if op.op_type == "const"
    ]
    assert all(op.weight_id is None for op in consts)
    assert (tmp_path / "once.mlpackage" / WEIGHT_FILE).read_bytes() == (
        tmp_path / "twice.mlpackage" / WEIGHT_FILE
    ).read_bytes()


def test_other_tools_items_are_kept(own_copy: Path, tmp_path: Path) -> None:
    notes = tmp_path / EXTRA_ITEM["name"]
    notes.write_text("kept as is")
    ModelPackage(str(own_copy)).addItem(str(notes), EXTRA_ITEM["name"], EXTRA_ITEM["author"], EXTRA_ITEM["description"])
    output = _round_trip(own_copy, tmp_path / "sliced.mlpackage").output
    items = json.loads((output / _package.MANIFEST_NAME).read_text())["itemInfoEntries"].values()
    (item,) = [item for item in items if item["author"] == EXTRA_ITEM["author"]]
    assert {key: item[key] for key in EXTRA_ITEM} == EXTRA_ITEM
    assert (output / _package.DATA_FOLDER / item["path"]).read_text() == "kept as is"


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_a_bad_input_raises_package_error(kind: str, single_package: Path, tmp_path: Path) -> None:
    make, message = BAD_INPUTS[kind]
    with pytest.raises(PackageError, match=message):
        load_package(make(single_package, tmp_path))


OUTPUT_CASES = {
    "existing output": (
        lambda source, folder: Path(shutil.copytree(source, folder / "out.mlpackage")),
        "already exists",
    ),
    "the input itself": (lambda source, folder: source, "is the input package"),
    "inside the input": (lambda source, folder: source / "out.mlpackage", "inside one another"),
    "wrong suffix": (lambda source, folder: folder / "out.mlmodel", "must end in .mlpackage"),
    "missing folder": (lambda source, folder: folder / "absent" / "out.mlpackage", "does not exist"),
}


@pytest.mark.parametrize("case", OUTPUT_CASES)
def test_a_bad_output_is_refused_before_writing(case: str, own_copy: Path, tmp_path: Path) -> None:
    destination_of, message = OUTPUT_CASES[case]
    destination = destination_of(own_copy, tmp_path)
    before = {path: tree_digest(path) for path in (own_copy, destination) if path.exists()}
    package = load_package(own_copy)
    with pytest.raises(PackageError, match=message):
        save_package(package, destination)
    assert {path: tree_digest(path) for path in before} == before


def test_force_replaces_an_existing_output(single_package: Path, multi_package: Path, tmp_path: Path) -> None:
    destination = Path(shutil.copytree(multi_package, tmp_path / "out.mlpackage"))
    (destination / "stale.txt").write_text("old")
    save_package(load_package(single_package), destination, force=True)
    assert not (destination / "stale.txt").exists()
    assert load_package(destination).function_names == ("main",)


@pytest.mark.parametrize("case", NOT_PACKAGES)
def test_force_refuses_to_replace_anything_but_a_package(case: str, own_copy: Path, tmp_path: Path) -> None:
    """Found by a user: ``force`` removed any folder with the output's name."""
    destination = NOT_PACKAGES[case](own_copy, tmp_path)
    before = tree_digest(tmp_path)
    with pytest.raises(PackageError, match="is not an .mlpackage folder with a readable manifest") as raised:
        save_package(load_package(own_copy), destination, force=True)
    assert "\n" not in str(raised.value)
    assert tree_digest(tmp_path) == before and os.path.lexists(destination)


class _Injected(OSError):
    """Stands for a disk that fills up halfway through writing."""


@pytest.mark.parametrize("failure, raised", [(KeyboardInterrupt, KeyboardInterrupt), (_Injected, PackageError)])
@pytest.mark.parametrize("existing", [False, True], ids=["new output", "forced over an output"])
def test_a_failed_save_leaves_no_partial_package(
    failure: type, raised: type, existing: bool, own_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    destination = tmp_path / "out.mlpackage"
    if existing:
        save_package(load_package(own_copy), destination)
    before = {path: tree_digest(path) for path in tmp_path.iterdir()}
    real = _package._build

    def write_then_fail(*args: object) -> str:
        real(*args)
        raise failure("injected")

    monkeypatch.setattr(_package, "_build", write_then_fail)
    with pytest.raises(raised):
        save_package(load_package(own_copy), destination, force=True)
    assert {path: tree_digest(path) for path in tmp_path.iterdir()} == before


def test_a_failed_rename_puts_the_old_output_back(
    own_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    destination = save_package(load_package(own_copy), tmp_path / "out.mlpackage")
    before = tree_digest(destination)
    real = os.rename

    def refuse_the_new_package(source: str, target: str) -> None:
        if Path(target) == destination and Path(source).name == destination.name:
            raise _Injected("injected")
        real(source, target)

    monkeypatch.setattr(os, "rename", refuse_the_new_package)
    with pytest.raises(PackageError, match="cannot write"):
        save_package(load_package(own_copy), destination, force=True)
    assert tree_digest(destination) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["input.mlpackage", "out.mlpackage"]


def _read_only(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        folder.chmod(0o755)
        pytest.skip("this user can write to read-only folders (root)")


def _denied(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(**kwargs: object) -> str:
        raise PermissionError(13, "Permission denied", kwargs["dir"])

    monkeypatch.setattr(_package.tempfile, "mkdtemp", refuse)


@pytest.mark.parametrize("lock", [_read_only, _denied], ids=["chmod", "denied"])
def test_an_unwritable_folder_fails_cleanly(
    lock: Callable[[Path, pytest.MonkeyPatch], None],
    single_package: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = tmp_path / "locked"
    folder.mkdir()
    package = load_package(single_package)
    lock(folder, monkeypatch)
    try:
        with pytest.raises(PackageError, match=f"cannot write in {folder}: Permission denied"):
            save_package(package, folder / "out.mlpackage")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def test_a_read_only_input_gives_an_output_that_can_be_written_and_removed(own_copy: Path, tmp_path: Path) -> None:
    """Found in review: the input's read-only permissions were copied, so writing the new spec and
    weights failed for any user but root, and the partial folder could not be removed."""
    for path in [own_copy, *own_copy.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        destination = save_package(load_package(own_copy), tmp_path / "out.mlpackage")
    finally:
        for path in [own_copy, *own_copy.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    for path in [destination, *destination.rglob("*")]:
        assert path.stat().st_mode & stat.S_IWUSR, path
    assert sorted(path.name for path in tmp_path.iterdir()) == ["input.mlpackage", "out.mlpackage"]


def test_a_replaced_output_with_read_only_folders_is_removed(own_copy: Path, tmp_path: Path) -> None:
    destination = save_package(load_package(own_copy), tmp_path / "out.mlpackage")
    for folder in [path for path in destination.rglob("*") if path.is_dir()]:
        folder.chmod(0o555)
    save_package(load_package(own_copy), destination, force=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["input.mlpackage", "out.mlpackage"]
    assert all(path.stat().st_mode & stat.S_IWUSR for path in destination.rglob("*"))


def test_an_output_that_appears_while_saving_is_left_alone(own_copy: Path, tmp_path: Path) -> None:
    """Found in review: without force, an output another process made meanwhile was replaced and deleted."""
    destination = tmp_path / "out.mlpackage"

    def another_process_writes(written: int, total: int) -> None:
        destination.mkdir(exist_ok=True)
        (destination / "theirs.txt").write_text("keep me")

    with pytest.raises(PackageError, match="appeared while it was written"):
        save_package(load_package(own_copy), destination, progress=another_process_writes)
    assert [path.name for path in destination.iterdir()] == ["theirs.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["input.mlpackage", "out.mlpackage"]


def test_save_package_names_a_wrong_argument(single_package: Path, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="expects the Package load_package returns, got PosixPath"):
        save_package(single_package, tmp_path / "out.mlpackage")  # type: ignore[arg-type]


def test_a_program_that_no_longer_fits_its_description_is_refused(single_package: Path, tmp_path: Path) -> None:
    package = load_package(single_package)
    package.program.functions["main"].outputs[0].name = "renamed"
    with pytest.raises(PackageError, match="no longer match"):
        save_package(package, tmp_path / "out.mlpackage")
    assert not (tmp_path / "out.mlpackage").exists()


def test_package_size_counts_every_file(single_package: Path) -> None:
    files = [path for path in single_package.rglob("*") if path.is_file()]
    assert len(files) >= 3
    assert package_size(single_package) == sum(path.stat().st_size for path in files)
