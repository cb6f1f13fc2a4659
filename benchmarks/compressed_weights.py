"""Compressed weights for the package benchmarks, built as ``ct.optimize.coreml`` stores them,
from random codes: no fp16 weights are made and compressed, so a package of 1 GiB of fp16
weights' worth takes seconds to build.

Each kind is a function ``(rng, shape)`` that adds the ops of one fp16 weight of ``shape`` to
the program being built and returns it, and the opset it needs: int4 and int8
``constexpr_blockwise_shift_scale`` (per block, per channel), palettized
``constexpr_lut_to_dense`` (per tensor and grouped, 1 to 8 bits), sparse
``constexpr_sparse_to_dense``, the joint sparse + palettized and sparse + int8 forms, and the
iOS16 ``constexpr_affine_dequantize``, ``constexpr_lut_to_dense`` and ``constexpr_sparse_to_dense``.
"""

from __future__ import annotations

import sdpa_slicer  # noqa: F401  first: it keeps coremltools' import-time warnings quiet

# isort: split
from typing import Callable, Mapping, Optional

import attrs
import coremltools as ct
import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Var, types

BLOCK_SIZE = 32
"""Input channels per scale of block-wise int4, as Apple's Llama recipe uses."""
GROUP_SIZE = 16
"""Output channels per palette of grouped palettization."""
SPARSITY = 0.5
SCALE = 1 / 64
"""Of the codes: weights of about the size of random ones."""

Weight = Callable[[np.random.Generator, tuple[int, int]], Var]


@attrs.frozen
class Kind:
    opset: ct.target
    weight: Weight
    op_types: tuple[str, ...]
    """The ``constexpr_*`` ops of one weight."""


def _sub_byte(values: np.ndarray, dtype: type) -> np.ndarray:
    return values.astype(types.nptype_from_builtin(dtype))


def _scales(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return (rng.random(shape, dtype=np.float32) * SCALE + SCALE / 2).astype(np.float16)


def _palette(rng: np.random.Generator, groups: int, nbits: int) -> np.ndarray:
    return rng.standard_normal((groups, 1, 2**nbits, 1), dtype=np.float32).astype(np.float16) * np.float16(0.02)


def _mask(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return rng.random(shape, dtype=np.float32) >= SPARSITY


def _blockwise(dtype: type, block_size: Optional[int]) -> Weight:
    """Codes of ``dtype`` with a scale per ``block_size`` input channels (``None``: per output channel)."""
    low, high = (-8, 8) if dtype == types.int4 else (-128, 128)

    def weight(rng: np.random.Generator, shape: tuple[int, int]) -> Var:
        codes = rng.integers(low, high, shape, dtype=np.int8)
        data = _sub_byte(codes, dtype) if types.is_sub_byte(dtype) else codes
        scale = _scales(rng, (shape[0], 1 if block_size is None else shape[1] // block_size))
        return mb.constexpr_blockwise_shift_scale(data=data, scale=scale)

    return weight


def _palettized(nbits: int, group_size: Optional[int]) -> Weight:
    """``nbits`` indices into a palette per ``group_size`` output channels (``None``: one palette)."""

    def weight(rng: np.random.Generator, shape: tuple[int, int]) -> Var:
        codes = rng.integers(0, 2**nbits, shape, dtype=np.uint8)
        indices = codes if nbits == 8 else _sub_byte(codes, getattr(types, f"uint{nbits}"))
        lut = _palette(rng, 1 if group_size is None else shape[0] // group_size, nbits)
        return mb.constexpr_lut_to_dense(indices=indices, lut=lut)

    return weight


def _sparse(rng: np.random.Generator, shape: tuple[int, int]) -> Var:
    mask = _mask(rng, shape)
    nonzero = rng.standard_normal(int(mask.sum()), dtype=np.float32).astype(np.float16) * np.float16(0.02)
    return mb.constexpr_sparse_to_dense(nonzero_data=nonzero, mask=_sub_byte(mask, types.uint1))


def _sparse_palettized(rng: np.random.Generator, shape: tuple[int, int]) -> Var:
    mask = _mask(rng, shape)
    codes = rng.integers(0, 16, int(mask.sum()), dtype=np.uint8)
    dense_mask, nonzero = mb.constexpr_lut_to_sparse(
        indices_mask=_sub_byte(mask, types.uint1),
        indices_nonzero_data=_sub_byte(codes, types.uint4),
        lut=_palette(rng, 1, 4),
    )
    return mb.constexpr_sparse_to_dense(nonzero_data=nonzero, mask=dense_mask)


def _sparse_int8(rng: np.random.Generator, shape: tuple[int, int]) -> Var:
    mask = _mask(rng, shape)
    codes = rng.integers(-128, 128, int(mask.sum()), dtype=np.int8)
    dense_mask, nonzero = mb.constexpr_sparse_blockwise_shift_scale(
        data_mask=_sub_byte(mask, types.uint1), nonzero_data=codes, scale=_scales(rng, (shape[0], 1))
    )
    return mb.constexpr_sparse_to_dense(nonzero_data=nonzero, mask=dense_mask)


def _affine_ios16(rng: np.random.Generator, shape: tuple[int, int]) -> Var:
    return mb.constexpr_affine_dequantize(
        quantized_data=rng.integers(-128, 128, shape, dtype=np.int8),
        zero_point=np.int8(0),
        scale=_scales(rng, (shape[0],)),
        axis=0,
    )


def _lut_ios16(rng: np.random.Generator, shape: tuple[int, int]) -> Var:
    return mb.constexpr_lut_to_dense(
        indices=rng.integers(0, 256, shape[0] * shape[1] // 2, dtype=np.uint8),  # 4-bit indices, packed
        lut=_palette(rng, 1, 4).reshape(16),
        shape=np.array(shape, dtype=np.uint32),
    )


def _sparse_ios16(rng: np.random.Generator, shape: tuple[int, int]) -> Var:
    mask = _mask(rng, shape)
    nonzero = rng.standard_normal(int(mask.sum()), dtype=np.float32).astype(np.float16) * np.float16(0.02)
    return mb.constexpr_sparse_to_dense(
        nonzero_data=nonzero,
        mask=np.packbits(mask.reshape(-1), bitorder="little"),
        shape=np.array(shape, dtype=np.uint32),
    )


IOS16, IOS18 = ct.target.iOS16, ct.target.iOS18
BLOCKWISE, LUT, SPARSE = "constexpr_blockwise_shift_scale", "constexpr_lut_to_dense", "constexpr_sparse_to_dense"
KINDS: Mapping[str, Kind] = {
    "int4 per-block": Kind(IOS18, _blockwise(types.int4, BLOCK_SIZE), (BLOCKWISE,)),
    "int8 per-channel": Kind(IOS18, _blockwise(types.int8, None), (BLOCKWISE,)),
    "palettized 4-bit": Kind(IOS18, _palettized(4, None), (LUT,)),
    "palettized 3-bit grouped": Kind(IOS18, _palettized(3, GROUP_SIZE), (LUT,)),
    "palettized 1-bit": Kind(IOS18, _palettized(1, None), (LUT,)),
    "sparse": Kind(IOS18, _sparse, (SPARSE,)),
    "sparse + palettized 4-bit": Kind(IOS18, _sparse_palettized, ("constexpr_lut_to_sparse", SPARSE)),
    "sparse + int8": Kind(IOS18, _sparse_int8, ("constexpr_sparse_blockwise_shift_scale", SPARSE)),
    "iOS16 int8": Kind(IOS16, _affine_ios16, ("constexpr_affine_dequantize",)),
    "iOS16 palettized 4-bit": Kind(IOS16, _lut_ios16, (LUT,)),
    "iOS16 sparse": Kind(IOS16, _sparse_ios16, (SPARSE,)),
}
"""Every kind of compressed weights the package benchmark builds, by name."""
