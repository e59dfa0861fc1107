"""The CLIP ViT-L/14 text encoder (openai/clip-vit-large-patch14's text tower), as SD 1.5 uses it.

Chapter 1 introduces it. Parameter names are Hugging Face ``CLIPTextModel``'s (``text_model.*``), which is
how the checkpoint stores them under ``cond_stage_model.transformer.``. The output is
``last_hidden_state`` after ``final_layer_norm``: (B, 77, 768) for sd15.

The causal mask is a constant of -1e4 above the diagonal rather than -inf (or float32's minimum), so an
FP16 copy of the graph (chapter 3) holds no -inf and no NaN appears in the softmax.
"""
from __future__ import annotations

import torch
from torch import nn

from course_lib.cnsd.config import CLIPTextConfig

MASK_VALUE = -1.0e4


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        # not saved (newer transformers make it non-persistent too); the checkpoint's copy is ignored
        self.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings)[None], persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding(self.position_ids[:, :n])


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads, self.head_dim = cfg.num_attention_heads, d // cfg.num_attention_heads
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        split = lambda t: t.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731  (B, nh, T, hd)
        q = split(self.q_proj(x) * self.head_dim ** -0.5)
        k, v = split(self.k_proj(x)), split(self.v_proj(x))
        attn = (q @ k.transpose(-1, -2) + mask).softmax(dim=-1)                      # (B, nh, T, T)
        return self.out_proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        if cfg.hidden_act != "quick_gelu":
            raise ValueError(f"hidden_act {cfg.hidden_act!r}: only CLIP's 'quick_gelu' is implemented")
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))                                 # quick_gelu


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return x


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)                              # (B, T, C)
        n = input_ids.shape[1]
        mask = torch.full((n, n), MASK_VALUE, dtype=x.dtype, device=x.device).triu(1)  # (T, T), causal
        return self.final_layer_norm(self.encoder(x, mask))


class CLIPTextModel(nn.Module):
    """``clip(input_ids) -> last_hidden_state``: token ids (B, 77), int32 or int64 -> (B, 77, hidden)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():                                  # shapes are fixed by then: skip the checks
            pass
        elif input_ids.ndim != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids {tuple(input_ids.shape)} {input_ids.dtype}: expected (B, "
                             f"{self.config.max_position_embeddings}) int32 token ids")
        elif input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens: at most "
                             f"{self.config.max_position_embeddings} fit the position embedding")
        return self.text_model(input_ids)
