"""Small facts about MIL graphs that several modules need: nested ops, readers, op positions,
dtype names and sizes, shapes for reports, and the fused attention op."""

from __future__ import annotations

import math
from typing import Callable, Iterator, Mapping, Optional, Union

import numpy as np
from coremltools.converters.mil.mil import Block, Function, Operation, Program, Var, types
from coremltools.converters.mil.mil.types.symbolic import is_symbolic

SDPA = "scaled_dot_product_attention"
"""The fused attention op of the iOS18 opset."""
QUANTIZATION_OPS = ("quantize", "dequantize")
"""The iOS17 activation quantization ops (W8A8): elementwise and monotonic, their parameters constant."""
QUANTIZATION_PARAMETERS = ("scale", "zero_point")
"""The inputs of ``QUANTIZATION_OPS`` that are a scalar, or a vector along ``axis`` of the quantized tensor."""
UNARY_OPS = frozenset(
    (
        "abs", "acos", "asin", "atan", "atanh", "ceil", "clamped_relu", "clip", "cos", "cosh", "elu",
        "erf", "exp", "exp2", "floor", "gelu", "inverse", "leaky_relu", "linear_activation", "log",
        "relu", "relu6", "round", "rsqrt", "scaled_tanh", "sigmoid", "sigmoid_hard", "sign", "silu",
        "sin", "sinh", "softplus", "softsign", "sqrt", "square", "tan", "tanh", "threshold",
        "thresholded_relu",
    )
)  # fmt: skip
"""Elementwise ops of one tensor (their other inputs are scalars such as ``clip``'s bounds)."""
BINARY_OPS = frozenset(("add", "sub", "mul", "real_div", "maximum", "minimum", "pow"))
FLOAT_DTYPES: dict[str, type[np.floating]] = {"fp16": np.float16, "fp32": np.float32}
"""The dtypes attention computes in, by MIL name."""

Dim = Optional[int]
"""A static size, or ``None`` when the size is symbolic."""
ReportShape = tuple[Union[int, str], ...]
"""A shape for reports: static dims as ints, symbolic ones by their symbol's name."""


NOT_A_PROGRAM = (
    "{caller} expects a coremltools MIL Program, got {given}; for a saved .mlpackage use "
    "sdpa_slicer.load_package(path).program, and to convert a model, "
    'coremltools.convert(model, convert_to="milinternal") returns one'
)


def check_program(prog: object, caller: str) -> None:
    """``TypeError`` naming the ways to a ``Program`` when ``prog`` (given to ``caller``) is not one."""
    if not isinstance(prog, Program):
        raise TypeError(NOT_A_PROGRAM.format(caller=caller, given=type(prog).__name__))


def program_function(prog: Program, name: Optional[str]) -> tuple[str, Function]:
    """The function ``name`` of ``prog`` (its default function when ``None``) and its name;
    ``ValueError`` naming the functions there are when it has none of that name."""
    name = prog.default_function_name if name is None else name
    if name not in prog.functions:
        known = ", ".join(repr(known) for known in prog.functions)
        raise ValueError(f"the program has no function {name!r}; its functions are {known}")
    return name, prog.functions[name]


def ops_in_block(block: Block) -> Iterator[Operation]:
    """Every op of ``block`` and of the blocks nested in it, in program order (an op before its blocks)."""
    for op in block.operations:
        yield op
        for nested in op.blocks:
            yield from ops_in_block(nested)


def readers(var: Var) -> list[Operation]:
    """The ops that read ``var``: its child ops, and the op holding each block that returns it."""
    return [*var.child_ops, *(block.outer_op for block in var.consuming_blocks if block.outer_op is not None)]


def reader_count(var: Var) -> int:
    return len(var.child_ops) + len(var.consuming_blocks)


def position_in(op: Optional[Operation], block: Block, positions: Mapping[Operation, int]) -> Optional[int]:
    """The position (from ``positions``) of the op of ``block`` that runs ``op``: ``op`` itself, or
    the op holding the nested block it is in; ``None`` when that is no op of ``block``."""
    while op is not None and op.enclosing_block is not block:
        op = op.enclosing_block.outer_op
    return None if op is None else positions.get(op)


def dtype_name(var: Var) -> str:
    """``"fp16"``, ``"fp32"``, ``"bool"``, ... for a tensor or scalar var."""
    return types.builtin_to_string(var.dtype)


def bits(dtype: type) -> int:
    """Bits per element of a MIL dtype (8 for bool)."""
    width = getattr(dtype, "get_bitwidth", None)
    return width() if width is not None else 8


def itemsize(dtype: str) -> float:
    """Bytes per element of a MIL dtype given by name: 2 for ``"fp16"``, 0.5 for ``"int4"``."""
    return bits(types.string_to_builtin(dtype)) / 8


def static_dim(dim: object) -> Dim:
    return None if is_symbolic(dim) else int(dim)  # type: ignore[call-overload]


def report_shape(var: Var) -> ReportShape:
    return tuple(str(dim) if is_symbolic(dim) else int(dim) for dim in var.shape)


def tensor_bytes(shape: tuple[object, ...], dtype: type) -> Optional[int]:
    """Bytes of a tensor of ``shape`` and MIL ``dtype``; ``None`` when a dim is symbolic."""
    if any(is_symbolic(dim) for dim in shape):
        return None
    return math.ceil(math.prod(int(dim) for dim in shape) * bits(dtype) / 8)  # type: ignore[call-overload]


def sdpa_scores_shape(op: Operation) -> tuple[object, ...]:
    """The scores a fused attention op implies: the query's dims with E replaced by S."""
    return (*op.inputs["query"].shape[:-1], op.inputs["key"].shape[-2])


def private_use_problem(var: Var, block: Block, is_ours: Callable[[Operation], bool], where: str = "") -> Optional[str]:
    """Why ``var`` is not a tensor only ``block``'s ops that ``is_ours`` accepts read; ``None``
    when it is one. ``where`` follows its name in the reason (" between the scores and the softmax")."""
    producer = var.op
    if producer is None:
        return f"'{var.name}'{where} is an input of its block"
    if producer.enclosing_block is not block:
        return f"'{var.name}'{where} comes from an enclosing block"
    if var.consuming_blocks:
        return f"'{var.name}'{where} is also an output of its block"
    others = [op.name for op in var.child_ops if not is_ours(op)]
    if others:
        return f"'{var.name}'{where} is also read by '{others[0]}'"
    return None
