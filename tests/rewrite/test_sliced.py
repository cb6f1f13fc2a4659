"""Already-sliced attention: the chunks ``slice_attention`` wrote are recognised, reported in one
line, and left as they are by any later slicing; attention joined otherwise is still a site."""

from __future__ import annotations

import attrs
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Program

from attention_cases import IOS18, AttentionCase, MaskCase, sdpa_program
from graph import signature
from programs import GroupedCase, attend, qkv_specs
from sdpa_slicer import slice_attention

AGGRESSIVE = {"num_chunks": 4, "min_seq_length": 1}
"""Options that would cut every chunk again if it were taken for a site."""


def _grouped() -> Program:
    return GroupedCase(batch=1, kv_heads=2, repeats=2, query_length=64, key_length=64, head_dim=8).program()


CASE = AttentionCase((1, 2), 64, 64, 8, 8)
PROGRAMS = {
    "fused": lambda: sdpa_program(CASE),
    "causal, pruned": lambda: sdpa_program(CASE, constant_mask=np.tril(np.ones((64, 64), dtype=bool))),
    "float mask input": lambda: sdpa_program(attrs.evolve(CASE, mask=MaskCase("fp32", (1, 1, 64, 64)))),
    "grouped-query": _grouped,
}


@pytest.mark.parametrize("build", PROGRAMS.values(), ids=PROGRAMS)
def test_a_sliced_program_is_reported_in_one_line_and_sliced_again_changes_nothing(build) -> None:
    prog = build()
    first = slice_attention(prog, num_chunks=2)
    assert first.num_rewritten == 1
    before = signature(prog)
    again = slice_attention(prog, **AGGRESSIVE)
    assert signature(prog) == before
    assert again.sites == ()
    (note,) = [note for note in again.notes if note.startswith("already sliced")]
    chunks = 2 * (first.sites[0].kv_heads or 1)
    assert note == (
        f"already sliced: {chunks} query chunk(s) of attention joined by {chunks // 2} concat(s), "
        "in function(s) 'main', left as they are"
    )
    assert not any("no attention found" in note for note in again.notes)


def test_attentions_of_two_queries_joined_by_a_concat_are_still_sites() -> None:
    @mb.program(input_specs=qkv_specs() + qkv_specs()[:1], opset_version=IOS18)
    def prog(q, k, v, other):
        joined = [attend(query, k, v, f"attention_{index}") for index, query in enumerate((q, other))]
        return mb.concat(values=joined, axis=-2, name="joined")

    report = slice_attention(prog, num_chunks=2)
    assert [site.status for site in report.sites] == ["rewritten", "rewritten"]
    assert not any(note.startswith("already sliced") for note in report.notes)
