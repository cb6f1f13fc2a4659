"""Graph transactions: add ops before a site, then swap them in for the site's ops, all or nothing.

::

    before                       while building               after swap
    ------                       --------------               ----------
    %a = op_a(...)               %a = op_a(...)               %a = op_a(...)
    %out = site_op(%a)           %n0 = new_op(%a)    # added  %n0 = new_op(%a)
    %u = user(%out)              %n1 = new_op(%n0)   # added  %out = new_op(%n0)   (renamed %n1)
                                 %out = site_op(%a)           %u = user(%out)
                                 %u = user(%out)

Everything a swap could trip on is checked before the graph is touched, and a roll back
removes exactly the ops the transaction added, whatever state a failure left them in.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Sequence

from coremltools.converters.mil.mil import Block, Operation, Var, types

from sdpa_slicer._coreml_compat import copy_scope_info, ops_before
from sdpa_slicer._errors import EmitError
from sdpa_slicer._graph import ops_in_block

SIDE_EFFECT_OPS = frozenset(("coreml_update_state", "read_state"))
"""Ops never removed as dead: they touch a Core ML state."""


class NameAllocator:
    """Unique names within one function: every var and op of a function must be distinct."""

    def __init__(self, taken: set[str]) -> None:
        self._taken = taken

    @classmethod
    def for_function(cls, function: Block) -> NameAllocator:
        names = {name for op in ops_in_block(function) for name in (op.name, *(var.name for var in op.outputs))}
        return cls(names | set(getattr(function, "inputs", {})))

    def __call__(self, wanted: str) -> str:
        name = wanted
        suffix = 1
        while name in self._taken:
            name = f"{wanted}_{suffix}"
            suffix += 1
        self._taken.add(name)
        return name


class SiteTransaction:
    """Replaces the ops of one site (``site_ops``, anchor last) by ops added right before the anchor.

    Creating it checks that the site's ops can be removed once their output is replaced;
    ``add`` adds ops; ``commit`` moves every use of the anchor's output to the new output and
    removes the site's ops (and constants only they read) and the added ops nothing reads;
    ``roll_back`` removes what was added.
    """

    def __init__(self, block: Block, site_ops: Sequence[Operation], names: NameAllocator) -> None:
        _check_removable(block, site_ops)
        self.block = block
        self.site_ops = tuple(site_ops)
        self.anchor = self.site_ops[-1]
        self.added: list[Operation] = []
        self._names = names

    def add(self, builder: Callable[..., Any], name: str, **inputs: Any) -> Any:
        """Add one op made by ``builder`` (an ``mb`` function) right before the anchor. Every op
        that lands before the anchor meanwhile is recorded, even if ``builder`` then fails: the
        op itself, and the constants the builder makes of plain values."""
        # What precedes the anchor now marks where the ops of this add end.
        before = next(ops_before(self.block, self.anchor), None)
        try:
            return builder(name=self._names(name), before_op=self.anchor, **inputs)
        finally:
            made = itertools.takewhile(lambda op: op is not before, ops_before(self.block, self.anchor))
            self.added += reversed(list(made))

    def commit(self, new_output: Var) -> list[Operation]:
        """Give every use of the anchor's output to ``new_output`` (which takes its name) and
        remove the site's ops; on failure the uses go back and ``EmitError`` is raised. Added ops
        that nothing reads (a constant row of a mask that key pruning cut once more) are removed
        too; they are returned."""
        old_output = self.anchor.outputs[0]
        _check_replaceable(old_output, new_output)
        _check_removable(self.block, self.site_ops)  # the new ops must not read the site's intermediates
        # Swapping copies the anchor's scope info to the new ops by recursing from the new output
        # through their inputs, one frame per op on the longest path: past Python's limit for an
        # online softmax over hundreds of key chunks. Copied in program order first, each call
        # stops at inputs already done.
        for op in self.added:
            for var in op.outputs:
                copy_scope_info(old_output, var)
        try:
            self.block.replace_uses_of_var_after_op(anchor_op=self.anchor, old_var=old_output, new_var=new_output)
            read = [var for op in self.site_ops for var in op.get_flattened_inputs()]
            self.block.remove_ops(list(self.site_ops))
        except Exception:
            self.block.replace_uses_of_var_after_op(
                anchor_op=self.anchor, old_var=new_output, new_var=old_output, force_replace=True
            )
            raise
        self._remove_dead_producers(read)
        unread = [
            var
            for op in reversed(self.added)
            if op.enclosing_block is self.block and op is not new_output.op  # kept, read or not, as the anchor was
            for var in op.outputs
        ]
        removed = remove_dead_producers([self.block], unread)
        new_output.name = old_output.name
        return removed

    def _remove_dead_producers(self, read: Sequence[Var]) -> None:
        """Remove the ops of this block and of the blocks enclosing it that only fed the removed
        site (its constants, a chain that repeated its keys), back to the first op with another
        reader or a side effect."""
        remove_dead_producers(_enclosing_blocks(self.block), read)

    def roll_back(self) -> list[Operation]:
        """Remove every op ``add`` added, still in the block, last first; return them."""
        added = [op for op in reversed(self.added) if op.enclosing_block is self.block]
        self.added = []
        for op in added:
            if op.outputs is None:
                _detach(self.block, op)
        built = [op for op in added if op.outputs is not None]
        if built:
            self.block.remove_ops(built)
        return added


def remove_dead_producers(blocks: Sequence[Block], read: Sequence[Var]) -> list[Operation]:
    """Remove the ops of ``blocks`` that made a var of ``read`` and that nothing reads any more,
    and so on through their inputs, back to the first op with another reader or a side effect;
    return them."""
    pending = list(dict.fromkeys(read))
    removed = []
    while pending:
        var = pending.pop(0)
        op = var.op
        if (
            op is None
            or op.enclosing_block not in blocks
            or op.op_type in SIDE_EFFECT_OPS
            or op.blocks
            or any(output.child_ops or output.consuming_blocks for output in op.outputs)
        ):
            continue
        op.enclosing_block.remove_ops([op])
        removed.append(op)
        pending += [input_var for input_var in op.get_flattened_inputs() if input_var not in pending]
    return removed


def _enclosing_blocks(block: Block) -> list[Block]:
    """``block`` and every block around it, out to its function."""
    blocks = [block]
    while blocks[-1].outer_op is not None:
        blocks.append(blocks[-1].outer_op.enclosing_block)
    return blocks


def _detach(block: Block, op: Operation) -> None:
    """Take out an op that failed its type inference (it has no outputs, which ``remove_ops`` needs)."""
    block.operations.remove(op)
    op.enclosing_block = None
    for var in op.get_flattened_inputs():
        var.remove_child_op(op)


def _check_removable(block: Block, site_ops: Sequence[Operation]) -> None:
    """Every op of the site must belong to ``block``, and each intermediate be read only inside
    the site, so removing the ops after the output's uses have moved cannot fail."""
    members = set(site_ops)
    for op in site_ops:
        if op.enclosing_block is not block:
            raise EmitError(f"its op '{op.name}' belongs to another block")
    for op in site_ops[:-1]:
        for var in op.outputs:
            if var.consuming_blocks or any(child not in members for child in var.child_ops):
                raise EmitError(f"intermediate '{var.name}' is used outside the attention site")


def _check_replaceable(old: Var, new: Var) -> None:
    if old.dtype != new.dtype or tuple(old.shape) != tuple(new.shape):
        raise EmitError(
            f"replacement type {types.builtin_to_string(new.dtype)}{tuple(new.shape)} differs from "
            f"{types.builtin_to_string(old.dtype)}{tuple(old.shape)}"
        )
    if not old.can_be_replaced_by_var(new):
        raise EmitError("replacement does not depend on every compressed weight the original used")
