"""The attention of query pieces over their key ranges, as ops (see ``ChunkAttention``): one
softmax over one key range, or an online softmax over several, the key ranges as the outer loop.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import attrs
import numpy as np
from coremltools.converters.mil.mil import Builder as mb
from coremltools.converters.mil.mil import Var

from sdpa_slicer._graph import FLOAT_DTYPES
from sdpa_slicer._rewrite.emit.ops import Ops
from sdpa_slicer._rewrite.plan.planning import Chunk, KeyChunks
from sdpa_slicer._rewrite.sites import ScoreStep


@attrs.frozen(eq=False)
class ChunkedOperand:
    """One operand of a score step per query piece (cut to the piece's rows, or whole), and its
    axis that runs along the keys (``None``: it broadcasts over them)."""

    name: str
    pieces: Sequence[Var]
    """One per query piece; built on first read when the operand is built per chunk."""
    key_axis: Optional[int]


@attrs.frozen(eq=False)
class ChunkedStep:
    """A score step with each operand given per query piece."""

    step: ScoreStep
    name: str
    operands: tuple[ChunkedOperand, ...]


class ChunkAttention:
    """Builds the attention of each query chunk of one site over the keys its plan gives it.

    One key range (all keys, or the range a constant mask leaves visible)::

        %s = matmul(%q_i, %k[range], transpose_y=...)  -> steps(%s) -> softmax -> matmul(%v[range])

    Weight steps (a ``quantize -> dequantize`` of the softmax's result) come between the
    softmax and ``matmul(%v)``; a site with them has one key range per query chunk.

    Several key ranges: an online softmax (running max ``m``, running sum ``l``, rescaled
    accumulator ``acc``), so no tensor exceeds one query chunk by one key chunk::

        %s_j   = steps(matmul(%q_i, %k_j))
        %m_j   = maximum(%m_{j-1}, reduce_max(%s_j))
        %p_j   = exp(%s_j - %m_j)
        %a_j   = exp(%m_{j-1} - %m_j)
        %l_j   = %l_{j-1} * %a_j + reduce_sum(%p_j)
        %acc_j = %acc_{j-1} * %a_j + matmul(%p_j, %v_j)
        %out_i = real_div(%acc_last, %l_last)

    The key ranges are the outer loop: each cut of K and V is made once, used by every query
    chunk that needs it, and dead before the next is made; the running states of the query
    chunks (output-sized together) stay alive instead.
    """

    def __init__(
        self,
        ops: Ops,
        base: str,
        key: Var,
        key_transposed: bool,
        value: Var,
        dtype: str,
        steps: Sequence[ChunkedStep],
        weight_steps: Sequence[ChunkedStep] = (),
    ) -> None:
        """``base`` names the new ops; ``key`` is ``(..., S, E)`` when ``key_transposed``, else
        ``(..., E, S)``; ``value`` is ``(..., S, EV)``; the scores are of ``dtype``."""
        self._ops = ops
        self._base = base
        self._key = key
        self._key_transposed = key_transposed
        self._value = value
        self._dtype = dtype
        self._steps = steps
        self._weight_steps = weight_steps

    def chunks(self, chunks: Sequence[tuple[str, Var, KeyChunks]]) -> list[Var]:
        """The output of each query piece ``(name, query, key ranges)``, in order; the score
        steps give each piece's operands by its position."""
        outputs: dict[int, Var] = {}
        walked = []
        for index, (name, query, keys) in enumerate(chunks):
            if keys is None or len(keys) == 1:
                columns = None if keys is None else keys[0]
                scores = self._applied(self._steps, index, name, self._scores(name, query, columns), columns)
                weights = self._ops.op(mb.softmax, f"{name}_weights", x=scores, axis=self._ops.const(-1, "int32"))
                weights = self._applied(self._weight_steps, index, name, weights, columns)
                outputs[index] = self._matmul(f"{name}_chunk", weights, self._values(columns))
            elif self._weight_steps:
                raise ValueError("a site whose weights are quantized cannot walk several key chunks")
            else:
                walked.append((index, name, query, keys))
        outputs.update(self._online_softmax(walked))
        return [outputs[index] for index in range(len(chunks))]

    def _scores(self, name: str, query: Var, columns: Optional[Chunk]) -> Var:
        """``query @ key^T`` over the keys in ``columns`` (all keys if ``None``)."""
        ops = self._ops
        key = self._key
        if columns is not None:
            key = ops.cut(self._cut_name("key", columns), key, -2 if self._key_transposed else -1, columns)
        return ops.op(
            mb.matmul,
            f"{name}_scores",
            x=query,
            y=key,
            transpose_x=ops.const(False, "bool"),
            transpose_y=ops.const(self._key_transposed, "bool"),
        )

    def _applied(
        self, steps: Sequence[ChunkedStep], index: int, name: str, scores: Var, columns: Optional[Chunk]
    ) -> Var:
        """``steps`` applied to the scores (or weights) of query piece ``index`` over the keys in ``columns``."""
        ops = self._ops
        for chunked in steps:
            operands = {}
            for operand in chunked.operands:
                piece = operand.pieces[index]
                axis = operand.key_axis
                if columns is not None and axis is not None and piece.shape[axis] != 1:
                    piece = ops.cut(f"{name}_{operand.name}_{columns[0]}_{columns[1]}", piece, axis, columns)
                operands[operand.name] = piece
            builder = getattr(mb, chunked.step.op_type)
            scores = ops.op(builder, f"{name}_{chunked.name}", **{chunked.step.scores_input: scores, **operands})
        return scores

    def _values(self, columns: Optional[Chunk]) -> Var:
        """The values of the keys in ``columns``. Cut only when needed, after the scores: a cut is
        a new tensor, and it need not be alive while the scores are."""
        if columns is None:
            return self._value
        return self._ops.cut(self._cut_name("value", columns), self._value, -2, columns)

    def _cut_name(self, what: str, columns: Chunk) -> str:
        return f"{self._base}_{what}_{columns[0]}_{columns[1]}"

    def _online_softmax(self, chunks: Sequence[tuple[int, str, Var, tuple[Chunk, ...]]]) -> dict[int, Var]:
        """Walk the key ranges of ``chunks`` (index, name, query, ranges) range by range."""
        ops = self._ops
        states: dict[int, tuple[Var, Var, Var]] = {}
        steps_taken: dict[int, int] = {}
        ranges = sorted({columns for *_, keys in chunks for columns in keys})
        for columns in ranges:
            for index, name, query, keys in chunks:
                if columns not in keys:
                    continue
                step = f"{name}_keys{steps_taken.setdefault(index, 0)}"
                steps_taken[index] += 1
                states[index] = self._online_step(step, index, query, columns, states.get(index))
        return {
            index: ops.op(mb.real_div, f"{name}_chunk", x=states[index][2], y=states[index][1])
            for index, name, _, _ in chunks
        }

    def _online_step(
        self, step: str, index: int, query: Var, columns: Chunk, state: Optional[tuple[Var, Var, Var]]
    ) -> tuple[Var, Var, Var]:
        """One key range of one query chunk: the new running max, sum and accumulator."""
        ops = self._ops
        scores = self._applied(self._steps, index, step, self._scores(step, query, columns), columns)
        piece_max = self._reduce(mb.reduce_max, f"{step}_max", scores)
        if state is None:
            # A row whose keys are all -inf so far (a -inf mask, or an fp16 one whose sum with a
            # score overflowed) would give exp(-inf - -inf) = NaN: the first max is floored.
            lowest = float(np.finfo(FLOAT_DTYPES[self._dtype]).min)
            new_max = ops.op(mb.maximum, f"{step}_max_floor", x=piece_max, y=ops.scalar(lowest, self._dtype))
        else:
            new_max = ops.op(mb.maximum, f"{step}_running_max", x=state[0], y=piece_max)
        probabilities = ops.op(mb.exp, f"{step}_exp", x=ops.op(mb.sub, f"{step}_shifted", x=scores, y=new_max))
        piece_sum = self._reduce(mb.reduce_sum, f"{step}_sum", probabilities)
        piece_out = self._matmul(f"{step}_out", probabilities, self._values(columns))
        if state is None:
            return new_max, piece_sum, piece_out
        running_max, running_sum, accumulator = state
        rescale = ops.op(mb.exp, f"{step}_rescale", x=ops.op(mb.sub, f"{step}_max_change", x=running_max, y=new_max))
        running_sum = ops.op(
            mb.add, f"{step}_running_sum", x=ops.op(mb.mul, f"{step}_old_sum", x=running_sum, y=rescale), y=piece_sum
        )
        accumulator = ops.op(
            mb.add, f"{step}_accumulated", x=ops.op(mb.mul, f"{step}_old_out", x=accumulator, y=rescale), y=piece_out
        )
        return new_max, running_sum, accumulator

    def _reduce(self, reduction: Callable[..., Var], name: str, x: Var) -> Var:
        ops = self._ops
        return ops.op(
            reduction,
            name,
            x=x,
            axes=ops.const(np.array([-1], dtype=np.int32), "int32"),
            keep_dims=ops.const(True, "bool"),
        )

    def _matmul(self, name: str, weights: Var, value: Var) -> Var:
        false = self._ops.const(False, "bool")
        return self._ops.op(mb.matmul, name, x=weights, y=value, transpose_x=false, transpose_y=false)
