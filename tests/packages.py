"""Real ``.mlpackage`` files for tests: written by ``ct.convert`` or ``save_multifunction``,
described and signed like a shipped model, damaged in the ways users meet, and read back."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Callable, Mapping

import coremltools as ct
import coremltools.optimize.coreml as cto
import numpy as np
from coremltools import proto
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Program, types
from coremltools.models.utils import _create_mlpackage

from attention_cases import IOS18
from programs import (
    CACHE_SHAPE,
    PREFILL_LENGTH,
    SHAPE,
    kv_cache_function,
)
from sdpa_slicer._graph import ops_in_block
from sdpa_slicer._mlpackage.package import load_package
from sdpa_slicer._tools.examples import (  # noqa: F401 (the tests' builders of packages)
    DEFAULT_FUNCTION,
    FUNCTIONS,
    GROUPED_QUERY_CACHE,
    GROUPED_QUERY_LENGTHS,
    KEY_WEIGHT,
    METADATA,
    QUERY_CODES,
    USER_METADATA,
    WEIGHT_FILE,
    WEIGHT_RNG,
    combine,
    combined_package,
    convert,
    describe,
    grouped_query_package,
    multifunction_package,
    near_miss_package,
    projected_package,
    truncate,
    write_package,
)

COREML_DATA = Path("Data", "com.apple.CoreML")
MODEL_FILE = COREML_DATA / "model.mlmodel"
MANIFEST_NAME = "Manifest.json"


MASK = np.where(np.tril(np.ones((SHAPE[2], SHAPE[2]), dtype=bool)), 0.0, -1e4).astype(np.float32)
"""An additive causal mask, large enough to be stored in the weight file."""


def masked_package(path: Path) -> Path:
    """``main(q, k, v)``: attention with the constant ``MASK``, which slicing replaces by its row chunks."""

    @mb.program(input_specs=[mb.TensorSpec(SHAPE) for _ in range(3)], opset_version=IOS18)
    def prog(q, k, v):
        mask = mb.const(val=MASK, name="causal_mask")
        return mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=mask, name="attention")

    return write_package(prog, path)


def stateful_package(path: Path) -> Path:
    """``main(q, cache)``: attention over a KV-cache state that it then updates."""
    spec = mb.TensorSpec(SHAPE, dtype=types.fp16)
    state = mb.StateTensorSpec(SHAPE, dtype=types.fp16)

    @mb.program(input_specs=[spec, state], opset_version=IOS18)
    def prog(q, cache):
        cached = mb.read_state(input=cache, name="cached")
        out = mb.scaled_dot_product_attention(query=q, key=cached, value=cached, name="attention")
        mb.coreml_update_state(state=cache, value=out, name="update_cache")
        return mb.identity(x=out, name="output")

    return write_package(prog, path)


PROJECTIONS = {name: WEIGHT_RNG.standard_normal(CACHE_SHAPE[-1:] * 2).astype(np.float32) for name in ("q", "k", "v")}
"""The query, key and value weights of both functions of the KV-cache packages."""
KV_FUNCTIONS = {"prefill": PREFILL_LENGTH, "decode": 1}
KV_DEFAULT_FUNCTION = "prefill"
COMPRESSED_SIZE = 32
"""Weights with more elements than this are compressed."""
COMPRESSIONS: Mapping[str, Callable[[ct.models.MLModel], ct.models.MLModel]] = {
    "int8": lambda model: cto.linear_quantize_weights(
        model,
        cto.OptimizationConfig(
            cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", weight_threshold=COMPRESSED_SIZE)
        ),
    ),
    "palettized4": lambda model: cto.palettize_weights(
        model,
        cto.OptimizationConfig(cto.OpPalettizerConfig(mode="uniform", nbits=4, weight_threshold=COMPRESSED_SIZE)),
    ),
}
"""How ``coremltools.optimize.coreml`` compresses a model's weights, by name (no scikit-learn needed)."""
COMPRESSED_OP_TYPES = {"int8": "constexpr_blockwise_shift_scale", "palettized4": "constexpr_lut_to_dense"}


def kv_cache_package(path: Path, compression: str) -> Path:
    """``prefill`` (the default) and ``decode`` functions attending over KV-cache states, their
    projection weights compressed by ``COMPRESSIONS[compression]``, combined by ``save_multifunction``."""
    functions = {name: kv_cache_function(length, PROJECTIONS) for name, length in KV_FUNCTIONS.items()}

    def save(prog: Program, part: Path) -> None:
        COMPRESSIONS[compression](convert(prog)).save(str(part))

    return combined_package(path, functions, KV_DEFAULT_FUNCTION, save)


def model_spec(path: Path) -> proto.Model_pb2.Model:
    """The package's model spec, read from its file (``MLModel`` would rewrite the manifest)."""
    spec = proto.Model_pb2.Model()
    spec.ParseFromString((path / MODEL_FILE).read_bytes())
    return spec


def tree_times(path: Path) -> dict[str, int]:
    """The modification time of ``path`` and of every file and folder under it, by relative path."""
    return {
        str(Path(root, name).relative_to(path)): os.stat(Path(root, name)).st_mtime_ns
        for root, folders, files in os.walk(path)
        for name in [".", *folders, *files]
    }


def tree_digest(path: Path) -> str:
    """A hash of every file's relative path and bytes under ``path``."""
    digest = hashlib.sha256()
    for root, folders, files in os.walk(path):
        folders.sort()
        for name in sorted(files):
            file = Path(root, name)
            digest.update(str(file.relative_to(path)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def const_values(path: Path) -> dict[str, Counter]:
    """Per function, how often each const value ``(dtype, shape, bytes)`` occurs in the package's
    program (by value: the loader names the consts feeding compressed weights anew each time)."""
    return program_const_values(load_package(path).program)


def program_const_values(program: Program) -> dict[str, Counter]:
    """``const_values`` of a loaded program."""
    values = {}
    for function_name, function in program.functions.items():
        consts = [op.outputs[0] for op in ops_in_block(function) if op.op_type == "const"]
        values[function_name] = Counter(
            (types.builtin_to_string(var.dtype), np.shape(var.val), np.asarray(var.val).tobytes()) for var in consts
        )
    return values


def compressed_weights(path: Path) -> dict[str, Counter]:
    """Per function, how often each ``constexpr_*`` op occurs with given stored inputs
    ``(op type, ((input name, dtype, shape, bytes), ...))``."""
    program = load_package(path).program
    weights = {}
    for function_name, function in program.functions.items():
        weights[function_name] = Counter(
            (
                op.op_type,
                tuple(
                    (name, types.builtin_to_string(var.dtype), np.shape(var.val), np.asarray(var.val).tobytes())
                    for name, var in sorted(op.inputs.items())
                ),
            )
            for op in ops_in_block(function)
            if op.op_type.startswith("constexpr_")
        )
    return weights


def blob_values(path: Path) -> dict[str, dict[str, proto.MIL_pb2.Value]]:
    """Per function, the values of its top-level ops stored in the weight file, by op name and
    argument: const values (``name``), and the inline arguments of iOS18 ``constexpr_*`` ops
    (``name.argument``)."""
    stored = {}
    for function_name, function in model_spec(path).mlProgram.functions.items():
        values = {}
        for block in function.block_specializations.values():
            for op in block.operations:
                name = op.attributes["name"].immediateValue.tensor.strings.values[0]
                if "val" in op.attributes and op.attributes["val"].HasField("blobFileValue"):
                    values[name] = op.attributes["val"]
                for argument, binding in op.inputs.items():
                    values.update(
                        (f"{name}.{argument}", bound.value)
                        for bound in binding.arguments
                        if bound.value.HasField("blobFileValue")
                    )
        stored[function_name] = values
    return stored


def blob_offsets(path: Path) -> dict[str, set[int]]:
    """Per function, where in the weight file the values of its top-level ops are stored."""
    return {
        name: {value.blobFileValue.offset for value in values.values()} for name, values in blob_values(path).items()
    }


def _neuralnetwork_spec() -> proto.Model_pb2.Model:
    @mb.program(input_specs=[mb.TensorSpec((1, 4))])
    def prog(x):
        return mb.relu(x=x, name="y")

    return ct.convert(prog, convert_to="neuralnetwork").get_spec()


def _missing(good: Path, folder: Path) -> Path:
    return folder / "missing.mlpackage"


def _model_file(good: Path, folder: Path) -> Path:
    path = folder / "model.mlmodel"
    ct.utils.save_spec(_neuralnetwork_spec(), str(path))
    return path


def _plain_folder(good: Path, folder: Path) -> Path:
    path = folder / "plain"
    shutil.copytree(good, path)
    return path


def _neuralnetwork_package(good: Path, folder: Path) -> Path:
    path = folder / "neuralnetwork.mlpackage"
    _create_mlpackage(_neuralnetwork_spec(), None, str(path))
    return path


def _damaged(remove: Path) -> Callable[[Path, Path], Path]:
    def damage(good: Path, folder: Path) -> Path:
        path = folder / f"without_{remove.name}.mlpackage"
        shutil.copytree(good, path)
        os.remove(path / remove)
        return path

    return damage


def _garbled(file: Path, content: bytes) -> Callable[[Path, Path], Path]:
    def garble(good: Path, folder: Path) -> Path:
        path = folder / f"garbled_{file.name}.mlpackage"
        shutil.copytree(good, path)
        (path / file).write_bytes(content)
        return path

    return garble


FIRST_BLOB = 64
"""The first blob record of a weight file, right after its 64-byte header."""


def _weight_file_damage(name: str, damage: Callable[[bytearray], None]) -> Callable[[Path, Path], Path]:
    """A copy of the good package whose weight file ``damage`` has changed in place."""

    def damaged(good: Path, folder: Path) -> Path:
        path = folder / f"{name}.mlpackage"
        shutil.copytree(good, path)
        data = bytearray((path / WEIGHT_FILE).read_bytes())
        damage(data)
        (path / WEIGHT_FILE).write_bytes(bytes(data))
        return path

    return damaged


def _overwrite(offset: int, content: bytes) -> Callable[[bytearray], None]:
    def overwrite(data: bytearray) -> None:
        data[offset : offset + len(content)] = content

    return overwrite


BAD_INPUTS: Mapping[str, tuple[Callable[[Path, Path], Path], str]] = {
    "missing path": (_missing, "does not exist"),
    "mlmodel file": (_model_file, "is an .mlmodel file"),
    "plain folder": (_plain_folder, "is not an .mlpackage folder"),
    "neuralnetwork": (_neuralnetwork_package, "holds a neuralNetwork model, not an ML program"),
    "no manifest": (_damaged(Path(MANIFEST_NAME)), "is not a readable package: Manifest.json: No such file"),
    "no model file": (_damaged(MODEL_FILE), "is not a readable package"),
    "no weight file": (_damaged(WEIGHT_FILE), "cannot be read"),
    "garbled model file": (_garbled(MODEL_FILE, b"\x01 not a protobuf"), "model.mlmodel is damaged"),
    "garbled manifest": (_garbled(Path(MANIFEST_NAME), b"{ not json"), "Manifest.json is damaged"),
    "truncated weight file": (_weight_file_damage("truncated", truncate), "weight.bin is truncated"),
    "weight file without its header": (_weight_file_damage("headless", lambda data: data.clear()), "is truncated"),
    "weight file of another version": (
        _weight_file_damage("version", _overwrite(4, (1).to_bytes(4, "little"))),
        "has format version 1",
    ),
    "blob record overwritten": (_weight_file_damage("record", _overwrite(FIRST_BLOB, bytes(4))), "is damaged"),
    "blob of another type": (
        _weight_file_damage("type", _overwrite(FIRST_BLOB + 4, (13).to_bytes(4, "little"))),
        "is damaged",
    ),
}
"""Inputs that are not a usable ML program package: how to make one from a good package in a
folder, and what the error says."""


def _output_folder(folder: Path) -> Path:
    (folder / "out.mlpackage").mkdir()
    return folder / "out.mlpackage"


def _folder_with_a_file(good: Path, folder: Path) -> Path:
    (_output_folder(folder) / "marker").write_text("keep me")
    return folder / "out.mlpackage"


def _plain_file(good: Path, folder: Path) -> Path:
    (folder / "out.mlpackage").write_text("keep me")
    return folder / "out.mlpackage"


def _garbled_manifest(good: Path, folder: Path) -> Path:
    (_output_folder(folder) / MANIFEST_NAME).write_text("{not json")
    return folder / "out.mlpackage"


def _link_to_a_package(good: Path, folder: Path) -> Path:
    shutil.copytree(good, folder / "elsewhere.mlpackage")
    (folder / "out.mlpackage").symlink_to(folder / "elsewhere.mlpackage")
    return folder / "out.mlpackage"


NOT_PACKAGES: dict[str, Callable[[Path, Path], Path]] = {
    "a folder holding a file": _folder_with_a_file,
    "an empty folder": lambda good, folder: _output_folder(folder),
    "a file": _plain_file,
    "a garbled manifest": _garbled_manifest,
    "a link to a package": _link_to_a_package,
}
"""Things with an output's name that ``force`` must not replace: (a good package, a folder) -> the path."""
