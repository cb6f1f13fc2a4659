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
