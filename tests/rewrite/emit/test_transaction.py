"""SiteTransaction: checks before the graph is touched, all-or-nothing swaps, and contained failures."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Block, Var
from coremltools.converters.mil.mil.scope import ScopeInfo, ScopeSource

from attention_cases import IOS18, AttentionCase, sdpa_program
from graph import signature
from injection import INJECTED, fail_site
from programs import attend, chained_attention_program, outer_operand_program, qkv_specs
from sdpa_slicer import EmitError, evaluate, slice_attention
from sdpa_slicer._graph import ops_in_block
from sdpa_slicer._rewrite.emit.transaction import NameAllocator, SiteTransaction
from sdpa_slicer._rewrite.pipeline import PASS_NAME


def _raise(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError(INJECTED)


def _fail_once(original: Callable[..., Any]) -> Callable[..., Any]:
    """``original``, except that its first call raises."""
    calls = []

    def fail_first(*args: Any, **kwargs: Any) -> Any:
        calls.append(None)
        if len(calls) == 1:
            raise RuntimeError(INJECTED)
        return original(*args, **kwargs)

    return fail_first


def _site_ops(block: Block, *names: str) -> list:
    by_name = {op.name: op for op in ops_in_block(block)}
    return [by_name[name] for name in names]


def test_an_op_of_another_block_is_refused_before_anything_changes():
    prog = outer_operand_program("cond", "key_transpose")
    main = prog.functions["main"]
    before = signature(prog)
    branch = next(op for op in main.operations if op.op_type == "cond").blocks[0]
    ops = _site_ops(main, "kt", "scores", "scaled_scores", "masked_scores", "weights", "attention")
    with pytest.raises(EmitError, match="its op 'kt' belongs to another block"):
        SiteTransaction(branch, ops, NameAllocator.for_function(main))
    assert signature(prog) == before


def test_an_intermediate_read_outside_the_site_is_refused():
    prog = chained_attention_program(3)
    main = prog.functions["main"]
    with pytest.raises(EmitError, match="intermediate 'attention_0' is used outside the attention site"):
        SiteTransaction(main, _site_ops(main, "attention_0", "attention_2"), NameAllocator.for_function(main))


@contextlib.contextmanager
def _transaction_on_one_site() -> Iterator[tuple[SiteTransaction, Var]]:
    """A transaction on the attention of a one-site program, inside its block, and the query; on
    leaving, the program must be exactly as it was."""
    prog = chained_attention_program(1)
    main = prog.functions["main"]
    before = signature(prog)
    with main:
        yield SiteTransaction(main, _site_ops(main, "attention_0"), NameAllocator.for_function(main)), main.inputs["q"]
    assert signature(prog) == before


def test_roll_back_removes_exactly_the_added_ops_even_those_already_gone():
    with _transaction_on_one_site() as (transaction, q):
        first = transaction.add(mb.mul, "first", x=q, y=2.0)
        transaction.add(mb.mul, "second", x=first, y=3.0)
        transaction.block.remove_ops([transaction.added[-1]])
        removed = transaction.roll_back()
        # The constants mb makes of the plain 2.0 and 3.0 are added (and removed) with their ops.
        assert [op.name for op in removed] == ["second_y_0", "first", "first_y_0"]


def test_roll_back_removes_an_op_that_failed_its_type_inference():
    with _transaction_on_one_site() as (transaction, q):
        with pytest.raises(ValueError):
            transaction.add(mb.matmul, "mismatched", x=q, y=np.zeros((3, 5), np.float32))
        assert transaction.added[-1].name == "mismatched" and transaction.added[-1].outputs is None
        transaction.roll_back()


FAILURES: dict[str, tuple[str, Callable[[], Callable[..., Any]]]] = {
    "checking the site": ("sdpa_slicer._rewrite.emit.transaction.SiteTransaction.__init__", lambda: _raise),
    "building": ("sdpa_slicer._rewrite.emit.site.SiteLayout.build", lambda: _raise),
    "moving the uses": (
        "coremltools.converters.mil.mil.Block.replace_uses_of_var_after_op",
        lambda: _fail_once(Block.replace_uses_of_var_after_op),
    ),
    "planning": ("sdpa_slicer._rewrite.pipeline.plan_site", lambda: _raise),
    "removing the site's ops": (
        "coremltools.converters.mil.mil.Block.remove_ops",
        lambda: _fail_once(Block.remove_ops),
    ),
    "matching": ("sdpa_slicer._rewrite.patterns.fused_sdpa.FusedSdpa.match", lambda: _raise),
}
"""Where a failure is injected: the attribute replaced, and a maker of its replacement."""


def _inject(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    path, make = FAILURES[where]
    monkeypatch.setattr(path, make())


@pytest.mark.parametrize("where", FAILURES)
def test_a_failure_anywhere_leaves_the_site_exactly_as_it_was_with_a_sentence_for_a_reason(monkeypatch, where):
    prog = chained_attention_program(1)
    before = signature(prog)
    _inject(monkeypatch, where)
    report = slice_attention(prog, num_chunks=2)
    reasons = [site.reason for site in report.sites if site.status == "skipped"]
    reasons += [miss.reason for miss in report.near_misses]
    (reason,) = reasons
    assert f"unexpected RuntimeError ({INJECTED})" in reason
    assert "bug in sdpa_slicer" in reason and "%" not in reason
    assert report.num_rewritten == 0
    assert signature(prog) == before


@pytest.mark.parametrize("where", FAILURES)
def test_under_strict_only_emit_error_leaves_slice_attention(monkeypatch, where):
    prog = chained_attention_program(1)
    before = signature(prog)
    _inject(monkeypatch, where)
    with pytest.raises(EmitError, match=f"{INJECTED}"):
        slice_attention(prog, num_chunks=2, strict=True)
    assert signature(prog) == before


def test_after_a_failed_site_the_next_site_of_the_block_still_shares_the_constants_that_survive(monkeypatch):
    prog = chained_attention_program(3)
    fail_site(monkeypatch, "attention_1")
    report = slice_attention(prog, num_chunks=2)
    assert [site.status for site in report.sites] == ["rewritten", "skipped", "rewritten"]
    unused = [
        op.name for op in ops_in_block(prog.functions["main"]) if not op.outputs[0].child_ops and op.op_type == "const"
    ]
    assert unused == []


def test_a_swap_of_hundreds_of_key_chunks_stays_within_the_recursion_limit():
    """Found in review: swapping in an online softmax over 500 or more key chunks passed Python's
    recursion limit (coremltools copies scope info recursively along the chain of new ops), and
    the site was skipped as a bug."""
    case = AttentionCase(batch=(1, 2), query_length=4, key_length=640, head_dim=8, value_dim=8)
    prog = sdpa_program(case)
    inputs = case.inputs(np.random.default_rng(0))
    want = evaluate(prog, inputs)["attention"]
    (site,) = slice_attention(prog, kv_chunk_size=1, num_chunks=1, min_seq_length=1, strict=True).sites
    assert site.rewritten and site.key_chunks == case.key_length
    np.testing.assert_allclose(evaluate(prog, inputs)["attention"], want, rtol=1e-5, atol=1e-6)


def test_every_new_op_carries_the_scope_info_of_the_op_it_replaces():
    """Converters record which module each op came from; the new ops keep that, marked as made by the pass."""
    torch_scopes = (
        ScopeInfo(source=ScopeSource.TORCHSCRIPT_MODULE_TYPE, data=["Attention"]),
        ScopeInfo(source=ScopeSource.TORCHSCRIPT_MODULE_NAME, data=["layers.0.attn"]),
    )

    @mb.program(input_specs=qkv_specs((1, 2, 128, 8)), opset_version=IOS18)
    def prog(q, k, v):
        with mb.scope(*torch_scopes):
            return attend(q, k, v, "attention")

    (site,) = slice_attention(prog, num_chunks=4, kv_chunk_size=32, min_seq_length=1).sites
    assert site.rewritten
    for op in prog.functions["main"].operations:
        assert op.scopes[ScopeSource.TORCHSCRIPT_MODULE_TYPE] == ["Attention"], op.name
        assert op.scopes[ScopeSource.TORCHSCRIPT_MODULE_NAME] == ["layers.0.attn"], op.name
        assert op.scopes[ScopeSource.COREMLTOOLS_GRAPH_PASS] == [PASS_NAME], op.name
