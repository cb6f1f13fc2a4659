"""Attention patterns: each module holds one; ``PATTERNS`` is the registry, tried in order.

Adding a form of attention takes one module with a pattern (see ``sites.Pattern``), one line
below, and its test beside the others in ``tests/rewrite/patterns/``.
"""

from __future__ import annotations

from sdpa_slicer._rewrite.patterns.decomposed_attention import DECOMPOSED_ATTENTION
from sdpa_slicer._rewrite.patterns.fused_sdpa import FUSED_SDPA

PATTERNS = (FUSED_SDPA, DECOMPOSED_ATTENTION)

__all__ = ["DECOMPOSED_ATTENTION", "FUSED_SDPA", "PATTERNS"]
