"""Folds, changes to every matched site: each module holds one; ``FOLDS`` is the registry, applied
in order.

Adding one (see ``sites.Fold``), such as reading un-repeated keys and values, takes one module,
one line below, and its test in ``tests/rewrite/folds/``.
"""

from __future__ import annotations

from sdpa_slicer._rewrite.folds.repeated_kv import REPEATED_KV

FOLDS = (REPEATED_KV,)

__all__ = ["FOLDS", "REPEATED_KV"]
