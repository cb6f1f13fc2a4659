"""Tiny random ``diffusers`` and ``transformers`` models of the families whose attention runs out of
memory on devices (diffusion, vision, speech), wrapped to take tensors and return one tensor, with
example inputs. Nothing is downloaded: every model is built from a config with random weights.

Needs PyTorch, diffusers and transformers; without them, collecting this module is skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import attrs
import coremltools as ct
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is needed for the vision models")
diffusers = pytest.importorskip("diffusers", reason="diffusers is needed for the diffusion models")
transformers = pytest.importorskip("transformers", reason="transformers is needed for the vision and speech models")
nn = torch.nn

OUTPUT_NAME = "out"
LATENT = 32
"""Latents of 32 x 32: self-attention over 1024 tokens in the UNet's first block and the VAE's mid block."""
TEXT_TOKENS, TEXT_DIM = 7, 32
IMAGE = 32
SEED = 0


@attrs.frozen
class VisionModel:
    """A model wrapped to ``forward(*inputs) -> tensor``, and example inputs by name."""

    name: str
    module: nn.Module
    inputs: dict[str, torch.Tensor]


class FirstOutput(nn.Module):
    """``model(**keywords, **fixed)``'s first output: the inputs arrive positionally, in ``names``' order."""

    def __init__(self, call: Callable[..., object], names: tuple[str, ...], **fixed: object) -> None:
        super().__init__()
        self.call, self.names, self.fixed = call, names, fixed

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        out = self.call(**dict(zip(self.names, tensors)), **self.fixed)
        while isinstance(out, (tuple, list)) or hasattr(out, "to_tuple"):
            out = out[0] if isinstance(out, (tuple, list)) else out.to_tuple()[0]
        return out


def randomize(model: nn.Module, seed: int = SEED) -> None:
    """Draw every parameter anew: ``N(0, 1 / fan_in)`` for matrices and kernels, ``1 + N(0, 0.1)`` for
    norm scales and ``N(0, 0.1)`` for the other vectors. Some libraries leave parameters their
    checkpoints fill (zero-initialised adaLN, SAM's neck ~1e-10); this gives every path a signal."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.ndim >= 2:
                parameter.copy_(noise * parameter[0].numel() ** -0.5)
            elif name.endswith("weight") and "norm" in name:
                parameter.copy_(1.0 + 0.1 * noise)
            else:
                parameter.copy_(0.1 * noise)


def _wrap(name: str, model: nn.Module, call: Callable[..., object], inputs: dict, **fixed: object) -> VisionModel:
    randomize(model)
    wrapper = FirstOutput(call, tuple(inputs), **fixed)
    wrapper.add_module("model", model.eval())
    return VisionModel(name, wrapper.eval(), inputs)


def _randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator)


def unet(block_out_channels: tuple[int, int] = (32, 64)) -> VisionModel:
    """Stable Diffusion's UNet: self-attention over the 32 x 32 latents and cross-attention to text
    (Stable Diffusion 1.5's first two blocks are 320 and 640 channels wide)."""
    model = diffusers.UNet2DConditionModel(
        sample_size=LATENT,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=block_out_channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    g = torch.Generator().manual_seed(SEED)
    inputs = {
        "sample": _randn(g, 1, 4, LATENT, LATENT),
        "timestep": torch.tensor([10.0]),
        "encoder_hidden_states": _randn(g, 1, TEXT_TOKENS, TEXT_DIM),
    }
    return _wrap("unet", model, model, inputs, return_dict=False)


def vae_decoder() -> VisionModel:
    """AutoencoderKL's decoder: attention in the mid block over the 32 x 32 latents, one head."""
    model = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=2 * LATENT,
    )
    g = torch.Generator().manual_seed(SEED)
    return _wrap("vae-decoder", model, model.decode, {"z": _randn(g, 1, 4, LATENT, LATENT)}, return_dict=False)


def dit() -> VisionModel:
    """DiT: a class-conditioned transformer over patches of the latents (adaLN-zero)."""
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        num_layers=2,
        sample_size=LATENT,
        patch_size=2,
        norm_num_groups=8,
        num_embeds_ada_norm=10,
    )
    g = torch.Generator().manual_seed(SEED)
    inputs = {
        "hidden_states": _randn(g, 1, 4, LATENT, LATENT),
        "timestep": torch.tensor([10]),
        "class_labels": torch.tensor([3]),
    }
    return _wrap("dit", model, model, inputs, return_dict=False)


def sd3() -> VisionModel:
    """SD3's MMDiT: joint attention over the image patches and the text tokens."""
    model = diffusers.SD3Transformer2DModel(
        sample_size=LATENT,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        caption_projection_dim=32,
        pooled_projection_dim=16,
        out_channels=4,
        pos_embed_max_size=LATENT,
    )
    g = torch.Generator().manual_seed(SEED)
    inputs = {
        "hidden_states": _randn(g, 1, 4, LATENT, LATENT),
        "encoder_hidden_states": _randn(g, 1, TEXT_TOKENS, TEXT_DIM),
        "pooled_projections": _randn(g, 1, 16),
        "timestep": torch.tensor([10.0]),
    }
    return _wrap("sd3", model, model, inputs, return_dict=False)


def _vision_encoder(name: str, model: nn.Module) -> VisionModel:
    g = torch.Generator().manual_seed(SEED)
    return _wrap(name, model, model, {"pixel_values": _randn(g, 1, 3, IMAGE, IMAGE)}, return_dict=False)


VISION_TOWER = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=IMAGE, patch_size=4
)
"""64 patches (plus a class token for ViT and CLIP)."""


def vit() -> VisionModel:
    return _vision_encoder("vit", transformers.ViTModel(transformers.ViTConfig(**VISION_TOWER)))


def clip_vision() -> VisionModel:
    return _vision_encoder("clip-vision", transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION_TOWER)))


def siglip_vision() -> VisionModel:
    return _vision_encoder(
        "siglip-vision", transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION_TOWER))
    )


def sam_vision() -> VisionModel:
    """SAM's image encoder: windowed and global attention with decomposed relative positions, 16 x 16 patches."""
    config = transformers.SamVisionConfig(
        hidden_size=32,
        output_channels=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_dim=64,
        image_size=IMAGE,
        patch_size=2,
        window_size=8,
        global_attn_indexes=(1,),
    )
    return _vision_encoder("sam-vision", transformers.SamVisionModel(config))


DECODER_TOKENS = 32
WHISPER = transformers.WhisperConfig(
    vocab_size=100,
    num_mel_bins=8,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_source_positions=64,
    max_target_positions=DECODER_TOKENS,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    decoder_start_token_id=1,
)
WHISPER_FRAMES = 2 * WHISPER.max_source_positions
"""Mel frames in; the encoder's stride-2 conv halves them to its positions."""


def _whisper() -> nn.Module:
    torch.manual_seed(SEED)
    return transformers.WhisperModel(WHISPER)


def whisper_encoder() -> VisionModel:
    encoder = _whisper().get_encoder()
    g = torch.Generator().manual_seed(SEED)
    inputs = {"input_features": _randn(g, 1, WHISPER.num_mel_bins, WHISPER_FRAMES)}
    return _wrap("whisper-encoder", encoder, encoder, inputs, return_dict=False)


def whisper_decoder() -> VisionModel:
    """Causal self-attention over the tokens and cross-attention to the encoder's positions."""
    decoder = _whisper().get_decoder()
    g = torch.Generator().manual_seed(SEED)
    inputs = {
        "input_ids": torch.randint(3, WHISPER.vocab_size, (1, DECODER_TOKENS), generator=g, dtype=torch.int32),
        "encoder_hidden_states": _randn(g, 1, WHISPER.max_source_positions, WHISPER.d_model),
    }
    return _wrap("whisper-decoder", decoder, decoder, inputs, use_cache=False, return_dict=False)


BUILDERS: dict[str, Callable[[], VisionModel]] = {
    "unet": unet,
    "vae-decoder": vae_decoder,
    "dit": dit,
    "sd3": sd3,
    "vit": vit,
    "clip-vision": clip_vision,
    "siglip-vision": siglip_vision,
    "sam-vision": sam_vision,
    "whisper-encoder": whisper_encoder,
    "whisper-decoder": whisper_decoder,
}


def build(name: str) -> VisionModel:
    """The model ``name`` with the same random weights on every call."""
    torch.manual_seed(SEED)
    return BUILDERS[name]()


def convert(model: VisionModel, precision: object) -> object:
    """``model`` traced and converted to an iOS18 MIL program at ``precision``, its output named ``out``."""
    with torch.no_grad():
        traced = torch.jit.trace(model.module, tuple(model.inputs.values()))
    return ct.convert(
        traced,
        inputs=[
            ct.TensorType(name=name, shape=tuple(t.shape), dtype=np.float32 if t.is_floating_point() else np.int32)
            for name, t in model.inputs.items()
        ],
        outputs=[ct.TensorType(name=OUTPUT_NAME)],
        convert_to="milinternal",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=precision,
    )


def torch_output(model: VisionModel) -> np.ndarray:
    with torch.no_grad():
        return model.module(*model.inputs.values()).numpy()


def sam_vision_package(path: Path) -> Path:
    """SAM's image encoder (``sam_vision``) converted to an fp32 ML program and saved at ``path``:
    the package docs/memory.md draws."""
    model = build("sam-vision")
    with torch.no_grad():
        traced = torch.jit.trace(model.module, tuple(model.inputs.values()))
    converted = ct.convert(
        traced,
        inputs=[ct.TensorType(name=name, shape=tuple(t.shape)) for name, t in model.inputs.items()],
        outputs=[ct.TensorType(name=OUTPUT_NAME)],
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT32,
    )
    converted.save(str(path))
    return path
