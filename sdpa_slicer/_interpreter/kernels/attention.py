"""``scaled_dot_product_attention``: softmax(Q K^T / sqrt(E) + mask) V, in fp32 for fp16 operands."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from sdpa_slicer._graph import SDPA
from sdpa_slicer._interpreter.kernels import kernel
from sdpa_slicer._interpreter.kernels._common import upcast


@kernel(SDPA)
def _scaled_dot_product_attention(
    query: np.ndarray, key: np.ndarray, value: np.ndarray, attn_mask: Optional[np.ndarray] = None
) -> np.ndarray:
    """A bool mask keeps True positions and sends False ones to -inf (a fully masked row gives NaN,
    as coremltools' value inference does); a float mask is added to the scores. The mask
    broadcasts over the batch dims and L.
    """
    query = upcast(query)
    # Scaling Q (L x E) is cheaper than scaling the scores (L x S).
    scores = np.matmul(query * np.float32(1.0 / math.sqrt(query.shape[-1])), np.swapaxes(upcast(key), -1, -2))
    if attn_mask is not None:
        if attn_mask.dtype == np.bool_:
            scores = np.where(attn_mask, scores, np.float32(-np.inf))
        else:
            scores += upcast(attn_mask)
    scores -= np.max(scores, axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= np.sum(scores, axis=-1, keepdims=True)
    return np.matmul(scores, upcast(value))
