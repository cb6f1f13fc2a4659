"""sdpa_slicer: rewrite Core ML attention so it works on query chunks instead of one huge scores tensor.

>>> from sdpa_slicer import slice_attention, SliceConfig
>>> SliceConfig().min_seq_length
64
"""

from __future__ import annotations

from sdpa_slicer import _quiet

_quiet.install()

from sdpa_slicer._config import SliceConfig
from sdpa_slicer._emit import EmitError
from sdpa_slicer._report import SiteReport, SliceReport
from sdpa_slicer._rewrite import slice_attention

__all__ = ["EmitError", "SiteReport", "SliceConfig", "SliceReport", "slice_attention"]
