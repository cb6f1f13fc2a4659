"""Attention written out as ops, as coremltools' torch frontend emits it when ``scale`` is given,
with any elementwise ops between the scores and the softmax (score modifiers).

::

    %qs = mul(x=%q, y=0.125)                      # optional; any scale on Q stays as it is
    %kt = transpose(x=%k, perm=[0, 1, 3, 2])      # optional; or transpose_y=True below
    %s  = matmul(x=%qs, y=%kt)
    %s1 = mul(x=%s, y=0.5)  or  real_div(x=%s, y=2.0)          # optional scalar scales
    %s2 = tanh(x=...), add(x=..., y=%bias), select(cond=%c, a=..., b=-inf), ...   # any number
    %p  = softmax(x=%sN, axis=-1)
    %pq = dequantize(quantize(%p))                # optional, any number of these ops
    %out = matmul(x=%pq, y=%v)

is the site ``softmax(steps(scale * qs @ k^T)) @ v``, found from its softmax and anchored at the
last matmul. The scalar scales right after the scores matmul are its ``scale`` (moved to the
query when rewritten); every later op is a ``ScoreStep``: an elementwise op whose other inputs
broadcast against the scores, constant or computed at run time. ``quantize`` and
``dequantize`` (activation quantization, W8A8) are steps too, their constant scale and zero
point a scalar or a vector along one axis of the scores; between the softmax and the value
matmul they are *weight steps*. A chain that quantizes its scores keeps its scalar scales
where they are. Every intermediate from ``%s`` to ``%pq`` (and ``%kt`` when folded) must be
read only by the next op of the chain, must not be a block output and must run in the
anchor's block; an op of an enclosing block (the query scale, ``%kt``, a bias) is an input of
the site.

A softmax that looks like part of an attention (a matmul feeds it or reads it) but fails one
of these rules is a near miss, with the reason.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
from coremltools.converters.mil.mil import Operation, Var

from sdpa_slicer._graph import BINARY_OPS, QUANTIZATION_OPS, UNARY_OPS, private_use_problem
from sdpa_slicer._rewrite.config import SliceConfig
from sdpa_slicer._rewrite.sites import AttentionSite, Failed, Match, ScoreStep, fail

SCALE_OPS = ("mul", "real_div")
SCORES_INPUTS = {
    **{op: ("x",) for op in UNARY_OPS},
    **{op: ("x", "y") for op in BINARY_OPS},
    "select": ("a", "b"),
    **{op: ("input",) for op in QUANTIZATION_OPS},
}
"""The inputs of each elementwise op that may carry the scores, tried in this order."""
WHERE = " between the scores and the softmax"
MAX_CHAIN = 32
"""Ops followed back from a softmax before giving up."""

Walked = Union[tuple[Operation, list[ScoreStep]], Failed]
"""The scores matmul and the steps after it, or why the walk failed."""


class DecomposedAttention:
    name = "decomposed_attention"

    def enabled(self, config: SliceConfig) -> bool:
        return config.match_decomposed

    def match(self, op: Operation) -> Match:
        if op.op_type != "softmax":
            return None
        weight_steps, weights = _weight_steps(op)
        readers = weights.child_ops
        anchor = readers[0] if len(readers) == 1 and readers[0].op_type == "matmul" else None
        visited: list[Operation] = []
        walked = _walk_to_scores(op.inputs["x"], op, visited)
        if anchor is None and not _looks_like_scores(op):
            return None
        weight_ops = [step.op for step in weight_steps if step.op is not None]
        chain = [*reversed(visited), op, *weight_ops, *([anchor] if anchor is not None else [])]
        if not _is_last_axis(op):
            return fail(self.name, f"softmax over axis {int(op.inputs['axis'].val)}, not the last", op, chain)
        if anchor is None:
            return fail(self.name, _unread_weights_reason(weights), op, chain)
        problem = _value_matmul_problem(anchor, weights)
        if problem is not None:
            return fail(self.name, problem, op, chain)
        if isinstance(walked, Failed):
            return fail(self.name, walked.reason, op, chain)
        scores_matmul, steps = walked
        scale, scale_steps, steps = _leading_scale(steps)
        quantized = any(step.op_type == "quantize" for step in (*steps, *weight_steps))
        key, key_transposed, key_ops = _folded_key(scores_matmul)
        step_ops = [step.op for step in (*scale_steps, *steps) if step.op is not None]
        return AttentionSite(
            written_out=True,
            block=anchor.enclosing_block,
            ops=(*key_ops, scores_matmul, *step_ops, op, *weight_ops, anchor),
            query=scores_matmul.inputs["x"],
            key=key,
            key_transposed=key_transposed,
            value=anchor.inputs["y"],
            scale=scale,
            scores_shape=tuple(scores_matmul.outputs[0].shape),
            steps=tuple(steps),
            scale_steps=tuple(scale_steps) if quantized else (),
            weight_steps=tuple(weight_steps),
            notes=_quantization_notes(steps, weight_steps, kept_scale=quantized and bool(scale_steps)),
        )


DECOMPOSED_ATTENTION = DecomposedAttention()


def _walk_to_scores(var: Var, consumer: Operation, visited: list[Operation]) -> Walked:
    """Follow ``var`` (read by ``consumer``) back through elementwise ops to the scores matmul."""
    problem = _sole_use_problem(var, consumer)
    if problem is not None:
        return Failed(problem)
    producer = var.op
    visited.append(producer)
    if producer.op_type == "matmul":
        if _flag(producer, "transpose_x"):
            return Failed(f"the scores matmul '{producer.name}' transposes its first operand")
        if producer.inputs["x"].rank < 2 or producer.inputs["y"].rank < 2:
            return Failed(f"the scores matmul '{producer.name}' has an operand of rank 1")
        return producer, []
    if producer.op_type not in SCORES_INPUTS:
        return Failed(
            f"{producer.op_type} '{producer.name}' between the scores and the softmax is not elementwise, "
            "so it cannot be cut by query rows"
        )
    if len(visited) > MAX_CHAIN:
        return Failed(f"more than {MAX_CHAIN} ops between the scores and the softmax")
    result = producer.outputs[0]
    first_failure: Optional[Failed] = None
    for name in SCORES_INPUTS[producer.op_type]:
        scores = producer.inputs.get(name)
        same_dtype = scores is not None and (scores.dtype == result.dtype or producer.op_type in QUANTIZATION_OPS)
        if scores is None or not same_dtype or tuple(scores.shape) != tuple(result.shape):
            continue
        walked = _walk_to_scores(scores, producer, visited)
        if isinstance(walked, Failed):
            first_failure = first_failure or walked
            continue
        matmul, steps = walked
        operands = tuple(
            (other, value) for other, value in producer.inputs.items() if other != name and isinstance(value, Var)
        )
        if any(value is scores for _, value in operands):
            return Failed(
                f"{producer.op_type} '{producer.name}' reads the scores twice, so they cannot be cut once per chunk"
            )
        return matmul, [*steps, _step(producer, name, operands)]
    return first_failure or Failed(
        f"no input of {producer.op_type} '{producer.name}' has the shape and dtype of its result"
    )


def _step(op: Operation, scores_input: str, operands: tuple[tuple[str, Var], ...]) -> ScoreStep:
    """``op`` as a step on the scores it reads through ``scores_input``."""
    axis = op.inputs.get("axis") if op.op_type in QUANTIZATION_OPS else None
    if axis is None or op.inputs["scale"].rank != 1:
        return ScoreStep(op.op_type, scores_input, operands, op)
    rank = op.inputs[scores_input].rank
    return ScoreStep(op.op_type, scores_input, operands, op, axis=int(axis.val) % rank - rank)


def _weight_steps(softmax: Operation) -> tuple[list[ScoreStep], Var]:
    """The ``quantize`` and ``dequantize`` ops right after ``softmax``, each the only reader of
    the one before in the same block, and the var they end with (the softmax's output if none)."""
    steps: list[ScoreStep] = []
    var = softmax.outputs[0]
    while len(steps) < MAX_CHAIN and len(var.child_ops) == 1 and not var.consuming_blocks:
        reader = var.child_ops[0]
        if reader.op_type not in QUANTIZATION_OPS or reader.enclosing_block is not softmax.enclosing_block:
            break
        operands = tuple((name, value) for name, value in reader.inputs.items() if name != "input")
        steps.append(_step(reader, "input", operands))
        var = reader.outputs[0]
    return steps, var


def _quantization_notes(steps: list[ScoreStep], weight_steps: list[ScoreStep], kept_scale: bool) -> tuple[str, ...]:
    """What a site says of the quantized activations of its chain."""
    notes = []
    pairs = sum(step.op_type == "quantize" for step in steps)
    if pairs:
        notes.append(
            f"quantized scores: {pairs} quantize -> dequantize between the scores and the softmax, "
            "applied to each chunk's scores"
        )
    if weight_steps:
        notes.append(
            "quantized weights: quantize -> dequantize between the softmax and the value matmul, "
            "applied to each chunk's weights"
        )
    if kept_scale:
        notes.append("the scale stays on the scores, where the program has it, so that they round to the same levels")
    return tuple(notes)


def _sole_use_problem(var: Var, consumer: Operation) -> Optional[str]:
    """Why ``var`` cannot be an intermediate of a chain ending at ``consumer``; ``None`` if it can."""
    return private_use_problem(var, consumer.enclosing_block, lambda op: op is consumer, WHERE)


def _looks_like_scores(softmax: Operation) -> bool:
    """Whether a matmul feeds ``softmax``, through elementwise ops whatever else reads them."""
    var = softmax.inputs["x"]
    for _ in range(MAX_CHAIN):
        producer = var.op
        if producer is None:
            return False
        if producer.op_type == "matmul":
            return True
        inputs = [producer.inputs.get(name) for name in SCORES_INPUTS.get(producer.op_type, ())]
        same_shape = [x for x in inputs if x is not None and tuple(x.shape) == tuple(var.shape)]
        if not same_shape:
            return False
        var = same_shape[0]
    return False


def _unread_weights_reason(weights: Var) -> str:
    readers = [f"{op.op_type} '{op.name}'" for op in weights.child_ops]
    if not readers:
        return "the softmax's result is not multiplied by values: it is only an output of its block"
    return f"the softmax's result is not multiplied by values: it is read by {', '.join(readers)}"


def _value_matmul_problem(matmul: Operation, weights: Var) -> Optional[str]:
    if weights.consuming_blocks:
        return "the softmax's result is also an output of its block"
    if matmul.inputs["x"] is not weights:
        return f"the softmax's result is the second operand of matmul '{matmul.name}'"
    if matmul.enclosing_block is not weights.op.enclosing_block:
        return f"the matmul after the softmax, '{matmul.name}', runs in a nested block"
    if _flag(matmul, "transpose_x") or _flag(matmul, "transpose_y"):
        return f"the matmul after the softmax, '{matmul.name}', transposes an operand"
    return None


def _leading_scale(steps: list[ScoreStep]) -> tuple[float, list[ScoreStep], list[ScoreStep]]:
    """Scalar constant ``mul``/``real_div`` steps right after the scores: their product, those
    steps, and the steps after them."""
    scale = 1.0
    scale_steps: list[ScoreStep] = []
    while steps and steps[0].op_type in SCALE_OPS and steps[0].op is not None:
        factor = _scalar_factor(steps[0])
        if factor is None:
            break
        scale *= factor
        scale_steps.append(steps[0])
        steps = steps[1:]
    return scale, scale_steps, steps


def _scalar_factor(step: ScoreStep) -> Optional[float]:
    """For ``s * c``, ``c * s`` or ``s / c`` with a scalar constant ``c``: the factor."""
    ((name, operand),) = step.operands
    if not _is_scalar_const(operand):
        return None
    value = float(np.asarray(operand.val).reshape(()))
    if step.op_type == "mul":
        return value
    if name == "y" and value != 0:  # s / c, never c / s
        return 1.0 / value
    return None


def _folded_key(matmul: Operation) -> tuple[Var, bool, tuple[Operation, ...]]:
    """The key before an explicit transpose of its last two axes, when that transpose is only ours
    (and its output is not the query too: ``matmul(x=t, y=t)`` would lose ``t``)."""
    key = matmul.inputs["y"]
    transposed = _flag(matmul, "transpose_y")
    transpose = key.op
    if (
        transpose is not None
        and transpose.op_type == "transpose"
        and matmul.inputs["x"] is not key
        and _sole_use_problem(key, matmul) is None
        and _swaps_last_two_axes(transpose)
    ):
        return transpose.inputs["x"], not transposed, (transpose,)
    return key, transposed, ()


def _swaps_last_two_axes(transpose: Operation) -> bool:
    perm = [int(axis) % transpose.inputs["x"].rank for axis in transpose.inputs["perm"].val]
    rank = len(perm)
    return rank >= 2 and perm == [*range(rank - 2), rank - 1, rank - 2]


def _flag(op: Operation, name: str) -> bool:
    var = op.inputs.get(name)
    return var is not None and bool(var.val)


def _is_last_axis(softmax: Operation) -> bool:
    axis = int(softmax.inputs["axis"].val)
    return axis in (-1, softmax.inputs["x"].rank - 1)


def _is_scalar_const(var: Var) -> bool:
    return var.val is not None and np.size(var.val) == 1 and var.op is not None and var.op.op_type == "const"
