"""Torch frontend converters that ``diffusers`` and ``transformers`` models need with coremltools 9.0.

Importing this module registers them (once per process): ``aten::diff`` and ``aten::new_ones``,
which transformers uses to build masks and that coremltools has no converter for, and ``int``
and ``bool`` of a constant one-element tensor, which coremltools converts with ``int(array)``
and NumPy 2 refuses for arrays that are not 0-d.

Needs PyTorch; without it, collecting this module (for doctests) is skipped.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="PyTorch is needed for the torch frontend converters")

from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.frontend.torch.ops import NUM_TO_DTYPE_STRING, _get_inputs  # noqa: E402
from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op  # noqa: E402

DIFF_ORDER, DIFF_DIM, DIFF_PREPEND, DIFF_APPEND = 1, 2, 3, 4
"""Input positions in ``aten::diff(input, n, dim, prepend, append)``."""


def _scalar_cast(context, node, to_python: type, dtype_name: str) -> None:  # type: ignore[no-untyped-def]
    (x,) = _get_inputs(context, node, expected=1)
    if x.can_be_folded_to_const():
        value = to_python(np.asarray(x.val).reshape(-1)[0])
        context.add(mb.const(val=value, name=node.name))
        return
    if len(x.shape) > 0:
        x = mb.squeeze(x=x, name=f"{node.name}_item")
    context.add(mb.cast(x=x, dtype=dtype_name, name=node.name))


@register_torch_op(torch_alias=["int"], override=True)
def int_of_one_element(context, node):  # type: ignore[no-untyped-def]
    _scalar_cast(context, node, int, "int32")


@register_torch_op(torch_alias=["bool"], override=True)
def bool_of_one_element(context, node):  # type: ignore[no-untyped-def]
    _scalar_cast(context, node, bool, "bool")


@register_torch_op
def diff(context, node):  # type: ignore[no-untyped-def]
    """``x[1:] - x[:-1]`` along ``dim``, with ``prepend`` and ``append`` joined on first; ``n`` times."""
    inputs = _get_inputs(context, node, min_expected=3)
    order, dim = inputs[DIFF_ORDER].val, inputs[DIFF_DIM].val
    parts = [part for part in (inputs[DIFF_PREPEND], inputs[0], inputs[DIFF_APPEND]) if part is not None]
    rank = inputs[0].rank
    dim = dim % rank
    x = mb.concat(values=parts, axis=dim) if len(parts) > 1 else parts[0]
    for step in range(order):
        later = mb.slice_by_index(
            x=x, begin=[1 if axis == dim else 0 for axis in range(rank)], end=[0] * rank, end_mask=[True] * rank
        )
        earlier = mb.slice_by_index(
            x=x,
            begin=[0] * rank,
            end=[-1 if axis == dim else 0 for axis in range(rank)],
            end_mask=[axis != dim for axis in range(rank)],
        )
        x = mb.sub(x=later, y=earlier, name=node.name if step == order - 1 else None)
    context.add(x, node.name)


@register_torch_op
def new_ones(context, node):  # type: ignore[no-untyped-def]
    """``x.new_ones(size, dtype=...)``: ones of ``size`` (a scalar for ``()``), in ``dtype`` when given."""
    inputs = _get_inputs(context, node)
    shape, dtype = inputs[1], inputs[2] if len(inputs) > 2 else None
    if isinstance(shape, list):
        shape = mb.concat(values=shape, axis=0)
    elif shape.val is not None:
        shape = np.asarray(shape.val, dtype=np.int32)
    ones = mb.const(val=np.float32(1.0)) if isinstance(shape, np.ndarray) and shape.size == 0 else None
    if ones is None:
        ones = mb.fill(shape=shape, value=1.0)
    if dtype is not None and dtype.val is not None:
        ones = mb.cast(x=ones, dtype=NUM_TO_DTYPE_STRING[dtype.val])
    context.add(ones, node.name)
