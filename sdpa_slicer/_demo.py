"""The built-in example: one Llama-style attention layer at 2048 tokens, before and after slicing."""

from __future__ import annotations

import coremltools as ct
import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Program, types

HEADS = 32
TOKENS = 2048
HEAD_DIM = 64


def llama_attention_program(heads: int = HEADS, tokens: int = TOKENS, head_dim: int = HEAD_DIM) -> Program:
    """``main(q, k, v)``: fp16 causal ``scaled_dot_product_attention`` as a Llama layer runs it."""
    shape = (1, heads, tokens, head_dim)
    causal = np.tril(np.ones((tokens, tokens), dtype=bool))

    @mb.program(
        input_specs=[mb.TensorSpec(shape, dtype=types.fp16) for _ in range(3)],
        opset_version=ct.target.iOS18,
    )
    def prog(q, k, v):
        return mb.scaled_dot_product_attention(
            query=q, key=k, value=v, attn_mask=mb.const(val=causal, name="causal_mask"), name="attention"
        )

    return prog
