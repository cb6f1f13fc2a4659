"""The coremltools pass: registered on import, configured by text options, placed in a pipeline."""

from __future__ import annotations

import coremltools as ct
import pytest
from coremltools.converters.mil.mil.passes.graph_pass import PassOption
from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

import sdpa_slicer
from attention_cases import AttentionCase, sdpa_program
from graph import op_counts
from sdpa_slicer._rewrite.coreml_pass import INSERT_BEFORE, PASS_NAME

CASE = AttentionCase(batch=(1, 2), query_length=96, key_length=96, head_dim=8, value_dim=8)


def _run_pass(options: dict):
    graph_pass = PASS_REGISTRY[PASS_NAME]
    graph_pass.set_options([PassOption(name, value) for name, value in options.items()])
    prog = sdpa_program(CASE)
    graph_pass(prog)
    return prog


def test_importing_the_package_registers_the_pass():
    assert PASS_NAME == "sdpa_slicer::slice_attention" and PASS_NAME in PASS_REGISTRY


def test_the_pass_takes_text_options():
    prog = _run_pass({"num_chunks": "3", "min_seq_length": "16"})
    assert op_counts(prog)["softmax"] == 3


@pytest.mark.parametrize("options, error", [({"num_chunks": "zero"}, ValueError), ({"chunks": "2"}, TypeError)])
def test_bad_pass_options_name_the_field(options, error):
    with pytest.raises(error, match="num_chunks|chunks"):
        _run_pass(options)


def test_pass_pipeline_puts_the_pass_after_fp16_casts_and_before_state_ops():
    pipeline = sdpa_slicer.pass_pipeline(chunk_size=32)
    passes = pipeline.passes
    assert passes.count(PASS_NAME) == 1
    assert passes.index(PASS_NAME) == passes.index(INSERT_BEFORE) - 1
    assert passes.index("common::add_fp16_cast") < passes.index(PASS_NAME)
    assert {str(option) for option in pipeline.get_options(PASS_NAME)} == {"chunk_size: 32"}


def test_pass_pipeline_keeps_a_base_pipeline_and_its_options():
    base = ct.PassPipeline.CLEANUP
    base.set_options("common::const_elimination", {"skip_const_by_size": "100"})
    pipeline = sdpa_slicer.pass_pipeline(base)
    assert pipeline.passes[:-1] == base.passes and pipeline.passes[-1] == PASS_NAME
    assert pipeline.get_options("common::const_elimination") is not None


def test_pass_pipeline_validates_the_config_at_once():
    with pytest.raises(ValueError, match="num_chunks"):
        sdpa_slicer.pass_pipeline(num_chunks=0)


def test_the_pipeline_runs_inside_convert():
    prog = sdpa_program(CASE)
    model = ct.convert(
        prog,
        convert_to="milinternal",
        pass_pipeline=sdpa_slicer.pass_pipeline(num_chunks=4, min_seq_length=16),
        minimum_deployment_target=ct.target.iOS18,
    )
    counts = op_counts(model)
    assert counts["scaled_dot_product_attention"] == 0 and counts["softmax"] == 4
