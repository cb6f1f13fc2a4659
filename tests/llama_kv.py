"""The tiny two-layer Llama-style model of ``docs/llm_recipe.py``, whose KV cache lives in registered
buffers, exported the way Apple's "On Device Llama 3.1 with Core ML" guide does: the buffers
become Core ML states, written with slice assignment at a position given as an input and read
back whole. The script runs once per test process (``run_recipe``); the tests reuse the model
and the packages it leaves.

Needs PyTorch; without it, collecting this module (for doctests) is skipped.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import os
import runpy
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import attrs
import coremltools as ct
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is needed to export the Llama-style model")
nn = torch.nn

from generation import DECODE, PREFILL, causal_mask  # noqa: E402
from packages import COMPRESSIONS, combine  # noqa: E402
from torch_layers import HEAD_DIM, KV_HEADS  # noqa: E402
from w8a8 import quantize_model_activations  # noqa: E402

RECIPE_SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "llm_recipe.py"
VOCAB, LAYERS = 64, 2
CACHE_LENGTH = 128
PREFILL_LENGTH = 64
CACHE_SHAPE = (LAYERS, 1, KV_HEADS, CACHE_LENGTH, HEAD_DIM)
CACHE_NAMES = ("k_cache", "v_cache")
"""The script's sizes, as the tests need them before it runs (checked against it)."""
LOGITS = "logits"
FUNCTION_LENGTHS = {PREFILL: PREFILL_LENGTH, DECODE: 1}


@attrs.frozen(eq=False)
class Recipe:
    """What a run of ``docs/llm_recipe.py`` left: the folder of its packages, its globals (the
    model as ``model``, its ``Model`` class, its ``convert`` ...), and what it printed."""

    folder: Path
    names: dict[str, Any]
    printed: str

    @property
    def model(self) -> nn.Module:
        return self.names["model"]

    def parts(self) -> dict[str, Path]:
        """The single-function packages it converted, by function name."""
        return {name: self.folder / f"{name}.mlpackage" for name in FUNCTION_LENGTHS}


@functools.lru_cache(maxsize=None)
def run_recipe() -> Recipe:
    """Run ``docs/llm_recipe.py`` from top to bottom in a temporary folder, once per process."""
    folder = Path(tempfile.mkdtemp(prefix="llm-recipe-"))
    atexit.register(shutil.rmtree, folder, True)
    printed = io.StringIO()
    here = os.getcwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(printed), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's, and coremltools' while converting
            names = runpy.run_path(str(RECIPE_SCRIPT), run_name="__main__")
    finally:
        os.chdir(here)
    return Recipe(folder, names, printed.getvalue())


def reset_caches(model: nn.Module) -> None:
    for name in CACHE_NAMES:
        getattr(model, name).zero_()


def call_inputs(tokens: Sequence[int], position: int) -> dict[str, np.ndarray]:
    """The inputs of one call: ``tokens`` written from cache position ``position`` on."""
    return {
        "input_ids": np.array([tokens], np.int32),
        "position": np.array([position], np.int32),
        "mask": causal_mask(len(tokens), position, CACHE_LENGTH),
    }


def torch_inputs(inputs: Mapping[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
    """``inputs`` as the model's arguments; the fp16 mask in fp32, as the model computes."""
    return tuple(
        torch.from_numpy(value.astype(np.float32) if value.dtype == np.float16 else value) for value in inputs.values()
    )


CALIBRATION_CALLS = 3


def calibration_calls(model: ct.models.MLModel) -> list[dict[str, np.ndarray]]:
    """Sample calls for a converted function (its query length read from its ``input_ids``): random
    tokens written at random positions of a zeroed cache."""
    input_ids = model.get_spec().description.input[0]
    length = int(input_ids.type.multiArrayType.shape[-1])
    rng = np.random.default_rng(length)
    return [
        call_inputs(rng.integers(0, VOCAB, length).tolist(), int(rng.integers(0, CACHE_LENGTH - length + 1)))
        for _ in range(CALIBRATION_CALLS)
    ]


def w8a8(model: ct.models.MLModel) -> ct.models.MLModel:
    """int8 activations (calibrated with ``evaluate`` on ``calibration_calls``), then int8 weights."""
    return COMPRESSIONS["int8"](quantize_model_activations(model, calibration_calls(model)))


def save_prefill_decode(
    parts: Mapping[str, Path], destination: Path, compress: Callable[[ct.models.MLModel], ct.models.MLModel]
) -> Path:
    """Compress each single-function package in ``parts`` (by function name) and combine them into
    one package with ``save_multifunction``, ``prefill`` the default function."""
    compressed = {}
    for name, part in parts.items():
        compressed[name] = destination.parent / f"{destination.stem}.{name}.mlpackage"
        compress(ct.models.MLModel(str(part), skip_model_load=True)).save(str(compressed[name]))
    return combine(compressed, destination, PREFILL)


def torch_generate(
    model: nn.Module, prefill: Mapping[str, np.ndarray], steps: Sequence[Mapping[str, np.ndarray]]
) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """PyTorch's logits for the prefill call and each decode step, and the caches after them."""
    reset_caches(model)
    logits = []
    with torch.no_grad():
        for inputs in (prefill, *steps):
            logits.append(model(*torch_inputs(inputs)).numpy())
    return logits, {name: getattr(model, name).numpy().copy() for name in CACHE_NAMES}
