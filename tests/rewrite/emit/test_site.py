"""The emitter: the subgraph each site becomes, its constants, its mask conversion and its names."""

from __future__ import annotations

import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Program

from attention_cases import MIL_DTYPES, NUMPY_DTYPES, AttentionCase, sdpa_program
from graph import op_counts, unread_ops
from programs import (
    QUANTIZED,
    DecomposedForm,
    Modifier,
    QuantizedPair,
    ScoreChain,
    chained_attention_program,
    decomposed_program,
    nested_attention_program,
)
from sdpa_slicer import evaluate, slice_attention
from sdpa_slicer._graph import ops_in_block
from sdpa_slicer._rewrite.emit.masks import additive_mask_values, masked_score
from sdpa_slicer._rewrite.emit.transaction import NameAllocator

SDPA = "scaled_dot_product_attention"
CASE = AttentionCase(batch=(1, 4), query_length=100, key_length=80, head_dim=16, value_dim=8)


def test_the_fused_op_becomes_split_matmul_softmax_matmul_and_one_concat():
    prog = sdpa_program(CASE)
    report = slice_attention(prog, num_chunks=3)
    counts = op_counts(prog)
    assert counts[SDPA] == 0
    assert (counts["split"], counts["matmul"], counts["softmax"], counts["concat"], counts["mul"]) == (1, 6, 3, 1, 1)
    (split,) = [op for op in ops_in_block(prog.functions["main"]) if op.op_type == "split"]
    assert sum(out.shape[-2] for out in split.outputs) == CASE.query_length
    assert report.num_rewritten == 1 and report.sites[0].num_chunks == 3


@pytest.mark.parametrize("num_chunks", [2, 5])
def test_each_site_adds_three_ops_per_chunk_plus_three_and_shares_every_constant(num_chunks):
    """Per site: mul (scale), split, matmul + softmax + matmul per chunk, concat; the sites after
    the first need no constant of their own."""
    counts = {}
    for count in (1, 3):
        prog = chained_attention_program(count)
        slice_attention(prog, num_chunks=num_chunks)
        ops = list(ops_in_block(prog.functions["main"]))
        counts[count] = (sum(op.op_type != "const" for op in ops), sum(op.op_type == "const" for op in ops))
    assert counts[1][0] == 3 * num_chunks + 3
    assert counts[3] == (3 * counts[1][0], counts[1][1])


def test_a_causal_mask_cut_by_rows_and_then_by_kept_keys_leaves_no_unread_constant():
    """Key pruning cuts each constant row chunk of the mask once more, to the keys it keeps; the
    row chunk, read by nothing then, is removed (it was written to the weight file for nothing)."""
    length = 64
    causal = np.triu(np.full((1, 1, length, length), -1e4, np.float32), 1)
    prog = sdpa_program(
        AttentionCase(batch=(1, 2), query_length=length, key_length=length, head_dim=8, value_dim=8),
        constant_mask=causal,
    )
    (site,) = slice_attention(prog, num_chunks=4, min_seq_length=1).sites
    assert site.rewritten and site.matmul_work_after < site.matmul_work_before
    assert unread_ops(prog) == set()


def test_one_chunk_decomposes_without_split_or_concat():
    prog = sdpa_program(CASE)
    slice_attention(prog, num_chunks=1)
    counts = op_counts(prog)
    assert counts[SDPA] == counts["split"] == counts["concat"] == 0
    assert counts["matmul"] == 2 and counts["softmax"] == 1


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_a_bool_mask_adds_zero_where_true_and_half_the_lowest_value_where_false(dtype):
    values = additive_mask_values(np.array([True, False]), dtype)
    assert values.dtype == NUMPY_DTYPES[dtype]
    assert values[0] == 0.0
    assert values[1] == np.finfo(NUMPY_DTYPES[dtype]).min / 2 == masked_score(dtype)
    # Adding the lowest score still cannot overflow to -inf.
    assert np.isfinite(values[1] + np.finfo(NUMPY_DTYPES[dtype]).min / 2)


def test_a_float_mask_cast_to_fp16_is_clipped_so_large_negatives_stay_finite():
    values = additive_mask_values(np.array([0.0, -1.5, -1e9, -np.inf, 1e9], np.float32), "fp16")
    assert values.dtype == np.float16
    np.testing.assert_array_equal(values, np.array([0.0, -1.5, -32752.0, -32752.0, 32752.0], np.float16))


def test_a_float_mask_cast_to_fp32_keeps_its_values():
    mask = np.array([0.0, -1.5, -60000.0, -np.inf], np.float16)
    np.testing.assert_array_equal(additive_mask_values(mask, "fp32"), mask.astype(np.float32))


def _masked_attention(mask: np.ndarray, dtype: str, constant: bool) -> Program:
    """Attention of q/k/v (2, 32, 8) under ``mask``, given as a constant or as an input."""
    shape = (2, 32, 8)
    specs = [mb.TensorSpec(shape, dtype=MIL_DTYPES[dtype]) for _ in range(3)]
    if not constant:
        mask_type = "bool" if mask.dtype == np.bool_ else {np.float16: "fp16", np.float32: "fp32"}[mask.dtype.type]
        specs.append(mb.TensorSpec(mask.shape, dtype=MIL_DTYPES[mask_type]))

    if constant:

        @mb.program(input_specs=specs, opset_version=ct.target.iOS18)
        def prog(q, k, v):
            return mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=mb.const(val=mask))

    else:

        @mb.program(input_specs=specs, opset_version=ct.target.iOS18)
        def prog(q, k, v, attn_mask):
            return mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=attn_mask)

    return prog


@pytest.mark.parametrize("dtype, mask_dtype", [("fp16", "bool"), ("fp32", "bool"), ("fp16", "fp32"), ("fp32", "fp16")])
def test_a_constant_mask_is_folded_to_exactly_what_the_emitted_conversion_computes(dtype, mask_dtype):
    """A constant mask becomes constant additive values; the same mask as an input goes through
    cast/sub/mul or clip/cast ops. Both programs must give the same bits, fully masked rows included."""
    rng = np.random.default_rng(0)
    keep = rng.random((32, 32)) < 0.6
    keep[3] = False  # a row with no visible key
    if mask_dtype == "bool":
        mask = keep
    else:
        mask = np.where(keep, rng.uniform(-2.0, 0.0, keep.shape), -np.inf).astype(NUMPY_DTYPES[mask_dtype])
        mask[5, :8] = -1e9 if mask_dtype == "fp32" else -60000.0
    inputs = {name: rng.standard_normal((2, 32, 8)).astype(NUMPY_DTYPES[dtype]) for name in ("q", "k", "v")}
    outputs = []
    for constant in (True, False):
        prog = _masked_attention(mask, dtype, constant)
        assert slice_attention(prog, num_chunks=4, min_seq_length=1, prune_masked_keys=False).num_rewritten == 1
        feeds = dict(inputs) if constant else {**inputs, "attn_mask": mask}
        (output,) = evaluate(prog, feeds).values()
        outputs.append(output)
    # The -inf of a float mask survives the cast to fp32 (the row is NaN, as in the original op);
    # clipped into fp16's range it becomes finite, like a bool mask's False.
    row_is_finite = mask_dtype == "bool" or dtype == "fp16"
    assert np.isfinite(outputs[0][:, 3]).all() == row_is_finite
    assert np.isnan(outputs[0][:, 3]).all() != row_is_finite
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_names_are_unique_across_nested_blocks_and_inputs():
    prog = nested_attention_program()
    function = prog.functions["main"]
    names = NameAllocator.for_function(function)
    taken = {op.name for op in ops_in_block(function)} | set(function.inputs)
    fresh = [names(wanted) for wanted in sorted(taken)[:5] + ["new", "new"]]
    assert not set(fresh) & taken
    assert len(set(fresh)) == len(fresh)
    assert fresh[-2:] == ["new", "new_1"]


def test_emitted_names_never_collide_with_existing_ones():
    prog = sdpa_program(CASE)
    slice_attention(prog, num_chunks=3)
    ops = list(ops_in_block(prog.functions["main"]))
    var_names = [var.name for op in ops for var in op.outputs]
    assert len(set(var_names)) == len(var_names)
    assert len({op.name for op in ops}) == len(ops)


@pytest.mark.parametrize("axis", [-1, -2, -3])
@pytest.mark.parametrize("kv_chunk_size", [None, 30])
def test_a_per_axis_quantized_pair_is_cut_with_the_chunk_along_its_axis(axis, kv_chunk_size):
    """Scales along the keys are cut to each key chunk, along the rows to each query chunk, and
    along the heads stay whole; every cut is a constant, as quantize's parameters must be."""
    chain = ScoreChain(modifiers=(Modifier(op=QUANTIZED, pair=QuantizedPair(step=1 / 16, axis=axis, offset=3)),))
    prog = decomposed_program(CASE, DecomposedForm(), 0.25, chain=chain)
    inputs = CASE.inputs(np.random.default_rng(0))
    want = evaluate(prog, inputs)["attention"]
    (site,) = slice_attention(prog, num_chunks=4, kv_chunk_size=kv_chunk_size).sites
    assert site.rewritten and site.num_chunks == 4
    sizes = {op.inputs["scale"].shape[0] for op in ops_in_block(prog.functions["main"]) if op.op_type == "quantize"}
    full = (CASE.batch + (CASE.query_length, CASE.key_length))[axis]
    assert sizes == {-1: {kv_chunk_size or full, full - (kv_chunk_size or 0) * 2}, -2: {25}, -3: {full}}[axis]
    for op in ops_in_block(prog.functions["main"]):
        if op.op_type in ("quantize", "dequantize"):
            assert all(op.inputs[name].op.op_type == "const" for name in ("scale", "zero_point", "axis"))
    np.testing.assert_allclose(evaluate(prog, inputs)["attention"], want, rtol=1e-5, atol=1e-6)
