"""Drop coremltools' import-time warnings that its macOS-only runtime is missing.

Off macOS they are always true and never actionable: Core ML's runtime exists only there,
and everything this library does (build, rewrite, save, evaluate in NumPy) works without it.
"""

from __future__ import annotations

import logging
import sys

MISSING_RUNTIME_PREFIX = "Failed to load _ML"


class _DropMissingRuntimeWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(MISSING_RUNTIME_PREFIX)


def install() -> None:
    if sys.platform != "darwin":
        logging.getLogger("coremltools").addFilter(_DropMissingRuntimeWarnings())
