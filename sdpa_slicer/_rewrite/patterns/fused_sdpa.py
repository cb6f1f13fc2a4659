"""The fused ``scaled_dot_product_attention`` op (iOS18 opset and later).

::

    %out = scaled_dot_product_attention(query=%q, key=%k, value=%v, attn_mask=%m)

is the site ``softmax(q @ k^T / sqrt(E) + m) @ v`` with ``key_transposed=True``; its mask is
the one score step ``add(scores, m)``.
"""

from __future__ import annotations

import math
from typing import Optional

from coremltools.converters.mil.mil import Operation
from coremltools.converters.mil.mil.types.symbolic import is_symbolic

from sdpa_slicer._graph import SDPA, sdpa_scores_shape
from sdpa_slicer._rewrite.config import SliceConfig
from sdpa_slicer._rewrite.sites import AttentionSite, Match, ScoreStep


class FusedSdpa:
    name = "fused_sdpa"

    def enabled(self, config: SliceConfig) -> bool:
        return True

    def match(self, op: Operation) -> Match:
        if op.op_type != SDPA:
            return None
        query, mask = op.inputs["query"], op.inputs.get("attn_mask")
        steps = () if mask is None else (ScoreStep("add", "x", (("y", mask),), is_mask=True),)
        return AttentionSite(
            written_out=False,
            block=op.enclosing_block,
            ops=(op,),
            query=query,
            key=op.inputs["key"],
            key_transposed=True,
            value=op.inputs["value"],
            scale=default_scale(query.shape[-1]),
            scores_shape=sdpa_scores_shape(op),
            steps=steps,
        )


FUSED_SDPA = FusedSdpa()


def default_scale(head_dim: object) -> Optional[float]:
    """The scale ``scaled_dot_product_attention`` applies, ``1 / sqrt(E)``; ``None`` for a dynamic E."""
    if is_symbolic(head_dim):
        return None
    return 1.0 / math.sqrt(int(head_dim))  # type: ignore[call-overload]
