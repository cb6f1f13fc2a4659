"""Attention patterns: each module holds one plain function from an op to the site it anchors."""

from __future__ import annotations

from sdpa_slicer._patterns.fused_sdpa import match_fused_sdpa

__all__ = ["match_fused_sdpa"]
