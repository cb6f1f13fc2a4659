"""A package of Llama-3.2-1B's full shape, built as a MIL program (random weights, nothing downloaded).

16 decoder layers of hidden size 2048, 32 query heads and 8 KV heads of 64, an MLP of 8192
(SiLU-gated), a vocabulary of 128256 (the embedding tied to the output projection), RMSNorm,
rotary embeddings; the KV cache of each layer as Core ML state over 2048 positions, written at a
position input; a causal mask input; every weight matrix int4 block-wise
(``constexpr_blockwise_shift_scale``, blocks of 32 input channels, fp16 scales), the codes
random. ``prefill`` (128 tokens, the default) and ``decode`` (1 token) are two functions of one
package that share every weight, saved the way ``ct.utils.save_multifunction`` saves them:
one program with both functions, the weights' const ops sharing a ``weight_id`` so that each is
stored once, converted with every pass skipped.

Built without ``ct.optimize``: compressing 1.2 billion fp16 weights takes minutes and gigabytes,
random codes take seconds. ``shape`` makes smaller models of the same structure (the tests build one).
"""

from __future__ import annotations

import sdpa_slicer  # noqa: F401  first: it keeps coremltools' import-time warnings quiet

# isort: split
from pathlib import Path

import attrs
import coremltools as ct
import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.converter import mil_convert
from coremltools.converters.mil.mil import Function, Program, Var, types

OPSET = ct.target.iOS18
FUNCTIONS = {"prefill": 128, "decode": 1}
"""Function name -> tokens per call."""
DEFAULT_FUNCTION = "prefill"
BLOCK_SIZE = 32
ROPE_THETA = 500000.0
NORM_EPSILON = 1e-5
SEED = 1


@attrs.frozen
class LlamaShape:
    layers: int = 16
    hidden: int = 2048
    query_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 64
    mlp: int = 8192
    vocabulary: int = 128256
    context: int = 2048

    @property
    def parameters(self) -> int:
        attention = self.hidden * self.head_dim * (2 * self.query_heads + 2 * self.kv_heads)
        return self.vocabulary * self.hidden + self.layers * (attention + 3 * self.hidden * self.mlp)


LLAMA_1B = LlamaShape()


class _Weights:
    """The random int4 weights (codes and scales) and norm weights, made once and shared by both functions."""

    def __init__(self, shape: LlamaShape) -> None:
        self.rng = np.random.default_rng(SEED)
        self.shape = shape
        self.matrices: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.norms: dict[str, np.ndarray] = {}

    def matrix(self, name: str, rows: int, columns: int) -> Var:
        """The fp16 weight ``name`` of ``rows`` x ``columns``: int4 codes times a scale per block."""
        if name not in self.matrices:
            codes = self.rng.integers(-8, 8, (rows, columns), dtype=np.int8)
            scales = (self.rng.random((rows, columns // BLOCK_SIZE), dtype=np.float32) + 0.5) / (8 * np.sqrt(columns))
            self.matrices[name] = (codes.astype(types.nptype_from_builtin(types.int4)), scales.astype(np.float16))
        codes, scales = self.matrices[name]
        data = _shared_const(codes, f"{name}_codes")
        scale = _shared_const(scales, f"{name}_scales")
        return mb.constexpr_blockwise_shift_scale(data=data, scale=scale, name=name)

    def norm(self, name: str) -> Var:
        if name not in self.norms:
            self.norms[name] = (1 + 0.1 * self.rng.standard_normal(self.shape.hidden)).astype(np.float16)
        return _shared_const(self.norms[name], name)


def _shared_const(value: np.ndarray, name: str) -> Var:
    """A const stored once for every function: the ``weight_id`` ``save_multifunction`` gives shared weights."""
    var = mb.const(val=value, name=name)
    var.op.weight_id = name
    return var


def _rms_norm(x: Var, weight: Var, name: str) -> Var:
    mean = mb.reduce_mean(x=mb.mul(x=x, y=x), axes=[-1], keep_dims=True, name=f"{name}_mean")
    scaled = mb.mul(x=x, y=mb.rsqrt(x=mean, epsilon=NORM_EPSILON), name=f"{name}_scaled")
    return mb.mul(x=scaled, y=weight, name=name)


def _rotated(x: Var, cos: Var, sin: Var, half: int, name: str) -> Var:
    """``x * cos + rotate_half(x) * sin``, as transformers' ``apply_rotary_pos_emb`` converts."""
    first, second = mb.split(x=x, num_splits=2, axis=-1, name=f"{name}_halves")
    rotated = mb.concat(values=[mb.mul(x=second, y=np.float16(-1)), first], axis=-1, name=f"{name}_rotate_half")
    return mb.add(x=mb.mul(x=x, y=cos), y=mb.mul(x=rotated, y=sin), name=name)


def _heads(x: Var, length: int, heads: int, head_dim: int, name: str) -> Var:
    split = mb.reshape(x=x, shape=[1, length, heads, head_dim], name=f"{name}_split")
    return mb.transpose(x=split, perm=[0, 2, 1, 3], name=name)


def _repeat_kv(cache: Var, repeats: int, name: str) -> Var:
    """transformers' ``repeat_kv`` as coremltools converts it."""
    batch, heads, length, width = cache.shape
    expanded = mb.expand_dims(x=cache, axes=[2], name=f"{name}_expanded")
    tiled = mb.tile(x=expanded, reps=[1, 1, repeats, 1, 1], name=f"{name}_tiled")
    return mb.reshape(x=tiled, shape=[batch, heads * repeats, length, width], name=name)


def llama_function(length: int, weights: _Weights) -> Function:
    """``(input_ids (1, L), position (1,), causal_mask (1, 1, L, context); k_cache_i, v_cache_i) -> logits``."""
    shape = weights.shape
    fp16 = types.fp16
    cache_shape = (1, shape.kv_heads, shape.context, shape.head_dim)
    specs = {
        "input_ids": mb.TensorSpec((1, length), dtype=types.int32),
        "position": mb.TensorSpec((1,), dtype=types.int32),
        "causal_mask": mb.TensorSpec((1, 1, length, shape.context), dtype=fp16),
        **{
            f"{name}_cache_{layer}": mb.StateTensorSpec(cache_shape, dtype=fp16)
            for layer in range(shape.layers)
            for name in ("k", "v")
        },
    }
    half = shape.head_dim // 2
    inverse_frequencies = (ROPE_THETA ** (-np.arange(half, dtype=np.float32) / half)).reshape(1, half)

    with Function(specs, OPSET) as function:
        input_ids, position, causal_mask, *caches = function.inputs.values()
        embedding = weights.matrix("embed_tokens", shape.vocabulary, shape.hidden)
        x = mb.gather(x=embedding, indices=input_ids, axis=0, name="embedded")
        positions = mb.add(x=mb.cast(x=position, dtype="fp32"), y=np.arange(length, dtype=np.float32))
        angles = mb.matmul(x=mb.reshape(x=positions, shape=[length, 1]), y=inverse_frequencies, name="angles")
        angles = mb.reshape(x=mb.concat(values=[angles, angles], axis=-1), shape=[1, 1, length, shape.head_dim])
        cos = mb.cast(x=mb.cos(x=angles), dtype="fp16", name="rope_cos")
        sin = mb.cast(x=mb.sin(x=angles), dtype="fp16", name="rope_sin")
        zero = np.zeros(2, np.int32)
        begin = mb.concat(values=[zero, position, zero[:1]], axis=0, name="cache_begin")
        end_row = mb.add(x=position, y=np.int32(length), name="cache_end_row")
        end = mb.concat(values=[np.int32([1, shape.kv_heads]), end_row, np.int32([shape.head_dim])], axis=0)
        for layer in range(shape.layers):
            prefix = f"layers_{layer}"
            h = _rms_norm(x, weights.norm(f"{prefix}_input_norm"), f"{prefix}_input_norm_out")
            projections = {}
            for name, heads in (("q", shape.query_heads), ("k", shape.kv_heads), ("v", shape.kv_heads)):
                weight = weights.matrix(f"{prefix}_{name}_proj", heads * shape.head_dim, shape.hidden)
                projected = mb.linear(x=h, weight=weight, name=f"{prefix}_{name}_projected")
                projections[name] = _heads(projected, length, heads, shape.head_dim, f"{prefix}_{name}_heads")
            query = _rotated(projections["q"], cos, sin, half, f"{prefix}_q_rotated")
            new = {"k": _rotated(projections["k"], cos, sin, half, f"{prefix}_k_rotated"), "v": projections["v"]}
            cached = {}
            for index, name in enumerate(("k", "v")):
                state = caches[2 * layer + index]
                read = mb.read_state(input=state, name=f"{prefix}_read_{name}")
                written = mb.slice_update(x=read, update=new[name], begin=begin, end=end, name=f"{prefix}_write_{name}")
                cache = mb.coreml_update_state(state=state, value=written, name=f"{prefix}_update_{name}")
                cached[name] = _repeat_kv(cache, shape.query_heads // shape.kv_heads, f"{prefix}_{name}_repeated")
            attention = mb.scaled_dot_product_attention(
                query=query, key=cached["k"], value=cached["v"], attn_mask=causal_mask, name=f"{prefix}_attention"
            )
            rows = mb.transpose(x=attention, perm=[0, 2, 1, 3])
            merged = mb.reshape(x=rows, shape=[1, length, shape.query_heads * shape.head_dim])
            output = weights.matrix(f"{prefix}_o_proj", shape.hidden, shape.query_heads * shape.head_dim)
            x = mb.add(x=x, y=mb.linear(x=merged, weight=output), name=f"{prefix}_attention_residual")
            h = _rms_norm(x, weights.norm(f"{prefix}_post_norm"), f"{prefix}_post_norm_out")
            gate = mb.linear(x=h, weight=weights.matrix(f"{prefix}_gate_proj", shape.mlp, shape.hidden))
            up = mb.linear(x=h, weight=weights.matrix(f"{prefix}_up_proj", shape.mlp, shape.hidden))
            down = weights.matrix(f"{prefix}_down_proj", shape.hidden, shape.mlp)
            gated = mb.mul(x=mb.silu(x=gate), y=up, name=f"{prefix}_gated")
            x = mb.add(x=x, y=mb.linear(x=gated, weight=down), name=f"{prefix}_mlp_residual")
        x = _rms_norm(x, weights.norm("final_norm"), "final_norm_out")
        function.set_outputs([mb.linear(x=x, weight=embedding, name="logits")])  # tied to the embedding
    return function


def llama_program(shape: LlamaShape = LLAMA_1B) -> Program:
    weights = _Weights(shape)
    prog = Program()
    for name, length in FUNCTIONS.items():
        prog.add_function(name, llama_function(length, weights))
    prog.default_function_name = DEFAULT_FUNCTION
    return prog


def build_llama_package(path: Path, shape: LlamaShape = LLAMA_1B) -> Path:
    """Save ``llama_program(shape)`` at ``path`` as ``save_multifunction`` saves a multi-function
    program (kept if it exists)."""
    if not path.exists():
        prog = llama_program(shape)
        prog.skip_all_passes = True
        prog.export_as_multifunction = True
        model = mil_convert(
            prog,
            convert_to="mlprogram",
            convert_from="milinternal",
            specification_version=OPSET,
            compute_units=ct.ComputeUnit.CPU_ONLY,
            skip_model_load=True,
        )
        model.save(str(path))
    return path
