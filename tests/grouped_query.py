"""A grouped-query attention layer of Llama-3.2-1B's shape, as a converted model holds it: 32 query
heads and 8 KV heads of 64, fp16, the KV cache in Core ML states, keys and values repeated for
the query heads as transformers' ``repeat_kv`` converts (``expand_dims -> tile -> reshape``), and
``prefill`` and ``decode`` functions in one package."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Function, Program, Var, types

from attention_cases import IOS18
from generation import DECODE, PREFILL
from packages import combine, write_package

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 2048, 32, 8, 64
CACHE_LENGTH = 2048
FUNCTION_LENGTHS = {PREFILL: 1024, DECODE: 1}
CACHE_SHAPE = (1, KV_HEADS, CACHE_LENGTH, HEAD_DIM)
_RNG = np.random.default_rng(32)
WEIGHTS = {
    name: (_RNG.standard_normal((rows, HIDDEN)) / np.sqrt(HIDDEN)).astype(np.float16)
    for name, rows in (("q", HEADS * HEAD_DIM), ("k", KV_HEADS * HEAD_DIM), ("v", KV_HEADS * HEAD_DIM), ("o", HIDDEN))
}
"""The projections (output rows x hidden), shared by both functions."""


def grouped_query_function(length: int) -> Function:
    """``(x (1, L, HIDDEN), position (1,), mask (1, 1, L, CACHE_LENGTH); k_cache, v_cache) -> out``:
    project, write the new keys and values into the caches at ``position``, attend over the
    repeated caches, project back."""
    specs = [
        mb.TensorSpec((1, length, HIDDEN), dtype=types.fp16),
        mb.TensorSpec((1,), dtype=types.int32),
        mb.TensorSpec((1, 1, length, CACHE_LENGTH), dtype=types.fp16),
        mb.StateTensorSpec(CACHE_SHAPE, dtype=types.fp16),
        mb.StateTensorSpec(CACHE_SHAPE, dtype=types.fp16),
    ]

    @mb.function(input_specs=specs, opset_version=IOS18)
    def function(x, position, mask, k_cache, v_cache):
        q, k, v = (_heads(mb.linear(x=x, weight=WEIGHTS[name], name=f"{name}_proj"), name) for name in "qkv")
        zero = np.zeros(2, np.int32)
        begin = mb.concat(values=[zero, position, zero[:1]], axis=0, name="begin")
        last = mb.add(x=position, y=np.int32(length), name="last")
        end = mb.concat(values=[np.int32([1, KV_HEADS]), last, np.int32([HEAD_DIM])], axis=0, name="end")
        repeated = []
        for name, state, update in (("k", k_cache, k), ("v", v_cache, v)):
            cached = mb.read_state(input=state, name=f"read_{name}")
            written = mb.slice_update(x=cached, update=update, begin=begin, end=end, name=f"write_{name}")
            mb.coreml_update_state(state=state, value=written, name=f"update_{name}")
            repeated.append(_repeat_kv(written, name))
        attention = mb.scaled_dot_product_attention(
            query=q, key=repeated[0], value=repeated[1], attn_mask=mask, name="attention"
        )
        merged = mb.reshape(x=mb.transpose(x=attention, perm=[0, 2, 1, 3]), shape=[1, length, HIDDEN], name="merged")
        return mb.linear(x=merged, weight=WEIGHTS["o"], name="out")

    return function


def _heads(x: Var, name: str) -> Var:
    """``(1, L, heads * HEAD_DIM)`` as ``(1, heads, L, HEAD_DIM)``."""
    heads = x.shape[-1] // HEAD_DIM
    split = mb.reshape(x=x, shape=[1, x.shape[1], heads, HEAD_DIM], name=f"{name}_split")
    return mb.transpose(x=split, perm=[0, 2, 1, 3], name=f"{name}_heads")


def _repeat_kv(cache: Var, name: str) -> Var:
    """``(1, KV_HEADS, S, E)`` as ``(1, HEADS, S, E)``, query head ``h`` reading KV head ``h // 4``."""
    repeats = HEADS // KV_HEADS
    expanded = mb.expand_dims(x=cache, axes=[2], name=f"{name}_expanded")
    tiled = mb.tile(x=expanded, reps=[1, 1, repeats, 1, 1], name=f"{name}_tiled")
    return mb.reshape(x=tiled, shape=[1, HEADS, CACHE_LENGTH, HEAD_DIM], name=f"{name}_repeated")


def grouped_query_program() -> Program:
    """Functions ``prefill`` (L = 1024) and ``decode`` (L = 1) of ``grouped_query_function``."""
    prog = Program()
    for name, length in FUNCTION_LENGTHS.items():
        prog.add_function(name, grouped_query_function(length))
    return prog


def grouped_query_package(path: Path) -> Path:
    """``grouped_query_program`` as a package, ``prefill`` its default function."""
    folder = path.parent / f"{path.stem}.parts"
    folder.mkdir()
    parts = {}
    for name, length in FUNCTION_LENGTHS.items():
        prog = Program()
        prog.add_function("main", grouped_query_function(length))
        parts[name] = write_package(prog, folder / f"{name}.mlpackage")
    combine(parts, path, PREFILL)
    shutil.rmtree(folder)
    return path
