"""sdpa_slicer: rewrite Core ML attention so it works on query chunks instead of one huge scores tensor."""

from __future__ import annotations

from sdpa_slicer._config import SliceConfig

__all__ = ["SliceConfig"]
