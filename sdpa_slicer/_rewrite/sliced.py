"""Already-sliced attention: the query chunks ``slice_attention`` writes, recognised so that a
sliced program is reported as such, and left as it is, instead of as one skipped site per chunk.

The emitted form (``emit/site.py``): one ``split`` of the query along its rows, a chain per
chunk (each a site the patterns match, written out as ops), and one ``concat`` of the chunks'
outputs along the same axis, in the split's order::

    %q0, %q1 = split(%q, axis=-2)
    %o0 = matmul(softmax(matmul(%q0, %k, transpose_y=True)), %v)
    %o1 = matmul(softmax(matmul(%q1, %k, transpose_y=True)), %v)
    %out = concat(%o0, %o1, axis=-2)

Sites that are the chunks of such a join, every one read only by it, are one sliced attention.
"""

from __future__ import annotations

from typing import Optional, Sequence

import attrs
from coremltools.converters.mil.mil import Operation, Var

from sdpa_slicer._rewrite.sites import AttentionSite

JOIN, CUT = "concat", "split"


@attrs.frozen(eq=False)
class SlicedAttention:
    """The chunk sites of one attention already cut into query chunks, and the concat joining them."""

    chunks: tuple[AttentionSite, ...]
    join: Operation


def sliced_attentions(sites: Sequence[AttentionSite]) -> tuple[SlicedAttention, ...]:
    """The already-sliced attentions among ``sites`` (one block's), in the order of their joins."""
    by_output = {site.anchor.outputs[0]: site for site in sites}
    found: list[SlicedAttention] = []
    joins: set[Operation] = set()
    for site in sites:
        join = _only_reader(site.anchor.outputs[0])
        if join is None or join.op_type != JOIN or join in joins:
            continue
        chunks = [by_output.get(value) for value in join.inputs["values"]]
        if len(chunks) < 2 or None in chunks:
            continue
        sliced = SlicedAttention(tuple(chunk for chunk in chunks if chunk is not None), join)
        if _is_emitted(sliced):
            joins.add(join)
            found.append(sliced)
    return tuple(found)


def _only_reader(var: Var) -> Optional[Operation]:
    if var.consuming_blocks or len(var.child_ops) != 1:
        return None
    return var.child_ops[0]


def _is_emitted(sliced: SlicedAttention) -> bool:
    """Every chunk read only by the join, which concatenates along the query rows, not interleaved,
    exactly the outputs of one split of the query along the same axis, in order."""
    join = sliced.join
    rows = sliced.chunks[0].query.rank - 2
    if bool(join.inputs["interleave"].val) or _axis(join, join.outputs[0].rank) != rows:
        return False
    if any(_only_reader(chunk.anchor.outputs[0]) is not join for chunk in sliced.chunks):
        return False
    cut = sliced.chunks[0].query.op
    if cut is None or cut.op_type != CUT or _axis(cut, cut.inputs["x"].rank) != rows:
        return False
    return [chunk.query for chunk in sliced.chunks] == list(cut.outputs)


def _axis(op: Operation, rank: int) -> Optional[int]:
    axis = op.inputs["axis"].val
    return None if axis is None else int(axis) % rank


def sliced_note(chunks: int, joins: int, functions: Sequence[str]) -> str:
    """The report's one line on the already-sliced attention it found."""
    names = ", ".join(f"'{name}'" for name in functions)
    return (
        f"already sliced: {chunks} query chunk(s) of attention joined by {joins} concat(s), in function(s) "
        f"{names}, left as they are"
    )
