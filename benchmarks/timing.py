"""How the benchmark scripts time a piece of work."""

from __future__ import annotations

import math
import time
from typing import Callable


def best_of(run: Callable[[], object], repeats: int) -> float:
    """The shortest wall time of ``repeats`` calls of ``run``, in seconds."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best
