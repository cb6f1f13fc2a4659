"""plan_site: a pure function from geometry and config to query chunks or a skip reason."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdpa_slicer import SliceConfig
from sdpa_slicer._rewrite.plan.geometry import FullSizeOperand, OperandGeometry, SiteGeometry
from sdpa_slicer._rewrite.plan.planning import (
    ALREADY_ONE_CHUNK,
    MANY_KEY_CHUNKS,
    QUANTIZED_WEIGHTS_NOTE,
    UNCHUNKED_DECOMPOSED,
    UNCHUNKED_GROUPS,
    UNCHUNKED_KEPT,
    UNCHUNKED_REGROUPED,
    SitePlan,
    Skip,
    even_chunks,
    plan_site,
)
from sdpa_slicer._rewrite.plan.pruning import StepValues

LLAMA = SiteGeometry(batch_shape=(1, 32), query_length=2048, key_length=2048, head_dim=64, value_dim=64, dtype="fp16")


def _mask(dtype: str, rank: int, rows: Optional[int]) -> OperandGeometry:
    return OperandGeometry("the mask", dtype, rank, rows, is_mask=True)


def _geometry(**changes) -> SiteGeometry:
    base = dict(batch_shape=(2, 4), query_length=100, key_length=50, head_dim=8, value_dim=8, dtype="fp32")
    base.update(changes)
    return SiteGeometry(**base)


def _chunks_are_a_partition(chunks, length):
    assert chunks[0][0] == 0 and chunks[-1][1] == length
    assert all(a_end == b_start for (_, a_end), (b_start, _) in zip(chunks, chunks[1:]))
    assert all(end > start for start, end in chunks)


def test_default_budget_splits_a_llama_layer_into_16_chunks_of_16_mib():
    plan = plan_site(LLAMA, SliceConfig())
    assert isinstance(plan, SitePlan)
    assert (plan.num_chunks, plan.chunk_size) == (16, 128)
    assert (plan.scores_bytes_before, plan.scores_bytes_after) == (256 << 20, 16 << 20)


def test_a_site_that_fits_the_budget_is_one_chunk():
    plan = plan_site(_geometry(batch_shape=(1,), query_length=128, key_length=128), SliceConfig())
    assert plan.query_chunks == ((0, 128),)


def test_a_written_out_chain_is_left_alone_only_when_one_chunk_would_rebuild_it():
    small = dict(batch_shape=(1,), query_length=128, key_length=128)
    assert plan_site(_geometry(**small, written_out=True), SliceConfig()) == Skip(
        ALREADY_ONE_CHUNK, scores_bytes=128 * 128 * 4, matmul_work=128 * 128 * 16
    )
    assert isinstance(plan_site(_geometry(**small, written_out=True), SliceConfig(num_chunks=2)), SitePlan)
    assert isinstance(plan_site(_geometry(**small, written_out=True), SliceConfig(kv_chunk_size=64)), SitePlan)
    assert isinstance(plan_site(_geometry(**small), SliceConfig()), SitePlan)


FITS = dict(batch_shape=(1, 8), query_length=512, key_length=512, head_dim=64, value_dim=64, dtype="fp16")
"""Scores of 4 MiB: one chunk under the default budget."""


def test_a_fused_op_that_fits_is_written_out_in_one_chunk_with_a_note_saying_why():
    plan = plan_site(_geometry(**FITS), SliceConfig())
    assert isinstance(plan, SitePlan)
    assert (plan.query_chunks, plan.key_chunks) == (((0, 512),), (None,))
    assert plan.notes == (UNCHUNKED_DECOMPOSED,)
    assert "suspected on device" in UNCHUNKED_DECOMPOSED and "estimate may rise" in UNCHUNKED_DECOMPOSED


@pytest.mark.parametrize(
    "config", [SliceConfig(decompose_unchunked=False), SliceConfig(decompose_unchunked=False, num_chunks=1)]
)
def test_decompose_unchunked_off_leaves_a_fused_op_planned_as_one_chunk_fused(config):
    assert plan_site(_geometry(**FITS), config) == Skip(
        UNCHUNKED_KEPT, scores_bytes=8 * 512 * 512 * 2, matmul_work=8 * 512 * 512 * 128
    )


@pytest.mark.parametrize(
    "config",
    [SliceConfig(decompose_unchunked=False, num_chunks=2), SliceConfig(decompose_unchunked=False, kv_chunk_size=256)],
)
def test_decompose_unchunked_off_still_chunks_a_fused_op_that_has_more_than_one_chunk(config):
    plan = plan_site(_geometry(**FITS), config)
    assert isinstance(plan, SitePlan) and UNCHUNKED_DECOMPOSED not in plan.notes


def test_decompose_unchunked_off_still_prunes_the_keys_one_chunk_cannot_see():
    config = SliceConfig(decompose_unchunked=False)
    causal = np.tril(np.ones((512, 512), dtype=bool))
    assert isinstance(
        plan_site(_geometry(**FITS, steps=_mask_steps(causal)), config), Skip
    )  # the last row sees every key
    first_half = np.zeros((512, 512), dtype=bool)
    first_half[:, :256] = True
    plan = plan_site(_geometry(**FITS, steps=_mask_steps(first_half)), config)
    assert isinstance(plan, SitePlan) and plan.key_chunks == (((0, 256),),)


@pytest.mark.parametrize("decompose", [True, False])
@pytest.mark.parametrize(
    "operand, written_out, note",
    [
        (None, False, UNCHUNKED_REGROUPED.format("one fused op")),
        (None, True, UNCHUNKED_REGROUPED.format("written out as ops")),
        (_mask("fp16", 4, 512), False, UNCHUNKED_GROUPS),
    ],
    ids=["fused, regrouped", "written out, regrouped", "mask with rows"],
)
def test_a_folded_site_in_one_chunk_is_rewritten_either_way_and_its_note_says_how(
    decompose, operand, written_out, note
):
    geometry = _geometry(
        **{**FITS, "batch_shape": (1, 2)}, groups=4, written_out=written_out, operands=(operand,) if operand else ()
    )
    plan = plan_site(geometry, SliceConfig(decompose_unchunked=decompose))
    assert isinstance(plan, SitePlan)
    assert plan.notes == (note,)


def test_a_written_out_chain_over_budget_with_nothing_left_to_cut_is_left_alone_with_a_note():
    one_row = dict(batch_shape=(1,), query_length=1, key_length=1, dtype="fp16", written_out=True)
    config = SliceConfig(min_seq_length=1, max_scores_bytes=1, min_query_chunk=1)
    skip = plan_site(_geometry(**one_row), config)
    assert isinstance(skip, Skip) and skip.reason == ALREADY_ONE_CHUNK
    assert skip.notes == ("one key of scores for 1 query rows (2 bytes) exceeds max_scores_bytes 1",)
    # Two keys can still be cut into key chunks of one; two rows into chunks of one row.
    assert isinstance(plan_site(_geometry(**{**one_row, "key_length": 2}), config), SitePlan)
    assert isinstance(plan_site(_geometry(**{**one_row, "query_length": 2}), config), SitePlan)


@pytest.mark.parametrize(
    "changes, config, reason",
    [
        (dict(query_length=None), SliceConfig(), "query length is dynamic"),
        (dict(query_length=63), SliceConfig(), "query length 63 is below min_seq_length 64"),
        (dict(query_length=1), SliceConfig(), "query length 1 is below min_seq_length 64"),
        (dict(scale=None), SliceConfig(), "head dimension is dynamic"),
        (dict(operands=(_mask("bool", 4, None),)), SliceConfig(), "query axis of the mask is dynamic"),
        (dict(operands=(_mask("fp32", 5, 100),)), SliceConfig(), "rank 5 of the mask exceeds the attention rank 4"),
        (dict(operands=(_mask("fp32", 4, 7),)), SliceConfig(), "query axis of the mask has size 7, expected 1 or 100"),
        (dict(operands=(_mask("int32", 2, 100),)), SliceConfig(), "dtype int32 of the mask is not bool, fp16 or fp32"),
        (dict(dtype="int32"), SliceConfig(), "attention dtype int32 is not fp16 or fp32"),
    ],
)
def test_skip_reasons(changes, config, reason):
    plan = plan_site(_geometry(**changes), config)
    assert isinstance(plan, Skip) and plan.reason.startswith(reason)


def test_chunk_size_gives_full_chunks_and_a_remainder():
    plan = plan_site(_geometry(), SliceConfig(chunk_size=32))
    assert plan.query_chunks == ((0, 32), (32, 64), (64, 96), (96, 100))


def test_num_chunks_gives_near_equal_chunks():
    plan = plan_site(_geometry(), SliceConfig(num_chunks=3))
    assert plan.split_sizes == (34, 33, 33)


def test_more_chunks_than_rows_gives_one_row_chunks_with_a_note():
    plan = plan_site(_geometry(query_length=70), SliceConfig(num_chunks=100))
    assert plan.split_sizes == (1,) * 70
    assert any("exceeds the query length" in note for note in plan.notes)


def test_dynamic_sizes_under_the_budget_assume_batch_one_and_s_equal_l():
    plan = plan_site(_geometry(batch_shape=(None, 4), key_length=None), SliceConfig(max_scores_bytes=100 * 4 * 4 * 10))
    assert plan.chunk_size == 10 and plan.scores_bytes_before is None
    assert any("assuming" in note for note in plan.notes)


def test_a_budget_below_min_query_chunk_rows_chunks_the_keys_instead():
    row_bytes = 2 * 4 * 50 * 4
    plan = plan_site(_geometry(), SliceConfig(max_scores_bytes=row_bytes * 4, min_query_chunk=16))
    assert plan.chunk_size <= 16 and plan.num_chunks == 7
    assert plan.max_key_chunks == 50 // (4 * 50 // 15) + 1
    assert plan.scores_bytes_after <= row_bytes * 4
    assert plan.notes == ()


def test_a_budget_below_one_key_column_is_noted():
    plan = plan_site(_geometry(), SliceConfig(max_scores_bytes=1))
    assert plan.max_key_chunks == 50
    assert any("exceeds max_scores_bytes" in note for note in plan.notes)


@pytest.mark.parametrize("keys_per_chunk, warned", [(1, True), (2, False)])
def test_hundreds_of_key_chunks_are_noted(keys_per_chunk: int, warned: bool):
    """A tiny budget made 2048 key chunks of one key: minutes to build, and fp16 rounding grows."""
    plan = plan_site(_geometry(key_length=2 * MANY_KEY_CHUNKS), SliceConfig(kv_chunk_size=keys_per_chunk, num_chunks=4))
    assert plan.max_key_chunks == 2 * MANY_KEY_CHUNKS // keys_per_chunk
    assert (
        any(note.startswith(f"{plan.max_key_chunks} key chunks for one query chunk") for note in plan.notes) == warned
    )


def test_a_budget_below_one_row_with_a_dynamic_key_length_gives_one_row_chunks():
    plan = plan_site(_geometry(key_length=None), SliceConfig(max_scores_bytes=1))
    assert plan.chunk_size == 1 and plan.num_chunks == 100
    assert any("exceeds max_scores_bytes" in note for note in plan.notes)


@given(
    length=st.integers(1, 500),
    key_length=st.integers(1, 300),
    batch=st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple),
    budget=st.integers(1, 1 << 22),
)
def test_budget_plan_is_the_fewest_chunks_that_fit(length, key_length, batch, budget):
    geometry = _geometry(batch_shape=batch, query_length=length, key_length=key_length)
    plan = plan_site(geometry, SliceConfig(min_seq_length=1, max_scores_bytes=budget))
    _chunks_are_a_partition(plan.query_chunks, length)
    row_bytes = math.prod(batch) * key_length * 4
    if any("exceeds max_scores_bytes" in note for note in plan.notes):
        # Unreachable: chunks are as small as the policy allows, min_query_chunk rows by one key.
        assert plan.chunk_size <= min(16, length) and plan.scores_bytes_after == math.prod(batch) * plan.chunk_size * 4
        return
    assert plan.scores_bytes_after <= budget
    if plan.max_key_chunks > 1:
        assert plan.chunk_size <= min(16, length) and plan.chunk_size * row_bytes > budget
    elif plan.num_chunks > 1:
        fewer = even_chunks(length, plan.num_chunks - 1)
        assert max(end - start for start, end in fewer) * row_bytes > budget


@given(length=st.integers(1, 1000), count=st.integers(1, 1000))
def test_even_chunks_partition_rows_into_sizes_differing_by_at_most_one(length, count):
    count = min(count, length)
    chunks = even_chunks(length, count)
    _chunks_are_a_partition(chunks, length)
    sizes = [end - start for start, end in chunks]
    assert len(sizes) == count and max(sizes) - min(sizes) <= 1


@given(length=st.integers(1, 300), rows=st.integers(1, 400))
def test_chunk_size_plans_partition_rows(length, rows):
    plan = plan_site(_geometry(query_length=length), SliceConfig(min_seq_length=1, chunk_size=rows))
    _chunks_are_a_partition(plan.query_chunks, length)
    assert plan.chunk_size == min(rows, length)


def _causal(length: int, window: Optional[int] = None) -> np.ndarray:
    rows, columns = np.indices((length, length))
    visible = columns <= rows
    return visible if window is None else visible & (columns > rows - window)


def _mask_steps(values: np.ndarray) -> tuple[StepValues, ...]:
    """The fused op's mask of ``values`` (bool, or float where -1e4 masks), as its one score step."""
    return (StepValues("add", "x", (("y", values),), is_mask=True),)


def _masked_geometry(values: np.ndarray, **changes) -> SiteGeometry:
    """A site whose constant mask ``values`` hides some keys."""
    length = values.shape[-2] if values.ndim > 1 else 64
    return _geometry(
        **{"query_length": length, "key_length": values.shape[-1], "steps": _mask_steps(values), **changes}
    )


def test_a_causal_mask_prunes_each_chunk_to_the_keys_before_its_last_row():
    plan = plan_site(_masked_geometry(_causal(256)), SliceConfig(num_chunks=8))
    assert plan.key_chunks == tuple(((0, 32 * (index + 1)),) for index in range(7)) + (None,)
    assert plan.matmul_work_after / plan.matmul_work_before == pytest.approx(36 / 64)


def test_a_sliding_window_prunes_to_well_under_forty_percent():
    plan = plan_site(_masked_geometry(_causal(256, window=32)), SliceConfig(chunk_size=32))
    assert plan.key_chunks[3] == ((65, 128),)
    assert plan.matmul_work_after / plan.matmul_work_before < 0.4


def test_pruning_can_be_turned_off():
    plan = plan_site(_masked_geometry(_causal(128)), SliceConfig(num_chunks=4, prune_masked_keys=False))
    assert plan.key_chunks == (None,) * 4 and plan.matmul_work_after == plan.matmul_work_before


def test_a_chunk_with_a_row_that_sees_no_key_keeps_all_keys():
    values = _causal(64)
    values[40] = False
    plan = plan_site(_masked_geometry(values), SliceConfig(num_chunks=4))
    assert plan.key_chunks[2] is None and plan.key_chunks[1] == ((0, 32),)


def test_a_float_mask_prunes_entries_at_or_below_the_masked_value():
    values = np.where(_causal(64), -1.0, -1e4).astype(np.float32)
    plan = plan_site(_masked_geometry(values), SliceConfig(num_chunks=2))
    assert plan.key_chunks == (((0, 32),), None)


def test_a_mask_broadcast_over_rows_gives_every_chunk_the_same_range():
    values = np.zeros((1, 64), dtype=bool)
    values[0, 10:20] = True
    plan = plan_site(_masked_geometry(values, query_length=64), SliceConfig(num_chunks=4))
    assert plan.key_chunks == (((10, 20),),) * 4


def test_key_chunks_follow_a_grid_within_the_visible_range():
    plan = plan_site(_masked_geometry(_causal(64)), SliceConfig(num_chunks=2, kv_chunk_size=20))
    assert plan.key_chunks == (((0, 20), (20, 32)), ((0, 20), (20, 40), (40, 60), (60, 64)))
    assert plan.scores_bytes_after == 2 * 4 * 32 * 20 * 4


def test_key_chunks_without_a_mask_cover_all_keys():
    plan = plan_site(_geometry(), SliceConfig(num_chunks=1, kv_chunk_size=16))
    assert plan.key_chunks == (((0, 16), (16, 32), (32, 48), (48, 50)),)
    assert plan.matmul_work_after == plan.matmul_work_before


def test_key_chunking_is_not_applicable_with_a_dynamic_key_length():
    plan = plan_site(_geometry(key_length=None), SliceConfig(num_chunks=2, kv_chunk_size=16))
    assert plan.key_chunks == (None, None)
    assert any("kv_chunk_size not applicable" in note for note in plan.notes)


@pytest.mark.parametrize("config", [SliceConfig(num_chunks=4, kv_chunk_size=8), SliceConfig(max_scores_bytes=1024)])
def test_quantized_weights_are_never_walked_in_key_chunks(config):
    """An online softmax would quantize weights before they are normalized; a budget too small
    for min_query_chunk rows gives smaller query chunks instead of key chunks."""
    plan = plan_site(_geometry(weights_quantized=True), config)
    assert isinstance(plan, SitePlan) and plan.max_key_chunks == 1
    assert (QUANTIZED_WEIGHTS_NOTE in plan.notes) == (config.kv_chunk_size is not None)
    unquantized = plan_site(_geometry(), config)
    assert isinstance(unquantized, SitePlan) and unquantized.max_key_chunks > 1


BIAS = FullSizeOperand("'bias' (2x4x100x50 fp32, 156.2 KiB)", recipe="reshape <- add <- expand_dims x2")
GATHERED = FullSizeOperand("'bias' (2x4x100x50 fp32, 156.2 KiB)", reason="'bias' is made by gather 'g'")


@pytest.mark.parametrize(
    "full_size, words",
    [(BIAS, "built per query chunk (reshape <- add <- expand_dims x2)"), (GATHERED, "is made by gather 'g'")],
)
def test_a_chunked_site_says_what_becomes_of_each_operand_as_large_as_the_scores(full_size, words):
    operand = OperandGeometry("the mask", "fp32", 4, 100, is_mask=True, heads=4, full_size=full_size)
    plan = plan_site(_geometry(operands=(operand,)), SliceConfig(num_chunks=4))
    (note,) = [note for note in plan.notes if "'bias'" in note]
    assert note.startswith("the mask, 'bias' (2x4x100x50 fp32, 156.2 KiB)") and words in note


def test_a_site_of_one_chunk_says_nothing_of_its_operands():
    operand = OperandGeometry("the mask", "fp32", 4, 100, is_mask=True, full_size=BIAS)
    plan = plan_site(_geometry(operands=(operand,)), SliceConfig(num_chunks=1))
    assert not any("'bias'" in note for note in plan.notes)
