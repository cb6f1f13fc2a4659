"""Activation quantization (W8A8) as ``coremltools.optimize.coreml.linear_quantize_activations``
does it, on Linux: the same three graph passes of coremltools 9.0, with the calibration they
need (value ranges of every var on sample inputs, which coremltools gets from Core ML's runtime
on a Mac) done by ``sdpa_slicer.evaluate``; then dead ops are removed, as saving a model does.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import coremltools as ct
import coremltools.optimize.coreml as cto
import numpy as np
from coremltools.converters.mil.mil import Program, types
from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass, PassOption
from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
from coremltools.models.utils import _apply_graph_pass

from graph import copied
from sdpa_slicer import evaluate

ACTIVATIONS = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric"))
"""The config coremltools' documentation gives for int8 activations."""
CALIBRATED_PASSES = (
    "compression::insert_prefix_quantize_dequantize_pair",
    "compression::insert_suffix_quantize_dequantize_pair",
)
PAIR_ELIMINATION = "common::dequantize_quantize_pair_elimination"
DEAD_CODE_ELIMINATION = "common::dead_code_elimination"
Ranges = dict[str, dict[str, float]]
Sample = Mapping[str, np.ndarray]


def activation_ranges(prog: Program, samples: Sequence[Sample], function_name: Optional[str] = None) -> Ranges:
    """``{var name: {"rmin": ..., "rmax": ...}}`` of every input and op output of the function over
    ``samples`` (each call starting from zero states), as coremltools' calibration records them."""
    probe = copied(prog)
    name = probe.default_function_name if function_name is None else function_name
    function = probe.functions[name]
    tensors = [
        var
        for op in function.operations
        if op.op_type != "const"
        for var in op.outputs
        if types.is_tensor(var.sym_type) or types.is_scalar(var.sym_type)
    ]
    function.set_outputs(tensors)
    ranges: Ranges = {}
    for sample in samples:
        for var_name, value in {**sample, **evaluate(probe, sample, name, states={})}.items():
            values = np.asarray(value, np.float64)
            low, high = float(values.min()), float(values.max())
            seen = ranges.setdefault(var_name, {"rmin": low, "rmax": high})
            seen["rmin"], seen["rmax"] = min(seen["rmin"], low), max(seen["rmax"], high)
    return ranges


def float_only(prog: Program) -> cto.OptimizationConfig:
    """``ACTIVATIONS`` but for the ``add`` ops of integers (position arithmetic): coremltools' prefix
    pass would put a quantize on them, which fails, so they are left out by name, as a user does."""
    integer_adds = {
        op.name: None
        for function in prog.functions.values()
        for op in function.operations
        if op.op_type == "add" and op.inputs["x"].dtype not in (types.fp16, types.fp32)
    }
    return cto.OptimizationConfig(global_config=ACTIVATIONS.global_config, op_name_configs=integer_adds)


def activation_passes(prog: Program, ranges: Ranges) -> list[AbstractGraphPass]:
    """coremltools' passes of ``linear_quantize_activations`` for ``prog``, in its order, set up as
    it sets them."""
    passes = []
    for name in CALIBRATED_PASSES:
        graph_pass = PASS_REGISTRY[name]
        graph_pass.set_options([PassOption("config", float_only(prog))])
        graph_pass.set_options([PassOption("activation_stats", ranges)])
        passes.append(graph_pass)
    return [*passes, PASS_REGISTRY[PAIR_ELIMINATION]]


def quantize_activations(prog: Program, samples: Sequence[Sample]) -> Program:
    """``prog`` (one function, iOS17 or later) with int8 activations, changed in place and returned."""
    for graph_pass in activation_passes(prog, activation_ranges(prog, samples)):
        graph_pass(prog)
    PASS_REGISTRY[DEAD_CODE_ELIMINATION](prog)
    return prog


def quantize_model_activations(model: ct.models.MLModel, samples: Sequence[Sample]) -> ct.models.MLModel:
    """``linear_quantize_activations(model, ACTIVATIONS, samples)``, calibrated with ``evaluate``:
    the same passes through the same coremltools helper, which saves the result as a model."""
    prog = _apply_graph_pass(model, [], spec_version=ct.target.iOS17, return_pymil_prog=True)
    return _apply_graph_pass(
        model,
        activation_passes(prog, activation_ranges(prog, samples)),
        spec_version=ct.target.iOS17,
        skip_model_load=True,
    )
