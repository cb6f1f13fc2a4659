"""Looking at programs in tests: ops by type, a text signature to compare, serialization."""

from __future__ import annotations

import copy
import sys
from collections import Counter

import coremltools as ct
from coremltools.converters.mil.mil import Program

from attention_cases import IOS18
from sdpa_slicer._graph import ops_in_block
from sdpa_slicer._rewrite.emit.transaction import SIDE_EFFECT_OPS

COPY_RECURSION_LIMIT = 20_000


def copied(prog: Program) -> Program:
    """A deep copy of ``prog``. ``copy.deepcopy`` recurses along every chain of ops, several frames
    per op, past Python's default limit for a converted layer of a few hundred ops."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, COPY_RECURSION_LIMIT))
    try:
        return copy.deepcopy(prog)
    finally:
        sys.setrecursionlimit(limit)


def op_counts(prog: Program, function_name: str = "main") -> Counter:
    return Counter(op.op_type for op in ops_in_block(prog.functions[function_name]))


def unread_ops(prog: Program) -> set[str]:
    """The output names of the ops of ``prog`` that no op reads and no block returns (state ops
    aside). Output names, not op names: a rewritten site's output keeps the name it had."""
    return {
        var.name
        for function in prog.functions.values()
        for op in ops_in_block(function)
        if op.op_type not in SIDE_EFFECT_OPS and not any(var.child_ops or var.consuming_blocks for var in op.outputs)
        for var in op.outputs
    }


def signature(prog: Program) -> str:
    """Text that changes when any op, input, output, name or type of ``prog`` changes."""
    return "\n".join(function.to_str(name) for name, function in prog.functions.items())


def function_outputs(prog: Program) -> dict[str, list[tuple[str, str]]]:
    return {name: [(var.name, str(var.sym_type)) for var in f.outputs] for name, f in prog.functions.items()}


def serialize(prog: Program, keep: bool = True, target: ct.target = IOS18) -> ct.models.MLModel:
    """Convert a copy of ``prog`` to an ML program for ``target`` with no passes, as Core ML would load it.

    ``ct.convert`` changes the program it converts; with ``keep=False`` it converts ``prog``
    itself, for a program too large to deep-copy (``deepcopy`` recurses through its ops)."""
    return ct.convert(
        copy.deepcopy(prog) if keep else prog,
        convert_to="mlprogram",
        pass_pipeline=ct.PassPipeline.EMPTY,
        minimum_deployment_target=target,
        skip_model_load=True,
    )
