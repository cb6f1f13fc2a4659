"""Programs whose attention reads an operand as large as the scores, made in the graph from smaller
tensors: SAM's decomposed relative-position bias, masks computed from positions, an ALiBi-style
bias, a tiled bias, a quantized run-time mask, and one made by an op no recipe follows.

Each builder returns ``(program, inputs)``; the site is the fused op (``decomposed=False``) or
the chain written out as ops, named ``attention``.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Program, Var, types

from attention_cases import IOS18
from programs import repeat_heads

HEADS = 2
SIDE = 8
"""Query and key grids of SIDE x SIDE: L = S = 64."""
LENGTH = SIDE * SIDE
HEAD_DIM = 8


def attention(q: Var, k: Var, v: Var, operand: Var, decomposed: bool) -> Var:
    """``softmax(q k^T / sqrt(E) + operand) v``, fused or written out."""
    if not decomposed:
        return mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=operand, name="attention")
    scores = mb.matmul(x=mb.mul(x=q, y=np.float32(HEAD_DIM**-0.5)), y=k, transpose_y=True, name="scores")
    biased = mb.add(x=scores, y=operand, name="biased")
    return mb.matmul(x=mb.softmax(x=biased, axis=-1, name="weights"), y=v, name="attention")


def _qkv(batch: int = 1) -> list:
    return [mb.TensorSpec((batch, HEADS, LENGTH, HEAD_DIM)) for _ in range(3)]


def _feeds(prog: Program, seed: int = 0) -> dict[str, np.ndarray]:
    """Normal values for float inputs; shuffled positions for ``positions``."""
    rng = np.random.default_rng(seed)
    inputs = prog.functions["main"].inputs
    feeds = {name: rng.standard_normal(tuple(var.shape)).astype(np.float32) for name, var in inputs.items()}
    if "positions" in feeds:
        feeds["positions"] = rng.permutation(LENGTH).astype(np.int32)
    return feeds


def relative_position_program(
    decomposed: bool = False, batch: int = 1, folded: bool = True, repeat: Optional[str] = None
) -> tuple[Program, dict]:
    """SAM's global attention: ``rel_h[..., None] + rel_w[..., None, :]`` (rank 5 when the batch and
    head axes are ``folded`` into one, rank 6 when not), reshaped to ``(batch, heads, L, S)``. With
    ``repeat`` (a form of ``REPEAT_FORMS``), the keys and values have one head, repeated for both."""
    lead = (batch * HEADS,) if folded else (batch, HEADS)
    rel = [mb.TensorSpec((*lead, SIDE, SIDE, SIDE)) for _ in range(2)]
    qkv = _qkv(batch)
    if repeat is not None:
        qkv[1:] = [mb.TensorSpec((batch, 1, LENGTH, HEAD_DIM)) for _ in range(2)]

    @mb.program(input_specs=[*qkv, *rel], opset_version=IOS18)
    def prog(q, k, v, rel_h, rel_w):
        if repeat is not None:
            k, v = (repeat_heads(x, repeat, HEADS, f"{x.name}_repeated") for x in (k, v))
        h = mb.expand_dims(x=rel_h, axes=[-1], name="rel_h_expanded")
        w = mb.expand_dims(x=rel_w, axes=[-2], name="rel_w_expanded")
        both = mb.add(x=h, y=w, name="decomposed_rel_pos")
        bias = mb.reshape(x=both, shape=[batch, HEADS, LENGTH, LENGTH], name="attn_bias")
        return attention(q, k, v, bias, decomposed)

    return prog, _feeds(prog)


POSITIONS = mb.TensorSpec((LENGTH,), dtype=types.int32)
"""Position ids, a run-time input (as a model with a KV cache or padding takes them)."""


def causal_positions_program(decomposed: bool = False) -> tuple[Program, dict]:
    """A causal bool mask computed from positions: ``pos[:, None] >= pos[None, :]``, ``(1, 1, L, S)``."""

    @mb.program(input_specs=[*_qkv(), POSITIONS], opset_version=IOS18)
    def prog(q, k, v, positions):
        rows = mb.expand_dims(x=positions, axes=[0, 1, 3], name="q_pos_column")
        columns = mb.reshape(x=positions, shape=[1, 1, 1, LENGTH], name="k_pos_row")
        mask = mb.greater_equal(x=rows, y=columns, name="causal")
        if decomposed:
            kept = mb.cast(x=mask, dtype="fp32", name="causal_as_float")
            mask = mb.mul(x=mb.sub(x=kept, y=np.float32(1.0)), y=np.float32(1e4), name="causal_bias")
        return attention(q, k, v, mask, decomposed)

    return prog, _feeds(prog)


def constant_positions_program() -> tuple[Program, dict]:
    """A causal additive mask computed from ``range_1d`` positions, all known when the program is built."""

    @mb.program(input_specs=_qkv(), opset_version=IOS18)
    def prog(q, k, v):
        positions = mb.range_1d(start=np.int32(0), end=np.int32(LENGTH), step=np.int32(1), name="positions")
        rows = mb.reshape(x=positions, shape=[LENGTH, 1], name="q_pos_column")
        visible = mb.cast(x=mb.greater_equal(x=rows, y=positions), dtype="fp32", name="visible")
        bias = mb.mul(x=mb.sub(x=visible, y=np.float32(1.0)), y=np.float32(1e4), name="causal_bias")
        return attention(q, k, v, mb.expand_dims(x=bias, axes=[0, 1], name="mask"), decomposed=True)

    return prog, _feeds(prog)


def alibi_program(decomposed: bool = False) -> tuple[Program, dict]:
    """An ALiBi-style bias built at full size: ``-slope[h] * |pos_q - pos_k|``, ``(1, heads, L, S)``, fp32."""
    slopes = (-(2.0 ** -np.arange(1, HEADS + 1))).astype(np.float32).reshape(1, HEADS, 1, 1)

    @mb.program(input_specs=[*_qkv(), POSITIONS], opset_version=IOS18)
    def prog(q, k, v, positions):
        columns = mb.cast(x=positions, dtype="fp32", name="k_float")
        rows = mb.reshape(x=columns, shape=[LENGTH, 1], name="q_float")
        distance = mb.abs(x=mb.sub(x=rows, y=columns, name="offsets"), name="distance")
        bias = mb.mul(x=distance, y=slopes, name="alibi")
        return attention(q, k, v, bias, decomposed)

    return prog, _feeds(prog)


def tiled_bias_program(decomposed: bool = False) -> tuple[Program, dict]:
    """A per-key bias ``(1, heads, 1, S)`` tiled to every query row, then masked by a select."""

    gates = [mb.TensorSpec((1, HEADS, 1, LENGTH)), mb.TensorSpec((1, 1, LENGTH, 1))]

    @mb.program(input_specs=[*_qkv(), *gates], opset_version=IOS18)
    def prog(q, k, v, key_bias, row_gate):
        tiled = mb.tile(x=key_bias, reps=[1, 1, LENGTH, 1], name="tiled_bias")
        gated = mb.select(cond=mb.greater(x=row_gate, y=np.float32(0.0)), a=tiled, b=np.float32(-3.0), name="gated")
        return attention(q, k, v, gated, decomposed)

    return prog, _feeds(prog)


def quantized_mask_program(decomposed: bool = False, axis: Optional[int] = None) -> tuple[Program, dict]:
    """A run-time float mask ``(1, 1, L, S)`` through ``quantize -> dequantize`` (W8A8) before the
    site: per tensor, or with a scale and zero point along ``axis`` (-2: the query rows)."""
    scale: object = np.float32(0.05)
    zero_point: object = np.int8(0)
    if axis is not None:
        scale = np.linspace(0.02, 0.08, LENGTH).astype(np.float32)
        zero_point = np.arange(LENGTH).astype(np.int8) % 5
    pair = {"scale": scale, "zero_point": zero_point, **({} if axis is None else {"axis": axis})}

    @mb.program(input_specs=[*_qkv(), mb.TensorSpec((1, 1, LENGTH, LENGTH))], opset_version=IOS18)
    def prog(q, k, v, mask):
        levels = mb.quantize(input=mask, output_dtype="int8", **pair)
        restored = mb.dequantize(input=levels, name="mask_restored", **pair)
        return attention(q, k, v, restored, decomposed)

    return prog, _feeds(prog)


def gathered_bias_program(decomposed: bool = False) -> tuple[Program, dict]:
    """A bias gathered at full size from a table of relative positions: no recipe follows ``gather``."""
    offsets = (np.arange(LENGTH)[:, None] - np.arange(LENGTH)[None, :] + LENGTH - 1).astype(np.int32)

    @mb.program(input_specs=[*_qkv(), mb.TensorSpec((2 * LENGTH - 1, HEADS))], opset_version=IOS18)
    def prog(q, k, v, table):
        gathered = mb.gather(x=table, indices=offsets, axis=0, name="gathered")  # (L, S, heads)
        bias = mb.expand_dims(x=mb.transpose(x=gathered, perm=[2, 0, 1]), axes=[0], name="bias")
        return attention(q, k, v, bias, decomposed)

    return prog, _feeds(prog)


BUILDERS: dict[str, Callable[..., tuple[Program, dict]]] = {
    "relative_position": relative_position_program,
    "causal_positions": causal_positions_program,
    "alibi": alibi_program,
    "tiled_bias": tiled_bias_program,
    "quantized_mask": quantized_mask_program,
    "quantized_mask_per_row": functools.partial(quantized_mask_program, axis=-2),
    "quantized_mask_per_key": functools.partial(quantized_mask_program, axis=3),
}
"""The programs whose operand has a recipe."""
