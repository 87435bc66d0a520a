"""Fast ops of Faceptor: reference math and dispatch.

(Stub: reference implementations only; fast paths are added by the kernels work.)
"""
import torch


def heatmap_to_coords_ref(logits: torch.Tensor) -> torch.Tensor:
    """Sigmoid-weighted soft-argmax (SPEC §5). logits [B,K,H,W] -> coords [B,K,2] as normalised (x, y)."""
    B, K, H, W = logits.shape
    x = logits if logits.dtype == torch.float64 else logits.float()
    s = torch.sigmoid(x)                                            # [B, K, H, W]
    S = s.sum((-2, -1)).clamp_min(1e-6)                             # [B, K]
    cols = torch.arange(W, dtype=x.dtype, device=x.device)
    rows = torch.arange(H, dtype=x.dtype, device=x.device)
    u = (s.sum(-2) * cols).sum(-1) / S                              # [B, K] expected column
    v = (s.sum(-1) * rows).sum(-1) / S                              # [B, K] expected row
    return torch.stack([(u + 0.5) / W, (v + 0.5) / H], dim=-1)


def heatmap_to_coords(logits: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    return heatmap_to_coords_ref(logits)


def layer_attention_ref(q, kf, kp, v, lb):
    """softmax_{(j,p)}(q.(kf[j,p] + kp[p]) / sqrt(dh) + lb[q, j]) @ v over the L*HW keys.

    q [B,H,Nq,dh], kf and v [B,H,L,HW,dh], kp [H,HW,dh] or [B,H,HW,dh], lb [B,H,Nq,L] -> [B,H,Nq,dh].
    """
    B, H, L, HW, dh = kf.shape
    if kp.dim() == 3:
        kp = kp.unsqueeze(0)
    k = kf + kp.unsqueeze(2)                                        # [B, H, L, HW, dh]
    s = torch.einsum("bhqd,bhlpd->bhqlp", q, k) * dh ** -0.5 + lb.unsqueeze(-1)
    s = s.flatten(-2)                                               # [B, H, Nq, L*HW]
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)         # all-masked row guard
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    out = p @ v.flatten(2, 3)                                       # [B, H, Nq, dh]
    return out / torch.where(l == 0, torch.ones_like(l), l)


def layer_attention(q, kf, kp, v, lb, impl: str = "auto"):
    return layer_attention_ref(q, kf, kp, v, lb)
