"""Attention written out as ops, as coremltools' torch frontend emits it when ``scale`` is given.

::

    %qs = mul(x=%q, y=0.125)                       # optional; any scale on Q stays as it is
    %kt = transpose(x=%k, perm=[0, 1, 3, 2])       # optional; or transpose_y=True below
    %s  = matmul(x=%qs, y=%kt)
    %s2 = mul(x=%s, y=0.5)   or   real_div(x=%s, y=2.0)     # optional scalar scales
    %a  = add(x=%s2, y=%mask)  or  add(x=%mask, y=%s2)      # optional additive mask
    %p  = softmax(x=%a, axis=-1)
    %out = matmul(x=%p, y=%v)

is the site ``softmax(scale * qs @ k^T + mask) @ v``, anchored at the last matmul. Every
intermediate from ``%s`` to ``%p`` (and ``%kt`` when folded) must be used only by the next op
of the chain, must not be a block output and must run in the anchor's block; otherwise the
chain is not a site, or (for ``%kt`` and the query scale) that op stays an input of the site.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from coremltools.converters.mil.mil import Operation, Var

from sdpa_slicer._config import SliceConfig
from sdpa_slicer._match import DECOMPOSED, AttentionSite

SCALE_OPS = ("mul", "real_div")


def match_decomposed_attention(
    op: Operation, function_name: str, config: SliceConfig
) -> Optional[AttentionSite]:
    if not config.match_decomposed or not _is_plain_matmul(op):
        return None
    weights = op.inputs["x"]
    softmax = _sole_producer(weights, op)
    if softmax is None or softmax.op_type != "softmax" or not _is_last_axis(softmax):
        return None
    found = _masked_scores(softmax.inputs["x"], softmax)
    if found is None:
        return None
    scores_matmul, scale, mask, chain_ops = found
    key, key_transposed, key_ops = _folded_key(scores_matmul)
    return AttentionSite(
        kind=DECOMPOSED,
        function_name=function_name,
        block=op.enclosing_block,
        ops=(*key_ops, scores_matmul, *chain_ops, softmax, op),
        query=scores_matmul.inputs["x"],
        key=key,
        key_transposed=key_transposed,
        value=op.inputs["y"],
        mask=mask,
        scale=scale,
        scores_shape=tuple(scores_matmul.outputs[0].shape),
    )


def _masked_scores(
    var: Var, consumer: Operation
) -> Optional[tuple[Operation, float, Optional[Var], list[Operation]]]:
    """Match ``[scale ops] -> [add mask]`` back from ``var`` to the scores matmul."""
    add = _sole_producer(var, consumer)
    if add is not None and add.op_type == "add":
        for scores, mask in ((add.inputs["x"], add.inputs["y"]), (add.inputs["y"], add.inputs["x"])):
            found = _scaled_scores(scores, add)
            if found is not None and tuple(add.outputs[0].shape) == tuple(scores.shape):
                matmul, scale, scale_ops = found
                return matmul, scale, mask, [*scale_ops, add]
    found = _scaled_scores(var, consumer)
    if found is None:
        return None
    matmul, scale, scale_ops = found
    return matmul, scale, None, scale_ops


def _scaled_scores(var: Var, consumer: Operation) -> Optional[tuple[Operation, float, list[Operation]]]:
    """Match ``matmul -> (mul | real_div by a scalar const)*`` back from ``var``."""
    scale = 1.0
    scale_ops: list[Operation] = []
    producer = _sole_producer(var, consumer)
    while producer is not None and producer.op_type in SCALE_OPS:
        factor = _scalar_factor(producer)
        if factor is None:
            return None
        operand, value = factor
        if tuple(operand.shape) != tuple(producer.outputs[0].shape):
            return None
        scale *= value
        scale_ops.insert(0, producer)
        producer = _sole_producer(operand, producer)
    if producer is None or not _is_plain_matmul(producer, allow_transposed_y=True):
        return None
    if producer.inputs["x"].rank < 2 or producer.inputs["y"].rank < 2:
        return None
    return producer, scale, scale_ops


def _scalar_factor(op: Operation) -> Optional[tuple[Var, float]]:
    """For ``x * c``, ``c * x`` or ``x / c`` with a scalar constant ``c``: ``x`` and the factor."""
    x, y = op.inputs["x"], op.inputs["y"]
    if _is_scalar_const(y):
        value = float(np.asarray(y.val).reshape(()))
        if op.op_type == "real_div":
            return (x, 1.0 / value) if value != 0 else None
        return x, value
    if op.op_type == "mul" and _is_scalar_const(x):
        return y, float(np.asarray(x.val).reshape(()))
    return None


def _folded_key(matmul: Operation) -> tuple[Var, bool, tuple[Operation, ...]]:
    """The key before an explicit transpose of its last two axes, when that transpose is only ours."""
    key = matmul.inputs["y"]
    transposed = _flag(matmul, "transpose_y")
    transpose = _sole_producer(key, matmul)
    if transpose is not None and transpose.op_type == "transpose" and _swaps_last_two_axes(transpose):
        return transpose.inputs["x"], not transposed, (transpose,)
    return key, transposed, ()


def _swaps_last_two_axes(transpose: Operation) -> bool:
    perm = [int(axis) % transpose.inputs["x"].rank for axis in transpose.inputs["perm"].val]
    rank = len(perm)
    return rank >= 2 and perm == [*range(rank - 2), rank - 1, rank - 2]


def _sole_producer(var: Var, consumer: Operation) -> Optional[Operation]:
    """The op producing ``var`` when ``consumer`` is its only use, it is no block output, and it
    runs in ``consumer``'s block: an op of an enclosing block is an input of the site, never
    one of its ops."""
    producer = var.op
    if producer is None or var.consuming_blocks or len(var.child_ops) != 1 or var.child_ops[0] is not consumer:
        return None
    return producer if producer.enclosing_block is consumer.enclosing_block else None


def _is_plain_matmul(op: Operation, allow_transposed_y: bool = False) -> bool:
    if op.op_type != "matmul" or _flag(op, "transpose_x"):
        return False
    return allow_transposed_y or not _flag(op, "transpose_y")


def _flag(op: Operation, name: str) -> bool:
    var = op.inputs.get(name)
    return var is not None and bool(var.val)


def _is_last_axis(softmax: Operation) -> bool:
    axis = int(softmax.inputs["axis"].val)
    return axis in (-1, softmax.inputs["x"].rank - 1)


def _is_scalar_const(var: Var) -> bool:
    return var.val is not None and np.size(var.val) == 1 and var.op is not None and var.op.op_type == "const"
