"""estimate_memory: tensor sizes, liveness over op order, weights apart, symbolic shapes listed."""

from __future__ import annotations

import math

import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import get_new_symbol, types

from attention_cases import AttentionCase, sdpa_program
from programs import CACHE_SHAPE, kv_cache_program
from sdpa_slicer import slice_attention
from sdpa_slicer._memory import estimate_memory

FLOAT = 4
HALF = 2
X = (64, 256)
X_BYTES = 64 * 256 * FLOAT


def _program(body, shape=X):
    @mb.program(input_specs=[mb.TensorSpec(shape)], opset_version=ct.target.iOS18)
    def prog(x):
        return body(x)

    return prog


def test_a_chain_holds_one_input_and_one_output_at_a_time():
    prog = _program(lambda x: mb.relu(x=mb.sigmoid(x=mb.tanh(x=x, name="a"), name="b"), name="c"))
    estimate = estimate_memory(prog)
    assert estimate.peak_live_bytes == 2 * X_BYTES
    assert estimate.largest_tensor.bytes == X_BYTES


def _a_kept_for_d(x):
    """a -> b -> c -> d, where d reads a again."""
    a = mb.tanh(x=x, name="a")
    b = mb.sigmoid(x=a, name="b")
    c = mb.relu(x=b, name="c")
    return mb.add(x=a, y=c, name="d")


def test_a_tensor_lives_until_its_last_consumer():
    estimate = estimate_memory(_program(_a_kept_for_d))
    # At "c": x is dead, a (kept for d), b and c are alive.
    assert estimate.peak_live_bytes == 3 * X_BYTES


def test_weights_are_reported_apart_and_not_live():
    weight = np.ones((256, 256), dtype=np.float32)
    estimate = estimate_memory(_program(lambda x: mb.matmul(x=x, y=weight, name="mm")))
    assert estimate.weights_bytes == weight.nbytes + 2  # and matmul's two bool transpose flags
    assert estimate.peak_live_bytes == 2 * X_BYTES


def _quantized(x):
    """x -> int8 levels -> fp32 again, as activation quantization (W8A8) writes it."""
    levels = mb.quantize(input=x, scale=np.float32(0.05), output_dtype="int8", name="levels")
    return mb.dequantize(input=levels, scale=np.float32(0.05), name="back")


def test_int8_activations_count_one_byte_each():
    prog = _program(_quantized)
    estimate = estimate_memory(prog)
    # x and its int8 levels (a quarter of its bytes), then the levels and the fp32 result.
    assert estimate.peak_live_bytes == X_BYTES + math.prod(X)
    assert [point.live_bytes for point in estimate.timeline if point.op_type != "const"] == [
        X_BYTES + math.prod(X),
        X_BYTES + math.prod(X),
    ]


def test_a_fused_attention_counts_its_scores_as_the_largest_tensor():
    case = AttentionCase(batch=(2, 4), query_length=128, key_length=96, head_dim=16, value_dim=8)
    estimate = estimate_memory(sdpa_program(case))
    scores = 2 * 4 * 128 * 96 * FLOAT
    assert estimate.largest_tensor.name == "attention (scores)"
    assert estimate.largest_tensor.op_type == "scaled_dot_product_attention"
    assert estimate.largest_tensor_bytes == scores
    inputs_and_output = 2 * 4 * (128 * 16 + 96 * 16 + 96 * 8 + 128 * 8) * FLOAT
    assert estimate.peak_live_bytes == scores + inputs_and_output


def test_symbolic_tensors_are_listed_not_guessed():
    estimate = estimate_memory(_program(lambda x: mb.relu(x=x, name="r"), shape=(get_new_symbol(), 8)))
    assert set(estimate.uncounted) == {"x", "r"}
    assert estimate.peak_live_bytes == 0


def test_nested_blocks_count_at_their_parent_op():
    def body(x):
        pred = mb.greater(x=mb.reduce_sum(x=x), y=0.0)
        inner = mb.cond(
            pred=pred,
            _true_fn=lambda: mb.relu(x=mb.tanh(x=x, name="t"), name="u"),
            _false_fn=lambda: mb.sigmoid(x=x, name="s"),
        )
        return mb.relu(x=inner, name="out")

    estimate = estimate_memory(_program(body))
    # At the cond: x, the bool predicate, the cond's output, and inside the true branch t and u.
    assert estimate.peak_live_bytes == 4 * X_BYTES + 1


def test_slicing_reports_the_estimate_before_and_after():
    case = AttentionCase(batch=(1, 8), query_length=256, key_length=256, head_dim=32, value_dim=32)
    report = slice_attention(sdpa_program(case), num_chunks=8)
    (before,), (after,) = report.memory_before, report.memory_after
    assert before.largest_tensor_bytes == 8 * 256 * 256 * FLOAT
    assert after.largest_tensor_bytes == before.largest_tensor_bytes // 8
    assert after.peak_live_bytes < before.peak_live_bytes


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="got str"):
        estimate_memory("model.mlpackage")
    with pytest.raises(ValueError, match="no function 'prefill'; its functions are 'main'"):
        estimate_memory(_program(lambda x: mb.relu(x=x)), "prefill")


def test_without_a_function_name_the_default_function_is_estimated():
    """Found in review: a package whose default function is not ``main`` needed the name spelled out."""
    prog = _program(lambda x: mb.relu(x=x))
    prog.functions["prefill"] = prog.functions.pop("main")
    prog.default_function_name = "prefill"
    assert estimate_memory(prog) == estimate_memory(prog, "prefill")
    assert estimate_memory(prog).function == "prefill"


def test_kv_cache_states_are_reported_apart():
    prog = kv_cache_program()
    cache_bytes = math.prod(CACHE_SHAPE) * HALF
    for name in ("prefill", "decode"):
        assert estimate_memory(prog, name).state_bytes == 2 * cache_bytes


WEIGHT_SHAPE = (256, 256)
COMPRESSED_WEIGHTS = {
    "int8 per channel": (
        lambda: mb.constexpr_blockwise_shift_scale(
            data=np.ones(WEIGHT_SHAPE, np.int8), scale=np.ones((256, 1), np.float16)
        ),
        256 * 256 + 256 * HALF,
    ),
    "int4 blockwise": (
        lambda: mb.constexpr_blockwise_shift_scale(
            data=np.ones(WEIGHT_SHAPE, types.np_int4_dtype), scale=np.ones((256, 8), np.float16)
        ),
        256 * 256 // 2 + 256 * 8 * HALF,
    ),
    "4-bit palette": (
        lambda: mb.constexpr_lut_to_dense(
            indices=np.zeros(WEIGHT_SHAPE, types.np_uint4_dtype), lut=np.ones((1, 1, 16, 1), np.float16)
        ),
        256 * 256 // 2 + 16 * HALF,
    ),
}


@pytest.mark.parametrize("kind", COMPRESSED_WEIGHTS)
def test_compressed_weights_count_at_their_stored_size(kind):
    make_weight, stored = COMPRESSED_WEIGHTS[kind]
    x_spec = mb.TensorSpec((4, 256), dtype=types.fp16)

    @mb.program(input_specs=[x_spec], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.matmul(x=x, y=make_weight(), name="mm")

    estimate = estimate_memory(prog)
    assert estimate.weights_bytes == stored + 2  # and matmul's two bool transpose flags
    assert estimate.peak_live_bytes == 2 * 4 * 256 * HALF


def test_the_timeline_gives_each_ops_live_bytes_and_its_peak_is_the_estimates():
    estimate = estimate_memory(_program(_a_kept_for_d))
    timeline = estimate.timeline
    assert [(point.position, point.op_name, point.outputs) for point in timeline] == [
        (index, name, (name,)) for index, name in enumerate("abcd")
    ]
    # x dies at a; b at c; a, c and the output d are alive at d.
    assert [point.live_bytes for point in timeline] == [2 * X_BYTES, 2 * X_BYTES, 3 * X_BYTES, 3 * X_BYTES]
    assert max(point.live_bytes for point in timeline) == estimate.peak_live_bytes
    assert all(point.tensor.bytes == X_BYTES for point in timeline)


def test_a_fused_attentions_point_holds_its_scores():
    case = AttentionCase(batch=(2, 4), query_length=128, key_length=96, head_dim=16, value_dim=8)
    estimate = estimate_memory(sdpa_program(case))
    (point,) = [point for point in estimate.timeline if point.op_type == "scaled_dot_product_attention"]
    assert point.tensor == estimate.largest_tensor
    assert point.live_bytes == estimate.peak_live_bytes


def test_an_op_holding_blocks_counts_their_peak_and_names_their_vars():
    def body(x):
        pred = mb.greater(x=mb.reduce_sum(x=x, name="sum"), y=0.0, name="pred")
        inner = mb.cond(
            pred=pred,
            _true_fn=lambda: mb.relu(x=mb.tanh(x=x, name="t"), name="u"),
            _false_fn=lambda: mb.sigmoid(x=x, name="s"),
            name="branch",
        )
        return mb.relu(x=inner, name="out")

    estimate = estimate_memory(_program(body))
    (branch,) = [point for point in estimate.timeline if point.op_type == "cond"]
    assert {"t", "u", "s"} <= set(branch.outputs)
    assert branch.live_bytes == estimate.peak_live_bytes == 4 * X_BYTES + 1
    assert branch.tensor.bytes == X_BYTES


def test_the_estimates_dict_leaves_the_timeline_out():
    estimate = estimate_memory(_program(lambda x: mb.relu(x=x, name="r")))
    assert estimate.timeline and "timeline" not in estimate.to_dict()
    assert estimate.to_dict()["peak_live_bytes"] == estimate.peak_live_bytes
