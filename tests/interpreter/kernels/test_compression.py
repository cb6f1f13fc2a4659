"""Weight decompression kernels against coremltools' own decompression (``materialized_val_inference``)."""

from __future__ import annotations

import zlib
from typing import Any

import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Function, Program, types
from coremltools.optimize import _utils as optimize_utils

from interpreter.kernels._oracle import OPSET
from sdpa_slicer._interpreter.evaluate import evaluate

IOS16 = ct.target.iOS16
SHAPE = (8, 12)
RNG_SEED = 7
SUB_BYTE = {
    "int4": types.np_int4_dtype,
    "uint4": types.np_uint4_dtype,
    "uint1": types.np_uint1_dtype,
    "uint2": types.np_uint2_dtype,
    "uint3": types.np_uint3_dtype,
    "uint6": types.np_uint6_dtype,
}
INT_RANGES = {"int4": (-8, 7), "uint4": (0, 15), "int8": (-128, 127), "uint8": (0, 255)}


def _rng(*key: Any) -> np.random.Generator:
    return np.random.default_rng([RNG_SEED, *(zlib.crc32(str(part).encode()) for part in key)])


def _ints(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    low, high = INT_RANGES[dtype]
    values = rng.integers(low, high, size=shape, endpoint=True)
    return values.astype(SUB_BYTE[dtype] if dtype in SUB_BYTE else np.dtype(dtype))


def _indices(rng: np.random.Generator, nbits: int, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 2**nbits, size=shape).astype(SUB_BYTE.get(f"uint{nbits}", np.dtype(np.uint8)))


def _floats(rng: np.random.Generator, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    return rng.uniform(-2.0, 2.0, size=shape).astype(dtype)


def assert_decompresses_like_coremltools(op_type: str, opset: Any = OPSET, **inputs: Any) -> None:
    """Build ``op_type`` on constant ``inputs``; its outputs through ``evaluate`` must equal, bit for
    bit, coremltools' decompression of the same op."""
    with Function({}, opset_version=opset) as function:
        result = getattr(mb, op_type)(**inputs)
        outputs = tuple(result) if isinstance(result, (list, tuple)) else (result,)
        function.set_outputs([mb.identity(x=var) for var in outputs])
    want = outputs[0].op.materialized_val_inference()
    want = tuple(want) if isinstance(want, tuple) else (want,)
    program = Program()
    program.add_function("main", function)
    got = tuple(evaluate(program, {}).values())
    assert len(got) == len(want)
    for got_value, want_value in zip(got, want):
        assert got_value.shape == np.shape(want_value)
        np.testing.assert_array_equal(got_value, np.asarray(want_value).astype(got_value.dtype))


SHIFT_SCALE_CASES = {
    "int8 per channel": ("int8", (8, 1), np.float16, False),
    "int8 per channel, offset": ("int8", (8, 1), np.float32, True),
    "uint8 per tensor, offset": ("uint8", (1, 1), np.float16, True),
    "int4 blockwise": ("int4", (8, 3), np.float16, False),
    "uint4 blockwise, offset": ("uint4", (4, 3), np.float16, True),
    "fp16 data, fp32 scale": (np.float16, (2, 12), np.float32, True),
}


@pytest.mark.parametrize("case", SHIFT_SCALE_CASES)
def test_blockwise_shift_scale(case: str) -> None:
    data_dtype, scale_shape, scale_dtype, with_offset = SHIFT_SCALE_CASES[case]
    rng = _rng(case)
    floating = not isinstance(data_dtype, str)
    data = _floats(rng, data_dtype, SHAPE) if floating else _ints(rng, data_dtype, SHAPE)
    inputs: dict[str, Any] = {"data": data, "scale": _floats(rng, scale_dtype, scale_shape)}
    if with_offset:
        inputs["offset"] = _floats(rng, scale_dtype, scale_shape) if floating else _ints(rng, data_dtype, scale_shape)
    assert_decompresses_like_coremltools("constexpr_blockwise_shift_scale", **inputs)


AFFINE_CASES = {
    "uint8, scalars": ("uint8", (), (), np.float16, 0),
    "int8, per channel on axis 0": ("int8", (SHAPE[0],), (SHAPE[0],), np.float16, 0),
    "uint8, per channel on axis -1": ("uint8", (SHAPE[1],), (SHAPE[1],), np.float32, -1),
    "int8, scalar zero point, vector scale": ("int8", (), (SHAPE[1],), np.float16, 1),
}


@pytest.mark.parametrize("case", AFFINE_CASES)
def test_affine_dequantize_ios16(case: str) -> None:
    dtype, zero_point_shape, scale_shape, scale_dtype, axis = AFFINE_CASES[case]
    rng = _rng(case)
    assert_decompresses_like_coremltools(
        "constexpr_affine_dequantize",
        IOS16,
        quantized_data=_ints(rng, dtype, SHAPE),
        zero_point=_ints(rng, dtype, zero_point_shape),
        scale=_floats(rng, scale_dtype, scale_shape),
        axis=np.int32(axis),
    )


LUT_CASES = {
    "4-bit per tensor": (4, (1, 1), 1, None),
    "2-bit per row group": (2, (4, 1), 1, None),
    "1-bit per column group": (1, (1, 3), 1, None),
    "3-bit": (3, (1, 1), 1, None),
    "6-bit per group": (6, (2, 2), 1, None),
    "8-bit": (8, (1, 1), 1, None),
    "2-bit vectors of 2 on axis 0": (2, (1, 1), 2, 0),
    "4-bit vectors of 3 on axis -1, grouped": (4, (2, 1), 3, -1),
}


@pytest.mark.parametrize("case", LUT_CASES)
@pytest.mark.parametrize("lut_dtype", [np.float16, np.float32, np.int8])
def test_lut_to_dense(case: str, lut_dtype: Any) -> None:
    nbits, groups, vector_size, vector_axis = LUT_CASES[case]
    rng = _rng(case, lut_dtype)
    shape = list(SHAPE)
    if vector_axis is not None:
        shape[vector_axis] //= vector_size
    lut_shape = (*groups, 2**nbits, vector_size)
    lut = (
        rng.integers(-100, 100, size=lut_shape).astype(lut_dtype)
        if lut_dtype == np.int8
        else _floats(rng, lut_dtype, lut_shape)
    )
    inputs: dict[str, Any] = {"indices": _indices(rng, nbits, tuple(shape)), "lut": lut}
    if vector_axis is not None:
        inputs["vector_axis"] = np.int32(vector_axis)
    assert_decompresses_like_coremltools("constexpr_lut_to_dense", **inputs)


@pytest.mark.parametrize("nbits", [1, 2, 4, 6, 8])
def test_lut_to_dense_ios16_packed_indices(nbits: int) -> None:
    rng = _rng("ios16 lut", nbits)
    shape = (5, 7)  # 35 fields: the last byte is only partly used
    indices = rng.integers(0, 2**nbits, size=int(np.prod(shape))).astype(np.uint8)
    assert_decompresses_like_coremltools(
        "constexpr_lut_to_dense",
        IOS16,
        indices=optimize_utils.pack_elements_into_bits(indices, nbits),
        lut=_floats(rng, np.float16, (2**nbits,)),
        shape=np.array(shape, np.uint32),
    )


@pytest.mark.parametrize("dtype", ["int4", "uint8", np.float16, np.float32])
def test_sparse_to_dense(dtype: Any) -> None:
    rng = _rng("sparse", dtype)
    mask = (rng.random(SHAPE) < 0.3).astype(types.np_uint1_dtype)
    count = int(np.count_nonzero(mask))
    nonzero = _ints(rng, dtype, (count,)) if isinstance(dtype, str) else _floats(rng, dtype, (count,))
    assert_decompresses_like_coremltools("constexpr_sparse_to_dense", nonzero_data=nonzero, mask=mask)


def test_sparse_to_dense_ios16_packed_mask() -> None:
    rng = _rng("ios16 sparse")
    shape = (5, 7)
    bits = rng.random(int(np.prod(shape))) < 0.4
    assert_decompresses_like_coremltools(
        "constexpr_sparse_to_dense",
        IOS16,
        nonzero_data=_floats(rng, np.float32, (int(bits.sum()),)),
        mask=np.packbits(bits, bitorder="little"),
        shape=np.array(shape, np.uint32),
    )


@pytest.mark.parametrize("vector_axis", [None, 1])
def test_lut_to_sparse(vector_axis: Any) -> None:
    rng = _rng("lut to sparse", vector_axis)
    vector_size = 1 if vector_axis is None else 2
    mask = (rng.random((8, 12 // vector_size)) < 0.5).astype(types.np_uint1_dtype)
    inputs: dict[str, Any] = {
        "indices_mask": mask,
        "indices_nonzero_data": _indices(rng, 2, (int(np.count_nonzero(mask)),)),
        "lut": _floats(rng, np.float16, (2, 1, 4, vector_size)),
    }
    if vector_axis is not None:
        inputs["vector_axis"] = np.int32(vector_axis)
    assert_decompresses_like_coremltools("constexpr_lut_to_sparse", **inputs)


def test_sparse_blockwise_shift_scale() -> None:
    rng = _rng("sparse shift scale")
    mask = (rng.random(SHAPE) < 0.5).astype(types.np_uint1_dtype)
    count = int(np.count_nonzero(mask))
    assert_decompresses_like_coremltools(
        "constexpr_sparse_blockwise_shift_scale",
        data_mask=mask,
        nonzero_data=_ints(rng, "int8", (count,)),
        scale=_floats(rng, np.float16, (4, 1)),
        offset=_ints(rng, "int8", (4, 1)),
    )


def test_cast() -> None:
    source = _floats(_rng("cast"), np.float16, SHAPE)
    assert_decompresses_like_coremltools("constexpr_cast", source_val=source, output_dtype="fp32")


def test_chained_decompression() -> None:
    """A sparse palettized weight: ``constexpr_lut_to_sparse`` feeding ``constexpr_sparse_to_dense``."""
    rng = _rng("chain")
    mask = (rng.random(SHAPE) < 0.5).astype(types.np_uint1_dtype)
    with Function({}, opset_version=OPSET) as function:
        sparse_mask, values = mb.constexpr_lut_to_sparse(
            indices_mask=mask,
            indices_nonzero_data=_indices(rng, 4, (int(np.count_nonzero(mask)),)),
            lut=_floats(rng, np.float16, (1, 1, 16, 1)),
        )
        weight = mb.constexpr_sparse_to_dense(nonzero_data=values, mask=sparse_mask)
        function.set_outputs([mb.identity(x=weight)])
    program = Program()
    program.add_function("main", function)
    (got,) = evaluate(program, {}).values()
    np.testing.assert_array_equal(got, weight.op.materialized_val_inference())
