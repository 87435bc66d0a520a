"""Output modules of Faceptor (paper Sec. 3.2 "Outputs") and the heads of Naive Faceptor (appendix A.2).

Faceptor's output modules are shared by all task heads of a type (docs/design.md section 4):
  * `DenseOutput`: MLP 256-256-256-256 on the task tokens, dot product with E_pixel -> [B, N_t, H/4, W/4].
  * `ValueOutput`: Linear(256 -> 1) on every task token -> [B, N_t] (age bins, expression classes, attributes).
  * `IdentityOutput`: F^12 tokens -> LayerNorm -> mean -> Linear -> BN -> Linear -> BN -> embedding.
  * `age_readout`: p = sigmoid(y) / sum(sigmoid(y)) over the 101 bins (not softmax), age = sum_k k p_k.
  * `value_readout`: the output dict of every type read through `ValueOutput` (one value per task token).

Task types beyond the paper read their tokens through the same `ValueOutput` (no new parameters but the queries,
and visibility's `PointOutput`, 3 C_en + 1 parameters):
  * pose (3 tokens: yaw, pitch, roll): degrees = POSE_SCALE_DEG * value [ours: a fixed scale keeps the shared
    Linear's outputs near unit size, as for the other types];
  * visibility (one token per landmark): the logit that the point is occluded is the value plus `PointOutput`'s
    read-out of F^12 where the token's heatmap puts the point; p = sigmoid [ours, the only type-specific module];
  * gender, race: class logits, as for expression.

Naive Faceptor (one head per task type, no sharing between types; docs/design.md section 5):
  * `UperNetHead`: FaRL-style adapters on layers 4, 6, 8, 12, then UperNet (PPM (1,2,3,6) + FPN, 512 channels).
  * `MLCAHead`: SwinFace's multi-level channel attention on layers 6, 8, 10, 12, an MLP, one classifier per dataset.
Divergences: none in the math. Datasets of one type share its trunk with a per-dataset final layer (for the
authors' Base configuration this is exactly their layout).
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------------------
# Faceptor output modules

class DenseOutput(nn.Module):
    """Task tokens T_t [B, N, C] -> MLP -> dot with E_pixel [B, C, h, w] -> logits [B, N, h, w]."""

    def __init__(self, dim: int = 256):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(3))

    def forward(self, tokens: torch.Tensor, pixel: torch.Tensor) -> torch.Tensor:
        x = tokens
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == 2 else F.relu(layer(x))
        return torch.einsum("bnc,bchw->bnhw", x, pixel)                                # [B, N_t, h, w]


class ValueOutput(nn.Module):
    """Linear(C -> 1) on every task token: [B, N, C] -> [B, N]."""

    def __init__(self, dim: int = 256):
        super().__init__()
        self.fc = nn.Linear(dim, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(tokens).squeeze(-1)


def age_readout(logits: torch.Tensor):
    """logits [B, 101] -> (probs [B, 101], age [B]) with p = sigmoid / sum(sigmoid) (the authors' read-out)."""
    s = torch.sigmoid(logits)
    probs = s / s.sum(-1, keepdim=True)
    ages = torch.arange(logits.shape[-1], dtype=probs.dtype, device=probs.device)
    return probs, (probs * ages).sum(-1)


POSE_SCALE_DEG = 90.0      # pose read-out: degrees per unit of the value head's output [ours]


def value_readout(kind: str, logits: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The output dict of a value-read task type from the value logits [B, N_t].

    age: `probs`, `age`, `logits`; pose: `pose` [B, 3] degrees (yaw, pitch, roll) and `logits`;
    visibility: `occluded` [B, N] probability that each point is occluded and `logits`;
    expression, attributes, gender, race: `logits`.
    """
    if kind == "age":
        probs, age = age_readout(logits)
        return {"probs": probs, "age": age, "logits": logits}
    if kind == "pose":
        return {"pose": POSE_SCALE_DEG * logits, "logits": logits}                    # [B, 3] degrees
    if kind == "visibility":
        return {"occluded": torch.sigmoid(logits), "logits": logits}                  # [B, N]
    return {"logits": logits}


class PointOutput(nn.Module):
    """The encoder's last map F^12 read at each point's predicted position -> LayerNorm -> Linear(C_en -> 1)
    [ours, visibility only].

    f_n = F^12 sampled bilinearly at coords_n (the soft-argmax of the token's own heatmap, detached: where the point
    is, is the landmark loss's business), value_n = w^T LN(f_n) + b. Zero-initialised, so a new visibility head
    starts as the token-only read-out. It sees what covers the point, which a token's one value does not.
    """

    def __init__(self, width: int = 768):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 1)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, feat: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """feat: F^12 [B, C_en, h, w]; coords [B, N, 2] normalised (x, y) in [0, 1] -> [B, N]."""
        if coords.dim() != 3 or coords.shape[-1] != 2 or coords.shape[0] != feat.shape[0]:
            raise ValueError(f"PointOutput: coords must be [B, N, 2] with the B of the features [B, C, h, w]; "
                             f"got {tuple(coords.shape)} and {tuple(feat.shape)}")
        grid = coords.detach().to(feat.dtype).unsqueeze(2) * 2 - 1                     # [B, N, 1, 2] in [-1, 1]
        f = F.grid_sample(feat, grid, mode="bilinear", padding_mode="border", align_corners=False)  # [B, C, N, 1]
        return self.fc(self.norm(f.squeeze(-1).transpose(1, 2))).squeeze(-1)           # [B, N]


class IdentityOutput(nn.Module):
    """F^12 tokens [B, HW, C_en] -> LayerNorm -> mean over tokens -> Linear -> BN -> Linear -> BN -> [B, embed]."""

    def __init__(self, width: int = 768, embed_dim: int = 512):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.head = nn.Sequential(nn.Linear(width, width, bias=False), nn.BatchNorm1d(width, eps=2e-5),
                                  nn.Linear(width, embed_dim, bias=False), nn.BatchNorm1d(embed_dim, eps=2e-5))

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        """feat: the last encoder map [B, C_en, h, w]."""
        x = self.norm(feat.flatten(2).transpose(1, 2)).mean(1)                         # [B, C_en]
        return self.head(x)


# ----------------------------------------------------------------------------------------------------------------
# Naive Faceptor: UperNet for dense tasks

class ConvBNReLU(nn.Module):
    """mmcv ConvModule layout: conv without bias, BatchNorm, ReLU."""

    def __init__(self, cin: int, cout: int, k: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _resize(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class UperNet(nn.Module):
    """UperNet decode head: PPM on the coarsest level, top-down FPN, fused 3x3 conv, dropout, 1x1 classifiers."""

    def __init__(self, in_dim: int, channels: int, num_classes: Dict[str, int], pool_scales=(1, 2, 3, 6)):
        super().__init__()
        self.pool_scales = pool_scales
        self.psp_modules = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(in_dim, channels, 1))
                                         for s in pool_scales)
        self.bottleneck = ConvBNReLU(in_dim + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(in_dim, channels, 1) for _ in range(3))
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in range(3))
        self.fpn_bottleneck = ConvBNReLU(4 * channels, channels, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.conv_seg = nn.ModuleDict({k: nn.Conv2d(channels, n, 1) for k, n in num_classes.items()})

    def forward(self, inputs: Sequence[torch.Tensor], task: str) -> torch.Tensor:
        top = inputs[3]
        psp = [top] + [_resize(m(top), top.shape[2:]) for m in self.psp_modules]
        lat = [conv(x) for conv, x in zip(self.lateral_convs, inputs[:3])] + [self.bottleneck(torch.cat(psp, 1))]
        for i in range(3, 0, -1):                                                       # top-down pathway
            lat[i - 1] = lat[i - 1] + _resize(lat[i], lat[i - 1].shape[2:])
        outs = [self.fpn_convs[i](lat[i]) for i in range(3)] + [lat[3]]
        outs = [outs[0]] + [_resize(o, outs[0].shape[2:]) for o in outs[1:]]
        x = self.dropout(self.fpn_bottleneck(torch.cat(outs, 1)))
        return self.conv_seg[task](x)


class UperNetHead(nn.Module):
    """FaRL-style multi-scale adapters on ViT layers 4, 6, 8, 12 (x4, x2, x1, x0.5), then UperNet -> [B, N, H/4, W/4]."""

    layers = (4, 6, 8, 12)

    def __init__(self, width: int, num_classes: Dict[str, int], channels: int = 512):
        super().__init__()
        self.fpns = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(width, width, 2, 2), nn.BatchNorm2d(width), nn.GELU(),
                          nn.ConvTranspose2d(width, width, 2, 2)),
            nn.ConvTranspose2d(width, width, 2, 2),
            nn.Identity(),
            nn.MaxPool2d(2),
        ])
        self.head = UperNet(width, channels, num_classes)

    def forward(self, feats: Sequence[torch.Tensor], task: str, layers: Sequence[int] = None) -> torch.Tensor:
        layers = layers or self.layers
        xs = [f(feats[n - 1]) for f, n in zip(self.fpns, layers)]
        return self.head(xs, task)


# ----------------------------------------------------------------------------------------------------------------
# Naive Faceptor: multi-level channel attention (SwinFace MLCA) for attribute-type tasks

class ChannelAttention(nn.Module):
    def __init__(self, dim: int, reduction: int = 16):
        super().__init__()
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(dim, dim // reduction), nn.ReLU(),
                                 nn.Linear(dim // reduction, dim))

    def forward(self, x):
        a = self.mlp(F.adaptive_avg_pool2d(x, 1)) + self.mlp(F.adaptive_max_pool2d(x, 1))
        return x * torch.sigmoid(a)[:, :, None, None]


class MLCAHead(nn.Module):
    """Layers 6, 8, 10, 12 -> Conv3x3 (C_en -> 128) each -> concat 512 -> channel attention -> ReLU -> global
    max-pool -> BN -> [Linear, ReLU, Dropout 0.5] x 2 -> one Linear per dataset."""

    layers = (6, 8, 10, 12)

    def __init__(self, width: int, num_outputs: Dict[str, int], branch: int = 128, hidden: int = 512):
        super().__init__()
        dim = branch * len(self.layers)
        self.conv = nn.ModuleList(nn.Conv2d(width, branch, 3, padding=1, bias=False) for _ in self.layers)
        self.channel_attention = ChannelAttention(dim, reduction=16)
        self.norm = nn.BatchNorm1d(dim, eps=2e-5)
        self.feature = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(0.5),
                                     nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(0.5))
        self.fcs = nn.ModuleDict({k: nn.Linear(hidden, n) for k, n in num_outputs.items()})

    def forward(self, feats: Sequence[torch.Tensor], task: str, layers: Sequence[int] = None) -> torch.Tensor:
        layers = layers or self.layers
        x = torch.cat([conv(feats[n - 1]) for conv, n in zip(self.conv, layers)], 1)   # [B, 512, h, w]
        x = F.relu(self.channel_attention(x))
        x = self.norm(F.adaptive_max_pool2d(x, 1).flatten(1))                          # [B, 512]
        return self.fcs[task](self.feature(x))
