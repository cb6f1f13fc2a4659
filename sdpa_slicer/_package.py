"""Read an ``.mlpackage`` into a MIL ``Program`` and write one back, keeping everything but the ops.

``load_package`` uses coremltools' milproto loader: every function comes back, compressed
weights stay ``constexpr_*`` ops. ``save_package`` serialises the program with no graph pass
at all and puts it into a copy of the input's model spec, so the model description (inputs,
outputs, states, their short descriptions, every function and the default function name),
the metadata and the spec version are those of the input. Equal weights are stored once.
The package is built in a hidden folder next to the destination and renamed into place
only when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Iterator, Optional, Union

import attrs
import coremltools as ct
import numpy as np
from coremltools import proto
from coremltools.converters.mil.backend.mil import load as mil_backend
from coremltools.converters.mil.frontend.milproto import load as milproto
from coremltools.converters.mil.mil import Operation, Program
from coremltools.libmodelpackage import ModelPackage
from coremltools.models.utils import _create_mlpackage

from sdpa_slicer._walk import walk_blocks

PACKAGE_SUFFIX = ".mlpackage"
MODEL_FILE_SUFFIX = ".mlmodel"
MANIFEST_NAME = "Manifest.json"
DATA_FOLDER = "Data"
COREML_AUTHOR = "com.apple.CoreML"
WEIGHTS_ITEM_NAME = "weights"
DEFAULT_FUNCTION_NAME = "main"
WEIGHT_ID_PREFIX = "sdpa_slicer_weight_"

PathLike = Union[str, "os.PathLike[str]"]


class PackageError(ValueError):
    """A package that cannot be read or written; the message names it."""


@attrs.define(eq=False)
class Package:
    """A loaded ``.mlpackage``: its MIL program (rewrite it in place) and the spec it came from."""

    path: Path
    program: Program
    spec: proto.Model_pb2.Model
    """The model spec as read: description, metadata, spec version and the original program."""

    @property
    def function_names(self) -> tuple[str, ...]:
        return tuple(self.program.functions)

    @property
    def default_function_name(self) -> str:
        return self.program.default_function_name


def load_package(path: PathLike) -> Package:
    """Load the ML program of the ``.mlpackage`` at ``path``; raise ``PackageError`` if it is not one."""
    path = Path(path)
    if not os.path.lexists(path):
        raise PackageError(f"{path} does not exist")
    if path.suffix == MODEL_FILE_SUFFIX:
        raise PackageError(
            f"{path} is an .mlmodel file; only ML programs saved as .mlpackage folders can be sliced"
        )
    if path.suffix != PACKAGE_SUFFIX or not path.is_dir():
        raise PackageError(f"{path} is not an .mlpackage folder")
    try:
        model = ct.models.MLModel(str(path), skip_model_load=True)
    except Exception as error:  # coremltools reports damage as RuntimeError, DecodeError, OSError, ...
        raise PackageError(f"{path} is not a readable package: {_first_line(error)}") from error
    spec = model.get_spec()
    kind = spec.WhichOneof("Type")
    if kind != "mlProgram":
        raise PackageError(f"{path} holds a {kind} model, not an ML program; only ML programs can be sliced")
    try:
        program = milproto.load(spec, spec.specificationVersion, model.weights_dir or "")
    except Exception as error:  # missing or truncated weight files, unsupported program content
        raise PackageError(f"the ML program in {path} cannot be read: {_first_line(error)}") from error
    description = spec.description
    if description.functions:
        described = [function.name for function in description.functions]
        if sorted(described) != sorted(program.functions):
            raise PackageError(
                f"{path} describes functions {', '.join(described)} but its program has "
                f"{', '.join(program.functions)}"
            )
        # The loader returns functions in protobuf map order; keep the package's order.
        program.functions = {name: program.functions[name] for name in described}
        program.default_function_name = description.defaultFunctionName
        program.export_as_multifunction = True
    elif list(program.functions) != [DEFAULT_FUNCTION_NAME]:
        raise PackageError(f"{path} has no function description for {', '.join(program.functions)}")
    return Package(path=path, program=program, spec=spec)


def save_package(package: Package, destination: PathLike, *, force: bool = False) -> Path:
    """Write ``package`` (its possibly rewritten program) as a new ``.mlpackage`` at ``destination``.

    Refuses to write over the input package, inside it or around it, and over an existing
    ``destination`` unless ``force``. Nothing appears at ``destination`` unless the whole
    package was written; on any failure (including ``KeyboardInterrupt``) an existing
    ``destination`` is left as it was.
    """
    destination = Path(destination)
    check_destination(package.path, destination, force)
    _check_program(package)
    with _staging_folder(destination) as staging:
        try:
            weights = staging / WEIGHTS_ITEM_NAME
            weights.mkdir()
            spec = _output_spec(package, weights)
            built = staging / destination.name
            _create_mlpackage(spec, str(weights), str(built))
            _copy_extra_items(package.path, built)
            _move_into_place(built, destination, staging)
        except OSError as error:
            raise PackageError(f"cannot write {destination}: {error}") from error
    return destination


def package_size(path: PathLike) -> int:
    """Total bytes of the files in a package folder."""
    return sum(
        os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def check_destination(source: Path, destination: Path, force: bool) -> None:
    """Raise ``PackageError`` if ``save_package`` must not write ``destination`` for the package at ``source``."""
    if destination.suffix != PACKAGE_SUFFIX:
        raise PackageError(f"output {destination} must end in {PACKAGE_SUFFIX}")
    source_real, destination_real = os.path.realpath(source), os.path.realpath(destination)
    if source_real == destination_real:
        raise PackageError(f"output {destination} is the input package; choose another output path")
    if os.path.commonpath([source_real, destination_real]) in (source_real, destination_real):
        raise PackageError(f"output {destination} and input {source} are inside one another")
    if os.path.lexists(destination) and not force:
        raise PackageError(f"output {destination} already exists; use force to replace it")
    if not destination.parent.is_dir():
        raise PackageError(f"output folder {destination.parent} does not exist")


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
    max_opset, op = program._get_max_opset_version_and_op()
    version = package.spec.specificationVersion
    if max_opset.value > version:
        raise PackageError(
            f"op '{op.name}' ({op.op_type}) needs {max_opset.name}, newer than the spec version {version} "
            f"of {package.path}"
        )


def _output_spec(package: Package, weights: Path) -> proto.Model_pb2.Model:
    """The input's spec with the program re-serialised; weights are written into ``weights``."""
    version = package.spec.specificationVersion
    with _shared_weights(package.program, version):
        exported = mil_backend.load(
            package.program,
            str(weights),
            specification_version=version,
            model_description=package.spec.description,
        )
    spec = proto.Model_pb2.Model()
    spec.CopyFrom(package.spec)
    attributes = dict(package.spec.mlProgram.attributes)  # the build info the loader does not keep
    spec.mlProgram.CopyFrom(exported.mlProgram)
    for key, value in attributes.items():
        spec.mlProgram.attributes[key].CopyFrom(value)
    return spec


@contextlib.contextmanager
def _shared_weights(program: Program, specification_version: int) -> Iterator[None]:
    """Give const ops with byte-identical weight-file values one ``weight_id``, so the value is
    stored once, in any function (what ``save_multifunction`` does); undone afterwards."""
    groups: dict[tuple[str, tuple[int, ...]], list[Operation]] = defaultdict(list)
    for visit in walk_blocks(program):
        for op in visit.ops:
            if op.op_type != "const" or op.weight_id is not None:
                continue
            value = op.outputs[0].val
            if mil_backend.should_use_weight_file(value, specification_version):
                groups[(str(op.outputs[0].sym_type), value.shape)].append(op)
    marked: list[Operation] = []
    try:
        shared = (same for ops in groups.values() for same in _equal_values(ops) if len(same) > 1)
        for number, same in enumerate(shared):
            for op in same:
                op.weight_id = f"{WEIGHT_ID_PREFIX}{number}"
                marked.append(op)
        yield
    finally:
        for op in marked:
            op._weight_id = None  # the public setter refuses to reset; leave the program as it was


def _equal_values(ops: list[Operation]) -> list[list[Operation]]:
    """``ops`` (same type and shape) grouped by byte-identical values."""
    if len(ops) < 2:
        return [ops]
    by_digest: dict[bytes, list[list[Operation]]] = defaultdict(list)
    for op in ops:
        data = _bytes_of(op)
        candidates = by_digest[hashlib.blake2b(data, digest_size=16).digest()]
        for group in candidates:
            if _bytes_of(group[0]) == data:
                group.append(op)
                break
        else:
            candidates.append([op])
    return [group for groups in by_digest.values() for group in groups]


def _bytes_of(op: Operation) -> memoryview:
    return memoryview(np.ascontiguousarray(op.outputs[0].val)).cast("B")  # type: ignore[arg-type]


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
        shutil.rmtree(staging, ignore_errors=True)


def _copy_extra_items(source: Path, built: Path) -> None:
    """Carry over manifest items other than the root model and the weights (other tools' data)."""
    manifest = json.loads((source / MANIFEST_NAME).read_text())
    root = manifest.get("rootModelIdentifier")
    extras = [
        item
        for identifier, item in manifest.get("itemInfoEntries", {}).items()
        if identifier != root and not (item.get("author") == COREML_AUTHOR and item.get("name") == WEIGHTS_ITEM_NAME)
    ]
    if not extras:
        return
    package = ModelPackage(str(built))
    for item in extras:
        package.addItem(str(source / DATA_FOLDER / item["path"]), item["name"], item["author"], item.get("description", ""))


def _move_into_place(built: Path, destination: Path, staging: Path) -> None:
    """Rename ``built`` to ``destination``; an existing destination goes into ``staging`` first
    and comes back if the rename fails."""
    replaced: Optional[Path] = None
    if os.path.lexists(destination):
        replaced = staging / "replaced"
        os.rename(destination, replaced)
    try:
        os.rename(built, destination)
    except BaseException:
        if replaced is not None:
            os.rename(replaced, destination)
        raise
