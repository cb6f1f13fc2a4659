"""Emitting: build the chunked subgraph of a site and swap it in, all or nothing.

For a site with a mask that has an L axis, in three chunks::

    before                                   after
    ------                                   -----
    %out = scaled_dot_product_attention(     %qs            = mul(%q, 1/sqrt(E))
        %q, %k, %v, %m)                      %q0, %q1, %q2  = split(%qs, axis=-2)
                                             %m0, %m1, %m2  = split(%m_additive, axis=-2)
                                             %s0 = matmul(%q0, %k, transpose_y=True)
                                             %a0 = add(%s0, %m0)
                                             %p0 = softmax(%a0, axis=-1)
                                             %o0 = matmul(%p0, %v)
                                             ...  (same for chunks 1 and 2)
                                             %out = concat(%o0, %o1, %o2, axis=-2)

This is the only module that mutates a program. Shared constants (axes, flags, the
scale, split sizes, converted masks) are made once per block and reused by every site.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Iterator, Optional

import numpy as np
from coremltools.converters.mil.mil import Block, Builder as mb, Operation, Var, types

from sdpa_slicer._match import AttentionSite, dtype_name
from sdpa_slicer._plan import SitePlan

NUMPY_DTYPES = {"fp16": np.float16, "fp32": np.float32}


def masked_score(dtype: str) -> float:
    """What a False entry of a bool mask adds to the scores: large, negative and finite.

    Half the dtype's range, so adding a score cannot overflow to -inf, and a row whose
    keys are all masked stays finite instead of becoming NaN.
    """
    return -float(np.finfo(NUMPY_DTYPES[dtype]).max) / 2


def additive_mask_values(mask: np.ndarray, dtype: str) -> np.ndarray:
    """A constant mask in the form the emitted ops would compute from it."""
    target = NUMPY_DTYPES[dtype]
    if mask.dtype == np.bool_:
        return np.where(mask, 0.0, masked_score(dtype)).astype(target)
    limit = -masked_score("fp16") if dtype == "fp16" else np.inf
    return np.clip(mask, -limit, limit).astype(target)


class EmitError(RuntimeError):
    """The replacement of a site could not be built or swapped in; the site is unchanged."""


class NameAllocator:
    """Unique names within one function: every var and op of a function must be distinct."""

    def __init__(self, taken: set[str]) -> None:
        self._taken = taken

    @classmethod
    def for_function(cls, function: Block) -> NameAllocator:
        return cls(set(_names_in_block(function)) | set(getattr(function, "inputs", {})))

    def __call__(self, wanted: str) -> str:
        name = wanted
        suffix = 1
        while name in self._taken:
            name = f"{wanted}_{suffix}"
            suffix += 1
        self._taken.add(name)
        return name


def _names_in_block(block: Block) -> Iterator[str]:
    for op in block.operations:
        yield op.name
        for var in op.outputs:
            yield var.name
        for nested in op.blocks:
            yield from _names_in_block(nested)


class BlockEmitter:
    """Rewrites the sites of one block. Use inside ``with block:``, sites in block order."""

    def __init__(self, block: Block, names: NameAllocator) -> None:
        self._block = block
        self._names = names
        self._cache: dict[Hashable, Any] = {}
        self._cached_in_transaction: list[Hashable] = []
        self._anchor: Optional[Operation] = None
        self._replacements: dict[Var, Var] = {}

    def rewrite(self, site: AttentionSite, plan: SitePlan) -> Var:
        """Replace ``site`` by its chunked form and return the new output var.

        On any failure the ops emitted for this site are removed, the site's ops stay
        exactly as they were, and ``EmitError`` is raised from the original error.
        """
        anchor = site.anchor
        boundary = _previous_op(self._block, anchor)
        self._anchor = anchor
        self._cached_in_transaction = []
        replaced = False
        old_output = site.output
        try:
            _check_removable(site)
            new_output = self._build(site, plan)
            _check_replaceable(old_output, new_output)
            self._block.replace_uses_of_var_after_op(anchor_op=anchor, old_var=old_output, new_var=new_output)
            replaced = True
            self._remove_site_ops(site)
        except Exception as error:
            if replaced:
                self._block.replace_uses_of_var_after_op(anchor_op=anchor, old_var=new_output, new_var=old_output)
            self._roll_back(anchor, boundary)
            raise EmitError(f"could not rewrite {anchor.op_type} '{anchor.name}': {error}") from error
        new_output.name = old_output.name
        self._replacements[old_output] = new_output
        return new_output

    def _current(self, var: Var) -> Var:
        """``var``, or what replaced it when it was the output of a site rewritten earlier."""
        return self._replacements.get(var, var)

    def _build(self, site: AttentionSite, plan: SitePlan) -> Var:
        base = site.anchor.name
        dtype = dtype_name(site.query)

        query = self._current(site.query)
        key = self._current(site.key)
        value = self._current(site.value)
        if site.scale is not None and site.scale != 1.0:
            query = self._op(mb.mul, f"{base}_scaled_query", x=query, y=self._scalar(site.scale, dtype))
        split_sizes = plan.split_sizes
        query_chunks = self._split(f"{base}_query_chunk", query, split_sizes)

        mask_chunks: list[Optional[Var]] = [None] * plan.num_chunks
        if site.mask is not None:
            additive = self._additive_mask(self._current(site.mask), dtype, base)
            if plan.slice_mask_rows:
                mask_chunks = list(self._cached_split(f"{base}_mask_chunk", additive, split_sizes))
            else:
                mask_chunks = [additive] * plan.num_chunks

        false = self._const(False, "bool")
        outputs = []
        for index, (query_chunk, mask_chunk) in enumerate(zip(query_chunks, mask_chunks)):
            scores = self._op(
                mb.matmul,
                f"{base}_scores_{index}",
                x=query_chunk,
                y=key,
                transpose_x=false,
                transpose_y=self._const(site.key_transposed, "bool"),
            )
            if mask_chunk is not None:
                scores = self._op(mb.add, f"{base}_masked_scores_{index}", x=scores, y=mask_chunk)
            weights = self._op(mb.softmax, f"{base}_weights_{index}", x=scores, axis=self._const(-1, "int32"))
            outputs.append(
                self._op(mb.matmul, f"{base}_chunk_{index}", x=weights, y=value, transpose_x=false, transpose_y=false)
            )
        if len(outputs) == 1:
            return outputs[0]
        return self._op(
            mb.concat,
            f"{base}_concat",
            values=tuple(outputs),
            axis=self._const(-2, "int32"),
            interleave=false,
        )

    def _op(self, builder: Callable[..., Any], name: str, **inputs: Any) -> Any:
        """Add one op right before the anchor of the site being rewritten."""
        return builder(name=self._names(name), before_op=self._anchor, **inputs)

    def _split(self, name: str, x: Var, sizes: tuple[int, ...]) -> tuple[Var, ...]:
        if len(sizes) == 1:
            return (x,)
        outputs = self._op(
            mb.split,
            name,
            x=x,
            split_sizes=self._const(np.array(sizes, dtype=np.int32), "int32"),
            axis=self._const(-2, "int32"),
        )
        return tuple(outputs)

    def _cached_split(self, name: str, x: Var, sizes: tuple[int, ...]) -> tuple[Var, ...]:
        """Split ``x`` into rows once per block; a constant is split into constants."""

        def split() -> tuple[Var, ...]:
            if x.val is None:
                return self._split(name, x, sizes)
            pieces = np.split(x.val, np.cumsum(sizes)[:-1], axis=-2)
            return tuple(self._op(mb.const, f"{name}_{index}", val=piece) for index, piece in enumerate(pieces))

        return self._cached(("split", id(x), sizes), split)

    def _additive_mask(self, mask: Var, dtype: str, base: str) -> Var:
        """The mask as values to add to the scores, in the scores' dtype; folded when constant."""
        mask_dtype = dtype_name(mask)
        if mask_dtype == dtype:
            return mask

        def convert() -> Var:
            if mask.val is not None:
                return self._op(mb.const, f"{base}_mask_additive", val=additive_mask_values(mask.val, dtype))
            if mask_dtype == "bool":
                ones = self._op(mb.cast, f"{base}_mask_as_float", x=mask, dtype=self._const(dtype, "str"))
                kept_as_zero = self._op(mb.sub, f"{base}_mask_minus_one", x=ones, y=self._scalar(1.0, dtype))
                return self._op(mb.mul, f"{base}_mask_additive", x=kept_as_zero, y=self._scalar(-masked_score(dtype), dtype))
            source = mask
            if dtype == "fp16":
                limit = -masked_score("fp16")
                source = self._op(
                    mb.clip,
                    f"{base}_mask_clipped",
                    x=mask,
                    alpha=self._scalar(-limit, mask_dtype),
                    beta=self._scalar(limit, mask_dtype),
                )
            return self._op(mb.cast, f"{base}_mask_cast", x=source, dtype=self._const(dtype, "str"))

        return self._cached(("additive_mask", id(mask), dtype), convert)

    def _scalar(self, value: float, dtype: str) -> Var:
        return self._const(NUMPY_DTYPES[dtype](value), dtype)

    def _const(self, value: Any, kind: str) -> Var:
        key = ("const", kind, _hashable(value))
        return self._cached(key, lambda: self._op(mb.const, f"sdpa_slicer_{kind}_const", val=value))

    def _cached(self, key: Hashable, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
            self._cached_in_transaction.append(key)
        return self._cache[key]

    def _remove_site_ops(self, site: AttentionSite) -> None:
        """Remove the site's ops and the constants only they used."""
        site_ops = set(site.ops)
        inputs = {var for op in site.ops for var in op.get_flattened_inputs()}
        self._block.remove_ops(list(site.ops))
        dead_consts = [
            var.op
            for var in inputs
            if var.op is not None
            and var.op not in site_ops
            and var.op.op_type == "const"
            and var.op.enclosing_block is self._block
            and not var.child_ops
            and not var.consuming_blocks
        ]
        if dead_consts:
            self._block.remove_ops(dead_consts)

    def _roll_back(self, anchor: Operation, boundary: Optional[Operation]) -> None:
        emitted = list(_ops_between(self._block, boundary, anchor))
        for key in self._cached_in_transaction:
            self._cache.pop(key, None)
        if emitted:
            self._block.remove_ops(emitted)


def _hashable(value: Any) -> Hashable:
    if isinstance(value, np.ndarray):
        return (value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, np.generic):
        return (value.dtype.str, value.item())
    return (type(value).__name__, value)


def _check_removable(site: AttentionSite) -> None:
    """Every intermediate of the site must be used only inside it, so removing it cannot fail."""
    site_ops = set(site.ops)
    for op in site.ops[:-1]:
        for var in op.outputs:
            if var.consuming_blocks or any(child not in site_ops for child in var.child_ops):
                raise EmitError(f"intermediate '{var.name}' is used outside the attention site")


def _check_replaceable(old: Var, new: Var) -> None:
    if old.dtype != new.dtype or tuple(old.shape) != tuple(new.shape):
        raise EmitError(
            f"replacement type {types.builtin_to_string(new.dtype)}{tuple(new.shape)} differs from "
            f"{types.builtin_to_string(old.dtype)}{tuple(old.shape)}"
        )
    if not old.can_be_replaced_by_var(new):
        raise EmitError("replacement does not depend on every compressed weight the original used")


def _previous_op(block: Block, op: Operation) -> Optional[Operation]:
    # Emitted ops are inserted right before the anchor, so the op before it now marks
    # where a rollback stops. coremltools keeps block ops in a linked list.
    node = block.operations._get_node_from_op(op).prev
    return None if node is None else node.op


def _ops_between(block: Block, boundary: Optional[Operation], anchor: Operation) -> Iterator[Operation]:
    """Ops after ``boundary`` and before ``anchor``, last first."""
    node = block.operations._get_node_from_op(anchor).prev
    while node is not None and node.op is not boundary:
        yield node.op
        node = node.prev
