"""Attention sites: what a pattern found in a block, and the plain shapes the planner reasons about."""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import attrs
import numpy as np
from coremltools.converters.mil.mil import Block, Operation, Var, types
from coremltools.converters.mil.mil.types.symbolic import is_symbolic

from sdpa_slicer._config import SliceConfig

FUSED = "fused"
DECOMPOSED = "decomposed"

Dim = Optional[int]
"""A static size, or ``None`` when the size is symbolic."""


def static_dim(dim: object) -> Dim:
    return None if is_symbolic(dim) else int(dim)  # type: ignore[call-overload]


def dtype_name(var: Var) -> str:
    """``"fp16"``, ``"fp32"``, ``"bool"``, ... for a tensor or scalar var."""
    return types.builtin_to_string(var.dtype)


@attrs.frozen
class MaskGeometry:
    """What the planner needs to know about a mask."""

    dtype: str
    rank: int
    rows: Dim
    """Size of the mask's query (L) axis; 1 when it broadcasts over L, including rank-1 masks."""
    values: Optional[np.ndarray] = attrs.field(default=None, eq=False, repr=False)
    """The mask's values when it is a constant."""


@attrs.frozen
class SiteGeometry:
    """Shapes and dtypes of one attention computation, free of any graph object."""

    batch_shape: tuple[Dim, ...]
    """Leading dims of the scores tensor (everything before L and S)."""
    query_length: Dim
    key_length: Dim
    head_dim: Dim
    value_dim: Dim
    dtype: str
    """Compute dtype of the scores: ``"fp16"`` or ``"fp32"``."""
    scale: Optional[float] = 1.0
    mask: Optional[MaskGeometry] = None
    written_out: bool = False
    """The site is already a chain of ops (not the fused op): one chunk over every key would
    rebuild the same chain."""

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype == "fp16" else 4


@attrs.frozen(eq=False)
class AttentionSite:
    """One attention computation in a block: ``softmax(scale * query @ key^T + mask) @ value``.

    ``ops`` are the ops computing it, the anchor (the op producing the result) last;
    a fused ``scaled_dot_product_attention`` is a single op.
    """

    kind: str
    function_name: str
    block: Block
    ops: tuple[Operation, ...]
    query: Var
    """``(..., L, E)``, as fed to the scores matmul."""
    key: Var
    """``(..., S, E)`` when ``key_transposed``, else ``(..., E, S)``."""
    key_transposed: bool
    value: Var
    """``(..., S, EV)``."""
    mask: Optional[Var]
    """Added to the scores; a bool mask keeps the keys where it is True."""
    scale: Optional[float]
    """Factor applied to ``query @ key^T``; ``None`` when it depends on a dynamic head dim."""
    scores_shape: tuple[object, ...]

    @property
    def anchor(self) -> Operation:
        return self.ops[-1]

    @property
    def output(self) -> Var:
        return self.anchor.outputs[0]

    def geometry(self) -> SiteGeometry:
        key_length = self.key.shape[-2] if self.key_transposed else self.key.shape[-1]
        return SiteGeometry(
            batch_shape=tuple(static_dim(d) for d in self.scores_shape[:-2]),
            query_length=static_dim(self.query.shape[-2]),
            key_length=static_dim(key_length),
            head_dim=static_dim(self.query.shape[-1]),
            value_dim=static_dim(self.value.shape[-1]),
            dtype=dtype_name(self.query),
            scale=self.scale,
            mask=None if self.mask is None else _mask_geometry(self.mask),
            written_out=self.kind == DECOMPOSED,
        )


def _mask_geometry(mask: Var) -> MaskGeometry:
    rank = mask.rank
    rows = static_dim(mask.shape[-2]) if rank >= 2 else 1
    return MaskGeometry(dtype=dtype_name(mask), rank=rank, rows=rows, values=mask.val)


def default_scale(head_dim: object) -> Optional[float]:
    """The scale ``scaled_dot_product_attention`` applies, ``1 / sqrt(E)``; ``None`` for a dynamic E."""
    if is_symbolic(head_dim):
        return None
    return 1.0 / math.sqrt(int(head_dim))  # type: ignore[call-overload]


Pattern = Callable[[Operation, str, SliceConfig], Optional[AttentionSite]]
"""A pattern looks at one op and returns the site it anchors, or ``None``."""


def find_sites(
    function_name: str, ops: Sequence[Operation], config: SliceConfig, patterns: Sequence[Pattern]
) -> list[AttentionSite]:
    """The sites anchored at ``ops``, in block order; the first pattern that matches an op wins."""
    sites = []
    for op in ops:
        for pattern in patterns:
            site = pattern(op, function_name, config)
            if site is not None:
                sites.append(site)
                break
    return sites
