"""sdpa_slicer: rewrite Core ML attention so it works on query chunks instead of one huge scores tensor.

>>> from sdpa_slicer import slice_attention, SliceConfig
>>> SliceConfig().min_seq_length
64
"""

from __future__ import annotations

from sdpa_slicer import _command_process, _quiet

_command_process.install()  # first: the command keeps torch out, and Ctrl-C waits for the imports
_quiet.install()

from sdpa_slicer._errors import EmitError, EvaluationError, PackageError, PlotError, UnsupportedOpError  # noqa: E402
from sdpa_slicer._interpreter.evaluate import evaluate  # noqa: E402
from sdpa_slicer._memory import MemoryEstimate, TensorInfo, TimelinePoint, estimate_memory  # noqa: E402
from sdpa_slicer._mlpackage.package import Package, load_package, save_package  # noqa: E402
from sdpa_slicer._rewrite import coreml_pass  # noqa: E402
from sdpa_slicer._rewrite.config import SliceConfig  # noqa: E402
from sdpa_slicer._rewrite.coreml_pass import pass_pipeline  # noqa: E402
from sdpa_slicer._rewrite.pipeline import slice_attention  # noqa: E402
from sdpa_slicer._rewrite.report import NearMissReport, SiteReport, SliceReport  # noqa: E402
from sdpa_slicer._tools.plot import plot_memory  # noqa: E402
from sdpa_slicer._version import __version__  # noqa: E402

coreml_pass.register()

__all__ = [
    "__version__",
    "EmitError",
    "EvaluationError",
    "MemoryEstimate",
    "NearMissReport",
    "Package",
    "PackageError",
    "PlotError",
    "SiteReport",
    "SliceConfig",
    "SliceReport",
    "TensorInfo",
    "TimelinePoint",
    "UnsupportedOpError",
    "estimate_memory",
    "evaluate",
    "load_package",
    "pass_pipeline",
    "plot_memory",
    "save_package",
    "slice_attention",
]
