"""The machine a benchmark ran on, printed first by every benchmark script."""

from __future__ import annotations

import sdpa_slicer  # noqa: F401  first: it keeps coremltools' import-time warnings quiet

# isort: split
import os
import platform
import subprocess

import coremltools as ct
import numpy as np

BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def machine_description() -> list[str]:
    threads = {name: os.environ[name] for name in BLAS_THREAD_VARIABLES if name in os.environ}
    return [
        f"machine: {_cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}",
        f"python {platform.python_version()}, numpy {np.__version__}, coremltools {ct.__version__}",
        f"BLAS thread settings: {threads or 'library defaults'}",
    ]


def _cpu_model() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    for line in lines:
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"
