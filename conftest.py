"""Settings for every test and doctest: hypothesis profiles, quiet coremltools output on Linux,
and doctests collected where they are written."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Generator

import pytest
from _pytest.doctest import DoctestModule

os.environ.setdefault("TQDM_DISABLE", "1")


LINUX_IMPORT_NOISE = ("Failed to load", "Torch version")


class _DropLinuxImportNoise(logging.Filter):
    """coremltools warns at import that its macOS-only runtime is missing and torch is untested."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(LINUX_IMPORT_NOISE)


logging.getLogger("coremltools").addFilter(_DropLinuxImportNoise())

from hypothesis import HealthCheck, settings  # noqa: E402

TESTS = Path(__file__).resolve().parent / "tests"
DOCS_SCRIPTS = (Path(__file__).resolve().parent / "docs" / "llm_recipe.py",)
"""Scripts shipped with the docs: importing one runs it (tests/test_llm_recipe.py does, in a
temporary folder), so they are not imported for doctests."""


@pytest.hookimpl(wrapper=True)
def pytest_collect_file(file_path: Path) -> Generator[None, list[pytest.Collector], list[pytest.Collector]]:
    """No doctest collection of the test modules: they hold no doctests, and one that skips at
    import (it needs PyTorch) would be reported once more as a skipped doctest module. Nor of
    the docs' scripts, which run when imported."""
    found = yield
    if TESTS in file_path.parents or file_path in DOCS_SCRIPTS:
        return [collector for collector in found if not isinstance(collector, DoctestModule)]
    return found


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
