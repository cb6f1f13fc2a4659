"""The ``evaluate`` engine: control flow, input checking, dtypes at op boundaries, errors, functions."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Program, get_new_symbol, types

from sdpa_slicer import EvaluationError, UnsupportedOpError, evaluate
from sdpa_slicer._interpreter.kernels import KERNELS, EvalContext, Kernel

OPSET = ct.target.iOS18
LOOP_LIMIT = 5


def build(specs: Sequence[Any], body: Callable[..., Any], function_name: str = "main") -> Program:
    """A one-function program of ``body`` with inputs ``specs`` (``mb.TensorSpec``s)."""
    return mb.program(input_specs=list(specs), opset_version=OPSET, function_name=function_name)(body)


def spec(shape: Sequence[Any], dtype: Any = types.fp32) -> Any:
    return mb.TensorSpec(tuple(shape), dtype=dtype)


def only_output(result: dict[str, np.ndarray]) -> np.ndarray:
    (value,) = result.values()
    return value


def _add(x: Any, y: Any) -> Any:
    return mb.add(x=x, y=y)


ADD_PROGRAM = build([spec((2, 3)), spec((2, 3))], _add)
RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 3)).astype(np.float32)
Y = RNG.standard_normal((2, 3)).astype(np.float32)


# --- control flow -------------------------------------------------------------------------------


def _cond_program() -> Program:
    def body(x: Any, threshold: Any) -> Any:
        pred = mb.squeeze(x=mb.greater(x=mb.reduce_sum(x=x, axes=[0], keep_dims=True), y=threshold))
        return mb.cond(pred=pred, _true_fn=lambda: mb.mul(x=x, y=2.0), _false_fn=lambda: mb.sub(x=x, y=1.0))

    return build([spec((3,)), spec((1,))], body)


@pytest.mark.parametrize("threshold", [-10.0, 10.0], ids=["true-branch", "false-branch"])
def test_cond_runs_the_branch_its_predicate_picks(threshold: float) -> None:
    x = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    got = only_output(evaluate(_cond_program(), {"x": x, "threshold": np.array([threshold], np.float32)}))
    np.testing.assert_array_equal(got, x * 2 if x.sum() > threshold else x - 1)


def _while_program() -> Program:
    """Double ``x`` and count until the count reaches ``limit``; odd counts also add 1 (a cond in the body)."""

    def body(x: Any, limit: Any) -> Any:
        def loop_cond(count: Any, value: Any) -> Any:
            return mb.squeeze(x=mb.less(x=count, y=limit))

        def loop_body(count: Any, value: Any) -> Any:
            odd = mb.squeeze(x=mb.equal(x=mb.mod(x=count, y=2), y=1))
            doubled = mb.mul(x=value, y=2.0)
            bumped = mb.cond(pred=odd, _true_fn=lambda: mb.add(x=doubled, y=1.0), _false_fn=lambda: doubled)
            return mb.add(x=count, y=1), bumped

        return mb.while_loop(_cond=loop_cond, _body=loop_body, loop_vars=(np.zeros(1, np.int32), x))

    return build([spec((2,)), spec((1,), types.int32)], body)


@pytest.mark.parametrize("limit", [0, 1, LOOP_LIMIT])
def test_while_loop_iterates_until_its_condition_fails(limit: int) -> None:
    x = np.array([0.5, -1.0], dtype=np.float32)
    result = evaluate(_while_program(), {"x": x, "limit": np.array([limit], np.int32)})
    count, value = result.values()
    expected = x.copy()
    for step in range(limit):
        expected = expected * 2 + (step % 2)
    np.testing.assert_array_equal(count, [limit])
    np.testing.assert_array_equal(value, expected)


def test_values_read_only_inside_nested_blocks_outlive_every_iteration() -> None:
    """``offset`` and ``factor`` are computed before the loop and read only in its body (``factor``
    in a cond inside it): the engine, which drops values after their last reader, must keep them."""

    def body(x: Any, limit: Any) -> Any:
        offset = mb.add(x=x, y=1.0)
        factor = mb.mul(x=x, y=0.0)

        def loop_body(count: Any, value: Any) -> Any:
            positive = mb.squeeze(x=mb.greater(x=count, y=0))
            grown = mb.add(x=value, y=offset)
            kept = mb.cond(pred=positive, _true_fn=lambda: mb.add(x=grown, y=factor), _false_fn=lambda: grown)
            return mb.add(x=count, y=1), kept

        loop = mb.while_loop(
            _cond=lambda count, value: mb.squeeze(x=mb.less(x=count, y=limit)),
            _body=loop_body,
            loop_vars=(np.zeros(1, np.int32), x),
        )
        return loop[1]

    x = np.array([0.5, -1.0], dtype=np.float32)
    prog = build([spec((2,)), spec((1,), types.int32)], body)
    got = only_output(evaluate(prog, {"x": x, "limit": np.array([3], np.int32)}))
    np.testing.assert_array_equal(got, x + 3 * (x + 1))


# --- input checking -----------------------------------------------------------------------------


def test_rejects_anything_but_a_program() -> None:
    with pytest.raises(TypeError, match="got dict"):
        evaluate({"main": None}, {})  # type: ignore[arg-type]


def test_unknown_function_lists_the_functions() -> None:
    with pytest.raises(ValueError, match=r"no function 'decode'; its functions are 'main'"):
        evaluate(ADD_PROGRAM, {"x": X, "y": Y}, function_name="decode")


@pytest.mark.parametrize(
    "inputs,message",
    [
        ({"x": X}, r"missing input\(s\) 'y' of function 'main'; it takes 'x', 'y'"),
        ({"x": X, "y": Y, "z": Y}, r"unknown input\(s\) 'z' for function 'main'"),
        ({"x": X, "y": Y[0]}, r"input 'y' must have rank 2 \(shape \(2, 3\)\), got shape \(3,\)"),
        ({"x": X, "y": Y[:, :2]}, r"input 'y' must have shape \(2, 3\), got \(2, 2\)"),
    ],
    ids=["missing", "unknown", "rank", "static-dim"],
)
def test_inputs_must_match_the_function(inputs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate(ADD_PROGRAM, inputs)


def test_inputs_must_be_a_mapping() -> None:
    with pytest.raises(TypeError, match="mapping from input name to array, got list"):
        evaluate(ADD_PROGRAM, [X, Y])  # type: ignore[arg-type]


def _symbolic_program() -> Program:
    length = get_new_symbol()
    return build([spec((length, 2)), spec((length, 2)), spec((get_new_symbol(), 2))], _symbolic_body)


def _symbolic_body(x: Any, y: Any, z: Any) -> Any:
    return mb.add(x=x, y=y), mb.reduce_sum(x=z, axes=[0])


def test_symbolic_dims_take_any_size_but_one_size_per_symbol() -> None:
    program = _symbolic_program()
    for length, other in [(1, 4), (5, 2)]:
        x, y, z = (np.ones((n, 2), np.float32) for n in (length, length, other))
        total, column_sums = evaluate(program, {"x": x, "y": y, "z": z}).values()
        np.testing.assert_array_equal(total, x + y)
        np.testing.assert_array_equal(column_sums, [other, other])
    with pytest.raises(ValueError, match=r"input 'y' has size 4 on axis 0, but its symbolic dim .* is 3 in 'x'"):
        evaluate(program, {"x": np.ones((3, 2), np.float32), "y": np.ones((4, 2), np.float32), "z": X[:, :2]})


def _identity_program(dtype: Any) -> Program:
    return build([spec((2,), dtype)], lambda x: mb.identity(x=x))


@pytest.mark.parametrize(
    "declared,given",
    [
        (types.bool, np.array([0.0, 1.0])),
        (types.bool, np.array([0, 1], np.int32)),
        (types.int32, np.array([1.0, 2.0], np.float32)),
        (types.int32, np.array([True, False])),
        (types.fp32, np.array([1, 2], np.int32)),
        (types.fp16, np.array([True, False])),
        (types.fp32, np.array([1 + 2j, 0j])),
        (types.fp32, np.array(["a", "b"])),
    ],
    ids=[
        "float-for-bool",
        "int-for-bool",
        "float-for-int",
        "bool-for-int",
        "int-for-float",
        "bool-for-fp16",
        "complex-for-float",
        "str-for-float",
    ],
)
def test_inputs_of_another_kind_are_refused(declared: Any, given: np.ndarray) -> None:
    with pytest.raises(TypeError, match=rf"input 'x' must be a {types.builtin_to_string(declared)} array"):
        evaluate(_identity_program(declared), {"x": given})


@pytest.mark.parametrize(
    "declared,given",
    [
        (types.fp32, np.array([0.1, -2.5], np.float64)),
        (types.fp16, np.array([0.1, -2.5], np.float32)),
        (types.int32, np.array([7, -3], np.int64)),
        (types.int32, np.array([7, 3], np.uint8)),
        (types.fp32, [0.5, 1.5]),
    ],
    ids=["fp64-for-fp32", "fp32-for-fp16", "int64-for-int32", "uint8-for-int32", "list-for-fp32"],
)
def test_inputs_of_the_same_kind_are_cast(declared: Any, given: Any) -> None:
    got = only_output(evaluate(_identity_program(declared), {"x": given}))
    want_type = types.nptype_from_builtin(declared)
    assert got.dtype == want_type
    np.testing.assert_array_equal(got, np.asarray(given).astype(want_type))


@pytest.mark.parametrize(
    "declared,given,message",
    [
        (types.int32, np.array([1, 2**40], np.int64), "values outside the int32 range"),
        (types.fp16, np.array([1.0, 1e6], np.float32), "finite values that overflow fp16"),
    ],
    ids=["int64-overflow", "fp16-overflow"],
)
def test_casts_that_change_values_are_refused(declared: Any, given: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=f"input 'x' has {message}"):
        evaluate(_identity_program(declared), {"x": given})


# --- dtypes and shapes at op boundaries ---------------------------------------------------------


def test_fp16_is_rounded_after_every_op() -> None:
    """1 + 2048 is not an fp16 number; rounded to 2048 between the ops, (1 + 2048) - 2048 is 0."""

    def body(x: Any) -> Any:
        return mb.sub(x=mb.add(x=x, y=np.float16(2048)), y=np.float16(2048))

    x = np.array([1.0], np.float16)
    big = np.float16(2048)
    rounded_each_step = (x + big) - big
    assert rounded_each_step != x.astype(np.float32) + np.float32(big) - np.float32(big)
    got = only_output(evaluate(build([spec((1,), types.fp16)], body), {"x": x}))
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, rounded_each_step)


def test_outputs_have_declared_dtypes_and_scalars_are_0d_arrays() -> None:
    def body(x: Any) -> Any:
        return mb.reduce_argmax(x=x, axis=0), mb.reduce_sum(x=x), mb.greater(x=x, y=0.0)

    program = build([spec((3,))], body)
    argmax, total, positive = evaluate(program, {"x": np.array([1.0, 3.0, -2.0], np.float32)}).values()
    assert (argmax.dtype, argmax.shape, int(argmax)) == (np.int32, (), 1)
    assert (total.dtype, total.shape, float(total)) == (np.float32, (), 2.0)
    assert positive.dtype == np.bool_
    np.testing.assert_array_equal(positive, [True, True, False])


def test_outputs_come_in_function_output_order() -> None:
    program = build([spec((2, 3)), spec((2, 3))], lambda x, y: (mb.sub(x=x, y=y, name="d"), mb.add(x=x, y=y, name="s")))
    result = evaluate(program, {"x": X, "y": Y})
    assert list(result) == ["d", "s"]
    np.testing.assert_array_equal(result["d"], X - Y)
    np.testing.assert_array_equal(result["s"], X + Y)


def test_outputs_are_writable_copies_of_inputs_and_constants() -> None:
    table = np.arange(6, dtype=np.float32)

    def body(x: Any) -> Any:
        return mb.identity(x=x), mb.reshape(x=table, shape=[2, 3])

    program = build([spec((2, 3))], body)
    for _ in range(2):
        echoed, reshaped = evaluate(program, {"x": X}).values()
        np.testing.assert_array_equal(reshaped, table.reshape(2, 3))
        echoed += 1
        reshaped += 1
    np.testing.assert_array_equal(echoed, X + 1)


def test_compressed_constants_are_decompressed() -> None:
    data = np.array([[1, 2], [3, 4]], np.int8)
    scale = np.array([[0.5], [2.0]], np.float32)

    def body(x: Any) -> Any:
        weight = mb.constexpr_blockwise_shift_scale(data=data, scale=scale)
        return mb.matmul(x=x, y=weight)

    x = np.array([1.0, -1.0], np.float32)
    got = only_output(evaluate(build([spec((2,))], body), {"x": x}))
    np.testing.assert_array_equal(got, x @ (data * scale))


def test_inf_and_nan_results_raise_no_warnings() -> None:
    """A fully masked attention row is NaN by definition, not a numerical accident worth a warning."""

    def body(q: Any, k: Any, v: Any, mask: Any) -> Any:
        return mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=mask)

    program = build([spec((1, 2, 4)), spec((1, 3, 4)), spec((1, 3, 4)), spec((2, 3), types.bool)], body)
    ones = np.ones((1, 3, 4), np.float32)
    mask = np.array([[True, False, True], [False, False, False]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = only_output(evaluate(program, {"q": ones[:, :2], "k": ones, "v": ones, "mask": mask}))
    assert np.isfinite(got[0, 0]).all() and np.isnan(got[0, 1]).all()


def test_an_fp16_value_several_ops_read_is_widened_once_until_forgotten() -> None:
    ctx = EvalContext(function_name="main")
    x = np.arange(4, dtype=np.float16)
    ctx.share(x)
    wide = ctx.widened(x)
    assert wide.dtype == np.float32 and not wide.flags.writeable
    assert ctx.widened(x) is wide
    assert ctx.widened(x.copy()) is not wide
    ctx.forget(x)
    assert ctx.widened(x) is not wide


# --- errors naming the op -----------------------------------------------------------------------


def _replace_add_kernel(monkeypatch: pytest.MonkeyPatch, fn: Callable[..., Any]) -> None:
    monkeypatch.setitem(KERNELS, "add", Kernel.of("add", fn))


def _one_add_program() -> Program:
    return build([spec((2, 3))], lambda x: mb.add(x=x, y=np.ones((2, 3), np.float32), name="the_add"))


def _write_into_y(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    y[...] = 0
    return x


@pytest.mark.parametrize(
    "fn,error,message",
    [
        (
            lambda x, y: x[:, :1],
            EvaluationError,
            r"add op 'the_add' produced 'the_add' with shape \(2, 1\), " r"but the program declares \(2, 3\)",
        ),
        (lambda x, y: (x, y), EvaluationError, r"add op 'the_add' produced 2 values, but it has 1 outputs"),
        (lambda x, y: 1 / 0, EvaluationError, r"add op 'the_add' failed: division by zero"),
        (_write_into_y, EvaluationError, r"add op 'the_add' failed: .*read-only"),
    ],
    ids=["wrong-shape", "wrong-count", "raises", "writes-a-constant"],
)
def test_kernel_bugs_are_reported_with_the_op(
    monkeypatch: pytest.MonkeyPatch, fn: Callable[..., Any], error: type, message: str
) -> None:
    _replace_add_kernel(monkeypatch, fn)
    with pytest.raises(error, match=message):
        evaluate(_one_add_program(), {"x": X})


def test_op_without_kernel_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(KERNELS, "add")
    with pytest.raises(NotImplementedError, match=r"no kernel for op type 'add' \(op 'the_add'\)"):
        evaluate(_one_add_program(), {"x": X})


def test_kernel_missing_an_input_of_the_op_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    _replace_add_kernel(monkeypatch, lambda x: x)
    with pytest.raises(UnsupportedOpError, match=r"the add kernel does not handle input 'y' of op 'the_add'"):
        evaluate(_one_add_program(), {"x": X})


STATE_SHAPE = (2, 3)
FP16_X = X.astype(np.float16)


def _state_program() -> Program:
    def body(cache: Any, x: Any) -> Any:
        return mb.add(x=mb.read_state(input=cache), y=x)

    return build([mb.StateTensorSpec(STATE_SHAPE, dtype=types.fp16), spec(STATE_SHAPE, types.fp16)], body)


def _accumulator_program() -> Program:
    """``cache += x``; returns the cache as read before the update and twice the value after it."""

    def body(cache: Any, x: Any) -> Any:
        before = mb.read_state(input=cache, name="before")
        mb.coreml_update_state(state=cache, value=mb.add(x=before, y=x), name="update")
        after = mb.read_state(input=cache, name="after")
        return mb.identity(x=before, name="old"), mb.mul(x=after, y=np.float16(2), name="doubled")

    return build([mb.StateTensorSpec(STATE_SHAPE, dtype=types.fp16), spec(STATE_SHAPE, types.fp16)], body)


def test_a_state_is_updated_in_place_like_an_mlstate() -> None:
    cache = np.ones(STATE_SHAPE, np.float16)
    states = {"cache": cache}
    for step in range(1, 3):
        old, doubled = evaluate(_accumulator_program(), {"x": FP16_X}, states=states).values()
        np.testing.assert_array_equal(old, np.ones(STATE_SHAPE, np.float16) + (step - 1) * FP16_X)
        np.testing.assert_array_equal(doubled, 2 * (old + FP16_X))
    assert states["cache"] is cache
    np.testing.assert_array_equal(cache, 1 + FP16_X + FP16_X)


def test_a_state_not_given_starts_at_zeros_and_is_added_to_states() -> None:
    states: dict[str, np.ndarray] = {}
    old, _ = evaluate(_accumulator_program(), {"x": FP16_X}, states=states).values()
    np.testing.assert_array_equal(old, np.zeros(STATE_SHAPE, np.float16))
    np.testing.assert_array_equal(states["cache"], FP16_X)
    _, doubled = evaluate(_accumulator_program(), {"x": FP16_X}).values()
    np.testing.assert_array_equal(doubled, 2 * FP16_X)


def test_a_failed_call_leaves_the_states_as_they_were(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        raise RuntimeError("injected")

    monkeypatch.setitem(KERNELS, "mul", Kernel.of("mul", fail))
    cache = np.ones(STATE_SHAPE, np.float16)
    with pytest.raises(EvaluationError, match="injected"):
        evaluate(_accumulator_program(), {"x": FP16_X}, states={"cache": cache})
    np.testing.assert_array_equal(cache, np.ones(STATE_SHAPE, np.float16))


@pytest.mark.parametrize(
    "inputs, states, error, message",
    [
        ({"cache": FP16_X}, {}, ValueError, r"unknown input\(s\) 'cache'"),
        ({}, {"kv": FP16_X.copy()}, ValueError, r"unknown state\(s\) 'kv'"),
        ({}, {"cache": X.copy()}, TypeError, r"state 'cache' must be a fp16 array, got float32"),
        ({}, {"cache": FP16_X.tolist()}, TypeError, r"state 'cache' must be a NumPy array .* got list"),
        ({}, {"cache": np.zeros((3, 2), np.float16)}, ValueError, r"state 'cache' must have shape \(2, 3\)"),
        ({}, {"cache": np.broadcast_to(np.float16(0), STATE_SHAPE)}, ValueError, "read-only array"),
    ],
    ids=["state-as-input", "unknown-state", "dtype", "not-an-array", "shape", "read-only"],
)
def test_bad_states_are_named(inputs: dict[str, Any], states: dict[str, Any], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        evaluate(_state_program(), {"x": FP16_X, **inputs}, states=states)


# --- functions ----------------------------------------------------------------------------------


def test_function_name_picks_the_function() -> None:
    program = build([spec((2, 3)), spec((2, 3))], _add)
    other = build([spec((3,))], lambda v: mb.mul(x=v, y=3.0), function_name="triple")
    program.add_function("triple", other.functions["triple"])
    v = np.array([1.0, 2.0, -1.0], np.float32)
    np.testing.assert_array_equal(only_output(evaluate(program, {"v": v}, function_name="triple")), v * 3)
    np.testing.assert_array_equal(only_output(evaluate(program, {"x": X, "y": Y})), X + Y)
    with pytest.raises(ValueError, match=r"its functions are 'main', 'triple'"):
        evaluate(program, {"v": v}, function_name="double")


def test_without_a_function_name_the_default_function_runs() -> None:
    """Found in review: a package whose default function is not ``main`` needed the name spelled out."""
    program = build([spec((3,))], lambda v: mb.mul(x=v, y=3.0), function_name="triple")
    program.functions.pop("main", None)
    program.default_function_name = "triple"
    v = np.array([1.0, 2.0, -1.0], np.float32)
    np.testing.assert_array_equal(only_output(evaluate(program, {"v": v})), v * 3)
