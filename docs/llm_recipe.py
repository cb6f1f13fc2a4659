"""docs/llm-recipe.md as one script: a tiny Llama-style model with its KV cache in buffers,
converted with Core ML states, its weights compressed, prefill and decode combined in one
package, sliced, and checked with ``evaluate``. Run it in an empty folder, where it writes the
packages (again on a second run): ``python llm_recipe.py`` (needs PyTorch; about 10 s)."""

import coremltools as ct
import coremltools.optimize.coreml as cto
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sdpa_slicer import evaluate, load_package, save_package, slice_attention

VOCAB, LAYERS, DIM, HEADS, KV_HEADS, HIDDEN = 64, 2, 32, 4, 2, 64
HEAD_DIM = DIM // HEADS
CACHE_LENGTH, PREFILL_LENGTH = 128, 64
CACHE_SHAPE = (LAYERS, 1, KV_HEADS, CACHE_LENGTH, HEAD_DIM)
CACHE_NAMES = ("k_cache", "v_cache")


class RMSNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(DIM))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def rotate_half(x):
    return torch.cat((-x[..., HEAD_DIM // 2 :], x[..., : HEAD_DIM // 2]), dim=-1)


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention_norm, self.mlp_norm = RMSNorm(), RMSNorm()
        self.q = nn.Linear(DIM, HEADS * HEAD_DIM, bias=False)
        self.k = nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
        self.v = nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
        self.o = nn.Linear(HEADS * HEAD_DIM, DIM, bias=False)
        self.gate, self.up = nn.Linear(DIM, HIDDEN, bias=False), nn.Linear(DIM, HIDDEN, bias=False)
        self.down = nn.Linear(HIDDEN, DIM, bias=False)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList([Layer() for _ in range(LAYERS)])
        self.norm = RMSNorm()
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.register_buffer("inv_freq", 10000.0 ** -(torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
        for name in CACHE_NAMES:
            self.register_buffer(name, torch.zeros(CACHE_SHAPE))

    def rotary(self, position, length):
        """RoPE's cos and sin, ``(length, HEAD_DIM)``, for the positions from ``position[0]`` on."""
        angles = (position + torch.arange(length)).float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()

    def forward(self, input_ids, position, mask):  # (1, L) int32, (1,) int32, (1, 1, L, S)
        length = input_ids.shape[-1]
        start = position[0]
        cos, sin = self.rotary(position, length)
        x = self.embedding(input_ids)
        for index, block in enumerate(self.blocks):
            h = block.attention_norm(x)
            q = block.q(h).unflatten(-1, (HEADS, HEAD_DIM)).transpose(1, 2)
            k = block.k(h).unflatten(-1, (KV_HEADS, HEAD_DIM)).transpose(1, 2)
            v = block.v(h).unflatten(-1, (KV_HEADS, HEAD_DIM)).transpose(1, 2)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            self.k_cache[index, :, :, start : start + length] = k
            self.v_cache[index, :, :, start : start + length] = v
            keys = self.k_cache[index].repeat_interleave(HEADS // KV_HEADS, dim=1)
            values = self.v_cache[index].repeat_interleave(HEADS // KV_HEADS, dim=1)
            attention = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            x = x + block.o(attention.transpose(1, 2).flatten(2))
            h = block.mlp_norm(x)
            x = x + block.down(F.silu(block.gate(h)) * block.up(h))
        return self.head(self.norm(x))


torch.manual_seed(0)
model = Model().eval()


def convert(model, length):
    example = (
        torch.zeros(1, length, dtype=torch.int32),
        torch.zeros(1, dtype=torch.int32),
        torch.zeros(1, 1, length, CACHE_LENGTH),
    )
    with torch.no_grad():
        traced = torch.jit.trace(model, example)
    for name in CACHE_NAMES:  # tracing ran the model once, writing into its caches
        getattr(model, name).zero_()
    return ct.convert(
        traced,
        inputs=[
            ct.TensorType(name="input_ids", shape=(1, length), dtype=np.int32),
            ct.TensorType(name="position", shape=(1,), dtype=np.int32),
            ct.TensorType(name="mask", shape=(1, 1, length, CACHE_LENGTH), dtype=np.float16),
        ],
        outputs=[ct.TensorType(name="logits", dtype=np.float16)],
        states=[
            ct.StateType(wrapped_type=ct.TensorType(shape=CACHE_SHAPE, dtype=np.float16), name=name)
            for name in CACHE_NAMES
        ],
        minimum_deployment_target=ct.target.iOS18,
        convert_to="mlprogram",
        skip_model_load=True,
    )


convert(model, PREFILL_LENGTH).save("prefill.mlpackage")
convert(model, 1).save("decode.mlpackage")

int8 = cto.OptimizationConfig(cto.OpLinearQuantizerConfig(mode="linear_symmetric", weight_threshold=32))
palettes = cto.OptimizationConfig(cto.OpPalettizerConfig(mode="uniform", nbits=4, weight_threshold=32))

for name in ("prefill", "decode"):
    mlmodel = ct.models.MLModel(f"{name}.mlpackage", skip_model_load=True)
    cto.linear_quantize_weights(mlmodel, int8).save(f"{name}-int8.mlpackage")
    cto.palettize_weights(mlmodel, palettes).save(f"{name}-4bit.mlpackage")

COMPRESSIONS = ("int8", "4bit")

for compression in COMPRESSIONS:
    descriptor = ct.utils.MultiFunctionDescriptor()
    descriptor.add_function(f"prefill-{compression}.mlpackage", "main", "prefill")
    descriptor.add_function(f"decode-{compression}.mlpackage", "main", "decode")
    descriptor.default_function_name = "prefill"
    ct.utils.save_multifunction(descriptor, f"llama-{compression}.mlpackage")

for compression in COMPRESSIONS:
    package = load_package(f"llama-{compression}.mlpackage")
    print(slice_attention(package.program, num_chunks=4))
    save_package(package, f"llama-{compression}-sliced.mlpackage", force=True)


def call(tokens, position):
    """The inputs of one call: ``tokens`` written to the cache from ``position`` on."""
    visible = np.arange(CACHE_LENGTH) <= position + np.arange(len(tokens))[:, None]
    return {
        "input_ids": np.array([tokens], np.int32),
        "position": np.array([position], np.int32),
        "mask": np.where(visible, 0.0, -np.inf).astype(np.float16)[None, None],
    }


def run(path, prompt, tokens):
    """The logits of a prefill call on ``prompt`` and of a decode call per token, and the caches."""
    prog = load_package(path).program
    states = {}  # k_cache and v_cache start as zeros
    logits = [evaluate(prog, call(prompt, 0), "prefill", states)["logits"]]
    for step, token in enumerate(tokens):
        logits.append(evaluate(prog, call([token], len(prompt) + step), "decode", states)["logits"])
    return logits, [states[name] for name in CACHE_NAMES]


def difference(got, want):
    """The largest |got - want| of the arrays, relative to the largest |want| of each."""
    return max(float(np.abs(g.astype(np.float64) - w).max() / np.abs(w).max()) for g, w in zip(got, want))


rng = np.random.default_rng(1)
prompt = rng.integers(0, VOCAB, PREFILL_LENGTH).tolist()
tokens = rng.integers(0, VOCAB, 3).tolist()

for compression in COMPRESSIONS:
    want, want_caches = run(f"llama-{compression}.mlpackage", prompt, tokens)
    got, got_caches = run(f"llama-{compression}-sliced.mlpackage", prompt, tokens)
    print(
        f"{compression} sliced against unsliced: logits {difference(got, want):.1e}, "
        f"caches {difference(got_caches, want_caches):.1e} of the largest value"
    )
