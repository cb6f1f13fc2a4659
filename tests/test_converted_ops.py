"""The ops of vision, diffusion and speech models as coremltools' torch frontend emits them: each
PyTorch function below is converted at fp32 and ``evaluate`` must compute what PyTorch computes.

The kernel tests check each op against its definition; these check that the frontend's way of
using it (its padding, its sampling mode, its decomposition of what has no MIL op) comes out
as PyTorch means it.
"""

from __future__ import annotations

from typing import Callable

import coremltools as ct
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is needed to convert the functions")
F = torch.nn.functional

from graph import op_counts  # noqa: E402
from sdpa_slicer import evaluate  # noqa: E402

RELATIVE = 1e-4
"""max |got - want| <= RELATIVE * max |want|, as in the other fp32 end-to-end tests."""
IMAGE = (1, 4, 9, 8)
SEED = 0


def _weights(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(SEED + len(shape)))


CONV_WEIGHT, DEPTHWISE_WEIGHT, TRANSPOSE_WEIGHT = _weights(6, 2, 3, 2), _weights(8, 1, 3, 3), _weights(4, 3, 3, 3)
CONV1D_WEIGHT, CONV3D_WEIGHT = _weights(5, 4, 3), _weights(3, 4, 2, 2, 2)
NORM_WEIGHT, NORM_BIAS, EINSUM_OPERAND = _weights(4), _weights(4, 1).flatten(), _weights(1, 8, 9, 5)
GRID = torch.rand(1, 5, 7, 2, generator=torch.Generator().manual_seed(SEED)) * 2.6 - 1.3
THETA = torch.tensor([[[0.9, -0.3, 0.1], [0.2, 1.1, -0.2]]])
SCATTER_INDEX = torch.tensor([[0, 2, 1, 0]] * 4).reshape(1, 4, 1, 4).expand(1, 4, 9, 4)

CASES: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], str]] = {
    "conv2d groups dilation stride": (
        lambda x: F.conv2d(x, CONV_WEIGHT, stride=(2, 1), padding=(1, 2), dilation=(2, 1), groups=2),
        "conv",
    ),
    "conv2d same": (lambda x: F.conv2d(x, CONV_WEIGHT[:, :, :, :1].repeat(1, 2, 1, 2), padding="same"), "conv"),
    "depthwise conv2d": (lambda x: F.conv2d(x, DEPTHWISE_WEIGHT, padding=1, groups=4), "conv"),
    "conv1d": (lambda x: F.conv1d(x.flatten(2), CONV1D_WEIGHT, stride=2, padding=1), "conv"),
    "conv3d": (lambda x: F.conv3d(x.unsqueeze(2).expand(1, 4, 3, 9, 8), CONV3D_WEIGHT, stride=(1, 2, 2)), "conv"),
    "conv_transpose2d output_padding": (
        lambda x: F.conv_transpose2d(x, TRANSPOSE_WEIGHT, stride=2, padding=1, output_padding=1),
        "conv_transpose",
    ),
    "max_pool2d ceil_mode": (lambda x: F.max_pool2d(x, 3, stride=2, padding=1, ceil_mode=True), "max_pool"),
    "avg_pool2d count_include_pad": (lambda x: F.avg_pool2d(x, 3, stride=2, padding=1), "avg_pool"),
    "avg_pool2d exclude pad": (lambda x: F.avg_pool2d(x, 2, padding=1, count_include_pad=False), "avg_pool"),
    "adaptive_avg_pool2d": (lambda x: F.adaptive_avg_pool2d(x, (3, 4)), "avg_pool"),
    "interpolate nearest": (lambda x: F.interpolate(x, scale_factor=2, mode="nearest"), "upsample_nearest_neighbor"),
    "interpolate bilinear": (lambda x: F.interpolate(x, scale_factor=2, mode="bilinear"), "upsample_bilinear"),
    "interpolate bilinear align_corners": (
        lambda x: F.interpolate(x, size=(5, 11), mode="bilinear", align_corners=True),
        "upsample_bilinear",
    ),
    "pad reflect": (lambda x: F.pad(x, (1, 2, 2, 1), mode="reflect"), "pad"),
    "pad replicate": (lambda x: F.pad(x, (1, 2, 2, 1), mode="replicate"), "pad"),
    "pad constant": (lambda x: F.pad(x, (1, 2, 2, 1), value=0.5), "pad"),
    "group_norm": (lambda x: F.group_norm(x, 2, NORM_WEIGHT, NORM_BIAS), "reduce_mean"),
    "instance_norm": (lambda x: F.instance_norm(x), "instance_norm"),
    "gelu tanh": (lambda x: F.gelu(x, approximate="tanh"), "gelu"),
    "grid_sample bilinear zeros": (lambda x: F.grid_sample(x, GRID, align_corners=False), "resample"),
    "grid_sample nearest border": (
        lambda x: F.grid_sample(x, GRID, mode="nearest", padding_mode="border", align_corners=True),
        "resample",
    ),
    "grid_sample reflection": (
        lambda x: F.grid_sample(x, GRID, padding_mode="reflection", align_corners=False),
        "resample",
    ),
    "grid_sample reflection aligned": (
        lambda x: F.grid_sample(x, GRID, padding_mode="reflection", align_corners=True),
        "resample",
    ),
    "affine_grid": (
        lambda x: F.grid_sample(x, F.affine_grid(THETA, [1, 4, 6, 5], align_corners=True), align_corners=True),
        "affine",
    ),
    "pixel_shuffle": (lambda x: F.pixel_shuffle(x, 2), "pixel_shuffle"),
    "pixel_unshuffle": (lambda x: F.pixel_unshuffle(x[..., :8, :], 2), "pixel_unshuffle"),
    "einsum nchw,nwhu->nchu": (lambda x: torch.einsum("nchw,nwhu->nchu", x, EINSUM_OPERAND), "einsum"),
    "einsum lowered to matmul": (lambda x: torch.einsum("bchw,bcvw->bhvw", x, x), "matmul"),
    "einsum lowered generically": (lambda x: torch.einsum("bchw,bdhw->bcdh", x, x.flip(1)), "matmul"),
    "cumsum": (lambda x: torch.cumsum(x, dim=2), "cumsum"),
    "topk": (lambda x: torch.topk(x, 3, dim=-1).values, "topk"),
    "argsort": (lambda x: torch.argsort(x, dim=1).float(), "argsort"),
    "scatter": (lambda x: x.scatter(3, SCATTER_INDEX, x[..., :4] * 2.0), "scatter_along_axis"),
    "gather": (lambda x: torch.gather(x, 3, SCATTER_INDEX), "gather_along_axis"),
}
"""name: (function of a (1, 4, 9, 8) image, an op type its conversion must hold)."""


class Function(torch.nn.Module):
    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.function = function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(x)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("name", sorted(CASES))
def test_a_converted_function_computes_what_pytorch_computes(name: str) -> None:
    function, op_type = CASES[name]
    x = torch.randn(*IMAGE, generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        want = function(x).numpy()
        traced = torch.jit.trace(Function(function).eval(), (x,))
    program = ct.convert(
        traced,
        inputs=[ct.TensorType(name="x", shape=IMAGE)],
        outputs=[ct.TensorType(name="out")],
        convert_to="milinternal",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT32,
    )
    assert op_counts(program)[op_type], f"the conversion of {name} has no {op_type}: {sorted(op_counts(program))}"
    got = evaluate(program, {"x": x.numpy()})["out"]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=RELATIVE * np.abs(want).max())
