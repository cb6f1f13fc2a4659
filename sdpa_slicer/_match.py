"""Attention sites: what a pattern found in a block, the plain shapes the planner reasons about,
and near misses, chains that look like attention but that no pattern took, with the reason.

A pattern is an object with a ``name``, the ``kind`` of site it finds, ``enabled(config)`` and
``match(op)``; ``match`` returns an ``AttentionSite``, a ``NearMiss`` (the op looks like part of
an attention, and the reason it is not one), or ``None`` (nothing to do with attention).
``find_sites`` runs the enabled patterns of ``PATTERNS`` (``_patterns/``) over a block.
"""

from __future__ import annotations

import math
from typing import Optional, Protocol, Sequence, Union

import attrs
import numpy as np
from coremltools.converters.mil.mil import Block, Operation, Var
from coremltools.converters.mil.mil.types.symbolic import is_symbolic

from sdpa_slicer._config import SliceConfig
from sdpa_slicer._graph import Dim, dtype_name, static_dim
from sdpa_slicer._pruning import StepValues
from sdpa_slicer._transaction import contained_bug

FUSED = "fused"
DECOMPOSED = "decomposed"

Shape = tuple[Union[int, str], ...]
"""A shape for reports: static dims as ints, symbolic ones by their symbol's name."""

INTERLEAVED = "interleaved"
"""Query head ``h`` reads KV head ``h // repeats`` (``repeat_interleave``, transformers' ``repeat_kv``)."""
TILED = "tiled"
"""Query head ``h`` reads KV head ``h % kv_heads`` (the whole head axis tiled)."""


@attrs.frozen
class HeadGroups:
    """Grouped-query heads: ``kv_heads`` key/value heads, each read by ``repeats`` query heads."""

    kv_heads: int
    repeats: int
    layout: str
    """``INTERLEAVED`` or ``TILED``: which query heads share a KV head."""

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
    keeps the keys where it is True, another float dtype is cast.
    """

    op_type: str
    scores_input: str
    operands: tuple[tuple[str, Var], ...]
    op: Optional[Operation] = None
    """The op in a written-out chain; ``None`` for the fused op's mask."""
    is_mask: bool = False

    def operand(self, name: str) -> Optional[Var]:
        return dict(self.operands).get(name)

    def label(self, input_name: str) -> str:
        """How reasons name one of the operands."""
        if self.is_mask:
            return "the mask"
        where = "" if self.op is None else f" '{self.op.name}'"
        return f"input {input_name} of {self.op_type}{where}"


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
    operands: tuple[OperandGeometry, ...] = ()
    steps: tuple[StepValues, ...] = attrs.field(default=(), eq=False, repr=False)
    """The score steps with their constant operands' values, for key pruning (``_pruning.py``)."""
    written_out: bool = False
    """The site is already a chain of ops (not the fused op): one chunk over every key would
    rebuild the same chain."""
    groups: int = 1
    """Query head groups that each read the same (un-repeated) keys and values; with groups,
    ``batch_shape`` is one group's (its head axis is the KV heads)."""

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


@attrs.frozen(eq=False)
class AttentionSite:
    """One attention computation in a block: ``softmax(steps(scale * query @ key^T)) @ value``.

    ``ops`` are the ops computing it, the anchor (the op producing the result) last; a fused
    ``scaled_dot_product_attention`` is a single op.
    """

    kind: str
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
    heads: Optional[HeadGroups] = None
    """Set when ``key`` and ``value`` have fewer heads than the query (folded repeats)."""
    notes: tuple[str, ...] = ()
    """What a fold could not do, and why."""

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

    def key_shape(self) -> Shape:
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
                _operand_geometry(step.label(name), var, step.is_mask)
                for step in self.steps
                for name, var in step.operands
                if var.rank >= 1
            ),
            steps=tuple(
                StepValues(
                    step.op_type,
                    step.scores_input,
                    tuple((name, None if var.val is None else np.asarray(var.val)) for name, var in step.operands),
                    step.is_mask,
                )
                for step in self.steps
            ),
            written_out=self.kind == DECOMPOSED,
            groups=1 if self.heads is None else self.heads.repeats,
        )


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


class Pattern(Protocol):
    """One form of attention: ``match(op)`` looks at one op of a block (see the module docstring)."""

    name: str
    kind: str

    def enabled(self, config: SliceConfig) -> bool: ...

    def match(self, op: Operation) -> Match: ...


class Fold(Protocol):
    """A change to a matched site: ``fold(site)`` returns the changed site, the reason it cannot
    change it (kept as a note of the site), or ``None`` when it has nothing to do with it."""

    name: str

    def enabled(self, config: SliceConfig) -> bool: ...

    def fold(self, site: AttentionSite) -> Union[AttentionSite, str, None]: ...


@attrs.frozen
class Found:
    """The sites of one block in block order (of their anchors), and its near misses."""

    sites: tuple[AttentionSite, ...]
    near_misses: tuple[NearMiss, ...]


def find_sites(
    ops: Sequence[Operation],
    config: SliceConfig,
    patterns: Sequence[Pattern],
    folds: Sequence[Fold] = (),
    strict: bool = False,
) -> Found:
    """The sites and near misses among ``ops`` (one block's, in order). For each op the enabled
    patterns are tried in order and the first site wins; a near miss counts only if no pattern
    finds a site there. Each site then goes through the enabled ``folds``, in order. A site
    that shares an op with an earlier one (its scores are that attention's output, say) is a
    near miss. A pattern or fold that raises gives a near miss or a note saying so, or, with
    ``strict``, ``EmitError``."""
    enabled = [pattern for pattern in patterns if pattern.enabled(config)]
    enabled_folds = [fold for fold in folds if fold.enabled(config)]
    found: list[tuple[AttentionSite, str]] = []
    near_misses: list[NearMiss] = []
    for op in ops:
        misses: list[NearMiss] = []
        for pattern in enabled:
            result = _match(pattern, op, strict)
            if isinstance(result, AttentionSite):
                found.append((_folded(result, enabled_folds, strict), pattern.name))
                misses = []
                break
            if isinstance(result, NearMiss):
                misses.append(result)
        near_misses += misses
    position = {op: index for index, op in enumerate(ops)}
    found.sort(key=lambda entry: position[entry[0].anchor])
    taken: dict[Operation, AttentionSite] = {}
    sites = []
    for site, pattern_name in found:
        shared = next((op for op in site.ops if op in taken), None)
        if shared is None:
            sites.append(site)
            taken.update(dict.fromkeys(site.ops, site))
        else:
            reason = f"its op '{shared.name}' belongs to the attention '{taken[shared].anchor.name}', rewritten on its own"
            near_misses.append(fail(pattern_name, reason, site.anchor, site.ops))
    return Found(tuple(sites), tuple(near_misses))


def _folded(site: AttentionSite, folds: Sequence[Fold], strict: bool) -> AttentionSite:
    for fold in folds:
        try:
            result = fold.fold(site)
        except Exception as error:  # a bug in a fold, contained: the site stays as matched
            result = contained_bug(error, f"in the {fold.name} fold", strict, "the site was not folded")
        if isinstance(result, AttentionSite):
            site = result
        elif result is not None:
            site = attrs.evolve(site, notes=(*site.notes, result))
    return site


def _match(pattern: Pattern, op: Operation, strict: bool) -> Match:
    try:
        return pattern.match(op)
    except Exception as error:  # a bug in a pattern, contained: the op is left alone, and said why
        return fail(pattern.name, contained_bug(error, f"in the {pattern.name} pattern", strict, "the op was left as it was"), op)


def fail(pattern: str, reason: str, start: Operation, chain: Sequence[Operation] = ()) -> NearMiss:
    """A near miss of ``pattern`` found from ``start``; ``chain`` are the ops looked at, in order."""
    return NearMiss(pattern, reason, tuple(chain) or (start,), start)


def report_shape(var: Var) -> Shape:
    return tuple(str(dim) if is_symbolic(dim) else int(dim) for dim in var.shape)


def default_scale(head_dim: object) -> Optional[float]:
    """The scale ``scaled_dot_product_attention`` applies, ``1 / sqrt(E)``; ``None`` for a dynamic E."""
    if is_symbolic(head_dim):
        return None
    return 1.0 / math.sqrt(int(head_dim))  # type: ignore[call-overload]


def _operand_geometry(label: str, var: Var, is_mask: bool) -> OperandGeometry:
    rank = var.rank
    rows = static_dim(var.shape[-2]) if rank >= 2 else 1
    heads = static_dim(var.shape[-3]) if rank >= 3 else 1
    return OperandGeometry(label=label, dtype=dtype_name(var), rank=rank, rows=rows, is_mask=is_mask, heads=heads)
