"""REPEATED_KV: keys and values whose heads repeat fewer heads, found by what each op does to indices."""

from __future__ import annotations

from typing import Callable, Optional

import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Var, types

from attention_cases import IOS18
from programs import REPEAT_FORMS, repeat_heads
from sdpa_slicer import evaluate, slice_attention
from sdpa_slicer._rewrite.folds.repeated_kv import Repeat, head_repeat
from sdpa_slicer._rewrite.sites import INTERLEAVED, TILED, Failed, HeadGroups

KV_SHAPE = (2, 3, 16, 8)
"""Batch 2, 3 KV heads, S = 16, E = 8."""
REPEATS = 4


def _chain_end(chain: Callable[[Var], Var], shape: tuple[int, ...] = KV_SHAPE) -> tuple[Var, Var]:
    """The input of a one-input program and the last var of ``chain`` applied to it."""
    ends = {}

    @mb.program(input_specs=[mb.TensorSpec(shape)], opset_version=IOS18)
    def prog(x):
        ends["x"], ends["out"] = x, chain(x)
        return ends["out"]

    return ends["x"], ends["out"]


@pytest.mark.parametrize("form", REPEAT_FORMS)
def test_every_form_exports_write_is_a_head_repeat_of_its_input(form):
    source, repeated = _chain_end(lambda x: repeat_heads(x, form, REPEATS, "repeated"))
    found = head_repeat(repeated, allow_swap=False)
    assert isinstance(found, Repeat) and found.source is source and not found.swapped
    assert found.heads == HeadGroups(3, REPEATS, TILED if form == "tile" else INTERLEAVED)


def test_one_head_expanded_over_all_heads_is_multi_query():
    source, repeated = _chain_end(lambda x: mb.tile(x=x, reps=[1, 8, 1, 1]), (1, 1, 16, 8))
    found = head_repeat(repeated, allow_swap=False)
    assert isinstance(found, Repeat) and found.source is source
    assert found.heads == HeadGroups(1, 8, INTERLEAVED)


def test_a_repeat_read_with_its_last_two_axes_swapped_is_a_swapped_repeat_for_keys_only():
    def transposed(x: Var) -> Var:
        return mb.transpose(x=repeat_heads(x, "repeat_kv", REPEATS, "repeated"), perm=[0, 1, 3, 2])

    _, keys = _chain_end(transposed)
    found = head_repeat(keys, allow_swap=True)
    assert isinstance(found, Repeat) and found.swapped
    assert head_repeat(keys, allow_swap=False) == Failed("the chain from 'x' reorders its axes")


def test_a_chain_without_a_tile_repeats_nothing():
    _, moved = _chain_end(lambda x: mb.transpose(x=mb.reshape(x=x, shape=[2, 3, 8, 16]), perm=[0, 1, 3, 2]))
    assert head_repeat(moved, allow_swap=True) is None


@pytest.mark.parametrize(
    "chain, expected",
    [
        pytest.param(
            lambda x: mb.tile(x=x, reps=[1, 1, 2, 1]),
            Failed("the chain from 'x' mixes axes other than the heads"),
            id="keys tiled",
        ),
        pytest.param(
            lambda x: mb.reshape(x=mb.tile(x=x, reps=[1, 1, 4, 1]), shape=[2, 12, 16, 8]),
            HeadGroups(3, 4, INTERLEAVED),
            id="keys tiled, then reshaped into heads: still h // r",
        ),
        pytest.param(
            lambda x: mb.transpose(x=mb.tile(x=x, reps=[4, 1, 1, 1]), perm=[0, 1, 2, 3]),
            Failed("the chain from 'x' mixes axes other than the heads"),
            id="the batch repeated",
        ),
        pytest.param(
            lambda x: mb.reshape(
                x=mb.transpose(x=mb.tile(x=mb.expand_dims(x=x, axes=[2]), reps=[1, 1, 4, 1, 1]), perm=[0, 2, 1, 3, 4]),
                shape=[2, 12, 16, 8],
            ),
            HeadGroups(3, 4, TILED),
            id="repeat-major heads: a tiled layout",
        ),
    ],
)
def test_what_a_chain_does_to_indices_decides_not_its_op_names(chain, expected):
    """A chain is a head repeat exactly when every output head reads one input head whole and the
    other axes are the input's; otherwise the reason says what the chain does instead."""
    _, out = _chain_end(chain)
    found = head_repeat(out, allow_swap=False)
    if isinstance(expected, HeadGroups):
        assert isinstance(found, Repeat) and found.heads == expected
    else:
        assert found == expected


def _grouped_program(key_form: str, value_form: str, chain: Optional[Callable[[Var, str], Var]] = None):
    """Attention of 12 query heads over keys and values of 3 heads, repeated in the given forms
    (or by ``chain``)."""

    def repeat(x: Var, form: str, name: str) -> Var:
        return chain(x, name) if chain is not None else repeat_heads(x, form, REPEATS, name)

    @mb.program(
        input_specs=[mb.TensorSpec((2, 12, 16, 8)), mb.TensorSpec(KV_SHAPE), mb.TensorSpec(KV_SHAPE)],
        opset_version=ct.target.iOS18,
    )
    def prog(q, k, v):
        keys, values = repeat(k, key_form, "keys"), repeat(v, value_form, "values")
        return mb.scaled_dot_product_attention(query=q, key=keys, value=values, name="attention")

    return prog


def test_keys_and_values_repeated_differently_are_left_repeated_with_the_reason():
    report = slice_attention(_grouped_program("repeat_kv", "tile"), min_seq_length=1, num_chunks=2)
    (site,) = report.sites
    assert site.status == "rewritten" and site.kv_heads is None
    assert site.notes[0] == (
        "keys and values not folded: keys repeat 3 heads 4x (interleaved), values 3 heads 4x (tiled)"
    )


def test_keys_repeated_along_the_sequence_are_left_as_they_are_with_the_reason():
    @mb.program(input_specs=[mb.TensorSpec((2, 3, 16, 8)), mb.TensorSpec(KV_SHAPE)], opset_version=ct.target.iOS18)
    def prog(q, k):
        keys = mb.tile(x=k, reps=[1, 1, 2, 1], name="keys")
        return mb.scaled_dot_product_attention(query=q, key=keys, value=keys, name="attention")

    (site,) = slice_attention(prog, min_seq_length=1, num_chunks=2).sites
    assert site.kv_heads is None
    assert site.notes[0] == "keys not folded: the chain from 'k' mixes axes other than the heads"


SEQUENCE_TILED_INTO_HEADS = lambda x, name: mb.reshape(  # noqa: E731
    x=mb.tile(x=x, reps=[1, 1, REPEATS, 1]), shape=[2, 12, 16, 8], name=name
)


@pytest.mark.parametrize("form", [*REPEAT_FORMS, "sequence tiled into heads"])
def test_a_folded_site_computes_what_the_repeated_one_did(form):
    chain = SEQUENCE_TILED_INTO_HEADS if form == "sequence tiled into heads" else None
    prog = _grouped_program(form, form, chain)
    rng = np.random.default_rng(0)
    inputs = {"q": rng.standard_normal((2, 12, 16, 8)), **{name: rng.standard_normal(KV_SHAPE) for name in "kv"}}
    want = evaluate(prog, inputs)["attention"]
    (site,) = slice_attention(prog, min_seq_length=1, num_chunks=2).sites
    assert (site.kv_heads, site.kv_repeats) == (3, REPEATS)
    np.testing.assert_allclose(evaluate(prog, inputs)["attention"], want, rtol=1e-5, atol=1e-6)


def test_a_tile_by_amounts_computed_at_run_time_is_not_followed():
    """Found in review: such a tile made the fold raise, and the site's note call it a bug."""

    @mb.program(input_specs=[mb.TensorSpec(KV_SHAPE), mb.TensorSpec((4,), dtype=types.int32)], opset_version=IOS18)
    def prog(x, reps):
        return mb.tile(x=x, reps=reps, name="tiled")

    tiled = prog.functions["main"].outputs[0]
    assert head_repeat(tiled, allow_swap=False) == Failed("tile 'tiled' repeats by amounts computed at run time")
