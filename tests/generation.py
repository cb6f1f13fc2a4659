"""Run an LLM-style program the way an app does: one prefill call, then decode calls, all on one
set of KV-cache states carried from call to call."""

from __future__ import annotations

from typing import Mapping, Sequence

import attrs
import numpy as np
from coremltools.converters.mil.mil import Program

from sdpa_slicer import evaluate

PREFILL = "prefill"
DECODE = "decode"


@attrs.frozen
class Generation:
    """Each call's outputs, in call order, and the states after the last call."""

    outputs: list[dict[str, np.ndarray]]
    states: dict[str, np.ndarray]


def generate(prog: Program, prefill: Mapping[str, np.ndarray], steps: Sequence[Mapping[str, np.ndarray]]) -> Generation:
    """``prefill`` then each of ``steps`` through ``decode``, starting from zeroed states."""
    states: dict[str, np.ndarray] = {}
    outputs = [evaluate(prog, prefill, PREFILL, states)]
    outputs.extend(evaluate(prog, inputs, DECODE, states) for inputs in steps)
    return Generation(outputs, states)


def causal_mask(query_length: int, position: int, cache_length: int) -> np.ndarray:
    """``(1, 1, L, S)`` fp16: 0 where query row ``i`` (at ``position + i``) may see a cached key, -inf elsewhere."""
    visible = np.arange(cache_length) <= position + np.arange(query_length)[:, None]
    return np.where(visible, 0.0, -np.inf).astype(np.float16)[None, None]


def max_differences(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """Largest absolute difference, and that relative to ``want``'s largest magnitude."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    largest = float(np.abs(want).max())
    absolute = float(np.abs(got - want).max())
    return absolute, absolute / largest if largest else absolute
