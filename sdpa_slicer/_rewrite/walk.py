"""Walk every block of a program: all functions, and every block nested in an op, at any depth."""

from __future__ import annotations

from typing import Iterator

import attrs
from coremltools.converters.mil.mil import Block, Operation, Program


@attrs.frozen(eq=False)
class BlockVisit:
    """One block of a program and the ops it held when the walk reached it, in order."""

    function_name: str
    block: Block
    ops: tuple[Operation, ...]


def walk_blocks(prog: Program) -> Iterator[BlockVisit]:
    """Yield each function's top-level block, then the blocks nested inside it, depth first.

    A block's own ops are listed before its nested blocks are visited, so a caller can
    collect every site of a block from one visit.
    """
    for function_name, function in prog.functions.items():
        yield from _walk_block(function_name, function)


def _walk_block(function_name: str, block: Block) -> Iterator[BlockVisit]:
    ops = tuple(block.operations)
    yield BlockVisit(function_name, block, ops)
    for op in ops:
        for nested in op.blocks:
            yield from _walk_block(function_name, nested)
