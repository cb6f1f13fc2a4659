"""The PyTorch pieces of a Llama-style decoder layer shared by the end-to-end tests: RMSNorm, RoPE
with ``rotate_half``, grouped-query projections and the SiLU-gated MLP.

Needs PyTorch; without it, collecting this module (for doctests) is skipped.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is needed for the Llama-style layers")
nn = torch.nn
F = torch.nn.functional

DIM, HEADS, KV_HEADS, HIDDEN = 32, 4, 2, 64
HEAD_DIM = DIM // HEADS
RMS_EPS = 1e-6


class RMSNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    # Python-int bounds: a traced x.shape[-1] // 2 trips the frontend's int conversion with recent torch.
    return torch.cat((-x[..., HEAD_DIM // 2 :], x[..., : HEAD_DIM // 2]), dim=-1)


class LlamaWeights(nn.Module):
    """The weights of one decoder layer and the steps around its attention."""

    def __init__(self) -> None:
        super().__init__()
        self.attention_norm, self.mlp_norm = RMSNorm(), RMSNorm()
        self.q = nn.Linear(DIM, HEADS * HEAD_DIM, bias=False)
        self.k = nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
        self.v = nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
        self.o = nn.Linear(HEADS * HEAD_DIM, DIM, bias=False)
        self.gate, self.up = nn.Linear(DIM, HIDDEN, bias=False), nn.Linear(DIM, HIDDEN, bias=False)
        self.down = nn.Linear(HIDDEN, DIM, bias=False)

    def rotated_qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries ``(B, HEADS, L, HEAD_DIM)``, keys and values ``(B, KV_HEADS, L, HEAD_DIM)``, RoPE on q and k."""
        h = self.attention_norm(x)
        q = self.q(h).unflatten(-1, (HEADS, HEAD_DIM)).transpose(1, 2)
        k = self.k(h).unflatten(-1, (KV_HEADS, HEAD_DIM)).transpose(1, 2)
        v = self.v(h).unflatten(-1, (KV_HEADS, HEAD_DIM)).transpose(1, 2)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def finish(self, x: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """The residual stream after the output projection of ``attention`` and the MLP."""
        x = x + self.o(attention.transpose(1, 2).flatten(2))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def repeat_kv(x: torch.Tensor) -> torch.Tensor:
    """Grouped-query keys or values repeated to one per query head."""
    return x.repeat_interleave(HEADS // KV_HEADS, dim=1)


def repeat_kv_expand(x: torch.Tensor, length: int) -> torch.Tensor:
    """transformers' ``repeat_kv``: a new axis expanded to the repeat, merged into the heads. Sizes
    are Python ints: a traced ``x.shape`` trips the frontend's int conversion with recent NumPy."""
    return x[:, :, None].expand(1, KV_HEADS, HEADS // KV_HEADS, length, HEAD_DIM).reshape(1, HEADS, length, HEAD_DIM)


def expand_one_head(x: torch.Tensor, length: int) -> torch.Tensor:
    """Multi-query attention: the first key/value head expanded over all query heads."""
    return x[:, :1].expand(1, HEADS, length, HEAD_DIM)


REPEATS = {
    "repeat_interleave": lambda x, length: repeat_kv(x),
    "repeat_kv": repeat_kv_expand,
    "expand": expand_one_head,
}
"""How exports make one key/value head per query head from a cache of ``length`` positions."""


class CachedAttention(nn.Module):
    """``forward(q (1, HEADS, L, HEAD_DIM), k, v (1, KV_HEADS, L, HEAD_DIM), position (1,) int32, mask)``:
    writes ``k`` and ``v`` into the cache buffers at ``position`` and attends over the whole cache,
    its heads repeated by ``repeat`` for the query heads."""

    def __init__(self, repeat: str, length: int, cache_length: int) -> None:
        super().__init__()
        self.repeat, self.length, self.cache_length = REPEATS[repeat], length, cache_length
        for name in ("k_cache", "v_cache"):
            self.register_buffer(name, torch.zeros(1, KV_HEADS, cache_length, HEAD_DIM))

    def forward(self, q, k, v, position, mask):  # type: ignore[no-untyped-def]
        start = position[0]
        self.k_cache[:, :, start : start + self.length] = k
        self.v_cache[:, :, start : start + self.length] = v
        keys, values = (self.repeat(cache, self.cache_length) for cache in (self.k_cache, self.v_cache))
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
