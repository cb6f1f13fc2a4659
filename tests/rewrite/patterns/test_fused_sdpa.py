"""FUSED_SDPA: every scaled_dot_product_attention op is a site, other ops are not."""

from __future__ import annotations

import math

import pytest

from attention_cases import AttentionCase, MaskCase, sdpa_program
from programs import nested_attention_program
from sdpa_slicer._rewrite.patterns import FUSED_SDPA
from sdpa_slicer._rewrite.sites import FUSED
from sdpa_slicer._rewrite.walk import walk_blocks


def _only_op(prog):
    return next(op for op in prog.functions["main"].operations if op.op_type == "scaled_dot_product_attention")


@pytest.mark.parametrize("mask", [None, MaskCase("bool", (1, 33, 20)), MaskCase("fp16", (20,))])
def test_the_fused_op_is_a_site_with_its_inputs(mask):
    case = AttentionCase(batch=(2, 3), query_length=33, key_length=20, head_dim=16, value_dim=5, mask=mask)
    op = _only_op(sdpa_program(case))
    site = FUSED_SDPA.match(op)
    assert site is not None and site.kind == FUSED and site.ops == (op,)
    assert (site.query, site.key, site.value) == (op.query, op.key, op.value)
    assert site.mask is op.inputs.get("attn_mask")
    assert site.key_transposed and site.scale == pytest.approx(1 / math.sqrt(16))
    geometry = site.geometry()
    assert geometry.batch_shape == (2, 3)
    assert (geometry.query_length, geometry.key_length, geometry.head_dim, geometry.value_dim) == (33, 20, 16, 5)
    if mask is None:
        assert site.steps == () and geometry.operands == ()
    else:
        (step,) = site.steps
        assert (step.op_type, step.scores_input, step.is_mask) == ("add", "x", True)
        (operand,) = geometry.operands
        assert (operand.label, operand.rank, operand.rows, operand.dtype) == (
            "the mask",
            len(mask.shape),
            mask.shape[-2] if len(mask.shape) > 1 else 1,
            mask.dtype,
        )


def test_symbolic_lengths_are_none_in_the_geometry():
    case = AttentionCase(batch=(1,), query_length=8, key_length=8, head_dim=4, value_dim=4, dynamic_key=True)
    geometry = FUSED_SDPA.match(_only_op(sdpa_program(case))).geometry()
    assert geometry.key_length is None and geometry.query_length == 8


def test_only_attention_ops_are_sites():
    prog = nested_attention_program()
    ops = [op for visit in walk_blocks(prog) for op in visit.ops]
    sites = [site for site in (FUSED_SDPA.match(op) for op in ops) if site is not None]
    attention_ops = [op for op in ops if op.op_type == "scaled_dot_product_attention"]
    assert len(ops) > len(attention_ops) > 0
    assert [site.anchor for site in sites] == attention_ops
