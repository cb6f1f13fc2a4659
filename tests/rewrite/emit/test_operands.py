"""Operands as large as the scores, built per query chunk from the tensors they are made from: the
ops after the pass, the numbers against the unsliced program, and the memory estimate."""

from __future__ import annotations

import numpy as np
import pytest

from attention_cases import AttentionCase, MaskCase, sdpa_program
from graph import copied, op_counts
from operand_programs import (
    BUILDERS,
    LENGTH,
    constant_positions_program,
    gathered_bias_program,
    relative_position_program,
)
from programs import REPEAT_FORMS
from sdpa_slicer import estimate_memory, evaluate, slice_attention
from sdpa_slicer._graph import ops_in_block

NUM_CHUNKS = 4
CASES = [(name, decomposed) for name in sorted(BUILDERS) for decomposed in (False, True)]


def _sliced(prog, **options):
    before = copied(prog)
    report = slice_attention(prog, num_chunks=NUM_CHUNKS, **options)
    return before, report


def _tensors(prog) -> list:
    """The outputs of every op but constants."""
    return [var for op in ops_in_block(prog.functions["main"]) if op.op_type != "const" for var in op.outputs]


@pytest.mark.parametrize("name, decomposed", CASES)
def test_the_operand_is_built_per_chunk_and_computes_what_it_did(name, decomposed):
    prog, feeds = BUILDERS[name](decomposed=decomposed)
    before, report = _sliced(prog)
    (site,) = report.sites
    assert (site.status, site.num_chunks) == ("rewritten", NUM_CHUNKS), str(report)
    assert any("built per query chunk" in note for note in site.notes), site.notes
    np.testing.assert_allclose(evaluate(prog, feeds)["attention"], evaluate(before, feeds)["attention"], atol=1e-5)
    full = [var.name for var in _tensors(prog) if tuple(var.shape[-2:]) == (LENGTH, LENGTH)]
    assert full == [] or set(full) <= set(prog.functions["main"].inputs), full
    assert estimate_memory(prog).largest_tensor_bytes * NUM_CHUNKS == estimate_memory(before).largest_tensor_bytes


def test_sams_bias_of_rank_5_is_built_per_chunk_with_tensors_of_rank_4_and_its_full_size_ops_are_gone():
    """Before: expand_dims x2 -> add (rank 5) -> reshape -> attention. After, per chunk: each of
    rel_h and rel_w merged to (BH, L, 8) once, cut to the chunk's rows, expanded, added and reshaped."""
    prog, _ = relative_position_program()
    slice_attention(prog, num_chunks=NUM_CHUNKS)
    counts = op_counts(prog)
    assert (counts["reshape"], counts["slice_by_size"], counts["expand_dims"], counts["add"]) == (
        2 + NUM_CHUNKS,
        2 * NUM_CHUNKS,
        2 * NUM_CHUNKS,
        2 * NUM_CHUNKS,
    )
    assert max(var.rank for var in _tensors(prog)) == 4
    names = {op.name for op in ops_in_block(prog.functions["main"])}
    assert not names & {"decomposed_rel_pos", "attn_bias", "rel_h_expanded", "rel_w_expanded"}


def test_each_chunk_builds_its_rows_after_the_chunk_before_it_and_its_own_scores():
    """Chunk i: scores, its rows of the bias, the bias added; no chunk's rows alive with another's."""
    prog, _ = relative_position_program()
    slice_attention(prog, num_chunks=NUM_CHUNKS)
    order = [op.name for op in ops_in_block(prog.functions["main"])]
    for index in range(NUM_CHUNKS):
        built = order.index(f"attention_{index}_attn_bias")
        assert order.index(f"attention_{index}_scores") < built < order.index(f"attention_{index}_masked_scores")
        if index:
            assert order.index(f"attention_{index - 1}_chunk") < order.index(f"attention_{index}_rel_h_rows")


def test_a_bias_whose_axes_stay_rank_5_per_chunk_is_left_as_it_is_with_a_note():
    """Unfolded batch and head axes: (B, H, qh, qw, kh) merges to (B, H, L, kh), and its expand_dims
    would be of rank 5 per chunk. The bias stays built at full size, cut per chunk, and says why."""
    prog, feeds = relative_position_program(batch=2, folded=False)
    before, report = _sliced(prog)
    (site,) = report.sites
    assert site.status == "rewritten"
    (note,) = [note for note in site.notes if "full size" in note]
    assert "'attn_bias' (2x2x64x64 fp32, 64.0 KiB)" in note and "rank 5" in note
    assert "decomposed_rel_pos" in {op.name for op in ops_in_block(prog.functions["main"])}
    np.testing.assert_allclose(evaluate(prog, feeds)["attention"], evaluate(before, feeds)["attention"], atol=1e-5)


@pytest.mark.parametrize("decomposed", [False, True])
def test_a_bias_gathered_at_full_size_is_left_as_it_is_with_a_note_naming_it(decomposed):
    prog, feeds = gathered_bias_program(decomposed)
    before, report = _sliced(prog)
    (site,) = report.sites
    (note,) = [note for note in site.notes if "full size" in note]
    assert "'bias' (1x2x64x64 fp32, 32.0 KiB)" in note and "transpose" in note
    np.testing.assert_allclose(evaluate(prog, feeds)["attention"], evaluate(before, feeds)["attention"], atol=1e-5)


@pytest.mark.parametrize("kv_chunk_size", [None, 16])
def test_key_chunks_cut_the_rows_each_chunk_built(kv_chunk_size):
    prog, feeds = relative_position_program()
    before, report = _sliced(prog, kv_chunk_size=kv_chunk_size)
    assert report.sites[0].key_chunks == (1 if kv_chunk_size is None else LENGTH // kv_chunk_size)
    np.testing.assert_allclose(evaluate(prog, feeds)["attention"], evaluate(before, feeds)["attention"], atol=1e-5)


def test_one_chunk_keeps_the_operand_as_it_is():
    prog, _ = relative_position_program()
    report = slice_attention(prog, num_chunks=1)
    assert "decomposed_rel_pos" in {op.name for op in ops_in_block(prog.functions["main"])}
    assert not any("per query chunk" in note for note in report.sites[0].notes)


@pytest.mark.parametrize("repeat", REPEAT_FORMS)
@pytest.mark.parametrize("decomposed", [False, True])
def test_each_group_of_query_heads_reads_its_heads_of_the_rows_its_chunk_built(repeat, decomposed):
    prog, feeds = relative_position_program(decomposed, repeat=repeat)
    before, report = _sliced(prog)
    (site,) = report.sites
    assert (site.status, site.kv_heads) == ("rewritten", 1), str(report)
    assert any("built per query chunk" in note for note in site.notes), site.notes
    np.testing.assert_allclose(evaluate(prog, feeds)["attention"], evaluate(before, feeds)["attention"], atol=1e-5)
    assert estimate_memory(prog).largest_tensor_bytes * NUM_CHUNKS <= estimate_memory(before).largest_tensor_bytes


def test_a_mask_the_program_computes_from_constants_is_a_constant_cut_into_constants():
    """``range_1d`` positions compared at build time: coremltools knows the mask's value, so it is
    a weight; its chunks are constants, as a constant mask's are (which prunes the keys a causal
    mask hides: the slices), and no op rebuilds it."""
    prog, feeds = constant_positions_program()
    before, report = _sliced(prog)
    (site,) = report.sites
    assert site.status == "rewritten" and not any("full size" in note for note in site.notes)
    assert {op.op_type for op in ops_in_block(prog.functions["main"])} == {
        "const", "mul", "split", "slice_by_size", "matmul", "add", "softmax", "concat",
    }  # fmt: skip
    np.testing.assert_allclose(evaluate(prog, feeds)["attention"], evaluate(before, feeds)["attention"], atol=1e-5)


def test_a_mask_that_is_an_input_is_cut_as_it_was_and_says_nothing():
    prog = sdpa_program(AttentionCase((1, 2), LENGTH, LENGTH, 8, 8, mask=MaskCase("fp32", (1, 1, LENGTH, LENGTH))))
    (site,) = slice_attention(prog, num_chunks=NUM_CHUNKS).sites
    assert site.status == "rewritten" and site.notes == ()
    assert op_counts(prog)["split"] == 2  # the query's and the mask's
