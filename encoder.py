"""The encoder of Faceptor (paper Sec. 3.2, eq. (1)): the CLIP-format ViT as FaRL ships it.

    enc = VisionTransformer.from_config(FaceptorConfig.base())      # ViT-B/16: 12 layers, width 768, 12 heads
    feats = enc(images)                                              # 12 maps [B, C_en, H/16, W/16]

Parameter names follow CLIP's VisionTransformer (conv1, class_embedding, positional_embedding, ln_pre,
transformer blocks with attn.in_proj_weight / out_proj and mlp.c_fc / c_proj, ln_post, proj), so FaRL's
checkpoint loads by name (checkpoint.load_farl); ln_post and proj are kept only for loading.
Divergences from CLIP / FaRL (each also listed in docs/design.md):
  * The attention uses F.scaled_dot_product_attention (the same math as the packed nn.MultiheadAttention).
  * QuickGELU is computed as silu(1.702 x) / 1.702 (the same function, one fused kernel).
  * The position table is kept at pos_grid x pos_grid (+ class row; 32 x 32 for Faceptor) and resized (bicubic) to
    the input grid at every forward.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F


class DropPath(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class QuickGELU(nn.Module):
    """CLIP's x * sigmoid(1.702 x), computed as silu(1.702 x) / 1.702: the same function, one fused ATen kernel
    forward and backward (about 1.6x faster on CPU than the three-op form; tests/test_model.py compares them)."""

    def forward(self, x):
        return F.silu(1.702 * x) * (1.0 / 1.702)


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter layout, computed with SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x):                                                              # x [B, T, C_en]
        B, T, C = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)                      # [B, T, 3 C_en]
        qkv = qkv.reshape(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # [3, B, heads, T, dh]
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])                     # [B, heads, T, dh]
        return self.out_proj(o.transpose(1, 2).reshape(B, T, C))


class Mlp(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.gelu = QuickGELU()
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualBlock(nn.Module):
    def __init__(self, width: int, heads: int, drop_path: float = 0.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = Mlp(width)
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.ln_1(x)))
        return x + self.drop_path(self.mlp(self.ln_2(x)))


class VisionTransformer(nn.Module):
    """Eq. (1): F = TransformerEncoder(X, E_en_pos), all layer maps [B, C_en, H/S, W/S], class token dropped."""

    def __init__(self, width=768, layers=12, heads=12, patch_size=16, pos_grid=32, drop_path=0.0, clip_dim=512):
        super().__init__()
        self.width, self.patch_size, self.pos_grid = width, patch_size, pos_grid
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, patch_size, patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(pos_grid * pos_grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        rates = [drop_path * i / (layers - 1) if layers > 1 else 0.0 for i in range(layers)]
        self.blocks = nn.ModuleList(ResidualBlock(width, heads, r) for r in rates)
        self.ln_post = nn.LayerNorm(width)                                              # unused, kept for loading
        self.proj = nn.Parameter(scale * torch.randn(width, clip_dim))                  # unused, kept for loading

    @classmethod
    def from_config(cls, cfg) -> "VisionTransformer":
        """From a model.FaceptorConfig (its vit_* fields, patch_size, pos_grid, drop_path, clip_dim)."""
        return cls(cfg.vit_width, cfg.vit_layers, cfg.vit_heads, cfg.patch_size, cfg.pos_grid, cfg.drop_path,
                   cfg.clip_dim)

    def position_table(self, gh: int, gw: int) -> torch.Tensor:
        """The stored pos_grid^2 table resized to the input grid (bicubic, align_corners=False) -> [1+gh*gw, C_en]."""
        pe = self.positional_embedding
        if (gh, gw) == (self.pos_grid, self.pos_grid):
            return pe
        grid = pe[1:].reshape(1, self.pos_grid, self.pos_grid, -1).permute(0, 3, 1, 2)  # [1, C_en, G, G]
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False, antialias=False)
        return torch.cat([pe[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)], 0)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.conv1(x)                                                               # [B, C_en, h, w]
        B, C, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)                                                # [B, h*w, C_en]
        x = torch.cat([self.class_embedding.to(x.dtype).expand(B, 1, C), x], 1)        # [B, 1+h*w, C_en]
        x = self.ln_pre(x + self.position_table(gh, gw).to(x.dtype))
        feats = []
        for blk in self.blocks:
            x = blk(x)
            feats.append(x[:, 1:].transpose(1, 2).reshape(B, C, gh, gw))               # [B, C_en, h, w]
        return feats                                                                    # Eq. (1): 12 maps
