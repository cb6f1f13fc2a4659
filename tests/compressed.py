"""Packages whose weights are compressed in every form coremltools makes: int4 and int8
(block-wise, per channel, per tensor), 1- to 8-bit palettized (per tensor and grouped), sparse,
the joint forms ``ct.optimize`` makes, and the pre-iOS18 ops; each around one attention site."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import attrs
import coremltools as ct
import coremltools.optimize.coreml as cto
import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Program, types

TOKENS = 64
"""Query rows: the default ``min_seq_length``, so that the site is sliced."""
HIDDEN = 32
HEADS = 2
BLOCK_SIZE = 8
GROUP_SIZE = 8
PALETTE_BITS = (1, 2, 3, 4, 6, 8)
SPARSITY = 0.5
WEIGHT_RNG_SEED = 20251203
WEIGHTS = ("q", "k", "v", "o")
"""The projections, each one weight of ``HIDDEN`` x ``HIDDEN`` to compress."""


def _program(opset: ct.target) -> Program:
    """``main(x)``: q, k and v projections of ``x`` (fp32 weights to compress), attention over them
    (fused from iOS18, written out as ops before), and an output projection."""
    rng = np.random.default_rng(WEIGHT_RNG_SEED)
    weights = {name: rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32) for name in WEIGHTS}
    head_size = HIDDEN // HEADS

    @mb.program(input_specs=[mb.TensorSpec((1, TOKENS, HIDDEN), dtype=types.fp32)], opset_version=opset)
    def prog(x):
        heads = {}
        for name in ("q", "k", "v"):
            projected = mb.linear(x=x, weight=weights[name], name=f"{name}_proj")
            split = mb.reshape(x=projected, shape=(1, TOKENS, HEADS, head_size))
            heads[name] = mb.transpose(x=split, perm=(0, 2, 1, 3), name=f"{name}_heads")
        if opset >= ct.target.iOS18:
            attention = mb.scaled_dot_product_attention(
                query=heads["q"], key=heads["k"], value=heads["v"], name="attention"
            )
        else:
            scaled = mb.mul(x=heads["q"], y=np.float32(head_size**-0.5))
            scores = mb.matmul(x=scaled, y=heads["k"], transpose_y=True)
            weights_ = mb.softmax(x=scores, axis=-1)
            attention = mb.matmul(x=weights_, y=heads["v"], name="attention")
        joined = mb.reshape(x=mb.transpose(x=attention, perm=(0, 2, 1, 3)), shape=(1, TOKENS, HIDDEN))
        return mb.linear(x=joined, weight=weights["o"], name="output")

    return prog


def _linear(dtype: str, granularity: str, block_size: int = 0) -> cto.OpLinearQuantizerConfig:
    options = {"block_size": block_size} if granularity == "per_block" else {}
    return cto.OpLinearQuantizerConfig(
        mode="linear_symmetric", dtype=dtype, granularity=granularity, weight_threshold=0, **options
    )


def _palettizer(nbits: int, grouped: bool) -> cto.OpPalettizerConfig:
    options = {"granularity": "per_grouped_channel", "group_size": GROUP_SIZE} if grouped else {}
    return cto.OpPalettizerConfig(mode="uniform", nbits=nbits, weight_threshold=0, **options)


PRUNER = cto.OpMagnitudePrunerConfig(target_sparsity=SPARSITY, weight_threshold=0)

Compress = Callable[[ct.models.MLModel], ct.models.MLModel]


def _quantized(config: cto.OpLinearQuantizerConfig, joint: bool = False) -> Compress:
    return lambda model: cto.linear_quantize_weights(model, cto.OptimizationConfig(config), joint_compression=joint)


def _palettized(config: cto.OpPalettizerConfig, joint: bool = False) -> Compress:
    return lambda model: cto.palettize_weights(model, cto.OptimizationConfig(config), joint_compression=joint)


def _pruned(model: ct.models.MLModel) -> ct.models.MLModel:
    return cto.prune_weights(model, cto.OptimizationConfig(PRUNER))


def _then(*steps: Compress) -> Compress:
    def compress(model: ct.models.MLModel) -> ct.models.MLModel:
        for step in steps:
            model = step(model)
        return model

    return compress


@attrs.frozen
class Kind:
    """One form of compressed weights: the opset and how ``ct.optimize`` makes it."""

    opset: ct.target
    compress: Compress


IOS16, IOS18 = ct.target.iOS16, ct.target.iOS18
KINDS: Mapping[str, Kind] = {
    **{
        f"{dtype} {granularity.replace('_', '-')}": Kind(IOS18, _quantized(_linear(dtype, granularity, BLOCK_SIZE)))
        for dtype in ("int4", "int8")
        for granularity in ("per_block", "per_channel", "per_tensor")
    },
    **{
        f"palettized {nbits}-bit{' grouped' if grouped else ''}": Kind(IOS18, _palettized(_palettizer(nbits, grouped)))
        for nbits in PALETTE_BITS
        for grouped in (False, True)
    },
    "sparse": Kind(IOS18, _pruned),
    "sparse + palettized 4-bit": Kind(IOS18, _then(_pruned, _palettized(_palettizer(4, False), joint=True))),
    "sparse + int8": Kind(IOS18, _then(_pruned, _quantized(_linear("int8", "per_channel"), joint=True))),
    "iOS16 int8": Kind(IOS16, _quantized(_linear("int8", "per_channel"))),
    "iOS16 uint8": Kind(
        IOS16,
        _quantized(cto.OpLinearQuantizerConfig(mode="linear", dtype="uint8", weight_threshold=0)),
    ),
    "iOS16 palettized 4-bit": Kind(IOS16, _palettized(_palettizer(4, False))),
    "iOS16 sparse": Kind(IOS16, _pruned),
}
"""Every form of compressed weights, by name."""


def compressed_package(path: Path, kind: str) -> Path:
    """``_program`` at the kind's opset, every weight compressed as ``KINDS[kind]`` says, saved at ``path``."""
    form = KINDS[kind]
    model = ct.convert(
        _program(form.opset),
        convert_to="mlprogram",
        minimum_deployment_target=form.opset,
        pass_pipeline=ct.PassPipeline.EMPTY,
        skip_model_load=True,
    )
    form.compress(model).save(str(path))
    return path
