"""Core ML state kernels: ``read_state`` and ``coreml_update_state`` on a ``StateBuffer``."""

from __future__ import annotations

import attrs
import numpy as np

from sdpa_slicer._interpreter.kernels import kernel


@attrs.define(eq=False)
class StateBuffer:
    """The value a state input holds during one call; the engine passes it as the state var's value.

    Kernels replace ``value`` rather than write into it, so an array read earlier keeps what it read.
    """

    name: str
    value: np.ndarray


@kernel("read_state")
def _read_state(input: StateBuffer) -> np.ndarray:  # noqa: A002 (the op's input name)
    return input.value


@kernel("coreml_update_state")
def _coreml_update_state(state: StateBuffer, value: np.ndarray) -> np.ndarray:
    state.value = value
    return value
