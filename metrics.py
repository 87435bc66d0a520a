"""Metrics of Faceptor's benchmarks (paper Sec. 4, Tables 3-9) in plain numpy.

This file stands alone: it needs numpy only, and accepts torch tensors as inputs when torch is installed, so it can
be copied into another project as it is. Functions check their inputs and raise ValueError saying what was
expected.

Metrics follow the authors' evaluation code (docs/datasets.md, "Metrics"); every function returns fractions (tables print percent):
- NME: per image, the mean over points of ||pred - gt||_2 / unit, then the mean over images. Units: 300W
  ||gt36 - gt45||, WFLW ||gt60 - gt72||, COFW ||gt8 - gt9|| (0-based, outer eye corners), AFLW-19 the diagonal
  sqrt(w^2 + h^2) of the annotated face box (NME_diag). Inter-pupil and box (sqrt(w h)) units are available via
  `unit=`.
- AUC / FR: CED(x) = fraction of images with NME <= x on the grid np.arange(0, threshold + step, step), step 1e-4,
  integrated with Simpson's rule (scipy.integrate.simpson's rule for irregular spacing, including its
  last-interval correction when the grid has an even number of points), divided by the threshold;
  FR = 1 - CED at the last grid point. The grid is built exactly as the authors' code builds it, so for some
  thresholds (0.07) floating point makes it end one step past the threshold, as theirs does.
- Parsing: F1 per class from one confusion matrix accumulated over the whole test set, 2 TP / (row + column sum);
  the mean is over foreground classes (all but class 0).
- MAE; top-1 accuracy; CelebA mean accuracy over attributes (positive iff logit > 0); face verification 10-fold
  accuracy with squared-distance thresholds 0:0.01:4, "same" iff distance < threshold, contiguous folds, the first
  best threshold on the other nine folds; std is the population std over folds (np.std).

Decisions where the sources are silent (ours):
- Parsing F1 of a class with no pixels in truth or prediction is 0/0: reported as NaN per class and left out of
  the foreground mean (the authors' code would make the whole mean NaN). A class predicted but absent from the
  truth has F1 = 0 and counts.
- Attribute labels: 1 positive, 0 negative, -1 unknown (ignored, as in the loss). CelebA's native -1 "negative"
  must be mapped to 0 by the loader (as Faceptor's label.pkl does). Per-attribute accuracy is taken over the known
  entries, then averaged over attributes having at least one known entry.
"""
from __future__ import annotations

import numpy as np

try:                       # tensors are accepted when torch is installed; numpy alone is enough otherwise
    import torch
except ImportError:        # pragma: no cover
    torch = None


def _np(x, dtype=np.float64) -> np.ndarray:
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.float()
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# Landmarks: NME, AUC / FR
# ---------------------------------------------------------------------------------------------------------------

# (number of points, default unit, {unit: definition}); point units are pairs of 0-based index lists (means taken).
_NME_UNITS = {
    "300w": (68, "inter_ocular", {"inter_ocular": ([36], [45]),
                                  "inter_pupil": (list(range(36, 42)), list(range(42, 48)))}),
    "wflw": (98, "inter_ocular", {"inter_ocular": ([60], [72]), "inter_pupil": ([96], [97])}),
    "cofw": (29, "inter_ocular", {"inter_ocular": ([8], [9])}),
    "aflw19": (19, "diag", {"diag": "diag", "box": "box", "inter_ocular": ([6], [11]), "inter_pupil": ([7], [10])}),
}


def _unit_distance(gt: np.ndarray, dataset: str, unit: str | None, boxes) -> np.ndarray:
    if dataset not in _NME_UNITS:
        raise ValueError(f"nme: unknown dataset {dataset!r}; expected one of {sorted(_NME_UNITS)}")
    num_points, default, units = _NME_UNITS[dataset]
    if gt.ndim != 3 or gt.shape[1:] != (num_points, 2):
        raise ValueError(f"nme: {dataset} landmarks must be [N, {num_points}, 2], got {gt.shape}")
    unit = default if unit is None else unit
    if unit not in units:
        raise ValueError(f"nme: unit {unit!r} is not defined for {dataset}; expected one of {sorted(units)}")
    spec = units[unit]
    if isinstance(spec, str):
        if boxes is None:
            raise ValueError(f"nme: {dataset} with unit {unit!r} needs boxes [N, 4] as x1, y1, x2, y2")
        b = _np(boxes)
        if b.shape != (gt.shape[0], 4):
            raise ValueError(f"nme: boxes must be [{gt.shape[0]}, 4] (x1, y1, x2, y2), got {b.shape}")
        w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        return np.sqrt(w * w + h * h) if spec == "diag" else np.sqrt(w * h)
    left, right = spec
    return np.linalg.norm(gt[:, left].mean(1) - gt[:, right].mean(1), axis=-1)       # [N]


def nme_per_sample(pred, gt, dataset: str, boxes=None, unit: str | None = None) -> np.ndarray:
    """Per-image NME [N]: mean over points of ||pred - gt||_2 / unit. pred, gt [N,K,2] pixel coordinates.

    dataset in {'300w', 'wflw', 'cofw', 'aflw19'}; the unit defaults to the paper's (inter-ocular, or the box
    diagonal for AFLW-19, which needs boxes [N,4] as x1, y1, x2, y2). The unit is measured on gt.
    """
    pred, gt = _np(pred), _np(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"nme: pred {pred.shape} and gt {gt.shape} differ in shape")
    unit_dist = _unit_distance(gt, dataset, unit, boxes)                               # [N]
    return np.linalg.norm(pred - gt, axis=-1).mean(-1) / unit_dist


def nme(pred, gt, dataset: str, boxes=None, unit: str | None = None) -> float:
    """Mean NME over images (a fraction); see `nme_per_sample`."""
    return float(nme_per_sample(pred, gt, dataset, boxes, unit).mean())


def _simpson(y: np.ndarray, x: np.ndarray) -> float:
    """Composite Simpson's rule on an irregular grid; an odd number of intervals gets a last-interval correction."""
    n = len(x)
    if n < 2:
        return 0.0
    if n == 2:
        return float(0.5 * (x[1] - x[0]) * (y[0] + y[1]))
    h = np.diff(x)
    stop = n - 1 if n % 2 == 1 else n - 2                      # last point covered by whole parabolic panels
    h0, h1 = h[0:stop:2], h[1:stop:2]
    y0, y1, y2 = y[0:stop - 1:2], y[1:stop:2], y[2:stop + 1:2]
    hs = h0 + h1
    total = np.sum(hs / 6.0 * (y0 * (2.0 - h1 / h0) + y1 * hs * hs / (h0 * h1) + y2 * (2.0 - h0 / h1)))
    if n % 2 == 0:                                             # odd number of intervals: the last one alone
        a, b = h[-2], h[-1]
        alpha = (2 * b * b + 3 * a * b) / (6 * (a + b))
        beta = (b * b + 3 * a * b) / (6 * a)
        eta = b ** 3 / (6 * a * (a + b))
        total += alpha * y[-1] + beta * y[-2] - eta * y[-3]
    return float(total)


def auc_fr(errors, threshold: float, step: float = 1e-4) -> tuple[float, float]:
    """(AUC, failure rate) of the cumulative error distribution up to `threshold` (fractions).

    CED(x) = fraction of errors <= x on x = np.arange(0, threshold + step, step); AUC = Simpson integral / threshold;
    FR = 1 - CED(last x).
    """
    e = _np(errors).reshape(-1)
    if e.size == 0:
        raise ValueError("auc_fr: no errors given")
    xs = np.arange(0.0, threshold + step, step)
    ced = np.searchsorted(np.sort(e), xs, side="right") / e.size                      # count(e <= x) / n
    return _simpson(ced, xs) / threshold, float(1.0 - ced[-1])


# ---------------------------------------------------------------------------------------------------------------
# Parsing: confusion matrix, F1
# ---------------------------------------------------------------------------------------------------------------

def parsing_confusion(pred, target, num_classes: int) -> np.ndarray:
    """Confusion matrix [C,C] (int64; rows = truth, columns = prediction) of label maps of equal shape.

    Accumulate over a test set by adding the matrices of its images.
    """
    p, t = _np(pred, np.int64).reshape(-1), _np(target, np.int64).reshape(-1)
    if p.shape != t.shape:
        raise ValueError(f"parsing_confusion: pred and target differ in size ({p.size} vs {t.size})")
    for name, v in (("pred", p), ("target", t)):
        if v.size and (v.min() < 0 or v.max() >= num_classes):
            raise ValueError(f"parsing_confusion: {name} has labels outside [0, {num_classes})")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def f1_list(per_class) -> list:
    """Per-class F1 as JSON values: float, or None for a class absent from truth and prediction (NaN)."""
    return [None if np.isnan(v) else float(v) for v in per_class]


def parsing_f1(confusion) -> tuple[np.ndarray, float]:
    """(F1 per class [C], mean F1 over foreground classes 1..C-1) from one confusion matrix (rows = truth).

    F1_c = 2 TP_c / (row_c + column_c). A class absent from both truth and prediction gets NaN and is left out of
    the mean; the mean is NaN when no foreground class is defined.
    """
    cm = _np(confusion)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"parsing_f1: confusion must be square [C, C], got {cm.shape}")
    denom = cm.sum(0) + cm.sum(1)                                                      # column + row sums
    tp2 = 2.0 * np.diag(cm)
    f1 = np.full(cm.shape[0], np.nan)
    np.divide(tp2, denom, out=f1, where=denom > 0)
    fg = f1[1:]
    fg = fg[~np.isnan(fg)]
    return f1, (float(fg.mean()) if fg.size else float("nan"))


# ---------------------------------------------------------------------------------------------------------------
# Age, expression, attributes
# ---------------------------------------------------------------------------------------------------------------

def mae(pred, target) -> float:
    """Mean absolute error (years for age)."""
    p, t = _np(pred).reshape(-1), _np(target).reshape(-1)
    if p.shape != t.shape:
        raise ValueError(f"mae: pred and target differ in size ({p.size} vs {t.size})")
    return float(np.abs(p - t).mean())


def accuracy(logits, labels) -> float:
    """Top-1 accuracy of logits [N,C] against labels [N]; ties go to the first maximal index (as np.argmax)."""
    z, y = _np(logits), _np(labels, np.int64).reshape(-1)
    if z.ndim != 2 or z.shape[0] != y.shape[0]:
        raise ValueError(f"accuracy: expected logits [N, C] and labels [N], got {z.shape} and {y.shape}")
    return float((z.argmax(axis=1) == y).mean())


def mean_attribute_accuracy(logits, labels) -> float:
    """Mean over attributes of the per-attribute accuracy; positive iff logit > 0; labels 1 / 0, -1 ignored."""
    z, y = _np(logits), _np(labels)
    if z.shape != y.shape or z.ndim != 2:
        raise ValueError(f"mean_attribute_accuracy: logits and labels must both be [N, A], got {z.shape} and {y.shape}")
    known = y != -1
    correct = ((z > 0) == (y == 1)) & known
    counts = known.sum(0)
    per_attr = correct.sum(0)[counts > 0] / counts[counts > 0]
    return float(per_attr.mean()) if per_attr.size else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# Face verification (10-fold)
# ---------------------------------------------------------------------------------------------------------------

def _contiguous_folds(n: int, folds: int) -> list[np.ndarray]:
    """Test indices of each fold: contiguous blocks, the first n % folds blocks one longer (KFold, no shuffle)."""
    sizes = np.full(folds, n // folds)
    sizes[: n % folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [np.arange(bounds[i], bounds[i + 1]) for i in range(folds)]


def verification_accuracy(emb_a, emb_b, issame, folds: int = 10) -> tuple[float, float]:
    """(mean, population std) over folds of the verification accuracy of pairs (emb_a[i], emb_b[i]).

    Embeddings [N,D] are L2-normalised here; distance = squared Euclidean; "same" iff distance < t, with t from
    0, 0.01, ..., 3.99 chosen (first maximum) on the other folds.
    """
    a, b = _np(emb_a), _np(emb_b)
    same = _np(issame, bool).reshape(-1)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] != same.size:
        raise ValueError(f"verification_accuracy: expected emb_a, emb_b [N, D] and issame [N], "
                         f"got {a.shape}, {b.shape}, {same.shape}")
    if same.size < folds:
        raise ValueError(f"verification_accuracy: {same.size} pairs cannot make {folds} folds")

    def normalise(e):
        n = np.linalg.norm(e, axis=1, keepdims=True)
        return e / np.where(n == 0, 1.0, n)

    dist = np.sum((normalise(a) - normalise(b)) ** 2, axis=1)                          # [N]
    thresholds = np.arange(0, 4, 0.01)
    correct = (dist[None, :] < thresholds[:, None]) == same[None, :]                   # [T, N]
    accs = []
    for test in _contiguous_folds(same.size, folds):
        train = np.ones(same.size, bool)
        train[test] = False
        best = int(np.argmax(correct[:, train].mean(1)))
        accs.append(correct[best, test].mean())
    accs = np.asarray(accs)
    return float(accs.mean()), float(accs.std())


# ---------------------------------------------------------------------------------------------------------------
# Task types beyond the paper: head pose, landmark visibility (gender and race use `accuracy`)
# ---------------------------------------------------------------------------------------------------------------
#
# Head pose: the absolute error of each angle in degrees (yaw, pitch, roll; order and signs of
# data.conventions.POSE_ANGLES), averaged over images; `mean` is the mean of the three MAEs (the "MAE" column of
# head-pose tables). Angles are compared as numbers, without wrap-around (the benchmarks keep |angle| < 99 deg).
#
# Landmark visibility, recall at a fixed precision (COFW's occlusion protocol): the positive class is "occluded";
# every (image, point) with a known label is one instance, pooled over the test set; labels -1 are left out. A
# threshold t calls an instance occluded iff its score >= t. Only the distinct scores are used as thresholds, so
# tied instances always fall on the same side together. Over these thresholds, precision = TP / (TP + FP) and
# recall = TP / P; the result is the largest recall among thresholds whose precision is >= the target precision,
# and 0 when no threshold reaches it. NaN when the labels hold no occluded instance (recall undefined).
# Reported beside it: the ROC AUC over the same instances, the probability that a random occluded instance scores
# above a random visible one, ties counting one half (Mann-Whitney U / (P N)); 0.5 is chance, and any constant
# score. NaN when either class is absent.

def pose_mae(pred, target) -> dict:
    """{'yaw', 'pitch', 'roll', 'mean'}: mean absolute error in degrees per angle of pred, target [N, 3]."""
    p, t = _np(pred), _np(target)
    if p.shape != t.shape or p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"pose_mae: pred and target must both be [N, 3] (yaw, pitch, roll), "
                         f"got {p.shape} and {t.shape}")
    per_angle = np.abs(p - t).mean(0)                                                  # [3]
    return {"yaw": float(per_angle[0]), "pitch": float(per_angle[1]), "roll": float(per_angle[2]),
            "mean": float(per_angle.mean())}


def recall_at_precision(scores, occluded, precision: float = 0.8) -> float:
    """Largest recall of the 'occluded' class among score thresholds reaching `precision` (rules above).

    scores: any shape, higher = more likely occluded (probabilities or logits); occluded: the same shape, 1
    occluded, 0 visible, -1 unknown (left out).
    """
    s, y = _np(scores).reshape(-1), _np(occluded).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"recall_at_precision: scores and labels differ in size ({s.size} vs {y.size})")
    if not 0 < precision <= 1:
        raise ValueError(f"recall_at_precision: precision must lie in (0, 1], got {precision}")
    known = y != -1
    s, y = s[known], y[known] == 1
    positives = int(y.sum())
    if positives == 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]                                         # end of each equal-score run
    tp = np.cumsum(y)[last_of_tie]                                                     # [T] at each threshold
    called = (np.nonzero(last_of_tie)[0] + 1).astype(np.float64)                       # TP + FP
    ok = tp / called >= precision - 1e-12
    return float(tp[ok].max() / positives) if ok.any() else 0.0


def visibility_recall(occlusion_scores, visible, precision: float = 0.8) -> float:
    """`recall_at_precision` with labels given as `visible` (1 visible, 0 occluded, -1 unknown), as the loaders
    store them."""
    v = _np(visible)
    return recall_at_precision(occlusion_scores, np.where(v == -1, -1, 1 - v), precision)


def visibility_auc(occlusion_scores, visible) -> float:
    """ROC AUC of the 'occluded' class (rules above); labels as `visibility_recall` takes them."""
    s, v = _np(occlusion_scores).reshape(-1).astype(np.float64), _np(visible).reshape(-1)
    if s.shape != v.shape:
        raise ValueError(f"visibility_auc: scores and labels differ in size ({s.size} vs {v.size})")
    known = v != -1
    s, occluded = s[known], v[known] == 0
    P, N = int(occluded.sum()), int((~occluded).sum())
    if P == 0 or N == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]                          # mid-ranks, 1-based
    return float((ranks[occluded].sum() - P * (P + 1) / 2.0) / (P * N))                # U / (P N)

