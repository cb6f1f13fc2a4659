"""Programs with attention in interesting places: nested blocks, several functions, chains."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping, Optional, Sequence

import attrs
import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Function, Program, Var, types

from attention_cases import IOS18, MIL_DTYPES, NUMPY_DTYPES, AttentionCase
from generation import causal_mask
from sdpa_slicer._tools.examples import near_miss_program, projected_attention_program  # noqa: F401 (shared with tests)

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
            inner = mb.cond(
                pred=pred, _true_fn=lambda: deeper(x), _false_fn=lambda: mb.identity(x=x), name="outer_branch"
            )
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


QUANTIZED = "quantized"
"""A modifier that is a ``quantize -> dequantize`` pair (``Modifier.pair``)."""
UNARY_MODIFIERS = ("tanh", "sigmoid", "clip", "abs", QUANTIZED)
BINARY_MODIFIERS = ("add", "sub", "mul", "real_div", "maximum", "minimum")
MODIFIER_OPS = (*UNARY_MODIFIERS, *BINARY_MODIFIERS, "select")
SELECT_FILL = -1e4
"""What a ``select`` modifier puts where its condition says so: masked, and finite in fp16."""
LEVEL_DTYPES = {"int8": np.int8, "uint8": np.uint8}


@attrs.frozen
class QuantizedPair:
    """``dequantize(quantize(x))``, as activation quantization (W8A8) writes it: levels of
    ``step`` (a scalar scale, or a vector along ``axis`` of ``x`` of steps within a factor of 2
    of it), optionally a zero point (``offset``, from the middle of the uint8 range for uint8)."""

    step: float = 1 / 32
    axis: Optional[int] = None
    """The axis (negative) of ``x`` its parameters run along; ``None``: per tensor."""
    levels: str = "int8"
    offset: Optional[int] = None
    seed: int = 0

    def parameters(self, x: Var) -> dict[str, Any]:
        """``scale``, ``zero_point`` and ``axis`` for ``x`` (its dims along ``axis`` static)."""
        dtype = NUMPY_DTYPES[types.builtin_to_string(x.dtype)]
        size = () if self.axis is None else (int(x.shape[self.axis]),)
        steps = self.step * np.random.default_rng(self.seed).uniform(0.5, 2.0, size) if size else self.step
        parameters: dict[str, Any] = {"scale": np.asarray(steps, dtype)}
        if self.offset is not None:
            middle = 128 if self.levels == "uint8" else 0
            parameters["zero_point"] = np.full(size, middle + self.offset, LEVEL_DTYPES[self.levels])
        if self.axis is not None:
            parameters["axis"] = np.int32(self.axis)
        return parameters

    def apply(self, x: Var, name: str) -> Var:
        parameters = self.parameters(x)
        levels = mb.quantize(input=x, output_dtype=self.levels, name=f"{name}_quantized", **parameters)
        return mb.dequantize(input=levels, name=name, **parameters)


@attrs.frozen
class Modifier:
    """An elementwise op on the scores between their scale and the softmax (a score modifier)."""

    op: str
    """One of ``MODIFIER_OPS``."""
    shape: tuple[Optional[int], ...] = ()
    """The operand's shape, aligned right against the scores: ``None`` for a full axis, 1 for a
    broadcast one; ``()`` for a scalar or no operand."""
    constant: bool = True
    """The operand is a constant; else a function input (for ``select``, its condition is then
    computed as ``input > 0``)."""
    scores_first: bool = True
    """The scores are ``x`` (``a`` for ``select``), the operand ``y`` (``b``)."""
    seed: int = 0
    pair: QuantizedPair = QuantizedPair()
    """The parameters of a ``quantized`` modifier."""

    @property
    def takes_operand(self) -> bool:
        return self.op not in UNARY_MODIFIERS

    def operand_shape(self, scores_shape: Sequence[Any]) -> tuple[Any, ...]:
        """The operand's shape against scores of ``scores_shape`` (symbolic dims stay symbols)."""
        dims = tuple(scores_shape)[len(scores_shape) - len(self.shape) :]
        return tuple(dim if pattern is None else 1 for pattern, dim in zip(self.shape, dims))

    def operand_values(self, shape: tuple[int, ...], dtype: type) -> np.ndarray:
        """Values of the operand (of a function input holding it, for a run-time one). Multipliers
        never enlarge the scores (``mul`` by 0.5 to 1, ``real_div`` by 1 to 2): amplified, the
        rounding of fp16 scores becomes the difference between two roundings of one program."""
        rng = np.random.default_rng(self.seed)
        if self.op == "select":
            keeps = rng.random(shape) < 0.75
            return keeps if self.constant else np.where(keeps, 1.0, -1.0).astype(dtype)
        if self.op == "mul":
            return rng.uniform(0.5, 1.0, shape).astype(dtype)
        if self.op == "real_div":
            return rng.uniform(1.0, 2.0, shape).astype(dtype)
        return rng.uniform(-2.0, 2.0, shape).astype(dtype)

    def apply(self, scores: Var, operand: Optional[Var], name: str) -> Var:
        """``scores`` through this op; ``operand`` is the run-time input when not ``constant``."""
        dtype = NUMPY_DTYPES[types.builtin_to_string(scores.dtype)]
        if self.op == QUANTIZED:
            return self.pair.apply(scores, name)
        if self.op == "clip":
            return mb.clip(x=scores, alpha=dtype(-3.0), beta=dtype(3.0), name=name)
        if not self.takes_operand:
            return getattr(mb, self.op)(x=scores, name=name)
        if operand is None:
            static = tuple(int(dim) for dim in self.operand_shape(scores.shape))
            operand = mb.const(val=self.operand_values(static, dtype), name=f"{name}_operand")
        if self.op == "select":
            condition = operand if self.constant else mb.greater(x=operand, y=dtype(0.0), name=f"{name}_condition")
            fill = dtype(SELECT_FILL)
            a, b = (scores, fill) if self.scores_first else (fill, scores)
            return mb.select(cond=condition, a=a, b=b, name=name)
        x, y = (scores, operand) if self.scores_first else (operand, scores)
        return getattr(mb, self.op)(x=x, y=y, name=name)


@attrs.frozen
class ScoreChain:
    """The score modifiers of a written-out site, and where among them the mask is added."""

    modifiers: tuple[Modifier, ...] = ()
    mask_at: int = 0
    """The mask is added before ``modifiers[mask_at]`` (after all of them when that is past the end)."""
    mask_pair: Optional[QuantizedPair] = None
    """Quantizes the mask before it is added (a float mask's, as W8A8 quantizes both inputs of an add)."""
    weights_pair: Optional[QuantizedPair] = None
    """Quantizes the softmax's result before the value matmul."""
    inputs_pair: Optional[QuantizedPair] = None
    """Quantizes q, k and v before the scores (per tensor: its ``axis`` is ignored)."""

    @property
    def weight_ops(self) -> tuple[str, ...]:
        return () if self.weights_pair is None else ("quantize", "dequantize")

    def runtime_operands(self) -> list[int]:
        """Indices of the modifiers whose operand is a function input."""
        return [
            index for index, modifier in enumerate(self.modifiers) if modifier.takes_operand and not modifier.constant
        ]


HOISTABLE = ("query_scale", "key_transpose", "scale", "mask")
"""Pieces of a site a program may compute in an enclosing block: the scaled query, the key's
transpose, the scores' scale factor and a constant mask."""
SCORES_SCALES = ("scores", "scores_left", "divide")


@attrs.frozen
class DecomposedForm:
    """How an attention chain is written out: where the scale goes, how K is transposed, ..."""

    scale_at: str = "query"
    """``query`` (mul before the matmul), ``scores`` (mul after), ``scores_left`` (``mul(c, s)``),
    ``divide`` (``real_div(s, 1/c)``) or ``none``."""
    key_transpose: str = "flag"
    """``flag`` (``transpose_y=True``) or ``op`` (an explicit transpose of the last two axes)."""
    mask_first: bool = False
    """Mask as the ``x`` operand of the add."""
    positive_axis: bool = False
    """Softmax axis given as ``rank - 1`` instead of -1."""

    def applied_scale(self, scale: float) -> float:
        """The scale the chain applies when asked for ``scale``: 1 when it is written without one."""
        return 1.0 if self.scale_at == "none" else scale

    def hoist(self, q: Var, k: Var, scale: float, name: str, pieces: Sequence[str]) -> dict[str, Var]:
        """Build those of ``pieces`` (``HOISTABLE``) that this form has, named as ``attend`` names
        them. Built in an enclosing block and given to ``attend``, they are inputs of the site."""
        made: dict[str, Var] = {}
        if "query_scale" in pieces and self.scale_at == "query":
            made["query_scale"] = mb.mul(x=q, y=_scalar(scale, q), name=f"{name}_scaled_q")
        if "key_transpose" in pieces and self.key_transpose == "op":
            perm = [*range(k.rank - 2), k.rank - 1, k.rank - 2]
            made["key_transpose"] = mb.transpose(x=k, perm=perm, name=f"{name}_kt")
        if "scale" in pieces and self.scale_at in SCORES_SCALES:
            made["scale"] = mb.const(val=self._factor(scale, q), name=f"{name}_scale")
        return made

    def attend(
        self,
        q: Var,
        k: Var,
        v: Var,
        mask: Optional[Var],
        scale: float,
        name: str,
        hoisted: Mapping[str, Var] = MappingProxyType({}),
        chain: ScoreChain = ScoreChain(),
        operands: Mapping[int, Var] = MappingProxyType({}),
    ) -> Var:
        """The chain in this form; the pieces in ``hoisted`` (see ``hoist``) are used, not built.
        ``chain`` adds score modifiers, the run-time operands of which are ``operands`` (by index),
        and the quantize -> dequantize pairs it asks for."""
        if chain.inputs_pair is not None:
            inputs_pair = attrs.evolve(chain.inputs_pair, axis=None)
            q, k, v = (
                inputs_pair.apply(x, f"{name}_{x_name}_quantized") for x, x_name in ((q, "q"), (k, "k"), (v, "v"))
            )
        pieces = {
            **self.hoist(q, k, scale, name, [p for p in ("query_scale", "key_transpose") if p not in hoisted]),
            **hoisted,
        }
        if self.scale_at == "query":
            q = pieces["query_scale"]
        if self.key_transpose == "op":
            scores = mb.matmul(x=q, y=pieces["key_transpose"], name=f"{name}_scores")
        else:
            scores = mb.matmul(x=q, y=k, transpose_y=True, name=f"{name}_scores")
        factor = pieces.get("scale", self._factor(scale, q))
        if self.scale_at == "scores":
            scores = mb.mul(x=scores, y=factor, name=f"{name}_scaled")
        elif self.scale_at == "scores_left":
            scores = mb.mul(x=factor, y=scores, name=f"{name}_scaled")
        elif self.scale_at == "divide":
            scores = mb.real_div(x=scores, y=factor, name=f"{name}_scaled")
        if mask is not None and chain.mask_pair is not None:
            mask = chain.mask_pair.apply(mask, f"{name}_mask_quantized")
        for index, modifier in enumerate(chain.modifiers):
            if index == chain.mask_at:
                scores = self._add_mask(scores, mask, name)
            scores = modifier.apply(scores, operands.get(index), f"{name}_mod{index}")
        if chain.mask_at >= len(chain.modifiers):
            scores = self._add_mask(scores, mask, name)
        axis = scores.rank - 1 if self.positive_axis else -1
        weights = mb.softmax(x=scores, axis=axis, name=f"{name}_weights")
        if chain.weights_pair is not None:
            weights = chain.weights_pair.apply(weights, f"{name}_weights_quantized")
        return mb.matmul(x=weights, y=v, name=name)

    def _add_mask(self, scores: Var, mask: Optional[Var], name: str) -> Var:
        if mask is None:
            return scores
        operands = (mask, scores) if self.mask_first else (scores, mask)
        return mb.add(x=operands[0], y=operands[1], name=f"{name}_masked")

    def _factor(self, scale: float, like: Var) -> Any:
        """The scalar the scores are multiplied (or, for ``divide``, divided) by."""
        return _scalar(1.0 / scale if self.scale_at == "divide" else scale, like)


def _scalar(value: float, like: Var):
    return NUMPY_DTYPES[types.builtin_to_string(like.dtype)](value)


def decomposed_program(
    case: AttentionCase, form: DecomposedForm, scale: float, opset=IOS18, chain: ScoreChain = ScoreChain()
) -> Program:
    """``main(q, k, v[, mask][, m0, m1, ...])`` computing attention as a chain of ops written in
    ``form``, with the score modifiers of ``chain`` (``m<i>``: the run-time operand of modifier
    ``i``); a mask must be of the attention dtype, as ``add`` needs. Static shapes only for
    modifiers with operands."""
    specs = case.input_specs()
    scores_shape = case.batch + (case.query_length, case.key_length)
    runtime = chain.runtime_operands()
    specs += [
        mb.TensorSpec(chain.modifiers[index].operand_shape(scores_shape), dtype=MIL_DTYPES[case.dtype])
        for index in runtime
    ]
    names = [*case.input_names, *(f"m{index}" for index in runtime)]

    def attention(*inputs: Var) -> Var:
        named = dict(zip(names, inputs))
        operands = {index: named[f"m{index}"] for index in runtime}
        return form.attend(
            named["q"], named["k"], named["v"], named.get("mask"), scale, "attention", chain=chain, operands=operands
        )

    function = Function(dict(zip(names, specs)), opset)
    with function:
        function.set_outputs([attention(*function.inputs.values())])
    prog = Program()
    prog.add_function("main", function)
    return prog


def modifier_inputs(case: AttentionCase, chain: ScoreChain) -> dict[str, np.ndarray]:
    """Values of the run-time operands ``m<i>`` of ``decomposed_program``."""
    scores_shape = case.batch + (case.query_length, case.key_length)
    dtype = NUMPY_DTYPES[case.dtype]
    return {
        f"m{index}": chain.modifiers[index].operand_values(chain.modifiers[index].operand_shape(scores_shape), dtype)
        for index in chain.runtime_operands()
    }


REPEAT_FORMS = ("repeat_interleave", "repeat_kv", "tile")
"""How exports repeat KV heads for more query heads, as coremltools' torch frontend writes them:
``cache.repeat_interleave(r, dim=1)``, transformers' ``repeat_kv`` (``expand`` then ``reshape``),
and ``torch.tile`` of the head axis (query head ``h`` then reads KV head ``h % kv_heads``)."""


def repeat_heads(x: Var, form: str, repeats: int, name: str) -> Var:
    """``x`` (``(B, KVH, S, E)``) with its heads repeated ``repeats`` times, written in ``form``."""
    batch, kv_heads, length, width = x.shape
    if form == "repeat_interleave":
        swapped = mb.transpose(x=x, perm=[1, 0, 2, 3], name=f"{name}_heads_first")
        tiled = mb.tile(x=swapped, reps=[repeats, 1, 1, 1], name=f"{name}_tiled")
        split = mb.reshape(x=tiled, shape=[repeats, kv_heads, batch, length, width], name=f"{name}_split")
        grouped = mb.transpose(x=split, perm=[1, 0, 2, 3, 4], name=f"{name}_grouped")
        merged = mb.reshape(x=grouped, shape=[-1, batch, length, width], name=f"{name}_merged")
        return mb.transpose(x=merged, perm=[1, 0, 2, 3], name=name)
    if form == "repeat_kv":
        expanded = mb.expand_dims(x=x, axes=[2], name=f"{name}_expanded")
        tiled = mb.tile(x=expanded, reps=[1, 1, repeats, 1, 1], name=f"{name}_tiled")
        return mb.reshape(x=tiled, shape=[batch, kv_heads * repeats, length, width], name=name)
    return mb.tile(x=x, reps=[1, repeats, 1, 1], name=name)


def repeated(x: np.ndarray, form: str, repeats: int) -> np.ndarray:
    """What ``repeat_heads`` computes, in NumPy."""
    return np.tile(x, (1, repeats, 1, 1)) if form == "tile" else np.repeat(x, repeats, axis=1)


@attrs.frozen
class GroupedCase:
    """Grouped-query attention: ``kv_heads * repeats`` query heads over keys and values of
    ``kv_heads`` heads, repeated in ``repeat_form``; fused, or written out as ops."""

    batch: int
    kv_heads: int
    repeats: int
    query_length: int
    key_length: int
    head_dim: int
    dtype: str = "fp32"
    repeat_form: str = "repeat_kv"
    fused: bool = True
    mask: Optional[str] = None
    """``None``; ``"heads"``, an input ``(1, 1, L, S)``; ``"per_head"``, an input ``(B, H, L, S)``;
    or ``"causal"``, a constant ``(L, S)``."""
    keys_as_columns: bool = False
    """The keys come in as ``(B, KVH, E, S)``, are repeated so, and transposed back after."""

    @property
    def heads(self) -> int:
        return self.kv_heads * self.repeats

    def attention_case(self) -> AttentionCase:
        """The same attention as plain shapes, for the strategies and references of plain attention."""
        return AttentionCase(
            batch=(self.batch, self.heads),
            query_length=self.query_length,
            key_length=self.key_length,
            head_dim=self.head_dim,
            value_dim=self.head_dim,
            dtype=self.dtype,
        )

    def _mask_shape(self) -> tuple[int, ...]:
        rows = (self.query_length, self.key_length)
        return (1, 1, *rows) if self.mask == "heads" else (self.batch, self.heads, *rows)

    def program(self) -> Program:
        dtype = MIL_DTYPES[self.dtype]
        kv_shape = (self.batch, self.kv_heads, self.key_length, self.head_dim)
        specs = [
            mb.TensorSpec((self.batch, self.heads, self.query_length, self.head_dim), dtype=dtype),
            mb.TensorSpec(self._key_shape(), dtype=dtype),
            mb.TensorSpec(kv_shape, dtype=dtype),
        ]
        names = ["q", "k", "v"]
        if self.mask in ("heads", "per_head"):
            specs.append(mb.TensorSpec(self._mask_shape(), dtype=dtype))
            names.append("mask")
        function = Function(dict(zip(names, specs)), IOS18)
        with function:
            inputs = dict(zip(names, function.inputs.values()))
            function.set_outputs([self._attend(inputs)])
        prog = Program()
        prog.add_function("main", function)
        return prog

    def _key_shape(self) -> tuple[int, ...]:
        rows = (self.head_dim, self.key_length) if self.keys_as_columns else (self.key_length, self.head_dim)
        return (self.batch, self.kv_heads, *rows)

    def _attend(self, inputs: Mapping[str, Var]) -> Var:
        keys, values = (repeat_heads(inputs[name], self.repeat_form, self.repeats, f"{name}_repeated") for name in "kv")
        if self.keys_as_columns:
            keys = mb.transpose(x=keys, perm=[0, 1, 3, 2], name="k_rows")
        mask = inputs.get("mask")
        if self.mask == "causal":
            mask = mb.const(val=self.constant_mask(), name="causal_mask")
        if not self.fused:
            return DecomposedForm().attend(inputs["q"], keys, values, mask, self.head_dim**-0.5, "attention")
        if mask is None:
            return mb.scaled_dot_product_attention(query=inputs["q"], key=keys, value=values, name="attention")
        return mb.scaled_dot_product_attention(
            query=inputs["q"], key=keys, value=values, attn_mask=mask, name="attention"
        )

    def constant_mask(self) -> np.ndarray:
        rows, columns = np.indices((self.query_length, self.key_length))
        visible = columns <= rows + self.key_length - self.query_length
        visible[:, 0] = True
        return np.where(visible, 0.0, -1e4).astype(NUMPY_DTYPES[self.dtype])

    def inputs(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        dtype = NUMPY_DTYPES[self.dtype]
        values = {
            "q": rng.standard_normal((self.batch, self.heads, self.query_length, self.head_dim)),
            "k": rng.standard_normal(self._key_shape()),
            "v": rng.standard_normal((self.batch, self.kv_heads, self.key_length, self.head_dim)),
        }
        if self.mask in ("heads", "per_head"):
            values["mask"] = np.where(
                rng.random(self._mask_shape()) < 0.7, rng.uniform(-2.0, 0.0, self._mask_shape()), -1e4
            )
        return {name: value.astype(dtype) for name, value in values.items()}

    def reference_inputs(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``inputs`` as plain attention takes them: the keys and values repeated, the mask given."""
        keys = np.swapaxes(inputs["k"], -1, -2) if self.keys_as_columns else inputs["k"]
        plain = {
            **inputs,
            "k": repeated(keys, self.repeat_form, self.repeats),
            "v": repeated(inputs["v"], self.repeat_form, self.repeats),
        }
        if self.mask == "causal":
            plain["mask"] = self.constant_mask()
        return plain


CACHE_SHAPE = (1, 2, 128, 8)
"""Batch, heads, S = 128 cached positions, E = 8: the KV cache of ``kv_cache_program``."""
PREFILL_LENGTH = 64
STATE_OP_TYPES = ("read_state", "slice_update", "coreml_update_state")


def kv_cache_function(
    query_length: int,
    projections: Optional[dict[str, np.ndarray]] = None,
    form: Optional[DecomposedForm] = None,
    repeat: Optional[tuple[str, int]] = None,
):
    """``(q, k, v, position, mask; k_cache, v_cache) -> out``: writes ``k`` and ``v`` into the cache
    states at ``position`` (a run-time value, so ``slice_update`` with computed bounds), then attends
    over the whole updated cache, as an exported LLM layer does. ``projections`` maps some of
    ``"q"``, ``"k"``, ``"v"`` to an ``(E, E)`` weight applied (``linear``) to that input first.
    Attention is the fused op, or written out as ops in ``form``. With ``repeat`` (a form of
    ``REPEAT_FORMS``, a count), the query has that many times the cache's heads, and attention
    reads the cache repeated in that form (grouped-query attention)."""
    batch, heads, cache_length, head_dim = CACHE_SHAPE
    rows = (batch, heads, query_length, head_dim)
    query_rows = (batch, heads * (1 if repeat is None else repeat[1]), query_length, head_dim)
    specs = [
        mb.TensorSpec(query_rows, dtype=types.fp16),
        mb.TensorSpec(rows, dtype=types.fp16),
        mb.TensorSpec(rows, dtype=types.fp16),
        mb.TensorSpec((1,), dtype=types.int32),
        mb.TensorSpec((1, 1, query_length, cache_length), dtype=types.fp16),
        mb.StateTensorSpec(CACHE_SHAPE, dtype=types.fp16),
        mb.StateTensorSpec(CACHE_SHAPE, dtype=types.fp16),
    ]

    @mb.function(input_specs=specs, opset_version=IOS18)
    def function(q, k, v, position, mask, k_cache, v_cache):
        q, k, v = (
            mb.linear(x=x, weight=projections[name], name=f"{name}_proj") if name in (projections or {}) else x
            for name, x in (("q", q), ("k", k), ("v", v))
        )
        zero = np.zeros(2, np.int32)
        begin = mb.concat(values=[zero, position, zero[:1]], axis=0, name="begin")
        end_row = mb.add(x=position, y=np.int32(query_length), name="end_row")
        end = mb.concat(values=[np.array([batch, heads], np.int32), end_row, np.int32([head_dim])], axis=0, name="end")
        caches = []
        for name, state, update in (("k", k_cache, k), ("v", v_cache, v)):
            cached = mb.read_state(input=state, name=f"read_{name}")
            written = mb.slice_update(x=cached, update=update, begin=begin, end=end, name=f"write_{name}")
            caches.append(mb.coreml_update_state(state=state, value=written, name=f"update_{name}"))
        if repeat is not None:
            caches = [repeat_heads(cache, *repeat, f"{name}_repeated") for cache, name in zip(caches, "kv")]
        if form is not None:
            return form.attend(q, caches[0], caches[1], mask, head_dim**-0.5, "attention")
        return mb.scaled_dot_product_attention(
            query=q, key=caches[0], value=caches[1], attn_mask=mask, name="attention"
        )

    return function


def kv_cache_calls(
    decode_steps: int = 3, repeats: int = 1
) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """Inputs of a ``prefill`` call from position 0, then of ``decode_steps`` ``decode`` calls; the
    query has ``repeats`` times the cache's heads."""

    def call(query_length: int, position: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(position)
        rows = (*CACHE_SHAPE[:2], query_length, CACHE_SHAPE[-1])
        query_rows = (CACHE_SHAPE[0], CACHE_SHAPE[1] * repeats, query_length, CACHE_SHAPE[-1])
        return {
            "q": rng.standard_normal(query_rows).astype(np.float16),
            **{name: rng.standard_normal(rows).astype(np.float16) for name in ("k", "v")},
            "position": np.array([position], np.int32),
            "mask": causal_mask(query_length, position, CACHE_SHAPE[2]),
        }

    return call(PREFILL_LENGTH, 0), [call(1, PREFILL_LENGTH + step) for step in range(decode_steps)]


def kv_cache_program(form: Optional[DecomposedForm] = None, repeat: Optional[tuple[str, int]] = None) -> Program:
    """Functions ``prefill`` (L = ``PREFILL_LENGTH``) and ``decode`` (L = 1) of ``kv_cache_function``."""
    prog = Program()
    prog.add_function("prefill", kv_cache_function(PREFILL_LENGTH, form=form, repeat=repeat))
    prog.add_function("decode", kv_cache_function(1, form=form, repeat=repeat))
    return prog


OUTER_SHAPE = (1, 128, 16)
"""Batch, L = S = 128, E = 16: the q, k, v and mask (L, S) of ``outer_operand_program``."""
OUTER_OPERANDS = ("key_transpose", "query", "value", "mask", "scale")
"""Which operand of the nested site an op of the enclosing block computes."""
CONTAINERS = ("cond", "while_loop")


def branch_over_an_outer_transpose_program() -> Program:
    """``main(q, k, v, flag)``: written-out attention in a cond branch whose key is transposed in
    the enclosing block; the other branch passes ``q`` on. (The fuzzer found that slicing it
    raised or skipped depending on the hash seed.)"""

    @mb.program(
        input_specs=[*(mb.TensorSpec((1, 128, 16)) for _ in range(3)), mb.TensorSpec((1,), dtype=types.bool)],
        opset_version=IOS18,
    )
    def prog(q, k, v, flag):
        kt = mb.transpose(x=k, perm=[0, 2, 1], name="kt")

        def true_fn() -> Var:
            scores = mb.matmul(x=mb.mul(x=q, y=0.25), y=kt, name="scores")
            return mb.matmul(x=mb.softmax(x=scores, axis=-1), y=v, name="attention")

        return mb.cond(pred=mb.squeeze(x=flag), _true_fn=true_fn, _false_fn=lambda: mb.add(x=q, y=0.0))

    return prog


def outer_operand_program(container: str, outer: str) -> Program:
    """``main(q, k, v, mask) -> out``: written-out attention inside a ``cond`` branch or a
    ``while_loop`` body (one turn), one of whose operands (``outer``, one of ``OUTER_OPERANDS``)
    is computed in the enclosing block: the key's transpose ``kt``, the scaled query ``q_outer``,
    the value ``v_outer``, the mask ``mask_outer`` or the scores' scale ``scale_outer``."""
    batch, length, head_dim = OUTER_SHAPE
    specs = [mb.TensorSpec(OUTER_SHAPE) for _ in range(3)] + [mb.TensorSpec((batch, length, length))]

    @mb.program(input_specs=specs, opset_version=IOS18)
    def prog(q, k, v, mask):
        made = {
            "key_transpose": lambda: mb.transpose(x=k, perm=[0, 2, 1], name="kt"),
            "query": lambda: mb.mul(x=q, y=np.float32(0.25), name="q_outer"),
            "value": lambda: mb.tanh(x=v, name="v_outer"),
            "mask": lambda: mb.mul(x=mask, y=np.float32(2.0), name="mask_outer"),
            "scale": lambda: mb.const(val=np.float32(0.25), name="scale_outer"),
        }[outer]()

        def attention(query: Var) -> Var:
            key = made if outer == "key_transpose" else mb.transpose(x=k, perm=[0, 2, 1], name="kt_inner")
            scores = mb.matmul(x=made if outer == "query" else query, y=key, name="scores")
            scale = made if outer == "scale" else np.float32(0.25)
            scores = mb.mul(x=scores, y=scale, name="scaled_scores")
            masked = mb.add(x=scores, y=made if outer == "mask" else mask, name="masked_scores")
            weights = mb.softmax(x=masked, axis=-1, name="weights")
            return mb.matmul(x=weights, y=made if outer == "value" else v, name="attention")

        if container == "cond":
            pred = mb.greater(x=mb.reduce_sum(x=q), y=np.float32(-1e9), name="always")
            return mb.cond(pred=pred, _true_fn=lambda: attention(q), _false_fn=lambda: mb.identity(x=q), name="branch")
        result, _ = mb.while_loop(
            _cond=lambda x, i: mb.less(x=i, y=1, name="more"),
            _body=lambda x, i: (attention(x), mb.add(x=i, y=1, name="next")),
            loop_vars=(q, 0),
            name="loop",
        )
        return mb.identity(x=result, name="out")

    return prog
