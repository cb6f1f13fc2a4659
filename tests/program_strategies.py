"""Whole MIL programs for the fuzzer: a plain, printable description, a builder, inputs and configs.

A ``ProgramSpec`` is a tree of plain values: functions, each a list of steps (attention sites,
ordinary ops, ``cond`` and ``while_loop`` ops holding more steps). hypothesis draws one, and a
failing example prints as Python that rebuilds exactly that program in a regression test.

Every tensor of a function has shape ``batch + (n, E)``: one batch, one head dim E, and ``n``
one of the function's two lengths (``LENGTH_L`` for queries and ``LENGTH_S`` for keys, though
any tensor may feed any role). Steps name their operands by index into the values visible at
that point (a "pool"): the function's inputs, then every value made before, including those
of the enclosing blocks.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import attrs
import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Function, Program, Var, get_new_symbol
from hypothesis import strategies as st

from attention_cases import IOS18, MASKED_FLOAT, MIL_DTYPES, NUMPY_DTYPES
from programs import HOISTABLE, REPEAT_FORMS, DecomposedForm, Modifier, QuantizedPair, ScoreChain, repeat_heads
from sdpa_slicer import SliceConfig
from strategies import MASK_STEPS, decomposed_forms, quantized_pairs, score_chains

LENGTH_L, LENGTH_S = 0, 1
INPUTS = ("q", "k", "v", "x")
GROUPED_INPUTS = ("kg", "vg")
INPUT_LENGTHS = (LENGTH_L, LENGTH_S, LENGTH_S, LENGTH_L)
"""The length each function input has; ``x`` is a second query-length input."""
MAX_SITES = 4
MAX_DEPTH = 3
MAX_STEPS = 4
MAX_NESTED_STEPS = 2
OP_KINDS = ("tanh", "half", "add", "linear", "transpose", "reshape", "mix", "roll")
MASK_KINDS = ("random", "causal", "window")
MASK_DTYPES = ("bool", "fp16", "fp32")
BUILT_FORMS = ("tiled", "reshaped", "decomposed")
"""How a mask of full rows may be built in the graph from its input: ``tiled`` from one row,
``reshaped`` from rows given as ``(a, b)`` with ``a * b = L``, and ``decomposed`` (float only)
as SAM's relative-position bias: ``reshape(add(expand_dims(h, -1), expand_dims(w, -2)))`` of
``h`` and ``w``, ``(..., L, kh)`` and ``(..., L, kw)`` with ``kh * kw = S``, both cut from the
input ``(..., L, kh + kw)``."""
ATTENTION_OUTPUT_OPS = ("scaled_dot_product_attention", "matmul")


@attrs.frozen
class Length:
    """A static length, or a symbolic one (``size`` is then the size fed when evaluating)."""

    size: int
    symbolic: bool = False


@attrs.frozen
class MaskSpec:
    """A mask added to a site's scores: a function input named ``name``, or a constant."""

    name: str
    dtype: str
    shape: tuple[Optional[int], ...]
    """Leading dims (1 or the batch dim), then rows (1 or ``None`` for L), then ``None`` for S."""
    kind: str = "random"
    """Which keys each row sees: ``random``, ``causal`` or ``window`` (one fixed row chunk)."""
    constant: bool = False
    seed: int = 0
    pair: Optional[QuantizedPair] = None
    """A float input mask quantized (``quantize -> dequantize``) before each site reads it."""
    built: Optional[str] = None
    """A form of ``BUILT_FORMS``: the mask of full rows is built by each site that reads it, in
    the site's block, from an input of another shape (static lengths only)."""


@attrs.frozen
class Site:
    """Attention of ``pool[query]`` over ``pool[key]`` and ``pool[value]``; ``form`` None is the fused op."""

    name: str
    query: int
    key: int
    value: int
    form: Optional[DecomposedForm] = None
    scale: float = 0.5
    mask: Optional[MaskSpec] = None
    hoisted: tuple[str, ...] = ()
    """Pieces (``HOISTABLE``) computed in the enclosing block, when the site is nested and the
    operands they need come from there: a key transpose hoisted out of a loop, say."""
    chain: ScoreChain = ScoreChain()
    """Score modifiers of a written-out site with L-long queries over S-long keys; their run-time
    operands are function inputs named ``<site>_m<index>``."""
    repeat: Optional[str] = None
    """A form of ``REPEAT_FORMS``: the site's keys and values are the function's ``kg`` and ``vg``
    repeated in that form (grouped-query attention), not ``pool[key]`` and ``pool[value]``."""


@attrs.frozen
class Op:
    """An ordinary op on ``pool[source]`` (and ``pool[other]`` of the same length) keeping its shape."""

    kind: str
    source: int
    other: int = 0


@attrs.frozen
class Cond:
    """``cond`` on the sign of the sum of ``q``; each branch runs its steps and returns a value of
    ``pool[source]``'s type: the last such value it made, or ``pool[source]`` passed through."""

    source: int
    true_steps: tuple[Any, ...]
    false_steps: tuple[Any, ...]


@attrs.frozen
class Loop:
    """``while_loop`` over ``pool[source]`` (plus a counter) for ``iterations`` turns; inside the
    body the loop variable is the last pool entry."""

    source: int
    iterations: int
    body: tuple[Any, ...]


Step = Union[Site, Op, Cond, Loop]


@attrs.frozen
class FunctionSpec:
    name: str
    dtype: str
    batch: tuple[int, ...]
    lengths: tuple[Length, Length]
    head_dim: int
    steps: tuple[Step, ...]
    outputs: tuple[int, ...]
    """Indices into the function's top-level pool."""
    symbolic_batch: bool = False
    """The first batch dim is symbolic (``batch[0]`` is the size fed when evaluating)."""
    kv_heads: int = 0
    """With 1 or more: inputs ``kg`` and ``vg`` of that many heads (the last batch dim), S long,
    which sites with a ``repeat`` read repeated to the function's heads."""


@attrs.frozen
class ProgramSpec:
    functions: tuple[FunctionSpec, ...]
    seed: int = 0
    """Seeds the weights and the evaluation inputs."""


def sites_of(steps: Sequence[Step]) -> list[Site]:
    """Every site among ``steps`` and the blocks nested in them, in program order."""
    found: list[Site] = []
    for step in steps:
        if isinstance(step, Site):
            found.append(step)
        elif isinstance(step, Cond):
            found += sites_of(step.true_steps) + sites_of(step.false_steps)
        elif isinstance(step, Loop):
            found += sites_of(step.body)
    return found


def modifier_operands_of(function: FunctionSpec) -> dict[str, Modifier]:
    """The modifiers of ``function`` whose operand is a function input, by the input's name."""
    return {
        f"{site.name}_m{index}": site.chain.modifiers[index]
        for site in sites_of(function.steps)
        for index in site.chain.runtime_operands()
    }


def masks_of(function: FunctionSpec) -> dict[str, MaskSpec]:
    """The input masks of ``function`` by name (a mask may be shared by several sites)."""
    return {
        site.mask.name: site.mask
        for site in sites_of(function.steps)
        if site.mask is not None and not site.mask.constant
    }


# --- building ------------------------------------------------------------------------------------


class _FunctionBuilder:
    """Builds one function of a spec inside ``mb.function``; keeps pool lengths and mask vars."""

    def __init__(self, spec: FunctionSpec, seed: int) -> None:
        self.spec = spec
        self.rng = np.random.default_rng(seed)
        self.dims = tuple(get_new_symbol() if length.symbolic else length.size for length in spec.lengths)
        self.batch = tuple(
            get_new_symbol() if spec.symbolic_batch and index == 0 else dim for index, dim in enumerate(spec.batch)
        )
        self.masks: dict[str, Var] = {}
        self.operands: dict[str, Var] = {}
        self.grouped: dict[str, Var] = {}
        self.hoisted: dict[str, dict[str, Var]] = {}
        self.dtype = NUMPY_DTYPES[spec.dtype]

    def input_specs(self) -> dict[str, Any]:
        dtype = MIL_DTYPES[self.spec.dtype]
        specs = {name: mb.placeholder(self._shape(length), dtype=dtype) for name, length in zip(INPUTS, INPUT_LENGTHS)}
        for name, mask in masks_of(self.spec).items():
            shape = _built_input_shape(mask, self._mask_shape(mask))
            specs[name] = mb.placeholder(shape, dtype=MIL_DTYPES[_input_dtype(mask)])
        for name, modifier in modifier_operands_of(self.spec).items():
            specs[name] = mb.placeholder(modifier.operand_shape(self._scores_shape()), dtype=dtype)
        if self.spec.kv_heads:
            for name in GROUPED_INPUTS:
                specs[name] = mb.placeholder(_grouped_shape(self.spec, self.dims[LENGTH_S]), dtype=dtype)
        return specs

    def _scores_shape(self) -> tuple:
        return self.batch + self.dims

    def function(self) -> Function:
        with Function(self.input_specs(), IOS18) as function:
            function.set_outputs(list(self.build(*function.inputs.values())))
        return function

    def _shape(self, length: int) -> tuple:
        return self.batch + (self.dims[length], self.spec.head_dim)

    def _mask_shape(self, mask: MaskSpec) -> tuple:
        shape = _mask_dims(mask, self.dims)
        leading = len(shape) - 2
        batch = self.batch[len(self.batch) - leading :] if leading > 0 else ()
        return tuple(dim if size != 1 else 1 for dim, size in zip(batch, shape[:leading])) + shape[leading:]

    def build(self, *inputs: Var) -> tuple[Var, ...]:
        names = list(masks_of(self.spec))
        self.masks = dict(zip(names, inputs[len(INPUTS) :]))
        self.operands = dict(zip(modifier_operands_of(self.spec), inputs[len(INPUTS) + len(names) :]))
        self.grouped = (
            dict(zip(GROUPED_INPUTS, inputs[len(inputs) - len(GROUPED_INPUTS) :])) if self.spec.kv_heads else {}
        )
        for name, mask in masks_of(self.spec).items():
            # A Core ML program cannot take a bool input: bool masks come in as fp32 0/1.
            if mask.dtype == "bool":
                self.masks[name] = mb.cast(x=self.masks[name], dtype="bool", name=f"{name}_bool")
        pool = [(var, length) for var, length in zip(inputs[: len(INPUTS)], INPUT_LENGTHS)]
        pool = self._steps(self.spec.steps, pool, "")
        return tuple(pool[index][0] for index in self.spec.outputs)

    def _steps(self, steps: Sequence[Step], pool: list, prefix: str) -> list:
        pool = list(pool)
        for index, step in enumerate(steps):
            name = f"{prefix}s{index}"
            pool.append(self._step(step, pool, name))
        return pool

    def _step(self, step: Step, pool: list, name: str) -> tuple[Var, int]:
        if isinstance(step, Site):
            return self._site(step, pool), pool[step.query][1]
        if isinstance(step, Op):
            return self._op(step, pool, name), pool[step.source][1]
        if isinstance(step, Cond):
            return self._cond(step, pool, name), pool[step.source][1]
        return self._loop(step, pool, name), pool[step.source][1]

    def _site(self, site: Site, pool: list) -> Var:
        query, key, value = (pool[index][0] for index in (site.query, site.key, site.value))
        if site.repeat is not None:
            repeats = self.spec.batch[-1] // self.spec.kv_heads
            key, value = (
                repeat_heads(self.grouped[name], site.repeat, repeats, f"{site.name}_{name}") for name in GROUPED_INPUTS
            )
        hoisted = dict(self.hoisted.get(site.name, {}))
        mask = hoisted.pop("mask", None)
        if mask is None and site.mask is not None:
            mask = self._mask(site, site.mask)
        if site.form is not None:
            operands = {index: self.operands[f"{site.name}_m{index}"] for index in site.chain.runtime_operands()}
            return site.form.attend(query, key, value, mask, site.scale, site.name, hoisted, site.chain, operands)
        if mask is None:
            return mb.scaled_dot_product_attention(query=query, key=key, value=value, name=site.name)
        return mb.scaled_dot_product_attention(query=query, key=key, value=value, attn_mask=mask, name=site.name)

    def _mask(self, site: Site, mask: MaskSpec) -> Var:
        if not mask.constant:
            var = self.masks[mask.name]
            if mask.built is not None:
                var = _built_mask(var, mask, self._mask_shape(mask), f"{site.name}_{mask.name}_{mask.built}")
            return var if mask.pair is None else mask.pair.apply(var, f"{site.name}_{mask.name}_quantized")
        lengths = tuple(length.size for length in self.spec.lengths)
        return mb.const(val=mask_values(mask, lengths, mask.seed), name=f"{site.name}_{mask.name}")

    def _op(self, op: Op, pool: list, name: str) -> Var:
        x, length = pool[op.source]
        other = pool[op.other][0]
        kind = op.kind
        head_dim = self.spec.head_dim
        static = not self.spec.lengths[length].symbolic and not self.spec.symbolic_batch
        if kind == "half":
            return mb.mul(x=x, y=self.dtype(0.5), name=name)
        if kind == "add":
            return mb.add(x=x, y=other, name=name)
        if kind == "linear":
            weight = self.rng.standard_normal((head_dim, head_dim)) / math.sqrt(head_dim)
            bias = self.rng.standard_normal(head_dim) * 0.1
            return mb.linear(x=x, weight=weight.astype(self.dtype), bias=bias.astype(self.dtype), name=name)
        if kind == "transpose":
            perm = [*range(x.rank - 2), x.rank - 1, x.rank - 2]
            return mb.transpose(x=mb.transpose(x=x, perm=perm, name=f"{name}_t"), perm=perm, name=name)
        if kind == "reshape" and static:
            flat = mb.reshape(x=x, shape=(-1, head_dim), name=f"{name}_flat")
            return mb.reshape(x=flat, shape=tuple(x.shape), name=name)
        if kind == "mix":
            both = mb.concat(values=(x, other), axis=-1, name=f"{name}_both")
            begin = [0] * x.rank
            begin[-1] = 1
            end = [0] * x.rank
            end[-1] = head_dim + 1
            end_mask = [True] * (x.rank - 1) + [False]
            return mb.slice_by_index(x=both, begin=begin, end=end, end_mask=end_mask, name=name)
        if kind == "roll" and static and x.shape[-2] > 1:
            first, rest = mb.split(x=x, split_sizes=[1, x.shape[-2] - 1], axis=-2, name=f"{name}_rows")
            return mb.concat(values=(rest, first), axis=-2, name=name)
        return mb.tanh(x=x, name=name)

    def _hoist(self, steps: Sequence[Step], pool: list) -> None:
        """Build here, in the block that encloses ``steps``, the pieces their sites want hoisted,
        where the operands a piece needs are in ``pool`` (values visible here)."""
        for site in steps:
            if not isinstance(site, Site) or not site.hoisted:
                continue
            # The repeated keys of a grouped site are made inside the site's block.
            outer_key = site.key < len(pool) and site.repeat is None
            pieces = [
                piece
                for piece in site.hoisted
                if (piece != "query_scale" or site.query < len(pool)) and (piece != "key_transpose" or outer_key)
            ]
            made: dict[str, Var] = {}
            if site.form is not None:
                # An operand made inside the block is never hoisted: then only its dtype is read.
                query, key = (pool[index][0] if index < len(pool) else pool[0][0] for index in (site.query, site.key))
                made = site.form.hoist(query, key, site.scale, site.name, pieces)
            if "mask" in pieces and site.mask is not None and site.mask.constant:
                made["mask"] = self._mask(site, site.mask)
            self.hoisted[site.name] = made

    def _cond(self, cond: Cond, pool: list, name: str) -> Var:
        q = pool[0][0]
        pred = mb.greater(x=mb.reduce_sum(x=q, name=f"{name}_sum"), y=self.dtype(0), name=f"{name}_pred")
        source, length = pool[cond.source]
        self._hoist(cond.true_steps + cond.false_steps, pool)

        def branch(steps: Sequence[Step], tag: str):
            def build() -> Var:
                made = self._steps(steps, pool, f"{name}{tag}")[len(pool) :]
                return _last_of_length(made, length, source, f"{name}{tag}_out")

            return build

        return mb.cond(
            pred=pred, _true_fn=branch(cond.true_steps, "t"), _false_fn=branch(cond.false_steps, "f"), name=name
        )

    def _loop(self, loop: Loop, pool: list, name: str) -> Var:
        source, length = pool[loop.source]
        self._hoist(loop.body, pool)

        def body(x: Var, counter: Var):
            inner = pool + [(x, length)]
            made = self._steps(loop.body, inner, f"{name}b")[len(inner) :]
            result = _last_of_length(made, length, x, f"{name}b_out")
            if result.op.op_type not in ATTENTION_OUTPUT_OPS:
                # coremltools refuses a loop body returning concat, split or slice results; a site
                # output is returned as it is, so the rewrite must handle it as a block output.
                result = mb.tanh(x=result, name=f"{name}b_result")
            return result, mb.add(x=counter, y=1, name=f"{name}_next")

        result, _ = mb.while_loop(
            _cond=lambda x, counter: mb.less(x=counter, y=loop.iterations, name=f"{name}_more"),
            _body=body,
            loop_vars=(source, 0),
            name=name,
        )
        return result


def _last_of_length(made: list, length: int, fallback: Var, name: str) -> Var:
    """The last value of ``length`` among ``made``; else ``fallback`` through an identity, since a
    block cannot return a value of its enclosing block untouched in every case coremltools takes."""
    for var, var_length in reversed(made):
        if var_length == length:
            return var
    return mb.identity(x=fallback, name=name)


def _factor(size: int) -> int:
    """The smallest factor of ``size`` above 1 (``size`` itself when prime; 1 for 1)."""
    return next((factor for factor in range(2, size + 1) if size % factor == 0), 1)


def _built_input_shape(mask: MaskSpec, shape: tuple) -> tuple:
    """The shape of the input a ``built`` mask of ``shape`` is built from."""
    if mask.built is None:
        return shape
    *leading, rows, columns = shape
    if mask.built == "tiled":
        return (*leading, 1, columns)
    if mask.built == "reshaped":
        return (*leading, _factor(rows), rows // _factor(rows), columns)
    return (*leading, rows, _factor(columns) + columns // _factor(columns))


def _built_mask(source: Var, mask: MaskSpec, shape: tuple, name: str) -> Var:
    """The mask of ``shape`` built from its input ``source`` (see ``BUILT_FORMS``), where a site reads it."""
    rank = len(shape)
    if mask.built == "tiled":
        return mb.tile(x=source, reps=[1] * (rank - 2) + [shape[-2], 1], name=name)
    if mask.built == "reshaped":
        return mb.reshape(x=source, shape=list(shape), name=name)
    high = _factor(shape[-1])
    size = [-1] * rank
    size[-1] = high
    h = mb.slice_by_size(x=source, begin=[0] * rank, size=size, name=f"{name}_h")
    size[-1] = shape[-1] // high
    w = mb.slice_by_size(x=source, begin=[0] * (rank - 1) + [high], size=size, name=f"{name}_w")
    both = mb.add(x=mb.expand_dims(x=h, axes=[-1]), y=mb.expand_dims(x=w, axes=[-2]), name=f"{name}_sum")
    return mb.reshape(x=both, shape=list(shape), name=name)


def built_mask_input(mask: MaskSpec, values: np.ndarray, seed: int) -> np.ndarray:
    """The input a ``built`` mask is built from, for the mask's ``values``: its first row, tiled;
    its rows as ``(a, b)``; or soft values in [-1, 0] for both halves of a decomposed bias."""
    if mask.built == "tiled":
        return values[..., :1, :]
    shape = _built_input_shape(mask, values.shape)
    if mask.built == "reshaped":
        return values.reshape(shape)
    return np.random.default_rng(seed).uniform(-1.0, 0.0, shape).astype(values.dtype)


def _input_dtype(mask: MaskSpec) -> str:
    return "fp32" if mask.dtype == "bool" else mask.dtype


def build_program(spec: ProgramSpec) -> Program:
    """The MIL program ``spec`` describes, all functions in the iOS18 opset."""
    prog = Program()
    for index, function in enumerate(spec.functions):
        prog.add_function(function.name, _FunctionBuilder(function, spec.seed + index).function())
    return prog


def _mask_dims(mask: MaskSpec, lengths: tuple) -> tuple:
    """``mask.shape`` with ``None`` rows and columns replaced by the query and key ``lengths``."""
    query_length, key_length = lengths
    if len(mask.shape) == 1:
        return (key_length,)
    *leading, rows, _ = mask.shape
    return tuple(leading) + ((query_length if rows is None else rows), key_length)


# --- values --------------------------------------------------------------------------------------


def mask_values(mask: MaskSpec, lengths: tuple[int, int], seed: int) -> np.ndarray:
    """Values of ``mask`` for the given L and S; every row keeps at least one key, since a row
    with none is undefined (NaN or rounding noise) before the rewrite."""
    query_length, key_length = lengths
    shape = _mask_dims(mask, lengths)
    full = shape if len(shape) >= 2 else (1,) + shape
    row, column = np.indices(full[-2:])
    offset = key_length - query_length
    rng = np.random.default_rng(seed)
    if mask.kind == "causal":
        visible = np.broadcast_to(column <= row + offset, full)
    elif mask.kind == "window":
        visible = np.broadcast_to((column <= row + offset) & (column > row + offset - 3), full)
    else:
        visible = rng.random(full) < 0.7
    visible = visible.copy()
    visible[..., 0] |= ~visible.any(axis=-1)
    visible = visible.reshape(shape)
    if mask.dtype == "bool":
        return visible
    soft = rng.uniform(-2.0, 0.0, shape)
    return np.where(visible, soft, MASKED_FLOAT).astype(NUMPY_DTYPES[mask.dtype])


def program_inputs(spec: ProgramSpec, function: FunctionSpec) -> dict[str, np.ndarray]:
    """Inputs for one function: normal q, k, v, x and masks built by ``mask_values``."""
    rng = np.random.default_rng(spec.seed)
    sizes = tuple(length.size for length in function.lengths)
    dtype = NUMPY_DTYPES[function.dtype]
    values = {
        name: rng.standard_normal(function.batch + (sizes[length], function.head_dim)).astype(dtype)
        for name, length in zip(INPUTS, INPUT_LENGTHS)
    }
    for name, mask in masks_of(function).items():
        full = mask_values(mask, sizes, mask.seed).astype(NUMPY_DTYPES[_input_dtype(mask)])
        values[name] = full if mask.built is None else built_mask_input(mask, full, mask.seed)
    for name, modifier in modifier_operands_of(function).items():
        values[name] = modifier.operand_values(modifier.operand_shape(function.batch + sizes), dtype)
    if function.kv_heads:
        for name in GROUPED_INPUTS:
            values[name] = rng.standard_normal(_grouped_shape(function, sizes[LENGTH_S])).astype(dtype)
    return values


def _grouped_shape(function: FunctionSpec, key_length: Any) -> tuple:
    return (*function.batch[:-1], function.kv_heads, key_length, function.head_dim)


def folds(site: Site, config: SliceConfig) -> bool:
    """Whether ``slice_attention`` reads the site's keys and values un-repeated: a quantize ->
    dequantize pair on them (``inputs_pair``, after the repeat) hides the repeat from the fold."""
    return site.repeat is not None and config.fold_repeated_kv and site.chain.inputs_pair is None


def expected_rewrite(site: Site, function: FunctionSpec, config: SliceConfig) -> Optional[bool]:
    """Whether ``slice_attention`` must rewrite ``site``; ``None`` when it must not find it at all."""
    if site.form is not None and not config.match_decomposed:
        return None
    length = function.lengths[_query_length_of(site, function)]
    folded = folds(site, config)
    return not length.symbolic and (length.size >= config.min_seq_length or folded)


def may_be_left_as_one_chunk(site: Site, function: FunctionSpec, config: SliceConfig) -> bool:
    """Whether ``site`` could be planned as one chunk over every key, which ``slice_attention``
    leaves as it is when it is written out, or fused with ``decompose_unchunked`` off (unless its
    keys and values are folded): only when no option asks for more than one query chunk or key
    chunk, and its scores could fit the budget or cannot be cut any further."""
    if (site.form is None and config.decompose_unchunked) or folds(site, config):
        return False
    query, key = (function.lengths[index] for index in _site_lengths(function)[site.name])
    if config.num_chunks is not None and config.num_chunks > 1 and query.size > 1:
        return False
    if config.chunk_size is not None and config.chunk_size < query.size:
        return False
    # Quantized weights are never walked in key chunks.
    quantized_weights = site.form is not None and site.chain.weights_pair is not None
    if config.kv_chunk_size is not None and not key.symbolic and config.kv_chunk_size < key.size:
        if not quantized_weights:
            return False
    if config.num_chunks is None and config.chunk_size is None and not (query.symbolic or key.symbolic):
        column_bytes = math.prod(function.batch) * query.size * (2 if function.dtype == "fp16" else 4)
        if function.symbolic_batch or column_bytes * key.size <= config.max_scores_bytes:
            return True
        # Too big for the budget: one chunk only if no fewer query rows are allowed and key
        # chunks (at least one key each) cannot cut the keys either.
        if config.kv_chunk_size is not None or quantized_weights:
            return query.size == 1
        return query.size <= config.min_query_chunk and max(1, config.max_scores_bytes // column_bytes) >= key.size
    return True


def _query_length_of(site: Site, function: FunctionSpec) -> int:
    return _site_lengths(function)[site.name][0]


def _site_lengths(function: FunctionSpec) -> dict[str, tuple[int, int]]:
    """Each site's (query length, key length) classes, found by replaying the pool."""
    found: dict[str, tuple[int, int]] = {}

    def replay(steps: Sequence[Step], pool: list[int]) -> list[int]:
        pool = list(pool)
        for step in steps:
            if isinstance(step, Site):
                found[step.name] = (pool[step.query], pool[step.key])
                pool.append(pool[step.query])
            elif isinstance(step, Op):
                pool.append(pool[step.source])
            elif isinstance(step, Cond):
                replay(step.true_steps, pool)
                replay(step.false_steps, pool)
                pool.append(pool[step.source])
            else:
                replay(step.body, pool + [pool[step.source]])
                pool.append(pool[step.source])
        return pool

    replay(function.steps, list(INPUT_LENGTHS))
    return found


# --- strategies ----------------------------------------------------------------------------------


@attrs.define
class _Drawing:
    """What drawing one function has used up so far."""

    draw: st.DrawFn
    function: str
    dtype: str
    batch: tuple[int, ...]
    lengths: tuple[Length, Length]
    sites_left: int
    symbolic_batch: bool = False
    site_prefix: str = ""
    """Sites of different functions may have the same names, as functions are separate name spaces."""
    masks: list[MaskSpec] = attrs.Factory(list)
    site_count: int = 0
    kv_heads: int = 0


@st.composite
def lengths(draw: st.DrawFn, max_length: int) -> Length:
    return Length(size=draw(st.integers(1, max_length)), symbolic=draw(st.integers(0, 4)) == 0)


@st.composite
def function_specs(draw: st.DrawFn, name: str, max_length: int = 16) -> FunctionSpec:
    drawing = _Drawing(
        draw=draw,
        function=name,
        dtype=draw(st.sampled_from(("fp16", "fp32"))),
        batch=tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2))),
        lengths=(draw(lengths(max_length)), draw(lengths(max_length))),
        sites_left=draw(st.integers(1, MAX_SITES)),
        site_prefix=draw(st.sampled_from(("", f"{name}_"))),
        symbolic_batch=draw(st.integers(0, 4)) == 0,
    )
    heads = drawing.batch[-1]
    static = not drawing.symbolic_batch and not any(length.symbolic for length in drawing.lengths)
    if static and len(drawing.batch) == 2 and heads > 1 and draw(st.booleans()):
        drawing.kv_heads = draw(st.sampled_from([count for count in range(1, heads) if heads % count == 0]))
    pool = list(INPUT_LENGTHS)
    steps = _draw_steps(drawing, pool, depth=0)
    if drawing.site_count == 0:
        steps.append(_draw_site(drawing, pool + _lengths_made(steps, pool)))
    made = _lengths_made(steps, pool)
    top = len(INPUTS) + len(made)
    site_outputs = [len(INPUTS) + index for index, step in enumerate(steps) if isinstance(step, Site)]
    made_indices = list(range(len(INPUTS), top))
    outputs = draw(st.lists(st.sampled_from(made_indices), min_size=1, max_size=3, unique=True))
    if site_outputs and draw(st.booleans()) and site_outputs[0] not in outputs:
        outputs.append(site_outputs[0])
    return FunctionSpec(
        name=name,
        dtype=drawing.dtype,
        batch=drawing.batch,
        lengths=drawing.lengths,
        head_dim=draw(st.integers(1, 8)),
        steps=tuple(steps),
        outputs=tuple(outputs),
        symbolic_batch=drawing.symbolic_batch,
        kv_heads=drawing.kv_heads,
    )


def _lengths_made(steps: Sequence[Step], pool: list[int]) -> list[int]:
    """The lengths of the values ``steps`` add to ``pool``."""
    pool = list(pool)
    start = len(pool)
    for step in steps:
        source = step.query if isinstance(step, Site) else step.source
        pool.append(pool[source])
    return pool[start:]


def _draw_steps(drawing: _Drawing, pool: list[int], depth: int) -> list[Step]:
    draw = drawing.draw
    pool = list(pool)
    steps: list[Step] = []
    # Nested blocks hold fewer steps, so that programs stay small however deep they nest.
    for _ in range(draw(st.integers(1, MAX_STEPS if depth == 0 else MAX_NESTED_STEPS))):
        kinds = (
            ["op", "op"]
            + (["site", "site"] if drawing.sites_left else [])
            + (["cond", "loop"] if depth < MAX_DEPTH else [])
        )
        kind = draw(st.sampled_from(kinds))
        if kind == "site":
            step: Step = _draw_site(drawing, pool)
        elif kind == "op":
            source = draw(st.integers(0, len(pool) - 1))
            same = [index for index, length in enumerate(pool) if length == pool[source]]
            symbolic = drawing.symbolic_batch or any(length.symbolic for length in drawing.lengths)
            # On a symbolic dim, concat then slice makes a new symbol, which sites cannot always
            # follow (known limits, replayed in tests/test_fuzz_programs.py).
            kinds = [kind for kind in OP_KINDS if not (symbolic and kind == "mix")]
            step = Op(kind=draw(st.sampled_from(kinds)), source=source, other=draw(st.sampled_from(same)))
        elif kind == "cond":
            source = draw(st.integers(0, len(pool) - 1))
            step = Cond(
                source=source,
                true_steps=tuple(_draw_steps(drawing, pool, depth + 1)),
                false_steps=tuple(_draw_steps(drawing, pool, depth + 1)),
            )
        else:
            source = draw(st.integers(0, len(pool) - 1))
            body = _draw_steps(drawing, pool + [pool[source]], depth + 1)
            step = Loop(source=source, iterations=draw(st.integers(0, 2)), body=tuple(body))
        steps.append(step)
        pool.append(pool[step.query if isinstance(step, Site) else step.source])
    return steps


def _draw_site(drawing: _Drawing, pool: list[int]) -> Site:
    draw = drawing.draw
    drawing.sites_left = max(0, drawing.sites_left - 1)
    name = f"{drawing.site_prefix}attention{drawing.site_count}"
    drawing.site_count += 1
    if draw(st.booleans()):
        # Queries of length L over keys of length S: the sites that can take a mask.
        query = draw(st.sampled_from([index for index, length in enumerate(pool) if length == LENGTH_L]))
        key = draw(st.sampled_from([index for index, length in enumerate(pool) if length == LENGTH_S]))
    else:
        query = draw(st.integers(0, len(pool) - 1))
        key = draw(st.integers(0, len(pool) - 1))
    same = [index for index, length in enumerate(pool) if length == pool[key]]
    value = draw(st.sampled_from(same))
    repeat = draw(st.none() | st.sampled_from(REPEAT_FORMS)) if drawing.kv_heads else None
    if repeat is not None:
        key = value = INPUTS.index("k")  # S long, as the repeated kg and vg are
    form = draw(st.none() | decomposed_forms())
    mask = None
    chain = ScoreChain()
    # A mask's rows are L and columns S: only sites with that query and key length can take one.
    if (pool[query], pool[key]) == (LENGTH_L, LENGTH_S):
        if draw(st.booleans()):
            mask = _draw_mask(drawing, decomposed=form is not None)
        if form is not None:
            static = not any(length.symbolic for length in drawing.lengths) and not drawing.symbolic_batch
            chain = draw(score_chains(len(drawing.batch) + 2, max_modifiers=2, constant=static))
    return Site(
        name=name,
        query=query,
        key=key,
        value=value,
        form=form,
        scale=draw(st.sampled_from((0.125, 0.3, 1.0))),
        mask=mask,
        hoisted=tuple(draw(st.lists(st.sampled_from(HOISTABLE), unique=True))),
        chain=chain,
        repeat=repeat,
    )


def _draw_mask(drawing: _Drawing, decomposed: bool) -> MaskSpec:
    """A new input mask, one shared with an earlier site, or a constant."""
    draw = drawing.draw
    usable = [mask for mask in drawing.masks if not decomposed or mask.dtype == drawing.dtype]
    if usable and draw(st.booleans()):
        return draw(st.sampled_from(usable))
    dtype = drawing.dtype if decomposed else draw(st.sampled_from(MASK_DTYPES))
    scores_rank = len(drawing.batch) + 2
    rank = draw(st.integers(1, scores_rank))
    leading = (
        tuple(draw(st.sampled_from(sorted({1, dim}))) for dim in drawing.batch)[len(drawing.batch) - (rank - 2) :]
        if rank > 2
        else ()
    )
    rows = draw(st.sampled_from((1, None))) if rank >= 2 else None
    shape = leading + ((rows,) if rank >= 2 else ()) + (None,)
    static = not any(length.symbolic for length in drawing.lengths) and not drawing.symbolic_batch
    constant = static and draw(st.booleans())
    quantizable = not constant and dtype != "bool" and draw(st.integers(0, 3)) == 0
    forms = [form for form in BUILT_FORMS if form != "decomposed" or dtype != "bool"]
    buildable = static and not constant and rank >= 2 and rows is None
    mask = MaskSpec(
        name=f"mask{len(drawing.masks)}",
        dtype=dtype,
        shape=shape if rank >= 2 else (None,),
        kind=draw(st.sampled_from(MASK_KINDS)),
        constant=constant,
        seed=draw(st.integers(0, 2**16)),
        pair=draw(quantized_pairs(len(shape), MASK_STEPS, per_axis=static)) if quantizable else None,
        built=draw(st.none() | st.sampled_from(forms)) if buildable else None,
    )
    if not constant:
        drawing.masks.append(mask)
    return mask


@st.composite
def program_specs(draw: st.DrawFn, max_functions: int = 3) -> ProgramSpec:
    count = draw(st.integers(1, max_functions))
    names = ["main", "second", "third"][:count]
    return ProgramSpec(functions=tuple(draw(function_specs(name)) for name in names), seed=draw(st.integers(0, 2**16)))


@st.composite
def program_configs(draw: st.DrawFn, spec: ProgramSpec) -> SliceConfig:
    """Any chunking policy, key chunking and pruning, and a min_seq_length that may skip some sites."""
    longest = max(length.size for function in spec.functions for length in function.lengths)
    options: dict[str, Any] = {
        "fold_repeated_kv": draw(st.integers(0, 9)) > 0,
        "min_seq_length": draw(st.sampled_from((1, 1, 1, 2, 8, longest, longest + 1))),
        "kv_chunk_size": draw(st.none() | st.integers(1, longest + 2)),
        "prune_masked_keys": draw(st.booleans()),
        "match_decomposed": draw(st.integers(0, 9)) > 0,
        "decompose_unchunked": draw(st.integers(0, 4)) > 0,
    }
    policy = draw(st.sampled_from(("chunk_size", "num_chunks", "max_scores_bytes", "default")))
    if policy == "chunk_size":
        options["chunk_size"] = draw(st.integers(1, longest + 2))
    elif policy == "num_chunks":
        options["num_chunks"] = draw(st.integers(1, longest + 2))
    elif policy == "max_scores_bytes":
        options["max_scores_bytes"] = draw(st.integers(1, 4 * 9 * longest * longest))
        options["min_query_chunk"] = draw(st.integers(1, 16))
    return SliceConfig(**options)
