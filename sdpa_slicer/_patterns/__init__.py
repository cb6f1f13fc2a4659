"""Attention patterns: each module holds one pattern object; ``PATTERNS`` is the registry.

Adding a form of attention takes one module with a pattern (see ``_match.Pattern``), one line
below, and its test beside the others in ``tests/patterns/``.
"""

from __future__ import annotations

from sdpa_slicer._patterns.decomposed_attention import DECOMPOSED_ATTENTION
from sdpa_slicer._patterns.fused_sdpa import FUSED_SDPA

PATTERNS = (FUSED_SDPA, DECOMPOSED_ATTENTION)

__all__ = ["DECOMPOSED_ATTENTION", "FUSED_SDPA", "PATTERNS"]
