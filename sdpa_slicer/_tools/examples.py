"""The example packages of docs/cli.md, as ``sdpa-slicer examples DIR`` writes them (the tests
build them with the same code):

- ``model.mlpackage``: two functions, ``first`` and ``second`` (the default), each an attention
  of projected queries and keys (L = S = 64), the query weight int8-compressed, the key weight
  shared; with every kind of metadata a shipped model carries.
- ``near-misses.mlpackage``: one attention written out as ops, and two softmax ops between
  matmuls that no pattern takes.
- ``truncated.mlpackage``: a one-function ``model.mlpackage`` whose weight file lost its end.
- ``grouped-query.mlpackage``: a grouped-query layer of Llama-3.2-1B's heads over a KV cache in
  Core ML states, as a prefill (1024 tokens, the default) and a decode function.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import coremltools as ct
import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Function, Program, Var

from sdpa_slicer._errors import PackageError
from sdpa_slicer._tools.demo import grouped_query_layer

IOS18 = ct.target.iOS18
SHAPE = (1, 2, 64, 8)
"""Batch, heads, L = S = 64 (the default min_seq_length), E = EV = 8."""
WEIGHT_RNG = np.random.default_rng(20240611)
KEY_WEIGHT = WEIGHT_RNG.standard_normal((8, 8)).astype(np.float32)
"""Shared by both functions of the multi-function package."""
QUERY_CODES = {name: WEIGHT_RNG.integers(-128, 128, (8, 8)).astype(np.int8) for name in ("main", "first", "second")}
"""One int8-compressed query weight per function."""
METADATA = {
    "author": "Jane Doe",
    "license": "BSD-3-Clause",
    "short_description": "attention with projected queries and keys",
    "version": "1.2.3",
}
USER_METADATA = {"com.example.origin": "sdpa_slicer/_tools/examples.py", "empty": ""}
FUNCTIONS = ("first", "second")
DEFAULT_FUNCTION = "second"
WEIGHT_FILE = Path("Data", "com.apple.CoreML", "weights", "weight.bin")
TRUNCATED_BYTES = 100
"""What the truncated package's weight file lost."""
PREFILL, DECODE = "prefill", "decode"
GROUPED_QUERY_LENGTHS = {PREFILL: 1024, DECODE: 1}
GROUPED_QUERY_CACHE = 2048
"""The grouped-query package's functions (their query lengths) and KV cache length."""


def projected_attention_program(
    key_weight: np.ndarray, query_codes: np.ndarray, shape: tuple[int, ...] = SHAPE
) -> Program:
    """``main(q, k, v)``: attention of ``q @ W_q`` and ``k @ key_weight``, ``W_q`` an int8-compressed
    weight (``constexpr_blockwise_shift_scale`` of ``query_codes``), so a package of it has weights."""
    scale = np.full((query_codes.shape[0], 1), 0.125, dtype=np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape) for _ in range(3)], opset_version=IOS18)
    def prog(q, k, v):
        query_weight = mb.constexpr_blockwise_shift_scale(data=query_codes, scale=scale, name="query_weight")
        query = mb.matmul(x=q, y=query_weight, name="query")
        key = mb.matmul(x=k, y=key_weight, name="key")
        return mb.scaled_dot_product_attention(query=query, key=key, value=v, name="attention")

    return prog


def near_miss_program(shape: tuple[int, ...] = SHAPE) -> Program:
    """``main(q, k, v)``: one attention written out as ops (``attention``), and two softmax ops
    between matmuls that no pattern takes: one over the query axis (``weights_by_query``), one
    whose scores go through a ``gather`` first (``weights_gathered``)."""
    key_length = shape[-2]

    @mb.program(input_specs=[mb.TensorSpec(shape) for _ in range(3)], opset_version=IOS18)
    def prog(q, k, v):
        def scores(query: Var, name: str) -> Var:
            return mb.matmul(
                x=mb.mul(x=query, y=np.float32(0.25), name=f"{name}_scaled_q"),
                y=k,
                transpose_y=True,
                name=f"{name}_scores",
            )

        attention = mb.matmul(x=mb.softmax(x=scores(q, "attention"), axis=-1, name="weights"), y=v, name="attention")
        by_query = mb.matmul(
            x=mb.softmax(x=scores(attention, "by_query"), axis=-2, name="weights_by_query"), y=v, name="by_query"
        )
        reversed_keys = np.arange(key_length, dtype=np.int32)[::-1].copy()
        gathered = mb.gather(x=scores(by_query, "gathered"), indices=reversed_keys, axis=-1, name="gathered")
        return mb.matmul(x=mb.softmax(x=gathered, axis=-1, name="weights_gathered"), y=v, name="out")

    return prog


def convert(prog: Program) -> ct.models.MLModel:
    """An iOS18 ML program of ``prog``, exactly as built (no graph passes)."""
    return ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=IOS18,
        pass_pipeline=ct.PassPipeline.EMPTY,
        skip_model_load=True,
    )


def describe(model: ct.models.MLModel) -> ct.models.MLModel:
    """Set every kind of metadata a shipped model carries: author, license, version, user keys."""
    for name, value in METADATA.items():
        setattr(model, name, value)
    model.user_defined_metadata.update(USER_METADATA)
    for feature in model.get_spec().description.input:
        model.input_description[feature.name] = f"the {feature.name} tensor"
    for feature in model.get_spec().description.output:
        model.output_description[feature.name] = "attention output"
    return model


def write_package(prog: Program, path: Path) -> Path:
    """Save ``prog`` as a described single-function ``.mlpackage`` at ``path``."""
    describe(convert(prog)).save(str(path))
    return path


def combine(parts: Mapping[str, Path], destination: Path, default: str) -> Path:
    """The single-function packages ``parts`` (function name -> package) as the functions of one
    package, written by ``save_multifunction`` (which stores the weights they share once)."""
    descriptor = ct.utils.MultiFunctionDescriptor()
    for name, part in parts.items():
        descriptor.add_function(str(part), "main", name)
    descriptor.default_function_name = default
    ct.utils.save_multifunction(descriptor, str(destination))
    return destination


def combined_package(
    path: Path, functions: Mapping[str, Function], default: str, save: Callable[[Program, Path], object]
) -> Path:
    """``functions`` each saved as a one-function package by ``save``, then combined into one
    package at ``path`` by ``save_multifunction``; the parts are removed."""
    folder = path.parent / f"{path.stem}.parts"
    folder.mkdir()
    parts = {}
    for name, function in functions.items():
        prog = Program()
        prog.add_function("main", function)
        parts[name] = folder / f"{name}.mlpackage"
        save(prog, parts[name])
    combine(parts, path, default)
    shutil.rmtree(folder)
    return path


def projected_package(path: Path) -> Path:
    """A single-function package with a const and a compressed weight and full metadata."""
    return write_package(projected_attention_program(KEY_WEIGHT, QUERY_CODES["main"]), path)


def multifunction_package(path: Path) -> Path:
    """Functions ``first`` and ``second`` (the default) sharing ``KEY_WEIGHT``, via ``save_multifunction``;
    metadata set afterwards, as ``save_multifunction`` keeps none."""
    folder = path.parent / f"{path.stem}.parts"
    folder.mkdir()
    parts = {
        name: write_package(projected_attention_program(KEY_WEIGHT, QUERY_CODES[name]), folder / f"{name}.mlpackage")
        for name in FUNCTIONS
    }
    combined = combine(parts, folder / "combined.mlpackage", DEFAULT_FUNCTION)
    describe(ct.models.MLModel(str(combined), skip_model_load=True)).save(str(path))
    shutil.rmtree(folder)
    return path


def near_miss_package(path: Path) -> Path:
    """One attention written out as ops and two softmax ops that look like attention but are not."""
    return write_package(near_miss_program(), path)


def truncate(data: bytearray) -> None:
    """Cut the end off a weight file's bytes."""
    del data[len(data) - TRUNCATED_BYTES :]


def truncated_package(path: Path) -> Path:
    """``projected_package`` with the last ``TRUNCATED_BYTES`` of its weight file cut off."""
    projected_package(path)
    data = bytearray((path / WEIGHT_FILE).read_bytes())
    truncate(data)
    (path / WEIGHT_FILE).write_bytes(bytes(data))
    return path


def grouped_query_package(path: Path) -> Path:
    """``sdpa_slicer._tools.demo.grouped_query_layer`` (Llama-3.2-1B's heads, the cache in states, keys and
    values repeated) as a package of a prefill and a decode function, prefill the default."""
    functions = {
        name: grouped_query_layer(length, GROUPED_QUERY_CACHE) for name, length in GROUPED_QUERY_LENGTHS.items()
    }
    return combined_package(path, functions, PREFILL, write_package)


EXAMPLES: Mapping[str, Callable[[Path], Path]] = {
    "model.mlpackage": multifunction_package,
    "near-misses.mlpackage": near_miss_package,
    "truncated.mlpackage": truncated_package,
    "grouped-query.mlpackage": grouped_query_package,
}
"""The packages docs/cli.md reads, by name: how to build each."""


def write_examples(folder: Path) -> list[Path]:
    """Write every package of ``EXAMPLES`` into ``folder`` (made if missing), or none: an existing
    one is refused before anything is written, and a failure leaves nothing behind."""
    folder = Path(folder)
    targets = [folder / name for name in EXAMPLES]
    for target in targets:
        if os.path.lexists(target):
            raise PackageError(f"{target} already exists; remove it or choose another folder")
    if folder.exists() and not folder.is_dir():
        raise PackageError(f"{folder} is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".sdpa-slicer-examples-", dir=folder))
    try:
        built = [build(staging / name) for name, build in EXAMPLES.items()]
        for package, target in zip(built, targets):
            os.replace(package, target)
    except BaseException:
        for target in targets:
            shutil.rmtree(target, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return targets
