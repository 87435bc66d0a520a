"""Per-task losses and the multi-task objective of Faceptor (paper appendix A.3, eqs. (8)-(14); docs/design.md).

One function per task type, each returning a scalar tensor (the mean loss over that head's samples), the
CosFace classifier as a module, the eq. (8) objective, and `task_loss`, which maps a task type plus the
model's output dict and a batch dict from data.py to that head's loss.

Where the authors' code differs from the appendix, we follow the code (their reported numbers come from it):
- Landmarks, eq. (9): the target is not a binary disc but exp(-8 r^2 / R^2) for r <= R = 5 heatmap pixels and 0
  beyond (a Gaussian of sigma R/4 cut at R); BCE-with-logits is averaged over all elements (B, N, h, w) rather than
  summed over landmarks; the coordinate term is the Euclidean norm ||l_hat - l||_2 averaged over (B, N), not the L1
  norm |dx| + |dy| summed over landmarks. Coordinates are normalised (x, y) with pixel centres at (i + 0.5) / size.
- Age, eq. (11): DLDL-v2 with p_hat = sigmoid(y) / sum(sigmoid(y)) (the code), not softmax (the text); the
  distribution term is KL(p || p_hat) (eq. (11)'s cross-entropy minus the entropy of p, a constant), summed over
  the 101 bins and averaged over the batch; target p = Gaussian(age, sigma 2) at ages 0..100, L1-normalised.
- Attributes, eq. (13): entries labelled -1 are ignored; the sum over attributes and samples is divided by the
  batch size.
- Recognition, eq. (14): CosFace with cos computed as <x, W_j> / max(||x|| ||W_j||, 1e-8), s = 64, m = 0.4.
- Objective, eq. (8): sum_t alpha_t L_t / sum_t alpha_t over the heads present in one step.

Task types beyond the paper (ours; no equation numbers):
- Head pose: L1 error in degrees, averaged over (yaw, pitch, roll) and the batch, divided by the read-out scale
  heads.POSE_SCALE_DEG (90), so the loss is the mean absolute error in units of 90 degrees. L1 rather than
  smooth-L1: it is the benchmark's metric (MAE) itself and does not grow quadratically on the large-angle outliers
  of 300W-LP's fitted poses; the scale keeps its gradient on the shared value head near that of the other heads.
- Landmark visibility: BCE-with-logits on the occlusion logit, target 1 = occluded (1 - `visible`); points
  labelled -1 (unknown) are ignored; mean over the known points. Its tokens are landmark tokens too (the model
  reads a heatmap from them): when the batch carries the points' positions, the landmark loss (eq. (9)-(10) as
  above) is added, so each token learns where its point is and the occlusion logit is read at that point.
  Without it the tokens found the occluded points barely better than chance on the synthetic faces (ROC AUC 0.66,
  no recall at 80 % precision after the 700-step demo-plus run).
- Gender, race: softmax cross-entropy (the expression loss, eq. (12), on another label field).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import ops
from heads import POSE_SCALE_DEG

AGE_BINS = 101          # ages 0..100
AGE_SIGMA = 2.0         # std of the DLDL-v2 target distribution
HEATMAP_RADIUS = 5.0    # R, in heatmap pixels


# ---------------------------------------------------------------------------------------------------------------
# Landmarks, eq. (9)
# ---------------------------------------------------------------------------------------------------------------

def _landmark_target_hw(coords: torch.Tensor, h: int, w: int, radius: float) -> torch.Tensor:
    """Cut Gaussian targets on an h x w grid: coords [B,N,2] normalised (x, y) -> [B,N,h,w]."""
    dtype = coords.dtype if coords.is_floating_point() else torch.float32
    coords = coords.to(dtype)
    x_px = coords[..., 0] * w - 0.5                                 # [B, N] column, pixel-index units
    y_px = coords[..., 1] * h - 0.5                                 # [B, N] row, pixel-index units
    cols = torch.arange(w, dtype=dtype, device=coords.device)
    rows = torch.arange(h, dtype=dtype, device=coords.device)
    dx2 = (cols - x_px[..., None]) ** 2                             # [B, N, w]
    dy2 = (rows - y_px[..., None]) ** 2                             # [B, N, h]
    r2 = dy2[..., :, None] + dx2[..., None, :]                      # [B, N, h, w]
    target = torch.exp(-8.0 * r2 / radius ** 2)                     # sigma = R / 4
    return torch.where(r2 <= radius ** 2, target, torch.zeros_like(target))


def landmark_target(coords: torch.Tensor, size: int, radius: float = HEATMAP_RADIUS) -> torch.Tensor:
    """Heatmap targets p_{k,m} of eq. (9) as in the authors' code.

    coords [B,N,2]: normalised (x, y); pixel index i has its centre at (i + 0.5) / size, so a landmark sits at
    x_px = x * size - 0.5 in pixel-index units. Returns [B,N,size,size] with exp(-8 r^2 / R^2) where the distance r
    (heatmap pixels) from the pixel to the landmark is <= R = radius, and 0 beyond.
    """
    if coords.dim() != 3 or coords.shape[-1] != 2:
        raise ValueError(f"landmark_target: coords must be [B, N, 2], got {tuple(coords.shape)}")
    return _landmark_target_hw(coords, size, size, radius)


def landmark_loss(heatmap_logits: torch.Tensor, coords: torch.Tensor,
                  pred_coords: torch.Tensor | None = None, radius: float = HEATMAP_RADIUS) -> torch.Tensor:
    """Eq. (9) as in the authors' code: BCE-with-logits (mean over all elements) + mean Euclidean coordinate error.

    heatmap_logits [B,N,h,w]; coords [B,N,2] true normalised (x, y). The predicted coordinates are
    `ops.heatmap_to_coords(heatmap_logits)`; pass `pred_coords` [B,N,2] when the model already computed them
    from the same logits (saves a second pass). lambda = 1.
    """
    if heatmap_logits.dim() != 4:
        raise ValueError(f"landmark_loss: heatmap_logits must be [B, N, h, w], got {tuple(heatmap_logits.shape)}")
    B, N, h, w = heatmap_logits.shape
    if coords.shape != (B, N, 2):
        raise ValueError(f"landmark_loss: coords must be [{B}, {N}, 2] to match the heatmaps, got {tuple(coords.shape)}")
    logits = heatmap_logits.float()
    coords = coords.to(logits.dtype)
    target = _landmark_target_hw(coords, h, w, radius)                                 # [B, N, h, w]
    bce = F.binary_cross_entropy_with_logits(logits, target)                           # Eq. (9), first term
    if pred_coords is None:
        pred_coords = ops.heatmap_to_coords(heatmap_logits)
    coord = (pred_coords.to(logits.dtype) - coords).norm(dim=-1).mean()                # Eq. (9), second term (L2)
    return bce + coord                                                                 # Eq. (9), lambda = 1


# ---------------------------------------------------------------------------------------------------------------
# Parsing, eq. (10); expression, eq. (12); attributes, eq. (13)
# ---------------------------------------------------------------------------------------------------------------

def parsing_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. (10): pixel-wise softmax cross-entropy, mean over all pixels. logits [B,C,H,W], mask [B,H,W] class ids."""
    if logits.dim() != 4 or mask.shape != (logits.shape[0],) + tuple(logits.shape[2:]):
        raise ValueError(f"parsing_loss: expected logits [B, C, H, W] and mask [B, H, W] of the same B, H, W, "
                         f"got {tuple(logits.shape)} and {tuple(mask.shape)}")
    return F.cross_entropy(logits.float(), mask.long())                                # Eq. (10)


def expression_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Eq. (12): softmax cross-entropy over the expression classes, mean over the batch. logits [B,7], label [B]."""
    return F.cross_entropy(logits.float(), label.long())                               # Eq. (12)


def classification_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy, mean over the batch (gender, race; the form of eq. (12)). logits [B,C], label [B]."""
    if logits.dim() != 2 or label.shape != logits.shape[:1]:
        raise ValueError(f"classification_loss: expected logits [B, C] and label [B], "
                         f"got {tuple(logits.shape)} and {tuple(label.shape)}")
    return F.cross_entropy(logits.float(), label.long())


def pose_loss(pose: torch.Tensor, target: torch.Tensor, scale: float = POSE_SCALE_DEG) -> torch.Tensor:
    """Mean |pose - target| over (yaw, pitch, roll) and the batch, divided by `scale`. Both [B,3] in degrees."""
    if pose.dim() != 2 or pose.shape[1] != 3 or target.shape != pose.shape:
        raise ValueError(f"pose_loss: expected pose and target [B, 3] (yaw, pitch, roll in degrees), "
                         f"got {tuple(pose.shape)} and {tuple(target.shape)}")
    return (pose.float() - target.to(pose.device).float()).abs().mean() / scale


def visibility_loss(logits: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits of the occlusion logits [B,N] against 1 - visible [B,N] (1 visible, 0 occluded, -1 unknown,
    ignored); mean over the known points (0 when none is known)."""
    if logits.dim() != 2 or visible.shape != logits.shape:
        raise ValueError(f"visibility_loss: logits and visible must both be [B, N_points], "
                         f"got {tuple(logits.shape)} and {tuple(visible.shape)}")
    logits = logits.float()
    visible = visible.to(logits.device)
    known = visible != -1                                                              # [B, N]
    occluded = torch.where(known, 1 - visible, torch.zeros_like(visible)).to(logits.dtype)
    per_point = F.binary_cross_entropy_with_logits(logits, occluded, reduction="none")
    per_point = torch.where(known, per_point, torch.zeros_like(per_point))
    return per_point.sum() / known.sum().clamp_min(1)


def attribute_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. (13): BCE-with-logits per attribute, labels in {1, 0, -1} with -1 ignored, summed, divided by batch size."""
    if logits.shape != labels.shape or logits.dim() != 2:
        raise ValueError(f"attribute_loss: logits and labels must both be [B, N_att], "
                         f"got {tuple(logits.shape)} and {tuple(labels.shape)}")
    logits = logits.float()
    known = labels != -1                                                               # [B, N_att]
    target = torch.where(known, labels, torch.zeros_like(labels)).to(logits.dtype)
    per_entry = F.binary_cross_entropy_with_logits(logits, target, reduction="none")   # Eq. (13)
    return torch.where(known, per_entry, torch.zeros_like(per_entry)).sum() / logits.shape[0]


# ---------------------------------------------------------------------------------------------------------------
# Age, eq. (11) (DLDL-v2)
# ---------------------------------------------------------------------------------------------------------------

def age_distribution(age: torch.Tensor, bins: int = AGE_BINS, sigma: float = AGE_SIGMA) -> torch.Tensor:
    """Target label distribution: Gaussian(age, sigma) sampled at ages 0..bins-1, L1-normalised. age [B] -> [B,bins]."""
    age = age.to(torch.float32 if not age.is_floating_point() else age.dtype)
    ks = torch.arange(bins, dtype=age.dtype, device=age.device)
    p = torch.exp(-(ks - age[:, None]) ** 2 / (2 * sigma ** 2))                        # [B, bins]
    return p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)


def _dldl_v2(log_p_hat: torch.Tensor, p_hat: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
    """KL(p || p_hat) summed over bins, mean over batch, plus mean |sum_i i p_hat_i - age| (lambda = 1)."""
    age = age.to(p_hat.dtype)
    p = age_distribution(age, p_hat.shape[-1])                                         # [B, 101]
    # 0 * log 0 = 0: bins where the target underflowed to 0 contribute nothing (and no NaN gradient).
    kl_terms = torch.xlogy(p, p) - p * log_p_hat
    kl = torch.where(p > 0, kl_terms, torch.zeros_like(kl_terms)).sum(-1).mean()       # Eq. (11), first term
    ks = torch.arange(p_hat.shape[-1], dtype=p_hat.dtype, device=p_hat.device)
    a_hat = (p_hat * ks).sum(-1)                                                       # expected age, [B]
    return kl + (a_hat - age).abs().mean()                                             # Eq. (11), lambda = 1


def age_loss(logits: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
    """Eq. (11), DLDL-v2 as in the authors' code. logits [B,101] raw outputs, age [B] (years, int or float).

    p_hat = sigmoid(y) / sum sigmoid(y); log p_hat is computed as logsigmoid(y) - logsumexp(logsigmoid(y)), which
    stays finite where sigmoid(y) underflows.
    """
    if logits.dim() != 2 or age.shape != logits.shape[:1]:
        raise ValueError(f"age_loss: expected logits [B, {AGE_BINS}] and age [B], "
                         f"got {tuple(logits.shape)} and {tuple(age.shape)}")
    logits = logits.float()
    log_s = F.logsigmoid(logits)                                                       # [B, 101]
    log_p_hat = log_s - torch.logsumexp(log_s, dim=-1, keepdim=True)
    return _dldl_v2(log_p_hat, log_p_hat.exp(), age)


def age_loss_from_probs(probs: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
    """Eq. (11) from the normalised read-out p_hat [B,101] (when raw logits are unavailable); log clamped at 1e-30."""
    probs = probs.float()
    return _dldl_v2(probs.clamp_min(1e-30).log(), probs, age)


# ---------------------------------------------------------------------------------------------------------------
# Recognition, eq. (14)
# ---------------------------------------------------------------------------------------------------------------

class CosFace(nn.Module):
    """Eq. (14): large-margin cosine loss. `weight` [num_classes, embed_dim] is the classifier W (rows W_j)."""

    def __init__(self, embed_dim: int, num_classes: int, s: float = 64.0, m: float = 0.4):
        super().__init__()
        self.embed_dim, self.num_classes, self.s, self.m = embed_dim, num_classes, s, m
        self.weight = nn.Parameter(torch.empty(num_classes, embed_dim))
        bound = 1.0 / math.sqrt(embed_dim)
        nn.init.uniform_(self.weight, -bound, bound)

    def cosine(self, embedding: torch.Tensor) -> torch.Tensor:
        """cos(theta_j) between each embedding [B,D] and each class row W_j -> [B, num_classes]."""
        x, w = embedding.float(), self.weight.float()
        norms = x.norm(dim=1)[:, None] * w.norm(dim=1)[None, :]                        # [B, n]
        return (x @ w.t()) / norms.clamp_min(1e-8)

    def forward(self, embedding: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if embedding.dim() != 2 or embedding.shape[1] != self.embed_dim:
            raise ValueError(f"CosFace: embedding must be [B, {self.embed_dim}], got {tuple(embedding.shape)}")
        cos = self.cosine(embedding)                                                   # [B, n]
        margin = F.one_hot(label.long(), self.num_classes).to(cos.dtype) * self.m
        return F.cross_entropy(self.s * (cos - margin), label.long())                  # Eq. (14)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_classes={self.num_classes}, s={self.s}, m={self.m}"


# ---------------------------------------------------------------------------------------------------------------
# Objective, eq. (8), and the per-head dispatcher
# ---------------------------------------------------------------------------------------------------------------

def multitask_loss(losses: dict, weights: dict) -> torch.Tensor:
    """Eq. (8): sum_t alpha_t L_t / sum_t alpha_t over the task heads present in `losses` (name -> scalar)."""
    if not losses:
        raise ValueError("multitask_loss: no task losses given")
    missing = [name for name in losses if name not in weights]
    if missing:
        raise KeyError(f"multitask_loss: no weight alpha_t for task head(s) {missing}; weights has {sorted(weights)}")
    total_weight = sum(float(weights[name]) for name in losses)
    if not total_weight > 0:
        raise ValueError(f"multitask_loss: the weights of {sorted(losses)} sum to {total_weight}, expected > 0")
    weighted = sum(float(weights[name]) * loss for name, loss in losses.items())
    return weighted / total_weight                                                     # Eq. (8)


def pixels_to_normalised(points: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """0-based pixel (x, y) of the network input -> normalised ((x + 0.5) / width, (y + 0.5) / height).

    Convention (docs/design.md): pixel centres sit at integer coordinates, so pixel i normalises to (i + 0.5) / size
    and normalised 0 and 1 are the image borders; the same convention as `landmark_target` and
    `ops.heatmap_to_coords` (the authors' ground truth is (label + 0.5) / 512).
    """
    scale = torch.tensor([width, height], dtype=points.dtype if points.is_floating_point() else torch.float32,
                         device=points.device)
    return (points + 0.5) / scale


TASK_TYPES = ("landmarks", "parsing", "age", "expression", "attributes", "recognition",
              "pose", "visibility", "gender", "race")


def task_loss(task_type: str, outputs: dict, batch: dict, cosface: CosFace | None = None) -> torch.Tensor:
    """The loss of one task head from the model's output dict and a data.py batch dict.

    landmarks: outputs `heatmap` [B,N,h,w] (and `coords`, used if present); batch `landmarks` [B,N,2] in pixels of
      `image` [B,3,S,S], normalised by `pixels_to_normalised` ((x + 0.5) / W, (y + 0.5) / H).
    parsing: outputs `logits` [B,C,H,W]; batch `mask` [B,H,W].
    age: outputs `logits` [B,101] (preferred) or `probs` [B,101]; batch `age` [B].
    expression: outputs `logits` [B,7]; batch `expression` [B].
    attributes: outputs `logits` [B,N]; batch `attributes` [B,N] in {1, 0, -1}.
    recognition: outputs `embedding` [B,512]; batch `identity` [B]; needs the `cosface` module.
    pose: outputs `pose` [B,3] degrees (yaw, pitch, roll); batch `pose` [B,3] degrees.
    visibility: outputs `logits` [B,N] occlusion logits; batch `visible` [B,N] in {1, 0, -1}; plus the landmark
      loss when outputs hold `heatmap` and the batch `landmarks` and `image`.
    gender, race: outputs `logits` [B,C]; batch `gender` / `race` [B] class ids.
    """
    def need(d, key, where):
        if key not in d:
            raise KeyError(f"task_loss({task_type!r}): {where} has no {key!r} (keys: {sorted(d)})")
        return d[key]

    if task_type == "landmarks":
        heatmap = need(outputs, "heatmap", "outputs")
        image = need(batch, "image", "batch")
        gt = pixels_to_normalised(need(batch, "landmarks", "batch").to(heatmap.device), image.shape[-2],
                                  image.shape[-1])
        return landmark_loss(heatmap, gt, pred_coords=outputs.get("coords"))
    if task_type == "parsing":
        return parsing_loss(need(outputs, "logits", "outputs"), need(batch, "mask", "batch"))
    if task_type == "age":
        age = need(batch, "age", "batch")
        if "logits" in outputs:
            return age_loss(outputs["logits"], age)
        return age_loss_from_probs(need(outputs, "probs", "outputs"), age)
    if task_type == "expression":
        return expression_loss(need(outputs, "logits", "outputs"), need(batch, "expression", "batch"))
    if task_type == "attributes":
        return attribute_loss(need(outputs, "logits", "outputs"), need(batch, "attributes", "batch"))
    if task_type == "recognition":
        if cosface is None:
            raise ValueError("task_loss('recognition'): pass the CosFace module as cosface=")
        return cosface(need(outputs, "embedding", "outputs"), need(batch, "identity", "batch"))
    if task_type == "pose":
        return pose_loss(need(outputs, "pose", "outputs"), need(batch, "pose", "batch"))
    if task_type == "visibility":
        loss = visibility_loss(need(outputs, "logits", "outputs"), need(batch, "visible", "batch"))
        if "landmarks" in batch and "heatmap" in outputs:                             # where each point is
            loss = loss + task_loss("landmarks", outputs, batch)
        return loss
    if task_type in ("gender", "race"):
        logits = need(outputs, "logits", "outputs")
        return classification_loss(logits, need(batch, task_type, "batch").to(logits.device))
    raise ValueError(f"task_loss: unknown task type {task_type!r}; expected one of {TASK_TYPES}")
