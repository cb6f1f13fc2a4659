"""Benchmark: the memory a Llama-3.2-1B-shaped attention layer asks for, before and after
``slice_attention``, with its KV cache as Core ML state and its keys and values repeated for the
query heads, as exports write it.

Run from a checkout (``PYTHONPATH=.`` or with the project installed)::

    python benchmarks/grouped_query.py            # S = 8192 and 131072, what docs/benchmarks.md shows
    python benchmarks/grouped_query.py --quick    # S = 1024

The layer (``sdpa_slicer._tools.demo.grouped_query_layer``): hidden 2048, 32 query heads, 8 KV heads,
head dim 64, fp16; ``x -> q, k, v projections -> write k and v into the cache states at a
position -> repeat the cache's 8 heads to 32 (transformers' repeat_kv) ->
scaled_dot_product_attention with a (1, 1, L, S) mask input -> output projection``. Prefill has
L = 128, decode L = 1. Every figure is
``sdpa_slicer.estimate_memory``'s (a static estimate of what the graph asks for, see
docs/memory.md); the floor is the same layer with 8 query heads and nothing repeated.
"""

from __future__ import annotations

import sdpa_slicer  # noqa: F401  first: it keeps coremltools' import-time warnings quiet

# isort: split
import argparse
from typing import Optional, Sequence

import attrs
from coremltools.converters.mil.mil import Program

from machine import machine_description
from sdpa_slicer import MemoryEstimate, estimate_memory, slice_attention
from sdpa_slicer._text import format_bytes, format_table
from sdpa_slicer._tools.demo import KV_HEADS, QUERY_HEADS, grouped_query_program

PREFILL_LENGTH = 128
CACHE_LENGTHS = (8192, 131072)
QUICK_CACHE_LENGTHS = (1024,)
CALLS = {"prefill": PREFILL_LENGTH, "decode": 1}
COLUMNS = (
    "S",
    "call",
    "peak before",
    "peak after",
    "not folded",
    "floor",
    "largest before",
    "largest after",
    "largest after is",
)


@attrs.frozen
class Row:
    cache_length: int
    call: str
    peak_before: int
    peak_after: int
    largest_before: int
    largest_after: int
    largest_after_name: str
    peak_not_folded: int
    """Peak after slicing with ``fold_repeated_kv=False``: the repeated cache stays."""
    floor_peak: int
    """Peak of the same layer with ``KV_HEADS`` query heads and no repeat, sliced."""

    def cells(self) -> list[str]:
        return [
            str(self.cache_length),
            self.call,
            *(
                format_bytes(size)
                for size in (self.peak_before, self.peak_after, self.peak_not_folded, self.floor_peak)
            ),
            format_bytes(self.largest_before),
            format_bytes(self.largest_after),
            self.largest_after_name,
        ]


def llama_layer(query_length: int, cache_length: int, query_heads: int = QUERY_HEADS) -> Program:
    """The layer as a one-function program; with ``query_heads == KV_HEADS`` nothing is repeated."""
    return grouped_query_program({"main": query_length}, cache_length, query_heads)


def sliced_estimate(
    query_length: int, cache_length: int, query_heads: int = QUERY_HEADS, **options: bool
) -> MemoryEstimate:
    """The memory estimate of the layer after ``slice_attention`` with default options but ``options``."""
    prog = llama_layer(query_length, cache_length, query_heads)
    slice_attention(prog, **options)
    return estimate_memory(prog)


def measure(cache_length: int, call: str) -> Row:
    """The layer for ``call`` before and after slicing with default options; also sliced without
    folding, and the floor."""
    length = CALLS[call]
    before = estimate_memory(llama_layer(length, cache_length))
    after = sliced_estimate(length, cache_length)
    assert after.largest_tensor is not None
    return Row(
        cache_length=cache_length,
        call=call,
        peak_before=before.peak_live_bytes,
        peak_after=after.peak_live_bytes,
        largest_before=before.largest_tensor_bytes,
        largest_after=after.largest_tensor_bytes,
        largest_after_name=f"{after.largest_tensor.name} ({after.largest_tensor.op_type})",
        peak_not_folded=sliced_estimate(length, cache_length, fold_repeated_kv=False).peak_live_bytes,
        floor_peak=sliced_estimate(length, cache_length, query_heads=KV_HEADS).peak_live_bytes,
    )


def table(cache_lengths: Sequence[int]) -> list[str]:
    rows = [measure(cache_length, call) for cache_length in cache_lengths for call in CALLS]
    return format_table(COLUMNS, [row.cells() for row in rows])


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="S = 1024 only")
    args = parser.parse_args(argv)
    print("\n".join(machine_description()), end="\n\n")
    print("\n".join(table(QUICK_CACHE_LENGTHS if args.quick else CACHE_LENGTHS)))


if __name__ == "__main__":
    main()
