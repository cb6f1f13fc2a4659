"""Slices with a run-time start and a static length (rotary tables read at the cache position):
given their length, so the attention they feed has a static query length."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Operation, Program, Var, types

from attention_cases import IOS18
from packages import write_package
from sdpa_slicer import estimate_memory, evaluate, load_package, pass_pipeline, slice_attention
from sdpa_slicer._graph import static_dim

HEADS, HEAD_DIM, KEYS = 2, 8, 128
TABLE = np.cos(np.arange(KEYS * HEAD_DIM, dtype=np.float32).reshape(KEYS, HEAD_DIM) / 7)
"""A rotary-style table: one row per position."""

End = Callable[[Var, int], Var]
"""Builds a slice's end (an int32 scalar) from its start and its length."""


def plus(start: Var, length: int) -> Var:
    return mb.add(x=start, y=np.int32(length))


def plus_through_int16(start: Var, length: int) -> Var:
    """As coremltools' torch frontend writes ``start + L``: added as a 1-element tensor, cast to
    int16 and back, squeezed to a scalar."""
    end = mb.cast(x=mb.add(x=mb.expand_dims(x=start, axes=[0]), y=np.array([length], np.int32)), dtype="int16")
    return mb.cast(x=mb.squeeze(x=end), dtype="int32")


def table_program(length: int, end: End = plus_through_int16, table: np.ndarray = TABLE) -> Program:
    """``attention(q * table[start : end(start, length)], k, v)`` with ``start = position[0]``: the
    one query row ``q`` broadcast to ``length`` rows by the table's, so that their length is the
    query's (as in a decode call, where the query's one row broadcasts against the table's)."""
    specs = [
        mb.TensorSpec((1, HEADS, 1, HEAD_DIM)),
        mb.TensorSpec((1, HEADS, KEYS, HEAD_DIM)),
        mb.TensorSpec((1, HEADS, KEYS, HEAD_DIM)),
        mb.TensorSpec((1,), dtype=types.int32),
    ]

    @mb.program(input_specs=specs, opset_version=IOS18)
    def prog(q, k, v, position):
        start = mb.slice_by_index(x=position, begin=[0], end=[1], squeeze_mask=[True], name="start")
        row = lambda value: mb.expand_dims(x=value, axes=[0])  # noqa: E731
        begin = mb.concat(values=[row(start), np.array([0], np.int32)], axis=0)
        stop = mb.concat(values=[row(end(start, length)), np.array([0], np.int32)], axis=0)
        cos = mb.slice_by_index(x=table, begin=begin, end=stop, end_mask=[False, True], name="cos")
        return mb.scaled_dot_product_attention(query=mb.mul(x=q, y=cos), key=k, value=v, name="attention")

    return prog


def inputs(position: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(position)
    shapes = {"q": (1, HEADS, 1, HEAD_DIM), "k": (1, HEADS, KEYS, HEAD_DIM), "v": (1, HEADS, KEYS, HEAD_DIM)}
    values = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    return {**values, "position": np.array([position], np.int32)}


def slice_op(prog: Program) -> Operation:
    """The op whose output is the table's rows, ``cos``."""
    return next(op for op in prog.functions["main"].operations if op.outputs[0].name == "cos")


@pytest.mark.parametrize("end", [plus, plus_through_int16])
def test_the_query_of_a_table_slice_gets_a_static_length_and_the_site_is_rewritten(end: End) -> None:
    prog = table_program(64, end)
    assert static_dim(prog.functions["main"].outputs[0].shape[2]) is None
    report = slice_attention(prog, num_chunks=4)
    assert [(site.status, site.query_length, site.num_chunks) for site in report.sites] == [("rewritten", 64, 4)]
    assert report.notes[0] == (
        "function 'main': 1 slice(s) with a run-time start and a static length given that length (slice_by_size)"
    )
    assert (slice_op(prog).op_type, slice_op(prog).outputs[0].shape) == ("slice_by_size", (64, HEAD_DIM))
    assert prog.functions["main"].outputs[0].shape == (1, HEADS, 64, HEAD_DIM)
    assert not estimate_memory(prog).uncounted
    assert "add" not in {op.op_type for op in prog.functions["main"].operations}, "the end's ops are left dead"


@pytest.mark.parametrize("position", [0, 5, KEYS - 64])
def test_the_slice_of_static_length_computes_what_the_slice_did(position: int) -> None:
    prog = table_program(64)
    slice_attention(prog, num_chunks=4)
    want = evaluate(table_program(64), inputs(position))["attention"]
    np.testing.assert_allclose(evaluate(prog, inputs(position))["attention"], want, rtol=1e-5, atol=1e-6)


def test_a_one_row_decode_slice_is_given_its_length_and_survives_save_and_load(tmp_path: Path) -> None:
    prog = table_program(1)
    report = slice_attention(prog)
    assert [(site.query_length, site.key_length) for site in report.sites] == [(1, KEYS)]
    assert not estimate_memory(prog).uncounted
    loaded = load_package(write_package(prog, tmp_path / "decode.mlpackage")).program
    assert slice_op(loaded).outputs[0].shape == (1, HEAD_DIM)
    assert loaded.functions["main"].outputs[0].shape == (1, HEADS, 1, HEAD_DIM)
    want = evaluate(table_program(1), inputs(9))["attention"]
    np.testing.assert_allclose(evaluate(loaded, inputs(9))["attention"], want, rtol=1e-5, atol=1e-6)


def _other_base(start: Var, length: int) -> Var:
    return mb.add(x=mb.mul(x=start, y=np.int32(2)), y=np.int32(length))


WIDE_TABLE = np.zeros((2**15, HEAD_DIM), np.float32)
"""Long enough that an index near its end does not fit int16."""


@pytest.mark.parametrize(
    "end, table, why",
    [
        (_other_base, TABLE, "the end is not the start plus a constant"),
        (plus_through_int16, WIDE_TABLE, "an index of the table would not survive the int16 cast"),
    ],
)
def test_a_slice_whose_length_is_not_certain_is_left_dynamic(end: End, table: np.ndarray, why: str) -> None:
    prog = table_program(64, end, table)
    report = slice_attention(prog, num_chunks=4)
    assert slice_op(prog).op_type == "slice_by_index", why
    assert [(site.status, site.reason) for site in report.sites] == [("skipped", "query length is dynamic")]
    assert not any("slice(s)" in note for note in report.notes)


def test_a_slice_whose_rows_reach_a_cond_is_left_dynamic() -> None:
    """The types of a ``cond`` come from its branches, which are not inferred again."""
    specs = [
        mb.TensorSpec((1, HEADS, 1, HEAD_DIM)),
        mb.TensorSpec((1,), dtype=types.int32),
        mb.TensorSpec((1,), dtype=types.bool),
    ]

    @mb.program(input_specs=specs, opset_version=IOS18)
    def prog(q, position, flag):
        start = mb.slice_by_index(x=position, begin=[0], end=[1], squeeze_mask=[True])
        row = lambda value: mb.expand_dims(x=value, axes=[0])  # noqa: E731
        begin = mb.concat(values=[row(start), np.array([0], np.int32)], axis=0)
        stop = mb.concat(values=[row(plus(start, 1)), np.array([0], np.int32)], axis=0)
        cos = mb.slice_by_index(x=TABLE, begin=begin, end=stop, end_mask=[False, True], name="cos")
        return mb.cond(
            pred=mb.squeeze(x=flag), _true_fn=lambda: mb.mul(x=q, y=cos), _false_fn=lambda: mb.add(x=q, y=cos)
        )

    report = slice_attention(prog)
    assert slice_op(prog).op_type == "slice_by_index"
    assert not any("slice(s)" in note for note in report.notes)


def test_inside_convert_the_pass_gives_the_slice_its_length(tmp_path: Path) -> None:
    ct.convert(
        table_program(1),
        convert_to="mlprogram",
        minimum_deployment_target=IOS18,
        pass_pipeline=pass_pipeline(),
        skip_model_load=True,
    ).save(str(tmp_path / "decode.mlpackage"))
    prog = load_package(tmp_path / "decode.mlpackage").program
    assert prog.functions["main"].outputs[0].shape == (1, HEADS, 1, HEAD_DIM)
    assert "slice_by_size" in {op.op_type for op in prog.functions["main"].operations}
