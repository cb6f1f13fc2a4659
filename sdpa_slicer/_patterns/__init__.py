"""Attention patterns and folds: each module holds one object; ``PATTERNS`` and ``FOLDS`` are
the registries.

Adding a form of attention takes one module with a pattern (see ``_match.Pattern``), one line
below, and its test beside the others in ``tests/patterns/``; a change to every matched site
(``_match.Fold``), such as reading un-repeated keys and values, likewise.
"""

from __future__ import annotations

from sdpa_slicer._patterns.decomposed_attention import DECOMPOSED_ATTENTION
from sdpa_slicer._patterns.fused_sdpa import FUSED_SDPA
from sdpa_slicer._patterns.repeated_kv import REPEATED_KV

PATTERNS = (FUSED_SDPA, DECOMPOSED_ATTENTION)
FOLDS = (REPEATED_KV,)

__all__ = ["DECOMPOSED_ATTENTION", "FOLDS", "FUSED_SDPA", "PATTERNS", "REPEATED_KV"]
