"""``benchmarks/vision.py`` times what its tables say: its conv variants compute the kernel's conv."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="PyTorch is needed for the benchmark's models")
pytest.importorskip("diffusers", reason="diffusers is needed for the benchmark's models")
pytest.importorskip("transformers", reason="transformers is needed for the benchmark's models")

import vision as benchmark  # noqa: E402
from sdpa_slicer._interpreter.kernels import KERNELS  # noqa: E402


@pytest.mark.parametrize("variant", [benchmark.conv_im2col, benchmark.conv_per_output])
def test_each_conv_variant_computes_the_kernels_same_padded_conv(variant):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    want = KERNELS["conv"].fn(x=x, weight=weight, pad_type="same")
    np.testing.assert_allclose(variant(x, weight), want, rtol=1e-5, atol=1e-5)


def test_the_benchmark_times_the_models_and_convolutions_it_names():
    assert set(benchmark.QUICK_MODELS) <= set(benchmark.MODELS)
    assert all(weight[1] == x[1] and weight[-1] == 3 for x, weight in benchmark.CONV_SHAPES)
    widths = benchmark.MODELS["unet (SD 1.5 widths)"]().module.model.config.block_out_channels
    assert tuple(widths) == benchmark.SD15_WIDTHS
