"""Weight decompression kernels: the ``constexpr_*`` ops coremltools writes for compressed weights.

The engine runs them once, when it resolves a program. The arithmetic follows coremltools'
own ``decompress`` of each op (same dtypes, same order of operations), so decompressed
weights are bit-identical to coremltools' value inference; blocks are broadcast by
reshaping instead of repeating the scales.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from sdpa_slicer._interpreter.kernels import kernel
from sdpa_slicer._interpreter.kernels._common import as_int, as_ints, as_nptype


def _blocked(data: np.ndarray, groups: Sequence[int]) -> np.ndarray:
    """``data`` viewed with each axis split into ``(group, position in block)``."""
    return data.reshape(tuple(size for n, g in zip(data.shape, groups) for size in (g, n // g)))


def _per_block(param: np.ndarray) -> np.ndarray:
    """A per-block parameter shaped to broadcast against ``_blocked`` data."""
    return param.reshape(tuple(size for g in param.shape for size in (g, 1)))


def _shift_scale(data: np.ndarray, scale: np.ndarray, offset: Optional[np.ndarray]) -> np.ndarray:
    """``scale * (data - offset)`` per block, computed in the scale's dtype."""
    values = _blocked(data.astype(scale.dtype), scale.shape)
    if offset is not None:
        values = values - _per_block(offset.astype(scale.dtype))
    return (values * _per_block(scale)).reshape(data.shape)


def _unpack_bits(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """``count`` unsigned ``nbits``-bit fields packed from the least significant bit of each byte up."""
    bits = np.unpackbits(packed.astype(np.uint8), bitorder="little")[: count * nbits]
    return bits.reshape(count, nbits).astype(np.intp) @ (1 << np.arange(nbits, dtype=np.intp))


def _scatter(nonzero_data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A tensor of ``mask``'s shape holding ``nonzero_data`` where ``mask`` is set and 0 elsewhere."""
    dense = np.zeros(mask.shape, dtype=nonzero_data.dtype)
    dense[mask != 0] = nonzero_data
    return dense


def _palette_lookup(indices: np.ndarray, lut: np.ndarray, vector_axis: Optional[Any]) -> np.ndarray:
    """iOS18 LUT: a palette per block of the first axes, vectors of ``lut.shape[-1]`` along ``vector_axis``."""
    rank = indices.ndim
    blocks = np.ix_(*(np.arange(n) // (n // g) for n, g in zip(indices.shape, lut.shape[:rank])))
    values = lut[(*blocks, indices.astype(np.intp))]  # indices.shape + (vector size,)
    if vector_axis is None:
        return values[..., 0]
    axis = as_int(vector_axis) % rank
    shape = list(indices.shape)
    shape[axis] *= lut.shape[-1]
    return np.moveaxis(values, -1, axis + 1).reshape(shape)


@kernel("constexpr_blockwise_shift_scale")
def _blockwise_shift_scale(data: np.ndarray, scale: np.ndarray, offset: Optional[np.ndarray] = None) -> np.ndarray:
    return _shift_scale(data, scale, offset)


@kernel("constexpr_affine_dequantize")
def _affine_dequantize(quantized_data: np.ndarray, zero_point: np.ndarray, scale: np.ndarray, axis: Any) -> np.ndarray:
    """iOS16 ``scale * (quantized_data - zero_point)``, scalar or per-channel along ``axis``, in fp32."""

    def along_axis(param: np.ndarray) -> np.ndarray:
        if param.ndim == 0:
            return param
        shape = [1] * quantized_data.ndim
        shape[as_int(axis) % quantized_data.ndim] = param.size
        return param.reshape(shape)

    values = quantized_data.astype(np.float32) - along_axis(zero_point).astype(np.float32)
    return (values * along_axis(scale)).astype(scale.dtype)


@kernel("constexpr_lut_to_dense")
def _lut_to_dense(
    indices: np.ndarray, lut: np.ndarray, vector_axis: Optional[Any] = None, shape: Optional[Any] = None
) -> np.ndarray:
    """iOS18: unpacked indices and per-block palettes; iOS16 (with ``shape``): one palette, packed indices."""
    if shape is None:
        return _palette_lookup(indices, lut, vector_axis)
    dims = as_ints(shape)
    nbits = int(lut.size).bit_length() - 1
    return lut[_unpack_bits(indices, nbits, int(np.prod(dims)))].reshape(dims)


@kernel("constexpr_sparse_to_dense")
def _sparse_to_dense(nonzero_data: np.ndarray, mask: np.ndarray, shape: Optional[Any] = None) -> np.ndarray:
    """iOS18: a uint1 mask of the output's shape; iOS16 (with ``shape``): a packed bit mask."""
    if shape is None:
        return _scatter(nonzero_data, mask)
    dims = as_ints(shape)
    return _scatter(nonzero_data, _unpack_bits(mask, 1, int(np.prod(dims)))).reshape(dims)


@kernel("constexpr_lut_to_sparse")
def _lut_to_sparse(
    indices_mask: np.ndarray, indices_nonzero_data: np.ndarray, lut: np.ndarray, vector_axis: Optional[Any] = None
) -> tuple[np.ndarray, np.ndarray]:
    """Palettized non-zero values: the (vector-widened) mask and the looked-up values where it is set."""
    dense = _palette_lookup(_scatter(indices_nonzero_data, indices_mask), lut, vector_axis)
    mask = indices_mask
    if vector_axis is not None:
        mask = np.repeat(mask, lut.shape[-1], axis=as_int(vector_axis))
    return mask, dense[mask != 0]


@kernel("constexpr_sparse_blockwise_shift_scale")
def _sparse_blockwise_shift_scale(
    data_mask: np.ndarray, nonzero_data: np.ndarray, scale: np.ndarray, offset: Optional[np.ndarray] = None
) -> tuple[np.ndarray, np.ndarray]:
    """Quantized non-zero values: the mask, and the dequantized values where it is set."""
    dense = _shift_scale(_scatter(nonzero_data, data_mask), scale, offset)
    return data_mask, dense[data_mask != 0]


@kernel("constexpr_cast")
def _constexpr_cast(source_val: np.ndarray, output_dtype: Any) -> np.ndarray:
    return source_val.astype(as_nptype(output_dtype))
