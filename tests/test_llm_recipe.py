"""The on-device LLM recipe end to end: ``docs/llm_recipe.py`` (the code of docs/llm-recipe.md)
runs from top to bottom: a Llama-style model with its KV cache in registered buffers, converted
with Core ML states, weights compressed (int8, 4-bit palettes), prefill and decode functions
combined with ``save_multifunction``, sliced, and run with ``evaluate``. Its packages are then
sliced by ``sdpa-slicer slice`` and run, prefill then decode steps, against the unsliced
package and PyTorch."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import attrs
import coremltools as ct
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is needed to export the Llama-style model")

from generation import DECODE, PREFILL, Generation, generate, max_differences  # noqa: E402
from llama_kv import (  # noqa: E402
    CACHE_LENGTH,
    CACHE_NAMES,
    CACHE_SHAPE,
    FUNCTION_LENGTHS,
    LOGITS,
    PREFILL_LENGTH,
    RECIPE_SCRIPT,
    VOCAB,
    Recipe,
    call_inputs,
    run_recipe,
    save_prefill_decode,
    torch_generate,
    w8a8,
)
from packages import COMPRESSED_OP_TYPES, WEIGHT_FILE, model_spec  # noqa: E402
from sdpa_slicer._graph import ops_in_block  # noqa: E402
from sdpa_slicer._mlpackage.package import load_package  # noqa: E402
from sdpa_slicer._tools.cli import main  # noqa: E402
from torch_layers import HEADS, KV_HEADS  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    # coremltools' repeat-op pass casts an int range while converting; nothing of this model.
    pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning"),
]

UNCOMPRESSED = "fp16"
W8A8 = "w8a8"
BUILT: Mapping[str, Callable[[ct.models.MLModel], ct.models.MLModel]] = {UNCOMPRESSED: lambda model: model, W8A8: w8a8}
"""The variants the tests build from the script's single-function packages."""
WRITTEN = {"int8": "llama-int8.mlpackage", "palettized4": "llama-4bit.mlpackage"}
"""The variants the script writes itself (the compressions of ``packages.COMPRESSIONS``)."""
VARIANTS = (*BUILT, *WRITTEN)
WEIGHT_OP_TYPES = {**COMPRESSED_OP_TYPES, W8A8: COMPRESSED_OP_TYPES["int8"]}
DECODE_STEPS = 3
NUM_CHUNKS = "4"
SLICED_RELATIVE = 5e-3
"""fp16 programs: the sliced package rounds its chunked softmax differently, by a few fp16 ulps."""
W8A8_SLICED_RELATIVE = 5e-2
"""W8A8: the prefill attention, fused, is written out as ops that round its output differently
by an fp16 ulp here and there; the quantize ops after it turn some of those into whole levels
(measured: 1.8e-2 for the logits, 1.5e-2 for the caches; docs/numerics.md)."""
TORCH_RELATIVE = 1e-2
"""The fp16 Core ML program against the fp32 PyTorch model."""


@attrs.frozen
class Sliced:
    variant: str
    source: Path
    output: Path
    document: dict[str, Any]
    """``sdpa-slicer slice --json`` output."""


@pytest.fixture(scope="module")
def recipe() -> Recipe:
    return run_recipe()


@pytest.fixture(scope="module")
def calls() -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """A prompt filling the prefill call, then one token per decode step."""
    rng = np.random.default_rng(1)
    prefill = call_inputs(rng.integers(0, VOCAB, PREFILL_LENGTH).tolist(), 0)
    steps = [call_inputs([int(rng.integers(VOCAB))], PREFILL_LENGTH + step) for step in range(DECODE_STEPS)]
    return prefill, steps


@pytest.fixture(scope="module")
def slice_variant(recipe: Recipe, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Sliced]:
    """The prefill/decode package of a variant (the script's, or built from its parts) sliced
    with the command, once per variant."""
    built: dict[str, Sliced] = {}

    def build(variant: str) -> Sliced:
        if variant not in built:
            folder = tmp_path_factory.mktemp(variant)
            if variant in WRITTEN:
                source = recipe.folder / WRITTEN[variant]
            else:
                source = save_prefill_decode(recipe.parts(), folder / "llama.mlpackage", BUILT[variant])
            output = folder / "llama-sliced.mlpackage"
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                assert main(["slice", str(source), "-o", str(output), "--num-chunks", NUM_CHUNKS, "--json"]) == 0
            built[variant] = Sliced(variant, source, output, json.loads(printed.getvalue()))
        return built[variant]

    return build


@pytest.fixture(params=sorted(VARIANTS))
def sliced(request: pytest.FixtureRequest, slice_variant: Callable[[str], Sliced]) -> Sliced:
    return slice_variant(request.param)


def _generate(path: Path, calls: tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]) -> Generation:
    prefill, steps = calls
    return generate(load_package(path).program, prefill, steps)


def _assert_close(got: np.ndarray, want: np.ndarray, relative: float, what: str) -> None:
    absolute, share = max_differences(got, want)
    assert share <= relative, f"{what}: max |difference| {absolute:.3g} is {share:.3g} of the largest value"


def test_prefill_is_sliced_and_both_read_the_kv_heads_without_repeating_them(sliced: Sliced) -> None:
    sites = [(site["function"], site["status"], site["num_chunks"]) for site in sliced.document["sites"]]
    assert sites == [(PREFILL, "rewritten", 4)] * 2 + [(DECODE, "rewritten", 1)] * 2
    folds = {(site["kv_heads"], site["kv_repeats"], site["kv_layout"]) for site in sliced.document["sites"]}
    assert folds == {(KV_HEADS, HEADS // KV_HEADS, "interleaved")}
    decode_notes = {tuple(site["notes"]) for site in sliced.document["sites"] if site["function"] == DECODE}
    assert decode_notes == {
        (
            f"keys/values: {KV_HEADS} heads read directly, not repeated {HEADS // KV_HEADS}x",
            "query length 1 is below min_seq_length 64: not chunked",
        )
    }
    package = load_package(sliced.output)
    ops = {op.op_type for function in package.program.functions.values() for op in ops_in_block(function)}
    assert "tile" not in ops


def test_the_caches_are_reported_as_state_memory(sliced: Sliced) -> None:
    cache_bytes = len(CACHE_NAMES) * math.prod(CACHE_SHAPE) * np.dtype(np.float16).itemsize
    for key in ("memory_before", "memory_after"):
        assert [(m["function"], m["state_bytes"]) for m in sliced.document[key]] == [
            (name, cache_bytes) for name in FUNCTION_LENGTHS
        ]


def test_functions_states_and_compressed_weights_are_kept(sliced: Sliced) -> None:
    package = load_package(sliced.output)
    assert (package.function_names, package.default_function_name) == ((PREFILL, DECODE), PREFILL)
    before, after = model_spec(sliced.source).description, model_spec(sliced.output).description
    assert after == before
    assert all([state.name for state in function.state] == list(CACHE_NAMES) for function in after.functions)
    assert (sliced.output / WEIGHT_FILE).read_bytes() == (sliced.source / WEIGHT_FILE).read_bytes()
    ops = [op.op_type for function in package.program.functions.values() for op in function.operations]
    if sliced.variant in WEIGHT_OP_TYPES:
        assert ops.count(WEIGHT_OP_TYPES[sliced.variant]) >= 2 * len(FUNCTION_LENGTHS)
    assert ("quantize" in ops) == (sliced.variant == W8A8)


def test_the_sliced_package_generates_like_the_unsliced_one(sliced: Sliced, calls: Any) -> None:
    want, got = _generate(sliced.source, calls), _generate(sliced.output, calls)
    relative = W8A8_SLICED_RELATIVE if sliced.variant == W8A8 else SLICED_RELATIVE
    for index, (got_call, want_call) in enumerate(zip(got.outputs, want.outputs)):
        _assert_close(got_call[LOGITS], want_call[LOGITS], relative, f"logits of call {index}")
    for name in CACHE_NAMES:
        _assert_close(got.states[name], want.states[name], relative, name)


def test_the_uncompressed_packages_match_torch(
    recipe: Recipe, slice_variant: Callable[[str], Sliced], calls: Any
) -> None:
    sliced = slice_variant(UNCOMPRESSED)
    logits, caches = torch_generate(recipe.model, *calls)
    for path in (sliced.source, sliced.output):
        run = _generate(path, calls)
        for index, (call, want) in enumerate(zip(run.outputs, logits)):
            _assert_close(call[LOGITS], want, TORCH_RELATIVE, f"{path.name}: logits of call {index}")
        for name in CACHE_NAMES:
            _assert_close(run.states[name], caches[name], TORCH_RELATIVE, f"{path.name}: {name}")


RECIPE_PAGE = RECIPE_SCRIPT.parents[1] / "docs" / "llm-recipe.md"
SCRIPT_FENCE = "```python"
FENCE_END = "```"
"""The fence of the page's blocks that are the script; other examples are fenced otherwise."""
DIFFERENCE_LINE = re.compile(r"^(\S+) sliced against unsliced: logits (\S+), caches (\S+) of the largest value$", re.M)


def script_blocks(page: str) -> list[str]:
    """The code of every block of ``page`` fenced as ``SCRIPT_FENCE``, in order."""
    return re.findall(rf"^{re.escape(SCRIPT_FENCE)}\n(.*?)^```$", page, re.MULTILINE | re.DOTALL)


def _blank_lines_as_one(text: str) -> str:
    return re.sub(r"\n{3,}", "\n\n", text)


def test_the_page_shows_the_whole_script_in_order() -> None:
    """The page's script blocks, one after another, are the script (two blank lines between
    definitions in the script may be one between blocks)."""
    blocks = script_blocks(RECIPE_PAGE.read_text())
    assert len(blocks) > 1
    assert _blank_lines_as_one("\n".join(blocks)) == _blank_lines_as_one(RECIPE_SCRIPT.read_text())


def test_the_page_quotes_what_the_script_printed(recipe: Recipe) -> None:
    page = RECIPE_PAGE.read_text()
    quoted = page[page.index("It prints:") :].split(FENCE_END, 2)[1].strip("\n").splitlines()
    assert quoted == [match.group(0) for match in DIFFERENCE_LINE.finditer(recipe.printed)]


def test_script_blocks_are_found_between_their_fences() -> None:
    page = "text\n```python\na = 1\n```\n\n```py\nnot = 2\n```\n```python\nb = 2\n\nc = 3\n```\n"
    assert script_blocks(page) == ["a = 1\n", "b = 2\n\nc = 3\n"]


def test_the_script_slices_both_compressed_packages_and_checks_them(recipe: Recipe) -> None:
    assert recipe.printed.count("4 attention site(s) rewritten, 0 skipped") == 2
    differences = DIFFERENCE_LINE.findall(recipe.printed)
    assert [compression for compression, *_ in differences] == ["int8", "4bit"]
    assert all(float(value) <= SLICED_RELATIVE for _, *values in differences for value in values)
    for written in WRITTEN.values():
        assert load_package(recipe.folder / written.replace(".mlpackage", "-sliced.mlpackage")).function_names == (
            PREFILL,
            DECODE,
        )


def test_the_tests_know_the_sizes_of_the_script(recipe: Recipe) -> None:
    names = recipe.names
    assert (names["VOCAB"], names["CACHE_LENGTH"], names["PREFILL_LENGTH"]) == (VOCAB, CACHE_LENGTH, PREFILL_LENGTH)
    assert (names["CACHE_SHAPE"], names["CACHE_NAMES"], names["HEADS"]) == (CACHE_SHAPE, CACHE_NAMES, HEADS)
