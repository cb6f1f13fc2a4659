"""RoPE read from tables at a run-time position (``cos_table[start : start + L]``): the recipe's
model with such tables, its decode function converted, gets a static query length, so its
attention is folded and estimated, and it computes what PyTorch does."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is needed to export the Llama-style model")

from generation import max_differences  # noqa: E402
from llama_kv import CACHE_LENGTH, LOGITS, call_inputs, run_recipe, torch_inputs  # noqa: E402
from sdpa_slicer import estimate_memory, evaluate, load_package, slice_attention  # noqa: E402
from torch_layers import HEADS, KV_HEADS  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
POSITION = 37
TORCH_RELATIVE = 1e-2
"""The fp16 Core ML program against the fp32 PyTorch model."""


def table_rope_model() -> torch.nn.Module:
    """The recipe's model, its RoPE rows read from tables made once, at the call's position."""
    recipe = run_recipe().names

    class TableRope(recipe["Model"]):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            cos, sin = super().rotary(torch.zeros(1, dtype=torch.int32), CACHE_LENGTH)
            self.register_buffer("cos_table", cos)
            self.register_buffer("sin_table", sin)

        def rotary(self, position: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
            start = position[0]
            return self.cos_table[start : start + length], self.sin_table[start : start + length]

    torch.manual_seed(0)
    return TableRope().eval()


def test_decode_with_rotary_tables_is_folded_estimated_and_computes_what_torch_does(tmp_path: Path) -> None:
    model = table_rope_model()
    path = tmp_path / "decode.mlpackage"
    run_recipe().names["convert"](model, 1).save(str(path))
    prog = load_package(path).program
    assert estimate_memory(prog).uncounted, "the converted decode query has a symbolic length"
    report = slice_attention(prog)
    assert [(site.status, site.query_length, site.kv_heads, site.kv_repeats) for site in report.sites] == [
        ("rewritten", 1, KV_HEADS, HEADS // KV_HEADS)
    ] * 2
    assert "function 'main': 2 slice(s) with a run-time start" in report.notes[0]
    assert report.memory_before[0].uncounted == report.memory_after[0].uncounted == ()
    inputs = call_inputs([5], POSITION)
    with torch.no_grad():
        want = model(*torch_inputs(inputs)).numpy()
    _, share = max_differences(evaluate(prog, inputs, states={})[LOGITS], want)
    assert share <= TORCH_RELATIVE
