"""Read an ``.mlpackage`` into a MIL ``Program`` and write one back, keeping everything but the ops.

``load_package`` reads the manifest and the model spec itself (opening a package with
coremltools' ``MLModel`` rewrites its manifest) and builds the program with coremltools'
milproto loader: every function comes back, compressed weights stay ``constexpr_*`` ops. A
value stored in a weight file is not read: it becomes a read-only view of the memory-mapped
file (see ``weights.py``), a sub-byte value stays packed, so loading takes about as long and
as much memory for 16 GB of weights, compressed or not, as for none, and only the values that a
rewrite or ``evaluate`` touches are ever read.

``save_package`` copies the input package file by file, weight files in the kernel where the
operating system allows, and replaces the model spec with the program serialised by
coremltools' exporter with no graph pass, inside a copy of the input's spec: the model
description (inputs, outputs, states, their short descriptions, every function and the
default function name), the metadata and the spec version are those of the input. Values
still stored in the input keep their offsets, so the weight file is the input's, byte for
byte, with only new values appended, each distinct one once (``compact=True`` writes only the
blobs the program refers to; ``weight_usage`` counts those it does not). The spec is serialised
deterministically (maps in sorted order) and the program loaded the same way in every run, so
the same input and rewrite give the same bytes. The package is built in a hidden folder next to
the destination and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import attrs
from coremltools import proto
from coremltools.converters.mil.mil import Program
from coremltools.libmodelpackage import ModelPackage

from sdpa_slicer._coreml_compat import load_milproto, newest_opset_op
from sdpa_slicer._errors import BlobError, PackageError
from sdpa_slicer._mlpackage.blobs import BlobFile
from sdpa_slicer._mlpackage.weights import PackageWeights, export_program, reading_weights
from sdpa_slicer._text import first_line

PACKAGE_SUFFIX = ".mlpackage"
MODEL_FILE_SUFFIX = ".mlmodel"
MANIFEST_NAME = "Manifest.json"
DATA_FOLDER = "Data"
COREML_AUTHOR = "com.apple.CoreML"
WEIGHTS_ITEM_NAME = "weights"
WEIGHTS_DESCRIPTION = "CoreML Model Weights"
DEFAULT_FUNCTION_NAME = "main"
NOT_A_PACKAGE = (
    "output {destination} exists and is not an .mlpackage folder with a readable manifest; "
    "only a package is ever replaced: move it away or choose another output path"
)

PathLike = Union[str, "os.PathLike[str]"]
ProgressCallback = Callable[[int, int], None]
"""Told the work done so far and the total: ops built when loading, bytes written when saving."""


@attrs.frozen
class PackageLayout:
    """Where a package keeps its model spec and its weights folder, as its manifest says."""

    model_file: Path
    weights_folder: Optional[Path]
    """None when the package has no weights item."""


@attrs.define(eq=False)
class Package:
    """A loaded ``.mlpackage``: its MIL program (rewrite it in place) and the spec it came from."""

    path: Path
    program: Program
    spec: proto.Model_pb2.Model
    """The model spec as read: description, metadata, spec version and the original program."""
    layout: PackageLayout
    weights: PackageWeights
    """The weight files the program's values are read from, and which value is stored where."""

    @property
    def function_names(self) -> tuple[str, ...]:
        return tuple(self.program.functions)

    @property
    def default_function_name(self) -> str:
        return self.program.default_function_name


def load_package(path: PathLike, *, lazy: bool = True, progress: Optional[ProgressCallback] = None) -> Package:
    """Load the ML program of the ``.mlpackage`` at ``path``; raise ``PackageError`` if it is not one.

    Weights are memory-mapped and read only when used; ``lazy=False`` reads them all into
    memory now. Either way they are read-only arrays. Nothing is written to the package.
    ``progress`` is told the ops built so far and the total.
    """
    path = Path(path)
    if not os.path.lexists(path):
        raise PackageError(f"{path} does not exist")
    if path.suffix == MODEL_FILE_SUFFIX:
        raise PackageError(f"{path} is an .mlmodel file; only ML programs saved as .mlpackage folders can be sliced")
    if path.suffix != PACKAGE_SUFFIX or not path.is_dir():
        raise PackageError(f"{path} is not an .mlpackage folder")
    layout = _read_layout(path)
    try:
        data = (path / layout.model_file).read_bytes()
    except OSError as error:
        raise PackageError(
            f"{path} is not a readable package: {layout.model_file}: {error.strerror or error}"
        ) from error
    spec = proto.Model_pb2.Model()
    try:
        spec.ParseFromString(data)
    except Exception as error:  # protobuf's DecodeError
        raise PackageError(
            f"{path} is not a readable package: {layout.model_file} is damaged ({first_line(error)})"
        ) from error
    kind = spec.WhichOneof("Type")
    if kind != "mlProgram":
        raise PackageError(f"{path} holds a {kind} model, not an ML program; only ML programs can be sliced")
    weights_folder = None if layout.weights_folder is None else path / layout.weights_folder
    weights = PackageWeights(weights_folder, lazy=lazy)
    program = _read_program(path, spec, weights, progress)
    return Package(path=path, program=program, spec=spec, layout=layout, weights=weights)


def save_package(
    package: Package,
    destination: PathLike,
    *,
    force: bool = False,
    progress: Optional[ProgressCallback] = None,
    compact: bool = False,
) -> Path:
    """Write ``package`` (its possibly rewritten program) as a new ``.mlpackage`` at ``destination``.

    The weight file is the input's, byte for byte, with new values appended; blobs the program
    no longer refers to stay in it (``weight_usage`` counts them). ``compact=True`` writes only
    the blobs the program refers to instead, at the cost of rewriting the weight file.

    Refuses to write over the input package, inside it or around it, over an existing
    ``destination`` unless ``force``, and over anything but a package (a folder with a readable
    manifest) even with ``force``. Nothing appears at ``destination`` unless the whole
    package was written; on any failure (including ``KeyboardInterrupt``) an existing
    ``destination`` is left as it was. ``progress`` is told the bytes of weights written.
    """
    with staged_package(package, destination, force=force, progress=progress, compact=compact) as put_in_place:
        put_in_place()
    return Path(destination)


@contextlib.contextmanager
def staged_package(
    package: Package,
    destination: PathLike,
    *,
    force: bool = False,
    progress: Optional[ProgressCallback] = None,
    compact: bool = False,
) -> Iterator[Callable[[], None]]:
    """``save_package`` in two steps: the package is written into a hidden folder next to
    ``destination`` on entry, and the function yielded puts it in place (a rename). Unless that
    function is called, nothing appears at ``destination``, and the hidden folder is removed at exit."""
    if not isinstance(package, Package):
        raise TypeError(f"save_package expects the Package load_package returns, got {type(package).__name__}")
    destination = Path(destination)
    check_destination(package.path, destination, force)
    _check_program(package)
    changed = package.weights.changed_files()
    if changed:
        raise PackageError(f"{changed[0]} changed after {package.path} was loaded; load the package again")
    with _staging_folder(destination) as staging:
        built = staging / destination.name
        with _writing(destination):
            _build(package, built, staging / WEIGHTS_ITEM_NAME, progress, compact)

        def put_in_place() -> None:
            with _writing(destination):
                _move_into_place(built, destination, staging, force)

        yield put_in_place


@contextlib.contextmanager
def _writing(destination: Path) -> Iterator[None]:
    """A failed write of ``destination`` as one ``PackageError``."""
    try:
        yield
    except (OSError, BlobError) as error:
        raise PackageError(f"cannot write {destination}: {error}") from error


def package_size(path: PathLike) -> int:
    """Total bytes of the files in a package folder."""
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def _read_layout(path: Path) -> PackageLayout:
    """The model spec and weights folder named by the package's manifest."""
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_bytes())
        entries = manifest["itemInfoEntries"]
        root = entries[manifest["rootModelIdentifier"]]
        model_file = Path(DATA_FOLDER, root["path"])
        weights = [
            Path(DATA_FOLDER, item["path"])
            for item in entries.values()
            if item.get("author") == COREML_AUTHOR and item.get("name") == WEIGHTS_ITEM_NAME
        ]
    except OSError as error:
        raise PackageError(f"{path} is not a readable package: {MANIFEST_NAME}: {error.strerror or error}") from error
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        damage = f"{type(error).__name__}: {first_line(error)}"
        raise PackageError(f"{path} is not a readable package: {MANIFEST_NAME} is damaged ({damage})") from error
    return PackageLayout(model_file=model_file, weights_folder=weights[0] if weights else None)


def _read_program(
    path: Path, spec: proto.Model_pb2.Model, weights: PackageWeights, progress: Optional[ProgressCallback]
) -> Program:
    """The spec's ML program, every function in the package's order, the default function set."""
    total = sum(_count_ops(function) for function in spec.mlProgram.functions.values())
    built = [0]

    def on_op() -> None:
        built[0] += 1
        if progress is not None:
            progress(built[0], total)

    try:
        with reading_weights(weights, on_op):
            program = load_milproto(
                spec.mlProgram, spec.specificationVersion, str(weights.folder or ""), sorted(spec.mlProgram.functions)
            )
    except Exception as error:  # damaged weight files, unsupported program content
        raise PackageError(f"the ML program in {path} cannot be read: {first_line(error)}") from error
    description = spec.description
    if description.functions:
        described = [function.name for function in description.functions]
        if sorted(described) != sorted(program.functions):
            raise PackageError(
                f"{path} describes functions {', '.join(described)} but its program has {', '.join(program.functions)}"
            )
        # Loaded in sorted order, the same in every run; keep the package's order.
        program.functions = {name: program.functions[name] for name in described}
        program.default_function_name = description.defaultFunctionName
        program.export_as_multifunction = True
    elif list(program.functions) != [DEFAULT_FUNCTION_NAME]:
        raise PackageError(f"{path} has no function description for {', '.join(program.functions)}")
    return program


def _count_ops(function: Any) -> int:
    """Ops in a milproto function or block, nested blocks included."""
    blocks = function.block_specializations.values() if hasattr(function, "block_specializations") else [function]
    return sum(1 + sum(_count_ops(block) for block in op.blocks) for block in blocks for op in block.operations)


def check_destination(source: Path, destination: Path, force: bool) -> None:
    """Raise ``PackageError`` if ``save_package`` must not write ``destination`` for the package at ``source``."""
    if destination.suffix != PACKAGE_SUFFIX:
        raise PackageError(f"output {destination} must end in {PACKAGE_SUFFIX}")
    source_real, destination_real = os.path.realpath(source), os.path.realpath(destination)
    if source_real == destination_real:
        raise PackageError(f"output {destination} is the input package; choose another output path")
    if os.path.commonpath([source_real, destination_real]) in (source_real, destination_real):
        raise PackageError(f"output {destination} and input {source} are inside one another")
    if os.path.lexists(destination):
        if not _is_package(destination):
            raise PackageError(NOT_A_PACKAGE.format(destination=destination))
        if not force:
            raise PackageError(f"output {destination} already exists; use force to replace it")
    if not destination.parent.is_dir():
        raise PackageError(f"output folder {destination.parent} does not exist")


def _is_package(path: Path) -> bool:
    """Whether ``path`` is a package folder (not a link to one) with a readable manifest: the one
    kind of thing ``force`` replaces."""
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        _read_layout(path)
    except PackageError:
        return False
    return True


def _check_program(package: Package) -> None:
    """The program must still fit the spec it will be saved with: functions, inputs, outputs, opset."""
    program, description = package.program, package.spec.description
    described = (
        {function.name: function for function in description.functions}
        if description.functions
        else {DEFAULT_FUNCTION_NAME: description}
    )
    if sorted(described) != sorted(program.functions):
        raise PackageError(
            f"the program's functions {', '.join(program.functions)} no longer match "
            f"{', '.join(described)} of {package.path}"
        )
    for name, function in program.functions.items():
        features = described[name]
        inputs = sorted([feature.name for feature in features.input] + [state.name for state in features.state])
        outputs = [feature.name for feature in features.output]
        if sorted(function.inputs) != inputs or [var.name for var in function.outputs] != outputs:
            raise PackageError(f"the inputs or outputs of function '{name}' no longer match {package.path}")
    max_opset, op = newest_opset_op(program)
    version = package.spec.specificationVersion
    if max_opset.value > version:
        raise PackageError(
            f"op '{op.name}' ({op.op_type}) needs {max_opset.name}, newer than the spec version {version} "
            f"of {package.path}"
        )


def _build(
    package: Package, built: Path, new_weights: Path, progress: Optional[ProgressCallback], compact: bool
) -> None:
    """Write the package at ``built``: the input's files, its weight files as loaded, the new spec.

    Values that are not in the input's weight files are appended to the copied ``weight.bin``
    (a new one if there is none), or, for a package without a weights item, written into
    ``new_weights`` and added to the package as its weights.
    """
    source, layout, weights = package.path, package.layout, package.weights
    skipped = {os.path.join(source, layout.model_file), *(os.fspath(blob_file.path) for blob_file in weights.files)}
    _copy_contents(source, built, skipped)
    total = sum(blob_file.size for blob_file in weights.files)
    written = [0]

    def copied(count: int) -> None:
        written[0] += count
        if progress is not None:
            progress(written[0], total)

    weights_folder = new_weights if layout.weights_folder is None else built / layout.weights_folder
    weights.copy_files(weights_folder, copied)
    spec = _output_spec(package, weights_folder)
    if compact:
        _compact(spec, weights_folder)
    (built / layout.model_file).write_bytes(spec.SerializeToString(deterministic=True))
    if layout.weights_folder is None and weights_folder.exists():
        ModelPackage(str(built)).addItem(str(weights_folder), WEIGHTS_ITEM_NAME, COREML_AUTHOR, WEIGHTS_DESCRIPTION)


@attrs.frozen
class WeightUsage:
    """How much of a package's weight files its program refers to."""

    referenced_bytes: int
    unreferenced_bytes: int
    """Blobs (their records, data and padding) no value of the program refers to."""
    unreferenced_blobs: int


def weight_usage(path: PathLike) -> WeightUsage:
    """Count the blobs of the weight files of the package at ``path`` that its program refers to,
    and those it does not (left behind by a rewrite: ``save_package(..., compact=True)`` drops them)."""
    path = Path(path)
    layout = _read_layout(path)
    spec = proto.Model_pb2.Model()
    spec.ParseFromString((path / layout.model_file).read_bytes())
    referenced = _referenced_offsets(spec)
    usage = [0, 0, 0]
    if layout.weights_folder is not None and (path / layout.weights_folder).is_dir():
        for file in sorted((path / layout.weights_folder).glob("*.bin")):
            blob_file = BlobFile(file)
            for record in blob_file.records():
                used = record.offset in referenced.get(file.name, set())
                usage[0 if used else 1] += blob_file.span(record)
                usage[2] += not used
    return WeightUsage(referenced_bytes=usage[0], unreferenced_bytes=usage[1], unreferenced_blobs=usage[2])


def _blob_file_values(spec: proto.Model_pb2.Model) -> Iterator[proto.MIL_pb2.Value]:
    """Every value of the spec's program stored in a weight file: of ops' attributes and inputs, nested blocks too."""

    def in_block(block: Any) -> Iterator[proto.MIL_pb2.Value]:
        for op in block.operations:
            values = list(op.attributes.values())
            values += [binding.value for argument in op.inputs.values() for binding in argument.arguments]
            yield from (value for value in values if value.HasField("blobFileValue"))
            for inner in op.blocks:
                yield from in_block(inner)

    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            yield from in_block(block)


def _referenced_offsets(spec: proto.Model_pb2.Model) -> dict[str, set[int]]:
    """The offsets the program refers to, by weight file name."""
    offsets: dict[str, set[int]] = {}
    for value in _blob_file_values(spec):
        offsets.setdefault(value.blobFileValue.fileName.split("/")[-1], set()).add(value.blobFileValue.offset)
    return offsets


def _compact(spec: proto.Model_pb2.Model, weights_folder: Path) -> None:
    """Rewrite each weight file in ``weights_folder`` with only the blobs the program refers to
    (none, for a file it does not refer to), and point the program's values at their new offsets."""
    moved = {}
    referenced = _referenced_offsets(spec)
    for path in sorted(weights_folder.glob("*.bin")):
        name, offsets = path.name, referenced.get(path.name, set())
        blob_file = BlobFile(path)
        compacted = path.with_name(f".{name}.compact")
        moved[name] = blob_file.write_compacted(compacted, [blob_file.record(offset) for offset in sorted(offsets)])
        os.replace(compacted, path)
    for value in _blob_file_values(spec):
        file_value = value.blobFileValue
        file_value.offset = moved[file_value.fileName.split("/")[-1]][file_value.offset]


def _copy_contents(source: Path, built: Path, skipped: set[str]) -> None:
    """Copy the files of ``source`` but ``skipped`` into a new folder ``built``: their bytes, not
    their permissions, so that a read-only input gives an output that can be written and removed."""
    for folder, _, names in os.walk(source, followlinks=True):
        target = built / os.path.relpath(folder, source)
        target.mkdir(parents=True, exist_ok=True)
        for name in names:
            path = os.path.join(folder, name)
            if path not in skipped:
                shutil.copyfile(path, target / name)


def _output_spec(package: Package, weights_folder: Path) -> proto.Model_pb2.Model:
    """The input's spec with the program re-serialised; new values are written into ``weights_folder``."""
    exported = export_program(package.program, weights_folder, package.spec.specificationVersion, package.weights)
    spec = proto.Model_pb2.Model()
    spec.CopyFrom(package.spec)
    attributes = dict(package.spec.mlProgram.attributes)  # the build info the loader does not keep
    spec.mlProgram.CopyFrom(exported)
    for key, value in attributes.items():
        spec.mlProgram.attributes[key].CopyFrom(value)
    return spec


@contextlib.contextmanager
def _staging_folder(destination: Path) -> Iterator[Path]:
    """A hidden folder next to ``destination`` (same file system, so a rename moves it), removed at exit."""
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".partial", dir=destination.parent))
    except OSError as error:
        raise PackageError(f"cannot write in {destination.parent}: {error.strerror or error}") from error
    try:
        yield staging
    finally:
        _remove_tree(staging)


def _remove_tree(path: Path) -> None:
    """Remove ``path`` and all below it, read-only folders too (a replaced output may have some)."""

    def make_writable_and_retry(remove: Callable[[str], object], failed: str, *_: object) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(failed), stat.S_IRWXU)
            remove(failed)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=make_writable_and_retry)
    else:
        shutil.rmtree(path, onerror=make_writable_and_retry)


def _move_into_place(built: Path, destination: Path, staging: Path, force: bool) -> None:
    """Rename ``built`` to ``destination``; with ``force``, an existing destination goes into
    ``staging`` first and comes back if the rename fails. Without it, a destination that appeared
    while the package was built is left alone (a rename fails over anything but an empty folder)."""
    replaced: Optional[Path] = None
    if os.path.lexists(destination):
        if not force:
            raise PackageError(f"output {destination} appeared while it was written; use force to replace it")
        if not _is_package(destination):
            raise PackageError(NOT_A_PACKAGE.format(destination=destination))
        replaced = staging / "replaced"
        os.rename(destination, replaced)
    try:
        os.rename(built, destination)
    except BaseException:
        if replaced is not None:
            os.rename(replaced, destination)
        raise
