"""Programs with attention in interesting places: nested blocks, several functions, chains."""

from __future__ import annotations

from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Program, Var

from attention_cases import IOS18

SHAPE = (1, 2, 64, 8)
"""Batch, heads, L = S = 64 (the default min_seq_length), E = EV = 8."""


def attend(query: Var, key: Var, value: Var, name: str) -> Var:
    return mb.scaled_dot_product_attention(query=query, key=key, value=value, name=name)


def qkv_specs(shape: tuple[int, ...] = SHAPE) -> list:
    return [mb.TensorSpec(shape) for _ in range(3)]


def nested_attention_program() -> Program:
    """Attention at depth 0, in both branches of a cond (1), in a while_loop body (1), and
    in conds nested inside that body (2 and 3). Output: ``looped``."""

    @mb.program(input_specs=qkv_specs(), opset_version=IOS18)
    def prog(q, k, v):
        top = attend(q, k, v, "top")
        pred = mb.greater(x=mb.reduce_sum(x=q), y=0.0, name="pred")
        branched = mb.cond(
            pred=pred,
            _true_fn=lambda: attend(top, k, v, "in_true"),
            _false_fn=lambda: attend(q, top, v, "in_false"),
            name="branch",
        )

        def deeper(x):
            middle = attend(x, k, v, "depth2")
            return mb.cond(
                pred=pred,
                _true_fn=lambda: attend(middle, k, v, "depth3"),
                _false_fn=lambda: mb.identity(x=middle),
                name="inner_branch",
            )

        def body(x, i):
            inner = mb.cond(pred=pred, _true_fn=lambda: deeper(x), _false_fn=lambda: mb.identity(x=x), name="outer_branch")
            return attend(inner, k, v, "in_loop"), mb.add(x=i, y=1)

        looped, _ = mb.while_loop(
            _cond=lambda x, i: mb.less(x=i, y=2), _body=body, loop_vars=(branched, 0), name="loop"
        )
        return mb.identity(x=looped, name="looped")

    return prog


def two_function_program() -> Program:
    """Functions ``main`` and ``second``, each with one attention op."""
    prog = Program()
    for name in ("main", "second"):

        @mb.function(input_specs=qkv_specs(), opset_version=IOS18)
        def function(q, k, v):
            return attend(q, k, v, f"{name}_attention")

        prog.add_function(name, function)
    return prog


def chained_attention_program(count: int, shape: tuple[int, ...] = SHAPE) -> Program:
    """``count`` attention ops in a chain: each one's output is the next one's query."""

    @mb.program(input_specs=qkv_specs(shape), opset_version=IOS18)
    def prog(q, k, v):
        x = q
        for index in range(count):
            x = attend(x, k, v, f"attention_{index}")
        return x

    return prog
