"""The fused ``scaled_dot_product_attention`` op (iOS18 opset and later).

::

    %out = scaled_dot_product_attention(query=%q, key=%k, value=%v, attn_mask=%m)

is the site ``softmax(q @ k^T / sqrt(E) + m) @ v`` with ``key_transposed=True``.
"""

from __future__ import annotations

from typing import Optional

from coremltools.converters.mil.mil import Operation

from sdpa_slicer._config import SliceConfig
from sdpa_slicer._match import FUSED, AttentionSite, default_scale

OP_TYPE = "scaled_dot_product_attention"


def match_fused_sdpa(op: Operation, function_name: str, config: SliceConfig) -> Optional[AttentionSite]:
    if op.op_type != OP_TYPE:
        return None
    query = op.inputs["query"]
    return AttentionSite(
        kind=FUSED,
        function_name=function_name,
        block=op.enclosing_block,
        ops=(op,),
        query=query,
        key=op.inputs["key"],
        key_transposed=True,
        value=op.inputs["value"],
        mask=op.inputs.get("attn_mask"),
        scale=default_scale(query.shape[-1]),
        scores_shape=tuple(query.shape[:-1]) + (op.inputs["key"].shape[-2],),
    )
