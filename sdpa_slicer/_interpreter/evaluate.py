"""``evaluate``: run a MIL ``Program`` op by op with NumPy kernels.

``MLModel.predict`` needs macOS; this interpreter is the project's numerics
oracle everywhere else. Every op's results are cast to the op's declared output
dtype (so fp16 stays fp16 between ops) and checked against its declared shape.
"""

from __future__ import annotations

from typing import Any, Mapping, MutableMapping, Optional, Sequence

import numpy as np
from coremltools.converters.mil.mil import Block, Operation, Program, Var, types
from coremltools.converters.mil.mil.types.symbolic import any_variadic, is_symbolic

from sdpa_slicer._errors import EvaluationError, UnsupportedOpError
from sdpa_slicer._graph import check_program, position_in, program_function, reader_count, readers
from sdpa_slicer._interpreter.kernels import KERNELS, EvalContext, Kernel
from sdpa_slicer._interpreter.kernels.state import StateBuffer

ArrayLike = Any
DeclaredShape = tuple[Optional[int], ...]
"""A shape as the program declares it, ``None`` for each symbolic dim."""

CONST_OP_TYPE = "const"
CONSTEXPR_PREFIX = "constexpr_"
COND_OP_TYPE = "cond"
WHILE_OP_TYPE = "while_loop"
MAX_WHILE_ITERATIONS = 1_000_000

# Var types are classes made per dtype and shape, slow to inspect: what the engine needs is cached.
_TYPE_FACTS: dict[Any, tuple[type, Optional[DeclaredShape], bool]] = {}

_KERNEL_STEP = 0
_COND_STEP = 1
_WHILE_STEP = 2


class _Output:
    """An op output: where its value goes, its dtype, and the shape the program declares."""

    __slots__ = ("var", "nptype", "shape", "symbolic", "shared")

    def __init__(self, var: Var) -> None:
        self.var = var
        self.nptype, self.shape, self.symbolic = _type_facts(var)
        self.shared = False
        """Read by several ops, and dropped after the last: its fp32 copy may be shared."""

    def matches(self, shape: tuple[int, ...]) -> bool:
        """Whether ``shape`` fits the declared shape (symbolic dims and unknown ranks fit anything)."""
        if self.shape is None:
            return True
        if not self.symbolic or len(shape) != len(self.shape):
            return shape == self.shape
        return all(want is None or got == want for got, want in zip(shape, self.shape))


class _Step:
    """One op of a block, resolved once so that running it is a few dict lookups."""

    __slots__ = ("kind", "op", "fn", "args", "tuple_args", "extras", "outputs", "release")

    def __init__(self, kind: int, op: Operation, kernel: Optional[Kernel], ctx: EvalContext) -> None:
        self.kind = kind
        self.op = op
        self.fn = kernel.fn if kernel is not None else None
        self.args = tuple((name, var) for name, var in op.inputs.items() if isinstance(var, Var))
        self.tuple_args = tuple((name, tuple(vars_)) for name, vars_ in op.inputs.items() if not isinstance(vars_, Var))
        extras: dict[str, Any] = {}
        if kernel is not None and kernel.wants_op:
            extras["op"] = op
        if kernel is not None and kernel.wants_ctx:
            extras["ctx"] = ctx
        self.extras = extras
        self.outputs = tuple(_Output(var) for var in op.outputs)
        self.release: tuple[Var, ...] = ()
        """Values of the block no later step reads, dropped once this step has run."""


class _Interpreter:
    """Holds the values of one ``evaluate`` call and the resolved steps of every block."""

    def __init__(self, function: Block, ctx: EvalContext) -> None:
        self.ctx = ctx
        self.env: dict[Var, Any] = {}
        self.steps: dict[int, list[_Step]] = {}
        self._resolve(function)

    def _resolve(self, block: Block) -> None:
        """Resolve the steps of ``block`` and its nested blocks; load const values into ``env``."""
        steps: list[_Step] = []
        for op in block.operations:
            op_type = op.op_type
            if op_type == CONST_OP_TYPE:
                values = _const_values(op)
                self.env.update(values)
                self.share_values_of_readers(values)
                continue
            if op_type.startswith(CONSTEXPR_PREFIX):
                self._decompress(op)
                continue
            if op.blocks:
                if op_type not in (COND_OP_TYPE, WHILE_OP_TYPE):
                    raise UnsupportedOpError(
                        f"{op_type} op {op.name!r} has nested blocks; only cond and while_loop are supported"
                    )
                for nested in op.blocks:
                    self._resolve(nested)
                kind = _COND_STEP if op_type == COND_OP_TYPE else _WHILE_STEP
                steps.append(_Step(kind, op, None, self.ctx))
                continue
            steps.append(_Step(_KERNEL_STEP, op, _kernel_for(op), self.ctx))
        _plan_releases(block, steps)
        self.steps[id(block)] = steps

    def _decompress(self, op: Operation) -> None:
        """Run a compressed weight's ``constexpr_*`` op now; its values are read-only constants."""
        step = _Step(_KERNEL_STEP, op, _kernel_for(op), self.ctx)
        with np.errstate(all="ignore"):
            self._run_kernel(step)
        values = {}
        for output in step.outputs:
            value = self.env[output.var]
            self.ctx.forget(value)
            values[output.var] = _read_only(value)
        self.env.update(values)
        self.share_values_of_readers(values)

    def share_values_of_readers(self, values: Mapping[Var, Any]) -> None:
        """Let kernels share one fp32 copy of each of ``values`` that several ops read."""
        for var, value in values.items():
            if reader_count(var) > 1:
                self.ctx.share(value)

    def _run_kernel(self, step: _Step) -> None:
        env = self.env
        kwargs = {name: env[var] for name, var in step.args}
        for name, vars_ in step.tuple_args:
            kwargs[name] = tuple(env[var] for var in vars_)
        if step.extras:
            kwargs.update(step.extras)
        assert step.fn is not None, "only kernel steps run here"
        try:
            result = step.fn(**kwargs)
        except Exception as exc:
            raise EvaluationError(f"{step.op.op_type} op {step.op.name!r} failed: {exc}") from exc
        self._store(step, result if isinstance(result, tuple) else (result,))

    def run_block(self, block: Block) -> None:
        env = self.env
        for step in self.steps[id(block)]:
            if step.kind == _KERNEL_STEP:
                self._run_kernel(step)
            elif step.kind == _COND_STEP:
                self._store(step, self._run_cond(step.op))
            else:
                self._store(step, self._run_while(step.op))
            for var in step.release:
                self.ctx.forget(env.pop(var))

    def _run_cond(self, op: Operation) -> tuple[Any, ...]:
        branch = op.blocks[0] if bool(self.env[op.inputs["pred"]]) else op.blocks[1]
        self.run_block(branch)
        return tuple(self.env[var] for var in branch.outputs)

    def _run_while(self, op: Operation) -> tuple[Any, ...]:
        env = self.env
        cond_block, body_block = op.blocks
        values = tuple(env[var] for var in op.inputs["loop_vars"])
        for _ in range(MAX_WHILE_ITERATIONS):
            self._bind(cond_block, values)
            self.run_block(cond_block)
            if not bool(env[cond_block.outputs[0]]):
                return values
            self._bind(body_block, values)
            self.run_block(body_block)
            values = tuple(env[var] for var in body_block.outputs)
        raise EvaluationError(f"while_loop op {op.name!r} did not finish within {MAX_WHILE_ITERATIONS} iterations")

    def _bind(self, block: Block, values: Sequence[Any]) -> None:
        for var, value in zip(block.inputs, values):
            self.env[var] = value

    def _store(self, step: _Step, results: tuple[Any, ...]) -> None:
        op = step.op
        if len(results) != len(step.outputs):
            raise EvaluationError(
                f"{op.op_type} op {op.name!r} produced {len(results)} values, but it has {len(step.outputs)} outputs"
            )
        for output, result in zip(step.outputs, results):
            value: np.ndarray = np.asarray(result, dtype=output.nptype)
            if value.shape != output.shape and not output.matches(value.shape):
                raise EvaluationError(
                    f"{op.op_type} op {op.name!r} produced {output.var.name!r} with shape {value.shape}, "
                    f"but the program declares {_format_shape(output.var.shape)}"
                )
            self.env[output.var] = value
            if output.shared:
                self.ctx.share(value)


def evaluate(
    prog: Program,
    inputs: Mapping[str, ArrayLike],
    function_name: Optional[str] = None,
    states: Optional[MutableMapping[str, np.ndarray]] = None,
) -> dict[str, np.ndarray]:
    """Run function ``function_name`` of ``prog`` (its default function when ``None``: ``main``,
    or the one a loaded package names) on ``inputs``; return ``{output name: array}`` in output order.

    Inputs are checked against the function's declared inputs (names, ranks,
    static dims, one size per symbolic dim, dtype kind) and cast to the declared
    dtype.

    ``states`` holds the buffers of Core ML state inputs (KV caches), by name: NumPy arrays
    of the state's dtype and shape. A state not in ``states`` starts as zeros. Like an
    ``MLState`` passed to ``predict``, the buffers are updated in place once the call
    succeeds: each given array is overwritten with the state's new value, and the new value
    of a state that was not given is added to ``states``. A failed call changes nothing.
    """
    check_program(prog, "evaluate")
    function_name, function = program_function(prog, function_name)
    bound = _bind_inputs(function, function_name, inputs, states)
    interpreter = _Interpreter(function, EvalContext(function_name=function_name))
    interpreter.env.update(bound)
    interpreter.share_values_of_readers(bound)
    # IEEE inf/NaN results are part of MIL semantics (e.g. a fully masked attention row), not warnings.
    with np.errstate(all="ignore"):
        interpreter.run_block(function)
    # Inputs and constants are read-only inside; an output that is one of them (or a view) is copied,
    # before a state it may be a view of is written.
    outputs = {}
    for var in function.outputs:
        value = interpreter.env[var]
        outputs[var.name] = value if value.flags.writeable else value.copy()
    if states is not None:
        _write_back(bound, states)
    return outputs


def _plan_releases(block: Block, steps: list[_Step]) -> None:
    """Give each step the values produced by ``block``'s steps that nothing reads after it.

    Holding every intermediate until the end would keep, say, all the chunks of a sliced
    attention alive at once, and make each new result land in fresh memory. A use inside a
    nested block counts at the op that holds the block; the block's outputs are kept.
    """
    position = {step.op: index for index, step in enumerate(steps)}
    kept = set(block.outputs)
    releases: list[list[Var]] = [[] for _ in steps]
    for index, step in enumerate(steps):
        for output in step.outputs:
            var = output.var
            if var in kept:
                continue
            uses = [position_in(user, block, position) for user in readers(var)]
            known = [use for use in uses if use is not None]
            if len(known) == len(uses) == reader_count(var):
                releases[max([index, *known])].append(var)
                output.shared = reader_count(var) > 1
    for step, release in zip(steps, releases):
        step.release = tuple(release)


def _kernel_for(op: Operation) -> Kernel:
    kernel = KERNELS.get(op.op_type)
    if kernel is None:
        raise UnsupportedOpError(f"no kernel for op type {op.op_type!r} (op {op.name!r})")
    unknown = [name for name in op.inputs if name not in kernel.inputs]
    if unknown and not kernel.takes_any_input:
        raise UnsupportedOpError(f"the {op.op_type} kernel does not handle input {unknown[0]!r} of op {op.name!r}")
    return kernel


def _nptype(var: Var) -> type:
    return _type_facts(var)[0]


def _type_facts(var: Var) -> tuple[type, Optional[DeclaredShape], bool]:
    """The NumPy dtype of ``var``, its declared shape (None for symbolic dims; None overall for an
    unknown rank) and whether that has symbolic dims."""
    sym_type = var.sym_type
    facts = _TYPE_FACTS.get(sym_type)
    if facts is None:
        if not (types.is_tensor(sym_type) or types.is_scalar(sym_type)):
            raise UnsupportedOpError(
                f"var {var.name!r} has type {sym_type.__type_info__()}; only tensors and scalars are supported"
            )
        shape = var.shape
        if any_variadic(shape):
            facts = (types.nptype_from_builtin(var.dtype), None, True)
        else:
            pattern = tuple(None if is_symbolic(d) else int(d) for d in shape)
            facts = (types.nptype_from_builtin(var.dtype), pattern, None in pattern)
        _TYPE_FACTS[sym_type] = facts
    return facts


def _const_values(op: Operation) -> dict[Var, Any]:
    """The values of a const op, as read-only arrays so that no kernel can change the program."""
    values = [var.val for var in op.outputs]
    result: dict[Var, Any] = {}
    for var, value in zip(op.outputs, values):
        if value is None:
            raise UnsupportedOpError(f"{op.op_type} op {op.name!r} has no value for {var.name!r}")
        if types.is_str(var.dtype):
            result[var] = str(value)
        else:
            result[var] = _read_only(np.asarray(value, dtype=_nptype(var)))
    return result


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


def _bind_inputs(
    function: Block,
    function_name: str,
    inputs: Mapping[str, ArrayLike],
    states: Optional[MutableMapping[str, np.ndarray]],
) -> dict[Var, Any]:
    """Check ``inputs`` and ``states`` against the function's inputs; return the values to start from."""
    if not isinstance(inputs, Mapping):
        raise TypeError(f"inputs must be a mapping from input name to array, got {type(inputs).__name__}")
    tensor_vars = {name: var for name, var in function.inputs.items() if not types.is_state(var.sym_type)}
    state_vars = {name: var for name, var in function.inputs.items() if types.is_state(var.sym_type)}
    _check_names("input", function_name, tensor_vars, inputs)
    _check_names("state", function_name, state_vars, states if states is not None else {}, required=False)

    bound: dict[Var, Any] = {}
    symbols: dict[Any, tuple[str, int]] = {}
    for name, var in tensor_vars.items():
        array = _coerce("input", name, inputs[name], var.dtype)
        _check_shape("input", name, array.shape, var.shape, symbols)
        bound[var] = _read_only(array)
    for name, var in state_vars.items():
        bound[var] = _state_buffer(name, var, states, symbols)
    return bound


def _state_buffer(
    name: str, var: Var, states: Optional[Mapping[str, Any]], symbols: dict[Any, tuple[str, int]]
) -> StateBuffer:
    """The starting value of state ``name``: the given array (checked, not copied) or zeros."""
    wrapped = var.sym_type.wrapped_type()
    dtype = types.nptype_from_builtin(wrapped.get_primitive())
    type_name = types.builtin_to_string(wrapped.get_primitive())
    shape = wrapped.get_shape()
    if states is None or name not in states:
        if any_variadic(shape) or any(is_symbolic(d) for d in shape):
            raise ValueError(f"state {name!r} has shape {_format_shape(shape)}; give its value in states")
        return StateBuffer(name, _read_only(np.zeros(tuple(int(d) for d in shape), dtype)))
    array = states[name]
    if not isinstance(array, np.ndarray):
        raise TypeError(f"state {name!r} must be a NumPy array (it is updated in place), got {type(array).__name__}")
    if array.dtype != dtype:
        raise TypeError(f"state {name!r} must be a {type_name} array, got {array.dtype}")
    if not array.flags.writeable:
        raise ValueError(f"state {name!r} is a read-only array; it is updated in place")
    _check_shape("state", name, array.shape, shape, symbols)
    return StateBuffer(name, _read_only(array))


def _write_back(bound: Mapping[Var, Any], states: MutableMapping[str, np.ndarray]) -> None:
    """Put each state's final value into ``states``: into the given array, or as a new entry."""
    for value in bound.values():
        if not isinstance(value, StateBuffer):
            continue
        given = states.get(value.name)
        if given is None:
            states[value.name] = np.array(value.value)
        else:
            np.copyto(given, value.value)  # NumPy copes with overlap: a value may be a view of ``given``


def _check_names(
    kind: str, function_name: str, declared: Mapping[str, Var], given: Mapping[str, Any], required: bool = True
) -> None:
    missing = [name for name in declared if name not in given]
    if missing and required:
        raise ValueError(
            f"missing {kind}(s) {', '.join(map(repr, missing))} of function {function_name!r}; "
            f"it takes {', '.join(map(repr, declared)) or 'none'}"
        )
    unknown = [name for name in given if name not in declared]
    if unknown:
        raise ValueError(
            f"unknown {kind}(s) {', '.join(map(repr, unknown))} for function {function_name!r}; "
            f"it takes {', '.join(map(repr, declared)) or 'none'}"
        )


def _coerce(kind: str, name: str, value: ArrayLike, dtype: type) -> np.ndarray:
    """``value`` as an array of ``dtype``, refusing casts that would change its meaning."""
    array = np.asarray(value)
    want = np.dtype(types.nptype_from_builtin(dtype))
    if array.dtype == want:
        return array
    got = array.dtype.kind
    type_name = types.builtin_to_string(dtype)
    if (
        (want.kind == "b") != (got == "b")
        or (want.kind in "iu" and got not in "iu")
        or (want.kind == "f" and got != "f")
    ):
        raise TypeError(f"{kind} {name!r} must be a {type_name} array, got {array.dtype}")
    if want.kind in "iu" and array.size:
        info = np.iinfo(want)
        if array.min() < info.min or array.max() > info.max:
            raise ValueError(f"{kind} {name!r} has values outside the {type_name} range [{info.min}, {info.max}]")
    with np.errstate(over="ignore"):  # overflow is checked just below
        converted = array.astype(want)
    if want.kind == "f" and want.itemsize < array.dtype.itemsize:
        if np.any(np.isinf(converted) & np.isfinite(array)):
            raise ValueError(f"{kind} {name!r} has finite values that overflow {type_name}")
    return converted


def _check_shape(
    kind: str,
    name: str,
    shape: tuple[int, ...],
    declared: tuple[Any, ...],
    symbols: dict[Any, tuple[str, int]],
) -> None:
    """Static dims must match; each symbolic dim must take one size across all inputs."""
    if any_variadic(declared):
        return
    if len(shape) != len(declared):
        raise ValueError(
            f"{kind} {name!r} must have rank {len(declared)} (shape {_format_shape(declared)}), got shape {shape}"
        )
    for axis, (size, want) in enumerate(zip(shape, declared)):
        if is_symbolic(want):
            first_name, first_size = symbols.setdefault(want, (name, size))
            if first_size != size:
                raise ValueError(
                    f"{kind} {name!r} has size {size} on axis {axis}, but its symbolic dim {want} "
                    f"is {first_size} in {first_name!r}"
                )
        elif size != want:
            raise ValueError(f"{kind} {name!r} must have shape {_format_shape(declared)}, got {shape}")


def _format_shape(shape: Sequence[Any]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"
