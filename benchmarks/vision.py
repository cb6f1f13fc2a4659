"""Benchmark: ``evaluate`` on converted diffusion models, and the ways to run ``conv`` in NumPy.

Run from a checkout, with the test extra, diffusers and transformers installed::

    OPENBLAS_NUM_THREADS=1 python benchmarks/vision.py           # the run docs/benchmarks.md shows
    OPENBLAS_NUM_THREADS=1 python benchmarks/vision.py --quick   # the test UNet alone

Tables:

1. ``evaluate`` wall time (best of ``--repeats``) of diffusers models converted by coremltools,
   as converted and sliced, fp32 and fp16, next to PyTorch's own forward pass (CPU, fp32) in the
   same run: the UNet and the VAE decoder of the tests (32 x 32 latents), and the UNet at Stable
   Diffusion 1.5's widths (320 and 640 channels) over the same latents.
2. ``conv`` three ways on the UNet's convolutions: the kernel's one batched matmul per kernel
   position, im2col (every window copied into one matrix, one matmul), and a loop over output
   positions; the first two are checked equal first.
"""

from __future__ import annotations

import sdpa_slicer  # noqa: F401  first: it keeps coremltools' import-time warnings quiet

# isort: split
import argparse
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import coremltools as ct
import numpy as np

from machine import machine_description
from sdpa_slicer import evaluate, slice_attention
from sdpa_slicer._interpreter.kernels import KERNELS
from timing import best_of

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import torch_converters  # noqa: E402,F401  (registers the converters the models need)
import vision_models  # noqa: E402

NUM_CHUNKS, MIN_SEQ_LENGTH = 4, 16
PRECISIONS = {"fp32": ct.precision.FLOAT32, "fp16": ct.precision.FLOAT16}
SD15_WIDTHS = (320, 640)
MODELS: dict[str, Callable[[], vision_models.VisionModel]] = {
    "unet (tests)": vision_models.unet,
    "vae-decoder (tests)": vision_models.vae_decoder,
    "unet (SD 1.5 widths)": lambda: vision_models.unet(SD15_WIDTHS),
}
QUICK_MODELS = ("unet (tests)",)
CONV_SHAPES = (
    ((1, 32, 32, 32), (32, 32, 3, 3)),
    ((1, 64, 16, 16), (64, 64, 3, 3)),
    ((1, 320, 32, 32), (320, 320, 3, 3)),
    ((1, 640, 16, 16), (640, 640, 3, 3)),
)
"""(input, weight) of 3 x 3 convolutions of the UNets above, stride 1, same padding."""


def evaluate_table(names: Sequence[str], repeats: int) -> list[str]:
    lines = [
        f"evaluate on converted diffusers models, wall time, best of {repeats}; torch: the PyTorch module, CPU fp32",
        "model                 precision  ops   evaluate s  sliced s  torch s  evaluate/torch",
    ]
    for name in names:
        model = MODELS[name]()
        feeds = {key: tensor.numpy() for key, tensor in model.inputs.items()}
        torch_seconds = best_of(lambda: vision_models.torch_output(model), repeats)
        for label, precision in PRECISIONS.items():
            program = vision_models.convert(model, precision)
            ops = sum(op.op_type != "const" for op in program.functions["main"].operations)
            unsliced = best_of(lambda: evaluate(program, feeds), repeats)
            slice_attention(program, num_chunks=NUM_CHUNKS, min_seq_length=MIN_SEQ_LENGTH)
            sliced = best_of(lambda: evaluate(program, feeds), repeats)
            lines.append(
                f"{name:<21} {label:<10} {ops:<5} {unsliced:<11.3f} {sliced:<9.3f} {torch_seconds:<8.3f} "
                f"{unsliced / torch_seconds:.1f}"
            )
    return lines


def conv_im2col(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Stride 1, same padding, one group: every window copied into a (positions, C K K) matrix."""
    k = weight.shape[-1]
    padded = np.pad(x, ((0, 0), (0, 0), (k // 2, k // 2), (k // 2, k // 2)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k), axis=(2, 3))  # N C H W k k
    columns = windows.transpose(0, 2, 3, 1, 4, 5).reshape(x.shape[0], x.shape[2] * x.shape[3], -1)
    out = columns @ weight.reshape(weight.shape[0], -1).T
    return out.transpose(0, 2, 1).reshape(x.shape[0], weight.shape[0], x.shape[2], x.shape[3])


def conv_per_output(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Stride 1, same padding: one tensordot per output position."""
    k = weight.shape[-1]
    padded = np.pad(x, ((0, 0), (0, 0), (k // 2, k // 2), (k // 2, k // 2)))
    out = np.empty((x.shape[0], weight.shape[0]) + x.shape[2:], dtype=x.dtype)
    for h in range(x.shape[2]):
        for w in range(x.shape[3]):
            out[:, :, h, w] = np.tensordot(padded[:, :, h : h + k, w : w + k], weight, axes=([1, 2, 3], [1, 2, 3]))
    return out


def conv_table(repeats: int, shapes: Sequence[tuple[tuple[int, ...], tuple[int, ...]]]) -> list[str]:
    ours = KERNELS["conv"].fn
    lines = [
        f"conv, 3 x 3, stride 1, same padding, fp32, wall time, best of {repeats} (per output: once)",
        "input              weight                 per position s  im2col s  per output s  im2col/ours",
    ]
    rng = np.random.default_rng(0)
    for x_shape, w_shape in shapes:
        x = rng.standard_normal(x_shape).astype(np.float32)
        weight = rng.standard_normal(w_shape).astype(np.float32)
        run_ours = lambda: ours(x=x, weight=weight, pad_type="same")  # noqa: E731
        reference = conv_im2col(x, weight)
        scale = np.abs(reference).max()
        assert np.abs(run_ours() - reference).max() <= 1e-5 * scale, "the conv kernel disagrees with im2col"
        ours_seconds = best_of(run_ours, repeats)
        im2col_seconds = best_of(lambda: conv_im2col(x, weight), repeats)
        per_output_seconds = best_of(lambda: conv_per_output(x, weight), 1)
        lines.append(
            f"{str(x_shape):<18} {str(w_shape):<22} {ours_seconds:<15.4f} {im2col_seconds:<9.4f} "
            f"{per_output_seconds:<13.4f} {im2col_seconds / ours_seconds:.2f}"
        )
    return lines


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the test UNet alone and the small convolutions")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best is shown")
    args = parser.parse_args(argv)
    names = QUICK_MODELS if args.quick else tuple(MODELS)
    shapes = CONV_SHAPES[:2] if args.quick else CONV_SHAPES
    for line in [
        *machine_description(),
        "",
        *evaluate_table(names, args.repeats),
        "",
        *conv_table(args.repeats, shapes),
    ]:
        print(line, flush=True)


if __name__ == "__main__":
    main()
