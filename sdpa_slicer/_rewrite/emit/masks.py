"""A mask as values to add to the scores, in the scores' dtype: what a bool mask's False and a
wider float mask become, folded into a constant when the mask is one."""

from __future__ import annotations

import numpy as np
from coremltools.converters.mil.mil import Builder as mb
from coremltools.converters.mil.mil import Var

from sdpa_slicer._graph import FLOAT_DTYPES, dtype_name
from sdpa_slicer._rewrite.emit.ops import OpBuilder


def masked_score(dtype: str) -> float:
    """What a False entry of a bool mask adds to the scores: large, negative and finite.

    Half the dtype's range, so adding a score cannot overflow to -inf, and a row whose
    keys are all masked stays finite instead of becoming NaN.
    """
    return -float(np.finfo(FLOAT_DTYPES[dtype]).max) / 2


def additive_mask_values(mask: np.ndarray, dtype: str) -> np.ndarray:
    """A constant mask in the form the emitted ops would compute from it."""
    target = FLOAT_DTYPES[dtype]
    if mask.dtype == np.bool_:
        return np.where(mask, 0.0, masked_score(dtype)).astype(target)
    limit = -masked_score("fp16") if dtype == "fp16" else np.inf
    return np.clip(mask, -limit, limit).astype(target)


def additive_mask(ops: OpBuilder, mask: Var, dtype: str, base: str) -> Var:
    """``mask`` as values to add to scores of ``dtype``, made once per block; ``mask`` itself when
    it is already of that dtype."""
    mask_dtype = dtype_name(mask)
    if mask_dtype == dtype:
        return mask

    def convert() -> Var:
        if mask.val is not None:
            return ops.op(mb.const, f"{base}_mask_additive", val=additive_mask_values(mask.val, dtype))
        if mask_dtype == "bool":
            ones = ops.op(mb.cast, f"{base}_mask_as_float", x=mask, dtype=ops.const(dtype, "str"))
            kept_as_zero = ops.op(mb.sub, f"{base}_mask_minus_one", x=ones, y=ops.scalar(1.0, dtype))
            return ops.op(mb.mul, f"{base}_mask_additive", x=kept_as_zero, y=ops.scalar(-masked_score(dtype), dtype))
        source = mask
        if dtype == "fp16":
            limit = -masked_score("fp16")
            source = ops.op(
                mb.clip,
                f"{base}_mask_clipped",
                x=mask,
                alpha=ops.scalar(-limit, mask_dtype),
                beta=ops.scalar(limit, mask_dtype),
            )
        return ops.op(mb.cast, f"{base}_mask_cast", x=source, dtype=ops.const(dtype, "str"))

    return ops.cached(("additive_mask", id(mask), dtype), convert)
