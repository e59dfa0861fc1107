"""Attention for CNSD: CrossAttention, the GEGLU feed-forward, BasicTransformerBlock, SpatialTransformer.

Chapter 1 introduces these modules (ldm.modules.attention in the original ControlNet code, same
parameter names). Chapter 4 fuses the q/k/v projections of :class:`CrossAttention` (see ``fusion.py``).

Shapes in comments: B batch, N query tokens (h*w of a feature map), M context tokens (77 for text, N
for self-attention), C channels, nh heads, hd head size (C = nh * hd).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# "math" spells attention out as matmul -> softmax (fp32) -> matmul, as the original does: what ONNX
# exports and chapter 4 counts. "sdpa" calls torch's fused scaled_dot_product_attention (chapter 3).
ATTENTION_BACKENDS = ("math", "sdpa")


class CrossAttention(nn.Module):
    """Multi-head attention of x over a context (cross) or over itself (self).

    ``is_self_attention`` is decided by how the layer is built (``context_dim=None``), not by comparing
    sizes: in a small model a cross-attention layer can have ``context_dim == query_dim``.
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64):
        super().__init__()
        inner = heads * dim_head
        self.is_self_attention = context_dim is None
        context_dim = query_dim if context_dim is None else context_dim
        self.heads, self.dim_head, self.scale = heads, dim_head, dim_head ** -0.5
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))
        self.backend = "math"

    def project(self, x: torch.Tensor, context: torch.Tensor | None):
        """q, k, v as (B, N|M, C). Chapter 4's fused layers override this one method."""
        context = x if context is None else context
        return self.to_q(x), self.to_k(context), self.to_v(context)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.is_self_attention and context is not None:
            raise ValueError("self-attention layer was given a context; expected context=None")
        q, k, v = self.project(x, context)
        b = x.shape[0]
        q, k, v = (t.reshape(b, -1, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, N|M, hd)
        if self.backend == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            sim = (q.float() @ k.float().transpose(-1, -2)) * self.scale   # (B, nh, N, M), in fp32 as the original
            out = sim.softmax(dim=-1).to(v.dtype) @ v                       # (B, nh, N, hd)
        out = out.transpose(1, 2).reshape(b, -1, self.heads * self.dim_head)  # (B, N, C)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Linear dim -> 2*inner, split in half: value * gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """ff.net.0 = GEGLU(dim -> 4*dim, gated), ff.net.2 = Linear(4*dim -> dim)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention on the text, feed-forward; each pre-LayerNorm with a residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)          # self
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)   # cross, over the text
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """A feature map as a token sequence: GroupNorm, 1x1 conv in, transformer blocks, 1x1 conv out, residual."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, groups: int = 32):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth))
        self.proj_out = nn.Conv2d(inner, channels, 1)                    # zero-initialised in the original

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        x_in = x
        x = self.proj_in(self.norm(x))
        x = x.flatten(2).transpose(1, 2)                                 # (B, h*w, C)
        for block in self.transformer_blocks:
            x = block(x, context)
        x = x.transpose(1, 2).reshape(b, -1, h, w)                       # (B, C, h, w)
        return self.proj_out(x) + x_in


def set_attention_backend(model: nn.Module, backend: str) -> int:
    """Chapter 3: switch every CrossAttention in ``model`` to "math" or "sdpa"; returns how many."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r}: expected one of {ATTENTION_BACKENDS}")
    layers = [m for m in model.modules() if isinstance(m, CrossAttention)]
    for m in layers:
        m.backend = backend
    return len(layers)
