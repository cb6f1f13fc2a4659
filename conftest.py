"""Settings for every test and doctest: hypothesis profiles and quiet coremltools output on Linux."""

from __future__ import annotations

import logging
import os

os.environ.setdefault("TQDM_DISABLE", "1")


LINUX_IMPORT_NOISE = ("Failed to load", "Torch version")


class _DropLinuxImportNoise(logging.Filter):
    """coremltools warns at import that its macOS-only runtime is missing and torch is untested."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(LINUX_IMPORT_NOISE)


logging.getLogger("coremltools").addFilter(_DropLinuxImportNoise())

from hypothesis import HealthCheck, settings  # noqa: E402

FUZZ_EXAMPLES = int(os.environ.get("SDPA_SLICER_FUZZ_EXAMPLES", "5000"))
SLOW_CHECKS = [HealthCheck.too_slow, HealthCheck.data_too_large]

settings.register_profile("default", max_examples=25, deadline=None, suppress_health_check=SLOW_CHECKS)
settings.register_profile(
    "ci",
    max_examples=300,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=SLOW_CHECKS,
)
settings.register_profile(
    "fuzz",
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    print_blob=True,
    suppress_health_check=SLOW_CHECKS,
)
