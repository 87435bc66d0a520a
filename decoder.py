"""Faceptor's transformer decoder with task-specific queries and Layer-Attention (paper Sec. 3.2-3.3).

Implements eqs. (2)-(7) of the paper:
  (2) task-specific queries Q_t (content) with positional queries E_de_pos,t  -> `TaskQueries`
  (3) F^ = Projection([F^2; F^4; F^6; F^8; F^10; F^12]), one 1x1 conv per layer    -> `Projection`
  (4) T_t = TransformerDecoder(F^, Q_t, L_t, P, E_de_pos,t)                         -> `TransformerDecoder`
  (5) E_pixel = PixelDecoder(F)                                                      -> `PixelDecoder`
  (6) CrossAttention(Q, K, V) = Softmax(Q K^T / sqrt(d)) V                          -> `CrossAttentionLayer`
  (7) K = F^ + Repeat(L_t) + Repeat(P)                                               -> `CrossAttentionLayer`

Where this differs from the paper's text (docs/design.md sections 3 and 12):
  * As in the authors' code, every layer is cross-attention -> self-attention -> FFN, each post-norm, and all
    attention is multi-head with d = head dimension in eq. (6) (the math of nn.MultiheadAttention).
  * P is a fixed 2-D sine code of the token centres passed through a learnable MLP (the authors' code), so it
    works at any grid size.
  * L_t is one 6 x C_de table per task head (the paper's eq. (7)); the authors share one table.
  * Stage 1 has only the layer-12 projection and adds no L_t (a per-key constant has no effect on softmax).
    Memory order with Layer-Attention: L12, L2, L4, L6, L8, L10.
  * Several task heads can be decoded in one pass: their queries are concatenated, self-attention is
    block-diagonal per head, cross-attention is computed per head group (each group may attend to its own memory).

The cross-attention has two paths computing the same function (by linearity of the key projection,
q.W_k(F^ + L_t + P) = q.W_k F^ + q.W_k P + q.W_k L_t):
  * reference (CPU default): per head group, keys K_t = KF + KP + KL_t materialised, then SDPA without a mask;
  * fused (CUDA default): all groups on one memory in one `ops.layer_attention` call, with q.W_k L_t as a
    per-(query, layer) bias and -inf on the layers of heads whose Layer-Attention is off. It goes through the
    registered op faceptor::layer_attention (Triton on CUDA, the reference math on CPU), so torch.compile and
    torch.export see one node.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import ops


# ----------------------------------------------------------------------------------------------------------------
# Positional code P and the projections

def sine_code(h: int, w: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Fixed 2-D sine code of the token centres y = (i+0.5)/h, x = (j+0.5)/w -> [h*w, dim] as [y-part, x-part]."""
    n = dim // 2
    k = torch.arange(n, device=device, dtype=torch.float64)
    freq = 10000.0 ** (2 * torch.div(k, 2, rounding_mode="floor") / n)              # [n]
    ys = (torch.arange(h, device=device, dtype=torch.float64) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float64) + 0.5) / w

    def code(c):                                                                      # [m] -> [m, n]
        a = 2 * math.pi * c[:, None] / freq[None, :]
        return torch.where(k.remainder(2) == 0, torch.sin(a), torch.cos(a))

    cy = code(ys)[:, None, :].expand(h, w, n)                                         # [h, w, n]
    cx = code(xs)[None, :, :].expand(h, w, n)                                         # [h, w, n]
    return torch.cat([cy, cx], dim=-1).reshape(h * w, 2 * n).to(dtype)               # [HW, C_de]


class AnchorPosition(nn.Module):
    """P: the sine code through a learnable MLP Linear-ReLU-Linear, shared by all layers and task heads."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, h: int, w: int) -> torch.Tensor:
        code = sine_code(h, w, self.dim, device=self.mlp[0].weight.device, dtype=self.mlp[0].weight.dtype)
        return self.mlp(code)                                                          # [HW, C_de]


class Projection(nn.Module):
    """Eq. (3): one 1x1 conv C_en -> C_de per selected encoder layer. Index 0 is layer 12 (the last), then the
    Layer-Attention layers (2, 4, 6, 8, 10 at full size) in that order."""

    def __init__(self, in_dim: int, out_dim: int, layers: Sequence[int]):
        super().__init__()
        self.layers = tuple(layers)                       # 1-based encoder layer numbers, first = last layer
        self.convs = nn.ModuleList(nn.Conv2d(in_dim, out_dim, 1) for _ in self.layers)

    def forward(self, feats: Sequence[torch.Tensor], levels: Optional[int] = None) -> torch.Tensor:
        """feats: the encoder's layer maps [B, C_en, h, w] (1-based layer n at index n-1) -> [B, L, HW, C_de]."""
        n = len(self.convs) if levels is None else levels
        out = []
        for i in range(n):                                                             # 1x1 conv as a token matmul
            tokens = feats[self.layers[i] - 1].flatten(2).transpose(1, 2)              # [B, HW, C_en]
            conv = self.convs[i]
            out.append(F.linear(tokens, conv.weight.flatten(1), conv.bias))            # Eq. (3) [B, HW, C_de]
        return torch.stack(out, dim=1)                                                 # [B, L, HW, C_de]


class TaskQueries(nn.Module):
    """Eq. (2): content queries Q_t ~ N(0,1), positional queries E_de_pos,t ~ U[0,1), layer embeddings L_t ~ N(0,1)."""

    def __init__(self, num_queries: int, dim: int, levels: int):
        super().__init__()
        self.content = nn.Parameter(torch.randn(num_queries, dim))                    # Eq. (2) Q_t  [N_t, C_de]
        self.pos = nn.Parameter(torch.rand(num_queries, dim))                          # E_de_pos,t   [N_t, C_de]
        self.level = nn.Parameter(torch.randn(levels, dim))                            # Eq. (7) L_t  [6, C_de]


@dataclass
class QueryGroup:
    """A contiguous block of decoder queries belonging to one task head.

    start, stop: query slice; memory: index into the list of memories; level: L_t [L, C_de], or None when the
    head sees only the layer-12 memory (stage 1, or Layer-Attention switched off)."""
    start: int
    stop: int
    memory: int = 0
    level: Optional[torch.Tensor] = None


# ----------------------------------------------------------------------------------------------------------------
# Decoder layers (post-norm)

def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[..., N, C] -> [..., heads, N, C/heads]"""
    *lead, n, c = x.shape
    return x.reshape(*lead, n, heads, c // heads).transpose(-2, -3)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, N, dh] -> [B, N, heads*dh]"""
    b, h, n, dh = x.shape
    return x.transpose(1, 2).reshape(b, n, h * dh)


class CrossAttentionLayer(nn.Module):
    """Eqs. (6)-(7): queries H + E_de_pos attend to keys F^ + L_t + P and values F^; residual + LayerNorm.

    Parameters are those of nn.MultiheadAttention (packed in_proj, out_proj) plus the post-norm."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"decoder width {dim} must be divisible by the number of heads {heads}")
        self.dim, self.heads = dim, heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tgt, query_pos, memories, pos, groups: Sequence[QueryGroup], impl: str = "auto"):
        """tgt, query_pos [B, Nq, C_de]; memories: list of [B, L, HW, C_de]; pos: list of P [HW, C_de]."""
        d, nh = self.dim, self.heads
        wq, wk, wv = self.in_proj_weight.split(d)
        bq, bk, bv = self.in_proj_bias.split(d)
        q = _split_heads(F.linear(tgt + query_pos, wq, bq), nh)                       # [B, heads, Nq, dh]
        out = torch.empty_like(q)
        use_fused = impl == "fused" or (impl == "auto" and q.is_cuda)
        for m, mem in enumerate(memories):
            gs = [g for g in groups if g.memory == m]
            if not gs:
                continue
            kf = _split_heads(F.linear(mem, wk), nh)                                   # [B, L, heads, HW, dh]
            kf = kf.transpose(1, 2)                                                    # [B, heads, L, HW, dh]
            v = _split_heads(F.linear(mem, wv, bv), nh).transpose(1, 2)                # [B, heads, L, HW, dh]
            kp = _split_heads(F.linear(pos[m], wk, bk), nh)                            # [heads, HW, dh]
            if use_fused:
                self._fused(q, kf, kp, v, wk, gs, out)
            else:
                for g in gs:
                    qg = q[:, :, g.start:g.stop]                                       # [B, heads, N_t, dh]
                    if g.level is None:                                                # layer-12 memory only
                        k, vg = kf[:, :, 0] + kp, v[:, :, 0]                           # [B, heads, HW, dh]
                    else:
                        kl = _split_heads(F.linear(g.level, wk), nh)                   # [heads, L, dh]
                        k = kf + kp[:, None] + kl[:, :, None]                          # Eq. (7) [B, heads, L, HW, dh]
                        k, vg = k.flatten(2, 3), v.flatten(2, 3)                       # [B, heads, L*HW, dh]
                    out[:, :, g.start:g.stop] = F.scaled_dot_product_attention(qg, k, vg)  # Eq. (6)
        x = self.out_proj(_merge_heads(out))                                           # [B, Nq, C_de]
        return self.norm(tgt + x)

    def _fused(self, q, kf, kp, v, wk, groups, out):
        """All groups of one memory in one `ops.layer_attention` call; L_t enters as the bias c * q.W_k L_t."""
        B, nh, L = kf.shape[0], kf.shape[1], kf.shape[2]
        idx = torch.cat([torch.arange(g.start, g.stop, device=q.device) for g in groups])
        qs = q[:, :, idx]                                                              # [B, heads, Nq_m, dh]
        c = qs.shape[-1] ** -0.5
        lbs = []
        for g in groups:
            n = g.stop - g.start
            if g.level is None:                                                        # only the layer-12 keys
                lb = qs.new_full((B, nh, n, L), float("-inf"))
                lb[..., 0] = 0
            else:
                kl = _split_heads(F.linear(g.level, wk), nh)                           # [heads, L, dh]
                lb = c * torch.einsum("bhqd,hld->bhql", q[:, :, g.start:g.stop], kl)   # [B, heads, N_t, L]
            lbs.append(lb)
        o = ops.layer_attention(qs, kf, kp, v, torch.cat(lbs, dim=2), impl="op")       # Eqs. (6)-(7) fused
        out[:, :, idx] = o.to(out.dtype)


class SelfAttentionLayer(nn.Module):
    """Self-attention among the queries of each task head (block-diagonal across heads); residual + LayerNorm."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tgt, query_pos, groups: Sequence[QueryGroup]):
        d, nh = self.dim, self.heads
        wq, wk, wv = self.in_proj_weight.split(d)
        bq, bk, bv = self.in_proj_bias.split(d)
        qk = tgt + query_pos
        q = _split_heads(F.linear(qk, wq, bq), nh)                                     # [B, heads, Nq, dh]
        k = _split_heads(F.linear(qk, wk, bk), nh)
        v = _split_heads(F.linear(tgt, wv, bv), nh)
        if len(groups) == 1:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = torch.empty_like(q)
            for g in groups:
                s = slice(g.start, g.stop)
                out[:, :, s] = F.scaled_dot_product_attention(q[:, :, s], k[:, :, s], v[:, :, s])
        return self.norm(tgt + self.out_proj(_merge_heads(out)))


class FFNLayer(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(x + self.linear2(F.relu(self.linear1(x))))


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.cross_attn = CrossAttentionLayer(dim, heads)
        self.self_attn = SelfAttentionLayer(dim, heads)
        self.ffn = FFNLayer(dim, ffn)

    def forward(self, x, query_pos, memories, pos, groups, impl="auto"):
        x = self.cross_attn(x, query_pos, memories, pos, groups, impl)
        x = self.self_attn(x, query_pos, groups)
        return self.ffn(x)


class TransformerDecoder(nn.Module):
    """Eq. (4): T_t = TransformerDecoder(F^, Q_t, L_t, P, E_de_pos,t); only the last layer's output is used."""

    def __init__(self, dim: int = 256, heads: int = 8, layers: int = 9, ffn: int = 2048):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, ffn) for _ in range(layers))
        self.reset_parameters()

    def reset_parameters(self):
        for p in self.layers.parameters():                                             # post-norm init
            if p.dim() == 2:
                nn.init.normal_(p, std=p.shape[1] ** -0.5)

    def forward(self, content, query_pos, memories, pos, groups, impl: str = "auto"):
        """content, query_pos [B, Nq, C_de] -> T [B, Nq, C_de]"""
        x = content
        for layer in self.layers:
            x = layer(x, query_pos, memories, pos, groups, impl)
        return x                                                                       # Eq. (4)


# ----------------------------------------------------------------------------------------------------------------
# Pixel decoder (eq. 5)

class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of [B, C, H, W]."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class PixelDecoder(nn.Sequential):
    """Eq. (5): projected F^12 [B, C_de, h, w] -> ConvT x2 -> LayerNorm -> GELU -> ConvT x2 -> E_pixel [B, C_de, 4h, 4w]."""

    def __init__(self, dim: int = 256):
        super().__init__(nn.ConvTranspose2d(dim, dim, 2, 2), LayerNorm2d(dim, eps=1e-6), nn.GELU(),
                         nn.ConvTranspose2d(dim, dim, 2, 2))
