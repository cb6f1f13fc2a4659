"""The plain shapes and values of one attention site that the planner reasons about, free of any
graph object: ``AttentionSite.geometry()`` makes them, ``plan_site`` reads them."""

from __future__ import annotations

from typing import Optional

import attrs

from sdpa_slicer._graph import Dim
from sdpa_slicer._rewrite.plan.pruning import StepValues


@attrs.frozen
class FullSizeOperand:
    """An operand as large as the scores (full query and key axes), made before the site."""

    description: str
    """``"'attn_bias' (1x2x256x256 fp32, 512.0 KiB)"``."""
    recipe: Optional[str] = None
    """The op types that build it again per query chunk (``recipes.py``); ``None``: it has no recipe."""
    reason: Optional[str] = None
    """Why it has no recipe."""


@attrs.frozen
class OperandGeometry:
    """What the planner needs to know about one operand of a score step."""

    label: str
    dtype: str
    rank: int
    rows: Dim
    """Size of its query (L) axis; 1 when it broadcasts over L, including ranks below 2."""
    is_mask: bool = False
    heads: Dim = 1
    """Size of its head axis (the scores' third from last); 1 when it broadcasts over heads."""
    full_size: Optional[FullSizeOperand] = None
    """Set when the operand holds full query and key axes."""


@attrs.frozen
class SiteGeometry:
    """Shapes and dtypes of one attention computation.

    >>> SiteGeometry(batch_shape=(1, 32), query_length=2048, key_length=2048, head_dim=64,
    ...              value_dim=64, dtype="fp16").itemsize
    2
    """

    batch_shape: tuple[Dim, ...]
    """Leading dims of the scores tensor (everything before L and S)."""
    query_length: Dim
    key_length: Dim
    head_dim: Dim
    value_dim: Dim
    dtype: str
    """Compute dtype of the scores: ``"fp16"`` or ``"fp32"``."""
    scale: Optional[float] = 1.0
    operands: tuple[OperandGeometry, ...] = ()
    steps: tuple[StepValues, ...] = attrs.field(default=(), eq=False, repr=False)
    """The score steps with their constant operands' values, for key pruning (``pruning.py``)."""
    written_out: bool = False
    """The site is already a chain of ops (not the fused op): one chunk over every key would
    rebuild the same chain."""
    groups: int = 1
    """Query head groups that each read the same (un-repeated) keys and values; with groups,
    ``batch_shape`` is one group's (its head axis is the KV heads)."""
    weights_quantized: bool = False
    """The softmax's result is quantized before the value matmul: its keys cannot be chunked
    (an online softmax would quantize weights that are not normalized yet)."""

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype == "fp16" else 4

    @property
    def regroupable(self) -> bool:
        """Whether the query heads of each KV head can be stacked as rows of one query: static
        batch dims, and every operand broadcasts over heads, and over rows unless there is one row."""
        return (
            self.groups > 1
            and None not in self.batch_shape
            and all(operand.heads == 1 and (operand.rows == 1 or self.query_length == 1) for operand in self.operands)
        )
