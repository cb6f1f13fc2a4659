"""walk_blocks visits every function and every nested block, at any depth."""

from __future__ import annotations

from programs import nested_attention_program, two_function_program
from sdpa_slicer._rewrite.walk import walk_blocks


def _attention_blocks(prog):
    return [
        (visit.function_name, visit.block)
        for visit in walk_blocks(prog)
        if any(op.op_type == "scaled_dot_product_attention" for op in visit.ops)
    ]


def test_every_function_is_walked():
    prog = two_function_program()
    assert sorted(name for name, _ in _attention_blocks(prog)) == ["main", "second"]


def test_blocks_nested_in_cond_and_while_loop_are_walked_at_depth():
    prog = nested_attention_program()
    blocks = _attention_blocks(prog)
    depths = sorted(_depth(block) for _, block in blocks)
    assert depths == [0, 1, 1, 1, 2, 3]


def test_a_visit_lists_the_block_ops_in_order():
    prog = two_function_program()
    visit = next(walk_blocks(prog))
    assert list(visit.ops) == list(visit.block.operations)


def _depth(block) -> int:
    depth = 0
    while block.outer_op is not None:
        block = block.outer_op.enclosing_block
        depth += 1
    return depth
