"""Small facts about MIL graphs that several modules need: nested ops, readers, op positions."""

from __future__ import annotations

from typing import Iterator, Mapping, Optional

from coremltools.converters.mil.mil import Block, Operation, Var


def ops_in_block(block: Block) -> Iterator[Operation]:
    """Every op of ``block`` and of the blocks nested in it, in program order (an op before its blocks)."""
    for op in block.operations:
        yield op
        for nested in op.blocks:
            yield from ops_in_block(nested)
