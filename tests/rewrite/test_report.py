"""SliceReport and SiteReport: counts, the text table, and the dict behind ``--json``."""

from __future__ import annotations

import json

import attrs
import pytest

from sdpa_slicer import MemoryEstimate, NearMissReport, SiteReport, SliceReport, TensorInfo
from sdpa_slicer._rewrite.report import NOTHING_GAINED

REWRITTEN = SiteReport(
    function="main",
    op_name="attention",
    kind="fused",
    status="rewritten",
    query_length=2048,
    key_length=2048,
    num_chunks=8,
    chunk_size=256,
    key_chunks=1,
    scores_bytes_before=256 * 1024 * 1024,
    scores_bytes_after=32 * 1024 * 1024,
    matmul_work_before=1000,
    matmul_work_after=562,
)
SKIPPED = SiteReport(
    function="decode",
    op_name="attention_1",
    kind="decomposed",
    status="skipped",
    reason="query length 1 is below min_seq_length 64",
    query_length=1,
    notes=("a note about this site",),
)


def _estimate(function: str, peak: int, largest: int) -> MemoryEstimate:
    return MemoryEstimate(
        function=function,
        largest_tensor=TensorInfo(name="scores", op_type="matmul", bytes=largest),
        peak_live_bytes=peak,
        weights_bytes=0,
    )


def test_counts_follow_the_sites():
    report = SliceReport(sites=(REWRITTEN, SKIPPED, REWRITTEN))
    assert (report.num_rewritten, report.num_skipped) == (2, 1)
    assert REWRITTEN.rewritten and not SKIPPED.rewritten


def test_the_table_has_one_row_per_site_and_the_reasons_and_notes_below():
    report = SliceReport(sites=(REWRITTEN, SKIPPED), notes=("function 'other' has no attention",))
    lines = str(report).splitlines()
    assert lines[0] == "1 attention site(s) rewritten, 1 skipped"
    assert lines[1].split()[:4] == ["function", "op", "kind", "status"]
    assert lines[2].split() == [
        "main",
        "attention",
        "fused",
        "rewritten",
        "2048",
        "2048",
        "8",
        "256",
        "1",
        "256.0",
        "MiB",
        "32.0",
        "MiB",
        "56%",
    ]
    # Unknown values print as "?", never as None or a guess.
    assert lines[3].split() == [
        "decode",
        "attention_1",
        "decomposed",
        "skipped",
        "1",
        "?",
        "?",
        "?",
        "?",
        "?",
        "?",
        "?",
    ]
    assert lines[4:] == [
        "  decode/attention_1: query length 1 is below min_seq_length 64",
        "  decode/attention_1: a note about this site",
        "  function 'other' has no attention",
    ]


def test_memory_lines_pair_each_function_before_and_after():
    report = SliceReport(
        sites=(REWRITTEN,),
        memory_before=(_estimate("main", 288 * 2**20, 256 * 2**20),),
        memory_after=(_estimate("main", 53 * 2**20 + 2**19, 16 * 2**20),),
    )
    assert str(report).splitlines()[-1] == (
        "memory of 'main': peak live 288.0 MiB -> 53.5 MiB, largest tensor 256.0 MiB -> 16.0 MiB (static estimate)"
    )


def test_the_memory_line_says_how_many_tensors_of_symbolic_shape_it_did_not_count():
    """Found in review: a function with a dynamic length printed "0 B -> 0 B" and nothing else."""
    before = attrs.evolve(_estimate("main", 0, 0), uncounted=("q", "scores"))
    after = attrs.evolve(_estimate("main", 0, 0), uncounted=("q",))
    report = SliceReport(sites=(SKIPPED,), memory_before=(before,), memory_after=(after,))
    assert str(report).splitlines()[-1] == (
        "memory of 'main': peak live 0 B -> 0 B, largest tensor 0 B -> 0 B "
        "(static estimate; 2 -> 1 tensor(s) of symbolic shape not counted)"
    )


def test_an_empty_report_says_so_without_a_table():
    assert str(SliceReport(sites=(), notes=("no attention found",))).splitlines() == [
        "0 attention site(s) rewritten, 0 skipped",
        "  no attention found",
    ]


def test_the_dict_is_json_and_keeps_every_field():
    report = SliceReport(
        sites=(REWRITTEN, SKIPPED),
        memory_before=(_estimate("main", 10, 8),),
        memory_after=(_estimate("main", 6, 2),),
    )
    data = json.loads(json.dumps(report.to_dict()))
    assert (data["num_rewritten"], data["num_skipped"]) == (1, 1)
    assert data["sites"][0]["matmul_work_after"] == 562
    assert data["sites"][1]["reason"] == SKIPPED.reason
    assert data["sites"][1]["notes"] == ["a note about this site"]
    assert data["memory_after"][0]["peak_live_bytes"] == 6


ONE_CHUNK = attrs.evolve(REWRITTEN, num_chunks=1, chunk_size=2048, scores_bytes_after=256 * 1024 * 1024)
MIB = 2**20


@pytest.mark.parametrize(
    "site, peak_after, gained",
    [
        (ONE_CHUNK, 10 * MIB, False),  # written out, estimated higher
        (ONE_CHUNK, 8 * MIB, False),
        (ONE_CHUNK, 7 * MIB, True),  # one chunk, yet lower (folded keys and values)
        (REWRITTEN, 9 * MIB, True),  # chunked
        (attrs.evolve(ONE_CHUNK, key_chunks=4), 9 * MIB, True),  # one query chunk, keys chunked
    ],
    ids=["one chunk, higher", "one chunk, the same", "one chunk, lower", "chunked", "key chunks"],
)
def test_the_last_line_says_when_nothing_was_gained_and_how_to_gain(
    site: SiteReport, peak_after: int, gained: bool
) -> None:
    """Found by a user: the default rewrite of a small model raised its estimate, and nothing
    said that slicing had gained nothing or what would."""
    report = SliceReport(
        sites=(site, SKIPPED),
        memory_before=(_estimate("main", 8 * MIB, 4 * MIB),),
        memory_after=(_estimate("main", peak_after, 4 * MIB),),
    )
    assert report.nothing_gained is not gained
    last = str(report).splitlines()[-1]
    assert (last == NOTHING_GAINED) is not gained
    assert "--max-scores-bytes" in NOTHING_GAINED and "--keep-unchunked-fused" in NOTHING_GAINED


def test_nothing_gained_is_not_said_of_a_report_with_nothing_rewritten() -> None:
    report = SliceReport(
        sites=(SKIPPED,), memory_before=(_estimate("main", MIB, MIB),), memory_after=(_estimate("main", MIB, MIB),)
    )
    assert not report.nothing_gained and NOTHING_GAINED not in str(report)


def test_the_hint_to_the_near_misses_is_left_out_where_they_are_listed() -> None:
    miss = NearMissReport(function="main", op_name="weights", pattern="decomposed_attention", reason="why", chain=())
    report = SliceReport(sites=(REWRITTEN,), near_misses=(miss,))
    assert "inspect --explain lists them" in str(report)
    assert "inspect --explain lists them" not in report.text(near_misses_listed=True)
