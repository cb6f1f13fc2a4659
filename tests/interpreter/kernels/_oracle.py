"""Run one MIL op two ways: through ``evaluate`` with real inputs, and through coremltools' value inference."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import coremltools as ct
import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Function, Program, Var, types
from hypothesis import settings
from hypothesis import strategies as st

from sdpa_slicer._interpreter.evaluate import evaluate

OPSET = ct.target.iOS18
Runtime = Union[np.ndarray, tuple[np.ndarray, ...]]

# |result - reference| <= ATOL + RTOL * |reference|. An fp16 result is compared with the reference
# computed on the same values widened to fp32 (coremltools would round every fp16 step, the kernels
# round once at the end), so it may differ by its final rounding: half an fp16 ulp, 2**-12 relative.
TOLERANCES = {
    np.dtype(np.float16): (1e-3, 1e-6),
    np.dtype(np.float32): (2e-5, 1e-6),
}
EXACT = (0.0, 0.0)

SEEDS = st.integers(min_value=0, max_value=2**32 - 1)

# Tests parametrized over many op types run a share of the active profile's examples per op type,
# so that a family's whole suite stays within roughly one profile budget.
PER_OP_SHARE = 5
MIN_PER_OP_EXAMPLES = 20
per_op = settings(max_examples=max(MIN_PER_OP_EXAMPLES, settings.default.max_examples // PER_OP_SHARE))


def _outputs(result: Union[Var, Sequence[Var]]) -> tuple[Var, ...]:
    return tuple(result) if isinstance(result, (list, tuple)) else (result,)


def reference(op_type: str, opset: Any = OPSET, **arguments: Any) -> tuple[np.ndarray, ...]:
    """The op's outputs from coremltools' value inference, all arguments given as constants."""
    with Function({}, opset_version=opset):
        outputs = _outputs(getattr(mb, op_type)(**arguments))
    values = tuple(var.val for var in outputs)
    assert all(value is not None for value in values), f"coremltools has no value inference for {op_type}"
    return tuple(np.asarray(value) for value in values)


def run(
    op_type: str,
    runtime: Mapping[str, Runtime],
    attributes: Optional[Mapping[str, Any]] = None,
    opset: Any = OPSET,
) -> tuple[np.ndarray, ...]:
    """Evaluate a one-op program whose ``runtime`` arguments are function inputs (tuples become
    tuples of inputs) and whose ``attributes`` are constants."""
    placeholders: dict[str, Any] = {}
    feeds: dict[str, np.ndarray] = {}
    layout: dict[str, Union[str, tuple[str, ...]]] = {}
    for name, value in runtime.items():
        items = value if isinstance(value, tuple) else (value,)
        names = tuple(f"{name}_{i}" for i in range(len(items))) if isinstance(value, tuple) else (name,)
        for input_name, array in zip(names, items):
            placeholders[input_name] = mb.placeholder(
                shape=array.shape, dtype=types.numpy_type_to_builtin_type(array.dtype), allow_rank0_input=True
            )
            feeds[input_name] = array
        layout[name] = names if isinstance(value, tuple) else name
    with Function(placeholders, opset_version=opset) as function:
        arguments = {
            name: (tuple(function.inputs[n] for n in names) if isinstance(names, tuple) else function.inputs[names])
            for name, names in layout.items()
        }
        outputs = _outputs(getattr(mb, op_type)(**arguments, **(attributes or {})))
        function.set_outputs(list(outputs))
    program = Program()
    program.add_function("main", function)
    result = evaluate(program, feeds)
    return tuple(result[var.name] for var in outputs)


def assert_close(got: np.ndarray, want: Any, tolerance: Optional[tuple[float, float]] = None) -> None:
    """``got`` has ``want``'s shape and matches it within ``tolerance`` (default: by ``got``'s dtype)."""
    want = np.asarray(want)
    assert got.shape == want.shape, f"shape {got.shape} != reference shape {want.shape}"
    if tolerance is None:
        tolerance = TOLERANCES.get(got.dtype, EXACT)
    rtol, atol = tolerance
    if rtol == atol == 0.0:
        np.testing.assert_array_equal(got, want.astype(got.dtype))
    else:
        np.testing.assert_allclose(
            got.astype(np.float64), want.astype(np.float64), rtol=rtol, atol=atol, equal_nan=True
        )


def widen(value: Any) -> Any:
    """``value`` with every fp16 array or scalar (also inside tuples) turned into fp32."""
    if isinstance(value, tuple):
        return tuple(widen(item) for item in value)
    if isinstance(value, (np.ndarray, np.generic)) and value.dtype == np.float16:
        return value.astype(np.float32)
    return value


def check_against_value_inference(
    op_type: str,
    runtime: Mapping[str, Runtime],
    attributes: Optional[Mapping[str, Any]] = None,
    tolerance: Optional[tuple[float, float]] = None,
    opset: Any = OPSET,
) -> tuple[np.ndarray, ...]:
    """Evaluate ``op_type`` and compare every output with coremltools' value inference (on the
    inputs widened to fp32); return the outputs."""
    attributes = dict(attributes or {})
    got = run(op_type, runtime, attributes, opset)
    wide = {name: widen(value) for name, value in {**runtime, **attributes}.items()}
    want = reference(op_type, opset, **wide)
    assert len(got) == len(want)
    for got_value, want_value in zip(got, want):
        assert_close(got_value, want_value, tolerance)
    return got


def check_against_formula(
    op_type: str,
    runtime: Mapping[str, Runtime],
    expected: Union[np.ndarray, Sequence[np.ndarray]],
    attributes: Optional[Mapping[str, Any]] = None,
    tolerance: Optional[tuple[float, float]] = None,
    opset: Any = OPSET,
) -> None:
    """Evaluate ``op_type`` and compare with ``expected`` computed independently (no value inference)."""
    got = run(op_type, runtime, attributes, opset)
    expected_values = tuple(expected) if isinstance(expected, (list, tuple)) else (expected,)
    assert len(got) == len(expected_values)
    for got_value, want_value in zip(got, expected_values):
        assert_close(got_value, want_value, tolerance)


def random_array(
    rng: np.random.Generator, shape: Sequence[int], dtype: Any, low: float = -3.0, high: float = 3.0
) -> np.ndarray:
    """Uniform values in ``[low, high)`` (integers for int dtypes, coin flips for bool)."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        return rng.integers(int(low), int(high), size=shape, endpoint=True).astype(dtype)
    return rng.uniform(low, high, size=shape).astype(dtype)
