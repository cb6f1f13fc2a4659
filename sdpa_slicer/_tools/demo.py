"""The built-in examples: a Llama-style attention layer at 2048 tokens (what ``sdpa-slicer demo``
slices), and a grouped-query layer of Llama-3.2-1B's shape over a KV cache in Core ML states."""

from __future__ import annotations

import coremltools as ct
import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Function, Program, Var, types

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


HIDDEN = 2048
QUERY_HEADS = 32
KV_HEADS = 8
WEIGHT_SEED = 32


def grouped_query_layer(query_length: int, cache_length: int, query_heads: int = QUERY_HEADS) -> Function:
    """``(x (1, L, HIDDEN), position (1,), mask (1, 1, L, S); k_cache, v_cache) -> out``: one
    attention layer of Llama-3.2-1B's shape as exports write it. The q/k/v projections, the new
    keys and values written into the cache states at ``position`` (``read_state -> slice_update ->
    coreml_update_state``), the cache's ``KV_HEADS`` heads repeated for the query heads as
    transformers' ``repeat_kv`` converts (``expand_dims -> tile -> reshape``),
    ``scaled_dot_product_attention``, and the output projection. With ``query_heads ==
    KV_HEADS`` nothing is repeated. fp16; seeded random weights."""
    fp16 = types.fp16
    cache_shape = (1, KV_HEADS, cache_length, HEAD_DIM)
    rng = np.random.default_rng(WEIGHT_SEED)

    def weight(rows: int, columns: int) -> np.ndarray:
        return (rng.standard_normal((rows, columns)) / np.sqrt(columns)).astype(np.float16)

    def heads_first(x: Var, heads: int, name: str) -> Var:
        split = mb.reshape(x=x, shape=[1, query_length, heads, HEAD_DIM], name=f"{name}_split")
        return mb.transpose(x=split, perm=[0, 2, 1, 3], name=name)

    specs = [
        mb.TensorSpec((1, query_length, HIDDEN), dtype=fp16),
        mb.TensorSpec((1,), dtype=types.int32),
        mb.TensorSpec((1, 1, query_length, cache_length), dtype=fp16),
        mb.StateTensorSpec(cache_shape, dtype=fp16),
        mb.StateTensorSpec(cache_shape, dtype=fp16),
    ]

    @mb.function(input_specs=specs, opset_version=ct.target.iOS18)
    def layer(x, position, mask, k_cache, v_cache):
        query = heads_first(
            mb.linear(x=x, weight=weight(query_heads * HEAD_DIM, HIDDEN), name="q_proj"), query_heads, "q"
        )
        zero = np.zeros(2, np.int32)
        begin = mb.concat(values=[zero, position, zero[:1]], axis=0, name="begin")
        end_row = mb.add(x=position, y=np.int32(query_length), name="end_row")
        end = mb.concat(values=[np.int32([1, KV_HEADS]), end_row, np.int32([HEAD_DIM])], axis=0, name="end")
        caches = []
        for name, state in (("k", k_cache), ("v", v_cache)):
            new = heads_first(
                mb.linear(x=x, weight=weight(KV_HEADS * HEAD_DIM, HIDDEN), name=f"{name}_proj"), KV_HEADS, name
            )
            cached = mb.read_state(input=state, name=f"read_{name}")
            written = mb.slice_update(x=cached, update=new, begin=begin, end=end, name=f"write_{name}")
            cache = mb.coreml_update_state(state=state, value=written, name=f"update_{name}")
            caches.append(_repeat_kv(cache, query_heads // KV_HEADS, f"{name}_repeated"))
        attention = mb.scaled_dot_product_attention(
            query=query, key=caches[0], value=caches[1], attn_mask=mask, name="attention"
        )
        rows = mb.transpose(x=attention, perm=[0, 2, 1, 3], name="attention_rows")
        merged = mb.reshape(x=rows, shape=[1, query_length, query_heads * HEAD_DIM], name="attention_merged")
        return mb.linear(x=merged, weight=weight(HIDDEN, query_heads * HEAD_DIM), name="o_proj")

    return layer


def _repeat_kv(cache: Var, repeats: int, name: str) -> Var:
    """transformers' ``repeat_kv`` as coremltools converts it; ``cache`` itself for one repeat."""
    if repeats == 1:
        return cache
    batch, heads, length, width = cache.shape
    expanded = mb.expand_dims(x=cache, axes=[2], name=f"{name}_expanded")
    tiled = mb.tile(x=expanded, reps=[1, 1, repeats, 1, 1], name=f"{name}_tiled")
    return mb.reshape(x=tiled, shape=[batch, heads * repeats, length, width], name=name)


def grouped_query_program(lengths: dict[str, int], cache_length: int, query_heads: int = QUERY_HEADS) -> Program:
    """One ``grouped_query_layer`` function per name in ``lengths`` (its query length)."""
    prog = Program()
    for name, length in lengths.items():
        prog.add_function(name, grouped_query_layer(length, cache_length, query_heads))
    return prog
