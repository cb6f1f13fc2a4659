"""Which keys each query row can see at all, from the constant ops between the scores and the
softmax; pure, on plain values.

A key is hidden from a row when its final score is, for sure, at least ``SOFTMAX_MARGIN`` below
the score of another key of that row: ``exp`` of the difference is then 0 in fp16 and fp32, so
the key adds exactly nothing, and key pruning may drop it. "For sure" rests on one assumption,
the one behind masking with -1e4 at all: the scores as the site scales them (``scale * q @ k^T``,
before any other op) are within ``SCORE_BOUND``. From there each step's effect is bounded:

- the steps before the masks (``tanh``, a constant ``mul``, an ``add`` of a constant bias, ...)
  only widen or narrow the bound; one that reads an operand computed at run time, or that is
  not in ``BOUNDS``, leaves nothing known;
- the masks that end the chain (``add`` or ``sub`` of a constant, ``select`` of a constant where
  a constant condition says so, the fused op's mask) are followed exactly, per row and key, as
  an interval of the final score;
- ``quantize`` and ``dequantize`` (activation quantization) are monotonic and saturating: before
  the masks they bound the scores by the levels they can reach; among and after the masks each
  interval goes through them end by end, widened by one level for the rounding of the division.
  A masked score that saturates at the lowest level may come back within reach of the others,
  and then hides nothing.

>>> import numpy as np
>>> causal = np.where(np.tril(np.ones((3, 3), bool)), 0.0, -1e4)
>>> visible_keys([StepValues("add", "x", (("y", causal),))]).astype(int)
array([[1, 0, 0],
       [1, 1, 0],
       [1, 1, 1]])
>>> visible_keys([StepValues("add", "x", (("y", None),)), StepValues("add", "x", (("y", causal),))]) is None
True
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import attrs
import numpy as np

from sdpa_slicer._graph import QUANTIZATION_OPS

SCORE_BOUND = 1e3
"""The assumed largest magnitude of a scaled score ``scale * q . k`` (attention logits are far
smaller in practice; Gemma 2 caps them at 50)."""
SOFTMAX_MARGIN = 110.0
"""A key this far below the best of its row adds 0 after softmax: exp(-110) underflows fp32."""


@attrs.frozen(eq=False)
class StepValues:
    """A score step as pruning sees it: the op, the input that takes the running scores, and the
    other inputs' values (``None`` for one computed at run time)."""

    op_type: str
    scores_input: str
    operands: tuple[tuple[str, Optional[np.ndarray]], ...]
    is_mask: bool = False
    """The fused op's mask: a bool mask hides the keys where it is False."""

    def value(self, name: str) -> Optional[np.ndarray]:
        return dict(self.operands).get(name)

    @property
    def constant(self) -> bool:
        return all(value is not None for _, value in self.operands)


def _largest(values: Optional[np.ndarray]) -> float:
    return math.inf if values is None else float(np.abs(np.asarray(values, np.float64)).max(initial=0.0))


def _divided(bound: float, divisors: Optional[np.ndarray]) -> float:
    """The bound of scores divided by ``divisors`` (unknown when computed at run time or 0)."""
    smallest = 0.0 if divisors is None else float(np.abs(np.asarray(divisors, np.float64)).min(initial=math.inf))
    return bound / smallest if smallest > 0 else math.inf


def _clipped(bound: float, alpha: Optional[np.ndarray], beta: Optional[np.ndarray]) -> float:
    """The bound of ``clip(x, alpha, beta)`` for ``|x| <= bound``: clip is monotonic, so the
    largest magnitude is at an end of ``[-bound, bound]`` clipped. A range that lies beyond the
    bound moves every score out to it (``clip(x, 5000, 6000)`` is 5000)."""
    if alpha is None or beta is None:
        return math.inf
    low, high = np.asarray(alpha, np.float64), np.asarray(beta, np.float64)
    return max(_largest(np.minimum(np.maximum(end, low), high)) for end in (-bound, bound))


LEVEL_RANGES = {"int8": (-128, 127), "uint8": (0, 255)}


DTYPE_ROUNDING = 2.0**-10
"""How far a result may grow when ``quantize`` rounds its quotient ``x / s`` to the input's
dtype before ``round``, or ``dequantize`` its product to the scale's: twice fp16's unit
roundoff. Without it, ``0.5 / 0.33333334`` (1.49999998) rounds in fp32 to 1.5 and then to
level 2, one level past ``round`` of the exact quotient, and ``11.137827 * 3`` comes out of
fp32 2e-6 above the exact product."""


def _quantized_bound(bound: float, step: StepValues) -> float:
    """The largest level ``quantize`` gives for scores within ``bound``: ``round(|x / s|) + |zp|``,
    the quotient widened by its rounding, at most the largest level of its dtype (it saturates)."""
    levels = LEVEL_RANGES.get(str(step.value("output_dtype")))
    if levels is None or step.value("scale") is None:
        return math.inf
    saturated = float(max(abs(end) for end in levels))
    quotient = _divided(bound, step.value("scale")) * (1 + DTYPE_ROUNDING)
    if not math.isfinite(quotient):
        return saturated
    return min(math.floor(quotient + 0.5) + _zero_point_bound(step), saturated)


def _dequantized_bound(bound: float, step: StepValues) -> float:
    """``|s| * (|level| + |zp|)`` for levels within ``bound``, widened by its rounding."""
    return _largest(step.value("scale")) * (bound + _zero_point_bound(step)) * (1 + DTYPE_ROUNDING)


def _zero_point_bound(step: StepValues) -> float:
    zero_point = step.value("zero_point")
    return 0.0 if zero_point is None else _largest(zero_point)


Bound = Callable[[float, StepValues], float]

BOUNDS: dict[str, Bound] = {
    **{
        name: (lambda bound, step: 1.0)
        for name in ("tanh", "sigmoid", "softsign", "sigmoid_hard", "erf", "sin", "cos", "sign")
    },
    **{name: (lambda bound, step: bound) for name in ("abs", "relu", "relu6", "gelu", "silu", "identity")},
    "atan": lambda bound, step: math.pi / 2,
    "floor": lambda bound, step: bound + 1.0,
    "ceil": lambda bound, step: bound + 1.0,
    "round": lambda bound, step: bound + 1.0,
    "clip": lambda bound, step: _clipped(bound, step.value("alpha"), step.value("beta")),
    "scaled_tanh": lambda bound, step: _largest(step.value("alpha")),
    "add": lambda bound, step: bound + _largest(_other(step)),
    "sub": lambda bound, step: bound + _largest(_other(step)),
    "mul": lambda bound, step: bound * _largest(_other(step)),
    "real_div": lambda bound, step: _divided(bound, _other(step)) if step.scores_input == "x" else math.inf,
    "maximum": lambda bound, step: max(bound, _largest(_other(step))),
    "minimum": lambda bound, step: max(bound, _largest(_other(step))),
    "select": lambda bound, step: max(bound, _largest(_other(step, "cond"))),
    "quantize": _quantized_bound,
    "dequantize": _dequantized_bound,
}
"""How each step bounds the magnitude of the scores, from their bound before it."""


def _other(step: StepValues, *skipped: str) -> Optional[np.ndarray]:
    """The step's one other operand (not the scores, nor ``skipped``); ``None`` if computed at run time."""
    values = [value for name, value in step.operands if name not in skipped]
    return values[0] if len(values) == 1 else None


def visible_keys(steps: Sequence[StepValues]) -> Optional[np.ndarray]:
    """Per query row (axis -2) and key (axis -1), whether the key may add anything to the row; a
    bool array of rank 2 or more, broadcasting over the scores. ``None`` when nothing is known:
    no constant mask ends the chain, or the steps before it cannot be bounded."""
    first_mask = _first_of_final_masks(steps)
    if first_mask is None:
        return None
    bound = SCORE_BOUND
    for step in steps[:first_mask]:
        rule = BOUNDS.get(step.op_type)
        bound = math.inf if rule is None else rule(bound, step)
        if not math.isfinite(bound):
            return None
    low: np.ndarray = np.array(-bound)
    high: np.ndarray = np.array(bound)
    for step in steps[first_mask:]:
        through = _through_levels if step.op_type in QUANTIZATION_OPS else _through_mask
        low, high = through(step, low, high)
    low, high = np.broadcast_arrays(low, high)
    best = np.max(low, axis=-1, keepdims=True) if low.ndim else low
    with np.errstate(invalid="ignore"):
        hidden = high <= best - SOFTMAX_MARGIN
    visible = ~hidden
    return visible.reshape((1,) * max(0, 2 - visible.ndim) + visible.shape)


def _first_of_final_masks(steps: Sequence[StepValues]) -> Optional[int]:
    """Where the constant masks that end the chain begin (``quantize`` and ``dequantize`` may come
    among and after them); ``None`` when no constant mask ends it."""
    first = None
    for index in range(len(steps) - 1, -1, -1):
        if _is_constant_mask(steps[index]):
            first = index
        elif steps[index].op_type not in QUANTIZATION_OPS:
            break
    return first


def _through_levels(step: StepValues, low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The interval after ``quantize`` or ``dequantize``: each end through the op (monotonic, the
    other way round for a negative scale), a quantized one widened by a level either way."""
    scale = np.asarray(step.value("scale"), np.float64)
    zero_point = step.value("zero_point")
    shift = 0.0 if zero_point is None else np.asarray(zero_point, np.float64)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if step.op_type == "dequantize":
            ends = (scale * (low - shift), scale * (high - shift))
            return np.minimum(*ends), np.maximum(*ends)
        smallest, largest = LEVEL_RANGES[str(step.value("output_dtype"))]
        ends = (low / scale, high / scale)
        lowest = np.clip(np.floor(np.minimum(*ends)) - 1 + shift, smallest, largest)
        highest = np.clip(np.ceil(np.maximum(*ends)) + 1 + shift, smallest, largest)
        return lowest, highest


def _is_constant_mask(step: StepValues) -> bool:
    if not step.constant:
        return False
    if step.op_type == "add" or (step.op_type == "sub" and step.scores_input == "x"):
        return True
    return step.op_type == "select"


def _through_mask(step: StepValues, low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The interval of the scores after one constant mask, from the interval before it."""
    if step.op_type == "select":
        condition = np.asarray(step.value("cond")).astype(bool)
        fill = np.asarray(step.value("b" if step.scores_input == "a" else "a"), np.float64)
        replaced = ~condition if step.scores_input == "a" else condition
        return np.where(replaced, fill, low), np.where(replaced, fill, high)
    values = np.asarray(_other(step))
    if values.dtype == np.bool_:
        added = np.where(values, 0.0, -np.inf)
    else:
        added = values.astype(np.float64) * (-1.0 if step.op_type == "sub" else 1.0)
    return low + added, high + added
