"""Attention sites: what a pattern found in a block, and near misses, chains that look like
attention but that no pattern took, with the reason.

A pattern is an object with a ``name``, ``enabled(config)`` and ``match(op)``; ``match`` returns
an ``AttentionSite``, a ``NearMiss`` (the op looks like part of an attention, and the reason it
is not one), or ``None`` (nothing to do with attention). A fold changes a matched site.
``find.py`` runs the patterns of ``patterns/`` and the folds of ``folds/`` over a block.
"""

from __future__ import annotations

from typing import Literal, Optional, Protocol, Sequence, Union

import attrs
import numpy as np
from coremltools.converters.mil.mil import Block, Operation, Var

from sdpa_slicer._graph import QUANTIZATION_PARAMETERS, ReportShape, dtype_name, report_shape, static_dim
from sdpa_slicer._rewrite.config import SliceConfig
from sdpa_slicer._rewrite.plan.geometry import FullSizeOperand, OperandGeometry, SiteGeometry
from sdpa_slicer._rewrite.plan.pruning import StepValues
from sdpa_slicer._rewrite.recipes import OperandRecipe, describe_operand, is_scores_sized, operand_recipe

SiteKind = Literal["fused", "decomposed"]
"""How a report names a site: a ``scaled_dot_product_attention`` op, or attention written out as ops."""
FUSED: SiteKind = "fused"
DECOMPOSED: SiteKind = "decomposed"

KvLayout = Literal["interleaved", "tiled"]
"""Which query heads share a KV head."""
INTERLEAVED: KvLayout = "interleaved"
"""Query head ``h`` reads KV head ``h // repeats`` (``repeat_interleave``, transformers' ``repeat_kv``)."""
TILED: KvLayout = "tiled"
"""Query head ``h`` reads KV head ``h % kv_heads`` (the whole head axis tiled)."""


@attrs.frozen
class HeadGroups:
    """Grouped-query heads: ``kv_heads`` key/value heads, each read by ``repeats`` query heads."""

    kv_heads: int
    repeats: int
    layout: KvLayout

    def query_heads(self, group: int) -> tuple[int, int, int]:
        """``(start, end, stride)`` of the query heads that read the KV heads in order, one each,
        in group ``group`` (of ``repeats``)."""
        if self.layout == INTERLEAVED:
            return group, group + self.repeats * (self.kv_heads - 1) + 1, self.repeats
        return group * self.kv_heads, (group + 1) * self.kv_heads, 1

    def summary(self) -> str:
        """``"8 heads 4x (interleaved)"``."""
        return f"{self.kv_heads} heads {self.repeats}x ({self.layout})"

    def describe(self) -> str:
        heads = "1 head" if self.kv_heads == 1 else f"{self.kv_heads} heads"
        return f"keys/values: {heads} read directly, not repeated {self.repeats}x"


@attrs.frozen(eq=False)
class ScoreStep:
    """One elementwise op between the scores and the softmax, applied to the running scores.

    ``op_type`` is the MIL op, ``scores_input`` the input that takes the running scores, and
    ``operands`` its other inputs, by name, each broadcasting against the scores. The fused
    op's ``attn_mask`` is the step ``add(x=scores, y=mask)`` with ``is_mask``: a bool mask
    keeps the keys where it is True, another float dtype is cast. A ``quantize`` or
    ``dequantize`` whose ``scale`` and ``zero_point`` are vectors has ``axis``: the scores axis
    (negative) they run along; they do not broadcast, they apply along that axis.
    """

    op_type: str
    scores_input: str
    operands: tuple[tuple[str, Var], ...]
    op: Optional[Operation] = None
    """The op in a written-out chain; ``None`` for the fused op's mask."""
    is_mask: bool = False
    axis: Optional[int] = None

    def label(self, input_name: str) -> str:
        """How reasons name one of the operands."""
        if self.is_mask:
            return "the mask"
        where = "" if self.op is None else f" '{self.op.name}'"
        return f"input {input_name} of {self.op_type}{where}"

    def along_axis(self, input_name: str, var: Var) -> bool:
        """Whether operand ``input_name`` is a vector applying along ``axis``."""
        return self.axis is not None and input_name in QUANTIZATION_PARAMETERS and var.rank == 1

    def broadcast_shape(self, input_name: str, var: Var) -> tuple[object, ...]:
        """The operand's shape as it applies to the scores, aligned right: a vector along ``axis``
        as ``(n, 1, ..., 1)``."""
        if self.along_axis(input_name, var):
            assert self.axis is not None
            return (var.shape[0],) + (1,) * (-self.axis - 1)
        return tuple(var.shape)

    def operand_axis(self, input_name: str, var: Var, scores_axis: int) -> Optional[int]:
        """The axis (negative) of the operand that runs along ``scores_axis`` (negative) of the
        scores; ``None`` when it has none."""
        if self.along_axis(input_name, var):
            return -1 if scores_axis == self.axis else None
        return scores_axis if var.rank >= -scores_axis else None


@attrs.frozen(eq=False)
class AttentionSite:
    """One attention computation in a block: ``softmax(steps(scale * query @ key^T)) @ value``.

    ``ops`` are the ops computing it, the anchor (the op producing the result) last; a fused
    ``scaled_dot_product_attention`` is a single op.
    """

    written_out: bool
    """The site is a chain of ops (attention written out); else the fused op, which a rewrite
    may emit again as a fused op."""
    block: Block
    ops: tuple[Operation, ...]
    query: Var
    """``(..., L, E)``, as fed to the scores matmul."""
    key: Var
    """``(..., S, E)`` when ``key_transposed``, else ``(..., E, S)``."""
    key_transposed: bool
    value: Var
    """``(..., S, EV)``."""
    scale: Optional[float]
    """Factor applied to ``query @ key^T``; ``None`` when it depends on a dynamic head dim."""
    scores_shape: tuple[object, ...]
    steps: tuple[ScoreStep, ...] = ()
    """Elementwise ops from the (scaled) scores to the softmax's input, in order."""
    scale_steps: tuple[ScoreStep, ...] = ()
    """The scalar scale ops of a written-out chain, when they stay where they are (applied to
    each chunk's scores, not once to the query): the chain quantizes its scores or weights, and
    moving the scale would round them differently, and so flip int8 levels."""
    weight_steps: tuple[ScoreStep, ...] = ()
    """Elementwise ops (``quantize``, ``dequantize``) from the softmax to the value matmul."""
    heads: Optional[HeadGroups] = None
    """Set when ``key`` and ``value`` have fewer heads than the query (folded repeats)."""
    notes: tuple[str, ...] = ()
    """What a fold could not do, and why."""

    @property
    def kind(self) -> SiteKind:
        return DECOMPOSED if self.written_out else FUSED

    @property
    def anchor(self) -> Operation:
        return self.ops[-1]

    @property
    def output(self) -> Var:
        return self.anchor.outputs[0]

    @property
    def mask(self) -> Optional[Var]:
        """The fused op's mask, or the operand of a written-out chain's last add; ``None`` if neither."""
        for step in reversed(self.steps):
            if step.op_type == "add":
                return step.operands[0][1]
        return None

    def all_steps(self) -> tuple[ScoreStep, ...]:
        """Every step of the site, scale steps and weight steps included."""
        return (*self.scale_steps, *self.steps, *self.weight_steps)

    def key_shape(self) -> ReportShape:
        """The key as ``(..., S, E)``."""
        shape = list(report_shape(self.key))
        if not self.key_transposed:
            shape[-2], shape[-1] = shape[-1], shape[-2]
        return tuple(shape)

    def geometry(self) -> SiteGeometry:
        key_length = self.key.shape[-2] if self.key_transposed else self.key.shape[-1]
        batch_shape = tuple(static_dim(d) for d in self.scores_shape[:-2])
        if self.heads is not None:
            batch_shape = (*batch_shape[:-1], self.heads.kv_heads)
        return SiteGeometry(
            batch_shape=batch_shape,
            query_length=static_dim(self.query.shape[-2]),
            key_length=static_dim(key_length),
            head_dim=static_dim(self.query.shape[-1]),
            value_dim=static_dim(self.value.shape[-1]),
            dtype=dtype_name(self.query),
            scale=self.scale,
            operands=tuple(
                _operand_geometry(
                    step.label(name),
                    step.broadcast_shape(name, var),
                    dtype_name(var),
                    step.is_mask,
                    None if step.along_axis(name, var) else self._full_size(var),
                )
                for step in self.all_steps()
                for name, var in step.operands
                if var.rank >= 1
            ),
            steps=tuple(_step_values(step) for step in self.steps),
            written_out=self.written_out,
            groups=1 if self.heads is None else self.heads.repeats,
            weights_quantized=bool(self.weight_steps),
        )

    def _full_size(self, operand: Var) -> Optional[FullSizeOperand]:
        """What an operand as large as the scores that an op makes at run time is made of; ``None``
        for a smaller one, an input or a constant."""
        if operand.op is None or operand.val is not None:
            return None  # an input, or a weight: nothing the program builds
        if not is_scores_sized(tuple(operand.shape), self.scores_shape):
            return None
        recipe = operand_recipe(operand, self.block, self.ops)
        if isinstance(recipe, OperandRecipe):
            return FullSizeOperand(describe_operand(operand), recipe=recipe.describe())
        return FullSizeOperand(describe_operand(operand), reason=recipe)


@attrs.frozen(eq=False)
class NearMiss:
    """Ops that look like attention, and why no pattern took them as a site."""

    pattern: str
    reason: str
    ops: tuple[Operation, ...]
    """The chain looked at, in program order."""
    start: Operation
    """The op the pattern started from."""


Match = Union[AttentionSite, NearMiss, None]


@attrs.frozen
class Failed:
    """Why a helper of a pattern or a fold could not do what it was asked."""

    reason: str


class Pattern(Protocol):
    """One form of attention: ``match(op)`` looks at one op of a block (see the module docstring)."""

    name: str

    def enabled(self, config: SliceConfig) -> bool: ...

    def match(self, op: Operation) -> Match: ...


class Fold(Protocol):
    """A change to a matched site: ``fold(site)`` returns the changed site, why it cannot change
    it (kept as a note of the site), or ``None`` when it has nothing to do with it."""

    name: str

    def enabled(self, config: SliceConfig) -> bool: ...

    def fold(self, site: AttentionSite) -> Union[AttentionSite, Failed, None]: ...


def fail(pattern: str, reason: str, start: Operation, chain: Sequence[Operation] = ()) -> NearMiss:
    """A near miss of ``pattern`` found from ``start``; ``chain`` are the ops looked at, in order."""
    return NearMiss(pattern, reason, tuple(chain) or (start,), start)


def _operand_geometry(
    label: str, shape: tuple[object, ...], dtype: str, is_mask: bool, full_size: Optional[FullSizeOperand]
) -> OperandGeometry:
    rank = len(shape)
    rows = static_dim(shape[-2]) if rank >= 2 else 1
    heads = static_dim(shape[-3]) if rank >= 3 else 1
    return OperandGeometry(
        label=label, dtype=dtype, rank=rank, rows=rows, is_mask=is_mask, heads=heads, full_size=full_size
    )


def _step_values(step: ScoreStep) -> StepValues:
    """``step`` as pruning sees it: constant operands by value, shaped as they apply to the scores."""
    operands = []
    for name, var in step.operands:
        value = None if var.val is None else np.asarray(var.val)
        if value is not None and step.along_axis(name, var):
            value = value.reshape(tuple(int(dim) for dim in step.broadcast_shape(name, var)))  # type: ignore[call-overload]
        operands.append((name, value))
    return StepValues(step.op_type, step.scores_input, tuple(operands), step.is_mask)
