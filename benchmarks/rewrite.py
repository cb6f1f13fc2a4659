"""Benchmarks: sdpa_slicer's rewrite against coremltools' own sliced-Q pass, and ``evaluate``
against NumPy.

Run from a checkout (``PYTHONPATH=.`` or with the project installed)::

    python benchmarks/rewrite.py            # the full run docs/benchmarks.md shows
    python benchmarks/rewrite.py --quick    # small sizes, a few seconds

Tables:

1. Rewrite time of a chain of N ``scaled_dot_product_attention`` ops (q/k/v (1, 32, 2048, 64)
   fp16, iOS18, 16 chunks) for sdpa_slicer, for coremltools'
   ``common::scaled_dot_product_attention_sliced_q`` (quadratic in program size, so measured
   only up to ``--upstream-max-sites``), and the builder floor: the time coremltools' builder
   takes to build the rewritten program's ops in a fresh program.
2. Per-site graph metrics of one such attention: ours against the upstream pass.
3. Numerics of scaling the query once (ours) against scaling each chunk's scores (upstream).
4. ``evaluate`` time on an attention program, fused and rewritten, against NumPy: fp32
   throughout, and the same ops as the program, each rounded to the inputs' dtype.
"""

from __future__ import annotations

import sdpa_slicer  # noqa: F401  first: it keeps coremltools' import-time warnings quiet

# isort: split
import argparse
import gc
import math
import time
from collections import Counter
from typing import Callable, Optional, Sequence

import attrs
import coremltools as ct
import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Program, Var, types
from coremltools.converters.mil.mil.passes.graph_pass import PassOption
from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

from machine import machine_description
from sdpa_slicer import estimate_memory, evaluate, slice_attention
from sdpa_slicer._memory import var_bytes
from sdpa_slicer._text import format_bytes, format_table
from timing import best_of

UPSTREAM_PASS = "common::scaled_dot_product_attention_sliced_q"
OPSET = ct.target.iOS18
NUM_CHUNKS = 16
REWRITE_SHAPE = (1, 32, 2048, 64)
"""q, k and v of every attention op: batch, heads, L = S, E."""


@attrs.frozen
class Sizes:
    """What one run measures."""

    sites: tuple[int, ...]
    upstream_max_sites: int
    repeats: int
    evaluate_shape: tuple[int, ...]
    numerics_shape: tuple[int, ...]
    numerics_seeds: int


FULL = Sizes(
    sites=(16, 64, 128, 256),
    upstream_max_sites=128,
    repeats=5,
    evaluate_shape=(1, 32, 1024, 64),
    numerics_shape=(1, 8, 512, 64),
    numerics_seeds=5,
)
QUICK = Sizes(
    sites=(4, 16),
    upstream_max_sites=16,
    repeats=2,
    evaluate_shape=(1, 8, 256, 64),
    numerics_shape=(1, 4, 128, 64),
    numerics_seeds=2,
)
NUMERICS_HEAD_DIMS = (64, 80, 128)
"""1/sqrt(64) is a power of two (scaling is exact); 1/sqrt(80) and 1/sqrt(128) are not."""


# --- programs ---------------------------------------------------------------------------


def attention_chain(num_sites: int, shape: Sequence[int] = REWRITE_SHAPE, dtype: type = types.fp16) -> Program:
    """``main(q, k, v)``: ``x = q``, then ``num_sites`` times ``x = sdpa(x, k, v)``; nothing else."""

    @mb.program(input_specs=[mb.TensorSpec(tuple(shape), dtype=dtype) for _ in range(3)], opset_version=OPSET)
    def prog(q, k, v):
        x = q
        for index in range(num_sites):
            x = mb.scaled_dot_product_attention(query=x, key=k, value=v, name=f"attention_{index}")
        return x

    return prog


def rewrite_ours(prog: Program) -> None:
    slice_attention(prog, num_chunks=NUM_CHUNKS)


def rewrite_upstream(prog: Program) -> None:
    graph_pass = PASS_REGISTRY[UPSTREAM_PASS]
    graph_pass.set_options([PassOption("min_seq_length", 1), PassOption("seq_length_divider", NUM_CHUNKS)])
    graph_pass(prog)


def rebuild(prog: Program) -> Program:
    """A fresh program holding the ops of ``prog``'s ``main(q, k, v)``, each built again by
    coremltools' builder (consts included), in order, with the same names."""
    function = prog.functions["main"]
    originals = list(function.inputs.values())
    specs = [mb.TensorSpec(tuple(var.shape), dtype=var.dtype) for var in originals]

    @mb.program(input_specs=specs, opset_version=function.opset_version)
    def rebuilt(q, k, v):
        env: dict[Var, Var] = dict(zip(originals, (q, k, v)))
        for op in function.operations:
            if op.op_type == "const":
                env[op.outputs[0]] = mb.const(val=op.outputs[0].val, name=op.name)
                continue
            arguments = {
                name: tuple(env[var] for var in value) if isinstance(value, (tuple, list)) else env[value]
                for name, value in op.inputs.items()
            }
            outputs = getattr(mb, op.op_type)(name=op.name, **arguments)
            env.update(zip(op.outputs, outputs if isinstance(outputs, (tuple, list)) else (outputs,)))
        return tuple(env[var] for var in function.outputs)

    return rebuilt


# --- timing -----------------------------------------------------------------------------


def rewrite_cpu_time(rewrite: Callable[[Program], None], num_sites: int) -> tuple[float, Program]:
    """CPU seconds one rewrite of a fresh ``attention_chain(num_sites)`` (built untimed) takes,
    and the rewritten program."""
    prog = attention_chain(num_sites)
    gc.collect()
    start = time.process_time()
    rewrite(prog)
    return time.process_time() - start, prog


def builder_floor(rewritten: Program) -> float:
    """CPU seconds the builder takes to build ``rewritten``'s ops afresh, with the cyclic garbage
    collector paused as ``slice_attention`` pauses it."""
    gc.collect()
    gc.disable()
    try:
        start = time.process_time()
        rebuild(rewritten)
        return time.process_time() - start
    finally:
        gc.enable()


# --- tables -----------------------------------------------------------------------------


def rewrite_time_table(sizes: Sizes) -> list[str]:
    best = {num_sites: (math.inf, math.inf) for num_sites in sizes.sites}
    # Sizes take turns, so that a busy moment of the machine does not skew one size only.
    for _ in range(sizes.repeats):
        for num_sites in sizes.sites:
            seconds, rewritten = rewrite_cpu_time(rewrite_ours, num_sites)
            floor = builder_floor(rewritten)
            best[num_sites] = (min(best[num_sites][0], seconds), min(best[num_sites][1], floor))
    rows = []
    per_site = {}
    for num_sites, (ours, floor) in best.items():
        per_site[num_sites] = ours / num_sites
        upstream: Optional[float] = None
        if num_sites <= sizes.upstream_max_sites:
            upstream, _ = rewrite_cpu_time(rewrite_upstream, num_sites)
        rows.append(
            [
                str(num_sites),
                f"{ours:.3f}",
                f"{1000 * ours / num_sites:.2f}",
                f"{floor:.3f}",
                f"{ours / floor:.2f}",
                "-" if upstream is None else f"{upstream:.3f}",
                "-" if upstream is None else f"{upstream / ours:.1f}",
            ]
        )
    smallest, largest = min(per_site), max(per_site)
    ours_total, floor_total = (sum(times[index] for times in best.values()) for index in (0, 1))
    header = ["sites", "ours s", "ours ms/site", "floor s", "ours/floor", "upstream s", "upstream/ours"]
    return [
        f"Rewrite CPU time: chain of N attention ops, q/k/v {REWRITE_SHAPE} fp16, {NUM_CHUNKS} chunks "
        f"(ours and floor best of {sizes.repeats}, upstream once and only up to {sizes.upstream_max_sites} sites)",
        *format_table(header, rows),
        f"ours per site at {largest} sites / at {smallest} sites: {per_site[largest] / per_site[smallest]:.2f}",
        f"ours/floor over all sizes together: {ours_total / floor_total:.2f}",
    ]


@attrs.frozen
class GraphMetrics:
    """What one rewritten attention site costs in the graph."""

    non_const_ops: int
    const_ops: int
    op_counts: str
    concat_bytes: int
    """Bytes written by concat ops: each copies its whole output."""
    largest_intermediate: int
    peak_live: int


def graph_metrics(prog: Program) -> GraphMetrics:
    ops = list(prog.functions["main"].operations)
    counts = Counter(op.op_type for op in ops if op.op_type != "const")
    estimate = estimate_memory(prog)
    return GraphMetrics(
        non_const_ops=sum(counts.values()),
        const_ops=sum(op.op_type == "const" for op in ops),
        op_counts=", ".join(f"{count} {op_type}" for op_type, count in sorted(counts.items())),
        concat_bytes=sum(var_bytes(op.outputs[0]) or 0 for op in ops if op.op_type == "concat"),
        largest_intermediate=estimate.largest_tensor_bytes,
        peak_live=estimate.peak_live_bytes,
    )


def graph_metrics_table() -> list[str]:
    programs = {name: attention_chain(1) for name in ("fused op (before)", "sdpa_slicer", "upstream pass")}
    rewrite_ours(programs["sdpa_slicer"])
    rewrite_upstream(programs["upstream pass"])
    metrics = {name: graph_metrics(prog) for name, prog in programs.items()}
    header = ["graph", "non-const ops", "const ops", "concat bytes", "largest intermediate", "peak live"]
    rows = [
        [
            name,
            str(m.non_const_ops),
            str(m.const_ops),
            format_bytes(m.concat_bytes),
            format_bytes(m.largest_intermediate),
            format_bytes(m.peak_live),
        ]
        for name, m in metrics.items()
    ]
    return [
        f"Per-site graph: one attention, q/k/v {REWRITE_SHAPE} fp16, {NUM_CHUNKS} chunks "
        "(largest intermediate and peak live from estimate_memory)",
        *format_table(header, rows),
        *(f"  {name}: {m.op_counts}" for name, m in metrics.items()),
    ]


def relative_error(result: np.ndarray, reference: np.ndarray) -> float:
    """Largest absolute error relative to the reference's largest magnitude."""
    return float(np.max(np.abs(result.astype(np.float64) - reference)) / np.max(np.abs(reference)))


def softmax_rows(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in place; returns ``scores``."""
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


def float64_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    return softmax_rows(q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])) @ v


def numerics_table(sizes: Sizes) -> list[str]:
    rows = []
    for dtype in (types.fp16, types.fp32):
        nptype = types.nptype_from_builtin(dtype)
        for head_dim in NUMERICS_HEAD_DIMS:
            shape = (*sizes.numerics_shape[:-1], head_dim)
            query_scaled = attention_chain(1, shape, dtype)
            rewrite_ours(query_scaled)
            # The upstream pass cuts the same chunks and scales each chunk's scores.
            scores_scaled = attention_chain(1, shape, dtype)
            rewrite_upstream(scores_scaled)
            errors: dict[str, float] = {"query": 0.0, "scores": 0.0}
            for seed in range(sizes.numerics_seeds):
                rng = np.random.default_rng(seed)
                inputs = {name: rng.standard_normal(shape).astype(nptype) for name in ("q", "k", "v")}
                reference = float64_attention(**inputs)
                for name, prog in (("query", query_scaled), ("scores", scores_scaled)):
                    (result,) = evaluate(prog, inputs).values()
                    errors[name] = max(errors[name], relative_error(result, reference))
            rows.append(
                [types.builtin_to_string(dtype), str(head_dim), f"{errors['query']:.2e}", f"{errors['scores']:.2e}"]
            )
    return [
        f"Numerics: scale on Q once (ours) vs on every chunk's scores (upstream), {NUM_CHUNKS} chunks, "
        f"q/k/v {sizes.numerics_shape[:-1]} x E, "
        f"standard normal, worst of {sizes.numerics_seeds} seeds; max |out - ref| / max |ref|, ref in float64",
        *format_table(["dtype", "E", "scale Q", "scale scores"], rows),
    ]


def numpy_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The same math written directly in NumPy: fp32 throughout, the result in the inputs' dtype."""
    dtype = q.dtype
    q, k, v = (np.asarray(x, dtype=np.float32) for x in (q, k, v))
    scores = (q * np.float32(1.0 / math.sqrt(q.shape[-1]))) @ np.swapaxes(k, -1, -2)
    return (softmax_rows(scores) @ v).astype(dtype, copy=False)


def numpy_chunked_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The rewritten graph's math written directly in NumPy: scale Q, then per query chunk
    ``matmul -> softmax -> matmul``, one concat, every op's result rounded to the inputs' dtype
    as ``evaluate`` rounds it (computing in fp32, as its kernels do)."""
    dtype = q.dtype

    def rounded(x: np.ndarray) -> np.ndarray:
        return x.astype(dtype, copy=False)

    k32, v32 = (np.asarray(x, dtype=np.float32) for x in (k, v))
    scale = np.float32(rounded(np.asarray(1.0 / math.sqrt(q.shape[-1]))))  # a constant of the graph's dtype
    scaled = rounded(q.astype(np.float32) * scale)
    outputs = []
    for chunk in np.array_split(scaled, NUM_CHUNKS, axis=-2):
        scores = rounded(chunk.astype(np.float32) @ np.swapaxes(k32, -1, -2)).astype(np.float32)
        weights = rounded(softmax_rows(scores)).astype(np.float32)
        outputs.append(rounded(weights @ v32))
    return np.concatenate(outputs, axis=-2)


def evaluate_table(sizes: Sizes) -> list[str]:
    shape = sizes.evaluate_shape
    rows = []
    for dtype in (types.fp32, types.fp16):
        nptype = types.nptype_from_builtin(dtype)
        rng = np.random.default_rng(0)
        inputs = {name: rng.standard_normal(shape).astype(nptype) for name in ("q", "k", "v")}
        fused = attention_chain(1, shape, dtype)
        chunked = attention_chain(1, shape, dtype)
        rewrite_ours(chunked)
        (rewritten_result,) = evaluate(chunked, inputs).values()
        # The direct implementation must compute what the graph computes, or the timing means nothing.
        np.testing.assert_array_equal(numpy_chunked_attention(**inputs), rewritten_result)
        direct = best_of(lambda: numpy_attention(**inputs), sizes.repeats)
        direct_chunked = best_of(lambda: numpy_chunked_attention(**inputs), sizes.repeats)
        for name, prog, same_math in (
            ("fused op", fused, direct),
            (f"rewritten, {NUM_CHUNKS} chunks", chunked, direct_chunked),
        ):
            seconds = best_of(lambda: evaluate(prog, inputs), sizes.repeats)
            rows.append(
                [
                    types.builtin_to_string(dtype),
                    name,
                    f"{seconds:.3f}",
                    f"{direct:.3f}",
                    f"{seconds / direct:.2f}",
                    f"{same_math:.3f}",
                    f"{seconds / same_math:.2f}",
                ]
            )
    return [
        f"evaluate vs NumPy: one attention, q/k/v {shape}, wall time, best of {sizes.repeats}",
        "numpy: fp32 throughout; same math: the program's own ops written in NumPy, "
        "each result rounded to the inputs' dtype",
        *format_table(["dtype", "program", "evaluate s", "numpy s", "ratio", "same math s", "ratio"], rows),
    ]


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    parser.add_argument(
        "--upstream-max-sites", type=int, default=None, help="time the upstream pass only up to this many sites"
    )
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.upstream_max_sites is not None:
        sizes = attrs.evolve(sizes, upstream_max_sites=args.upstream_max_sites)
    sections = [
        machine_description,
        lambda: rewrite_time_table(sizes),
        graph_metrics_table,
        lambda: numerics_table(sizes),
        lambda: evaluate_table(sizes),
    ]
    for section in sections:
        print("\n".join(section()), end="\n\n", flush=True)


if __name__ == "__main__":
    main()
