"""Attention patterns: each module holds one plain function from an op to the site it anchors."""

from __future__ import annotations

from sdpa_slicer._patterns.decomposed_attention import match_decomposed_attention
from sdpa_slicer._patterns.fused_sdpa import match_fused_sdpa

PATTERNS = (match_fused_sdpa, match_decomposed_attention)

__all__ = ["PATTERNS", "match_decomposed_attention", "match_fused_sdpa"]
