"""Small conversions shared by the kernel families."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from coremltools.converters.mil.mil.types.type_mapping import string_to_nptype

# Index outputs (argmax, topk) are int32 unless iOS17's output dtype input says uint16.
DEFAULT_INDEX_DTYPE = "int32"


def upcast(x: np.ndarray) -> np.ndarray:
    """``x`` in fp32 if it is fp16 (NumPy's fp16 math is slow and rounds every step), else unchanged.

    The engine casts the kernel's result back to the op's declared dtype.
    """
    return x.astype(np.float32) if x.dtype == np.float16 else x


def per_channel(parameter: Any, rank: int) -> np.ndarray:
    """A ``[C]`` parameter (fp16 widened to fp32) shaped to broadcast along axis 1 of a rank-``rank`` tensor."""
    return np.reshape(upcast(np.asarray(parameter)), (1, -1) + (1,) * (rank - 2))


def as_int(value: Any) -> int:
    """A scalar attribute (0-d array, NumPy or Python scalar) as ``int``."""
    return int(np.asarray(value).reshape(()))


def as_bool(value: Any) -> bool:
    """A scalar bool attribute as ``bool``."""
    return bool(np.asarray(value).reshape(()))


def as_ints(value: Any) -> tuple[int, ...]:
    """A 1-D (or scalar) integer attribute as a tuple of ``int``."""
    return tuple(int(v) for v in np.asarray(value).reshape(-1))


def as_axes(value: Optional[Any], rank: int) -> Optional[tuple[int, ...]]:
    """Axes normalised to non-negative ints; ``None`` stays ``None`` (meaning all axes)."""
    if value is None:
        return None
    return tuple(axis % rank if rank else 0 for axis in as_ints(value))


def as_str(value: Any) -> str:
    """A string attribute (const str or 0-d array of str) as ``str``."""
    return str(np.asarray(value).reshape(()).item()) if not isinstance(value, str) else value


def as_nptype(value: Any) -> type:
    """A MIL dtype name such as ``"fp16"`` or ``"int32"`` as a NumPy scalar type."""
    return string_to_nptype(as_str(value).lower())
