"""Evaluation of Faceptor (paper Sec. 4, Tables 3-9; SPEC §10): metric functions and paper-style tables.

Metrics follow the authors' evaluators (DATASETS.md §1-§7, §14, §18); every function returns fractions
(tables print percent):
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
from typing import Mapping, Sequence

import numpy as np
import torch


def _np(x, dtype=np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
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
    """Top-1 accuracy of logits [N,C] against labels [N]; ties go to the first maximal index (torch.argmax)."""
    logits = torch.as_tensor(logits)
    labels = torch.as_tensor(labels).reshape(-1)
    if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"accuracy: expected logits [N, C] and labels [N], "
                         f"got {tuple(logits.shape)} and {tuple(labels.shape)}")
    pred = logits.float().argmax(dim=1)
    return float((pred == labels.to(pred.device).long()).double().mean())


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
# Tables
# ---------------------------------------------------------------------------------------------------------------

def format_percent(value, digits: int = 2) -> str:
    """A fraction as a percent string ('-' for None or NaN); strings pass through unchanged."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    value = float(value)
    return "-" if np.isnan(value) else f"{100.0 * value:.{digits}f}"


def format_table(rows: Sequence[Mapping], columns: Sequence[str], digits: int = 2) -> str:
    """A markdown table: one row per mapping, one column per name; numbers (fractions) printed as percent.

    Missing entries print as '-'; string entries (e.g. a dataset name) print as they are.
    """
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(format_percent(row.get(c), digits) for c in columns) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation pipeline: the synthetic test split (synthetic.py) and the benchmark protocols under --data-root
# ---------------------------------------------------------------------------------------------------------------
#
#   python evaluate.py out/demo/stage1_step0000600.pt                      # synthetic test table
#   python evaluate.py CHECKPOINT --data-root DATA --json results.json     # every protocol found under DATA
#
# Synthetic split (ours; not in the paper): faces of identities never seen in training (synthetic.py draws the
# test pool from its own seed stream). Every head runs in one `model.predict` call per batch (dense heads on the
# size_512 rendering, the others on the size_112 rendering of the same faces). Baselines come from training
# faces: the mean normalised landmark shape, the per-pixel majority class map, the mean age, the majority
# expression, the per-attribute majority. Verification: 10-fold accuracy on pairs of unseen identities with
# flip-summed embeddings (DATASETS.md §18). NME uses the 300W inter-ocular unit (points 36 and 45).

_BASELINE_CACHE = {}


def _first_head(model, kind: str, queries: int | None = None):
    from model import TASKS
    for t in model.cfg.tasks:
        if TASKS[t].type == kind and (queries is None or TASKS[t].queries == queries):
            return t
    return None


def _synthetic_settings(train_cfg: Mapping) -> dict:
    return {"seed": int(train_cfg.get("synthetic_seed", 0)),
            "identities": int(train_cfg.get("synthetic_identities", 1000)),
            "length": int(train_cfg.get("synthetic_train_length", 40000)),
            "framing_112": str(train_cfg.get("synthetic_framing_112", "loose"))}


def synthetic_baselines(size_512: int, settings: Mapping, n: int = 1000) -> dict:
    """Statistics of `n` training faces: mean normalised landmarks [68,2], majority class map [S,S], mean age,
    majority expression, per-attribute majority [40] (1/0). Cached per (size, settings, n)."""
    from synthetic import SyntheticFaces
    key = (size_512, tuple(sorted(settings.items())), n)
    if key not in _BASELINE_CACHE:
        ds = SyntheticFaces("train", size=size_512, length=settings["length"], seed=settings["seed"],
                            n_identities=settings["identities"])      # labels do not depend on the framing
        stride = max(1, len(ds) // n)
        lms, counts, ages, expr, attrs = [], np.zeros((19, size_512, size_512), np.int64), [], [], []
        for i in range(0, stride * n, stride):
            it = ds[i % len(ds)]
            lms.append((it["landmarks"].numpy() + 0.5) / size_512)                   # normalised (x, y)
            np.put_along_axis(counts, it["mask"].numpy()[None], np.take_along_axis(
                counts, it["mask"].numpy()[None], 0) + 1, 0)
            ages.append(it["age"]), expr.append(it["expression"]), attrs.append(it["attributes"].numpy())
        attrs = np.stack(attrs)
        _BASELINE_CACHE[key] = {"landmarks": np.mean(lms, 0), "mask": counts.argmax(0), "age": float(np.mean(ages)),
                                "expression": int(np.bincount(expr, minlength=7).argmax()),
                                "attributes": (attrs.mean(0) > 0.5).astype(np.int64)}
    return _BASELINE_CACHE[key]


def _to_device_norm(images: torch.Tensor, group: str, device) -> torch.Tensor:
    from composer import normalize_images
    return normalize_images(images, group).to(device)


@torch.no_grad()
def evaluate_synthetic(model, train_cfg: Mapping, n_test: int = 1000, n_pairs: int | None = None,
                       batch_size: int = 64, device="cpu", n_baseline: int = 1000) -> dict:
    """Metrics of every head of `model` on the synthetic test split and their baselines (fractions; MAE in years).

    train_cfg: the training config dict (checkpoint["config"]) for the synthetic world's seed and identities.
    Keys: nme, nme_baseline, parsing_f1, parsing_f1_baseline, age_mae, age_mae_baseline, expression_acc,
    expression_acc_baseline, attribute_macc, attribute_macc_baseline, verification_acc, verification_std,
    n_test, n_pairs (only the keys whose heads the model has); parsing_f1_per_class lists the 19 classes' F1 in
    CelebAMask-HQ order (None for a class absent from truth and prediction).
    """
    from synthetic import SyntheticFaces
    model.eval()
    device = torch.device(device)
    cfg = model.cfg
    s512, s112 = cfg.size_512, cfg.size_112
    settings = _synthetic_settings(train_cfg)
    heads = {"landmarks": _first_head(model, "landmarks", 68), "parsing": _first_head(model, "parsing", 19),
             "age": _first_head(model, "age"), "expression": _first_head(model, "expression"),
             "attributes": _first_head(model, "attributes", 40), "recognition": _first_head(model, "recognition")}
    heads = {k: v for k, v in heads.items() if v is not None}
    n_ids = max(5, n_test // 2)                                  # two images per test identity (verification)
    test512 = SyntheticFaces("test", size=s512, length=2 * n_ids, seed=settings["seed"], n_identities=n_ids)
    test112 = SyntheticFaces("test", size=s112, length=2 * n_ids, seed=settings["seed"], n_identities=n_ids,
                             framing=settings["framing_112"])
    n = min(n_test, len(test512))
    need512 = any(k in heads for k in ("landmarks", "parsing"))
    need112 = any(k in heads for k in ("age", "expression", "attributes", "recognition"))
    base = synthetic_baselines(s512, settings, n_baseline)
    acc = {"lm_pred": [], "lm_gt": [], "conf": np.zeros((19, 19), np.int64), "conf_base": np.zeros((19, 19), np.int64),
           "age": [], "age_gt": [], "expr": [], "expr_gt": [], "attr": [], "attr_gt": []}
    emb = torch.zeros(len(test112), cfg.embed_dim) if "recognition" in heads else None
    tasks = list(heads.values())
    for start in range(0, len(test112) if emb is not None else n, batch_size):
        idx = range(start, min(start + batch_size, len(test112) if emb is not None else n))
        items512 = [test512[i] for i in idx] if need512 and start < n else None
        items112 = [test112[i] for i in idx]
        x112 = _to_device_norm(torch.stack([it["image"] for it in items112]), "global", device)
        x512 = _to_device_norm(torch.stack([it["image"] for it in items512]), "dense", device) if items512 else None
        run = [t for t in tasks if items512 is not None or t not in (heads.get("landmarks"), heads.get("parsing"))]
        out = model.predict(images_512=x512, images_112=x112 if need112 else None, tasks=run)
        if emb is not None:                                                             # flip-summed embeddings
            flipped = model.predict(images_112=x112.flip(-1), tasks=[heads["recognition"]])
            emb[start:start + len(idx)] = (out[heads["recognition"]]["embedding"]
                                           + flipped[heads["recognition"]]["embedding"]).float().cpu()
        keep = [j for j, i in enumerate(idx) if i < n]
        if not keep:
            continue
        if "landmarks" in heads:
            coords = out[heads["landmarks"]]["coords"].float().cpu().numpy()[keep]
            acc["lm_pred"].append(coords * s512 - 0.5)                                  # pixel coordinates
            acc["lm_gt"].append(np.stack([items512[j]["landmarks"].numpy() for j in keep]))
        if "parsing" in heads:
            pred = out[heads["parsing"]]["logits"].argmax(1).cpu().numpy()[keep]
            gt = np.stack([items512[j]["mask"].numpy() for j in keep])
            acc["conf"] += parsing_confusion(pred, gt, 19)
            acc["conf_base"] += parsing_confusion(np.broadcast_to(base["mask"], gt.shape), gt, 19)
        if "age" in heads:
            acc["age"].append(out[heads["age"]]["age"].float().cpu().numpy()[keep])
            acc["age_gt"] += [items112[j]["age"] for j in keep]
        if "expression" in heads:
            acc["expr"].append(out[heads["expression"]]["logits"].float().cpu()[keep])
            acc["expr_gt"] += [items112[j]["expression"] for j in keep]
        if "attributes" in heads:
            acc["attr"].append(out[heads["attributes"]]["logits"].float().cpu().numpy()[keep])
            acc["attr_gt"].append(np.stack([items112[j]["attributes"].numpy() for j in keep]))
    res = {"n_test": n}
    if "landmarks" in heads:
        pred, gt = np.concatenate(acc["lm_pred"]), np.concatenate(acc["lm_gt"])
        mean_shape = np.broadcast_to(base["landmarks"] * s512 - 0.5, gt.shape)
        res["nme"], res["nme_baseline"] = nme(pred, gt, "300w"), nme(mean_shape, gt, "300w")
    if "parsing" in heads:
        per_class, res["parsing_f1"] = parsing_f1(acc["conf"])
        res["parsing_f1_baseline"] = parsing_f1(acc["conf_base"])[1]
        res["parsing_f1_per_class"] = f1_list(per_class)
    if "age" in heads:
        gt = np.asarray(acc["age_gt"])
        res["age_mae"] = mae(np.concatenate(acc["age"]), gt)
        res["age_mae_baseline"] = mae(np.full_like(gt, base["age"]), gt)
    if "expression" in heads:
        labels = torch.tensor(acc["expr_gt"])
        res["expression_acc"] = accuracy(torch.cat(acc["expr"]), labels)
        res["expression_acc_baseline"] = float((labels == base["expression"]).double().mean())
    if "attributes" in heads:
        gt = np.concatenate(acc["attr_gt"])
        res["attribute_macc"] = mean_attribute_accuracy(np.concatenate(acc["attr"]), gt)
        res["attribute_macc_baseline"] = mean_attribute_accuracy(
            np.broadcast_to(np.where(base["attributes"] > 0, 1.0, -1.0), gt.shape), gt)
    if emb is not None:
        pairs = test112.verification_pairs(n_pairs or max(10, 10 * (len(test112) // 10)), seed=settings["seed"])
        a = emb[[p[0] for p in pairs]]
        b = emb[[p[1] for p in pairs]]
        res["verification_acc"], res["verification_std"] = verification_accuracy(a, b, [p[2] for p in pairs])
        res["n_pairs"] = len(pairs)
    return res


SYNTHETIC_ROWS = (("landmarks NME (300W inter-ocular) ↓", "nme", "nme_baseline"),
                  ("parsing F1 (fg mean) ↑", "parsing_f1", "parsing_f1_baseline"),
                  ("age MAE (years) ↓", "age_mae", "age_mae_baseline"),
                  ("expression accuracy ↑", "expression_acc", "expression_acc_baseline"),
                  ("attribute mean accuracy ↑", "attribute_macc", "attribute_macc_baseline"),
                  ("verification accuracy (unseen ids) ↑", "verification_acc", None))


def synthetic_table(res: Mapping) -> str:
    """Markdown table: metric, model, baseline, ratio (percent for fractions, years for MAE)."""
    lines = ["| synthetic test | model | baseline | model / baseline |", "|---|---|---|---|"]
    for name, key, bkey in SYNTHETIC_ROWS:
        if key not in res:
            continue
        fmt = (lambda v: f"{v:.2f}") if key == "age_mae" else (lambda v: format_percent(v))
        b = res.get(bkey) if bkey else None
        ratio = f"{res[key] / b:.2f}x" if b else "-"
        lines.append(f"| {name} | {fmt(res[key])} | {fmt(b) if b is not None else '-'} | {ratio} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Benchmark protocols (DATASETS.md): every test set found under the data root
# ---------------------------------------------------------------------------------------------------------------

# (table, dataset folder / head, split, metric kind, extra) in the order the paper's tables list them.
BENCHMARKS = (
    ("landmarks", "300w", "common", "nme", {}), ("landmarks", "300w", "challenge", "nme", {}),
    ("landmarks", "300w", "full", "nme", {}),
    ("landmarks", "wflw", "test", "nme", {"auc": 0.1}), ("landmarks", "cofw", "test", "nme", {"auc": 0.1}),
    ("landmarks", "aflw19", "test", "nme", {"unit": "diag"}), ("landmarks", "aflw19", "frontal", "nme", {"unit": "diag"}),
    ("parsing", "celebamask_hq", "test", "f1", {}), ("parsing", "lapa", "test", "f1", {"inverse": True}),
    ("age", "morph2", "test", "mae", {}), ("age", "utkface", "test", "mae", {}),
    ("expression", "rafdb", "test", "acc", {}), ("expression", "ferplus", "test", "acc", {}),
    ("expression", "affectnet", "test", "acc", {}),
    ("attributes", "celeba", "test", "macc", {}), ("attributes", "lfw73", "test", "macc", {}),
)
VERIFICATION_SETS = ("lfw", "cfp_fp", "agedb_30", "calfw", "cplfw")


def _batches(ds, batch_size: int, group: str, num_workers: int = 0):
    from composer import collate
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=lambda items: collate(items, group))
    yield from loader


@torch.no_grad()
def evaluate_protocol(model, name: str, root: str, split: str, kind: str, extra: Mapping, batch_size: int = 32,
                      device="cpu", num_workers: int = 0) -> dict:
    """One test protocol (DATASETS.md) of head `name` on `root` (the dataset's folder)."""
    import data
    from transforms import Warp
    size = model.cfg.input_size(name)
    ds = data.build_dataset(name, root, split, transform=data.default_transform(name, train=False, size=size))
    if len(ds) == 0:
        return None
    group = "dense" if kind in ("nme", "f1") else "global"
    preds, gts, boxes, conf, seen = [], [], [], None, 0
    raw = data.build_dataset(name, root, split) if extra.get("inverse") else None
    for b in _batches(ds, batch_size, group, num_workers):
        x = b["image"].to(device)
        out = model.predict(images_512=x, tasks=[name]) if group == "dense" else \
            model.predict(images_112=x, tasks=[name])
        o, first = out[name], seen
        seen += x.shape[0]
        if kind == "nme":                                  # back to original image coordinates
            coords = o["coords"].float().cpu().numpy() * size - 0.5
            for j in range(x.shape[0]):
                w = Warp.from_item(b, j)
                preds.append(w.inverse_points(coords[j].astype(np.float64)))
                gts.append(w.inverse_points(b["landmarks"][j].double().numpy()))
                if "box" in b:
                    c = w.inverse_points(b["box"][j].double().numpy().reshape(2, 2))
                    boxes.append(c.reshape(-1))
        elif kind == "f1":
            n_cls = o["logits"].shape[1]
            conf = np.zeros((n_cls, n_cls), np.int64) if conf is None else conf
            if raw is None:                                # evaluated in the aligned frame (CelebAMask-HQ: 512)
                conf += parsing_confusion(o["logits"].argmax(1).cpu().numpy(), b["mask"].numpy(), n_cls)
            else:                                          # LaPa: logits warped back to the original resolution
                for j in range(x.shape[0]):
                    w = Warp.from_item(b, j)
                    H, W = b["orig_size"][j].tolist()
                    pred = w.inverse_image(o["logits"][j].float().cpu(), (H, W)).argmax(0).numpy()
                    conf += parsing_confusion(pred, raw[first + j]["mask"].numpy(), n_cls)
        elif kind == "mae":
            preds.append(o["age"].float().cpu().numpy()), gts.append(b["age"].numpy())
        elif kind == "acc":
            preds.append(o["logits"].float().cpu()), gts.append(b["expression"])
        else:
            preds.append(o["logits"].float().cpu().numpy()), gts.append(b["attributes"].numpy())
    res = {"n": len(ds)}
    if kind == "nme":
        p, g = np.stack(preds), np.stack(gts)
        bx = np.stack(boxes) if boxes and extra.get("unit") == "diag" else None
        errors = nme_per_sample(p, g, name, bx)
        res["nme"] = float(errors.mean())
        if "auc" in extra:
            res[f"auc@{extra['auc']}"], res[f"fr@{extra['auc']}"] = auc_fr(errors, extra["auc"])
    elif kind == "f1":
        per_class, mean = parsing_f1(conf)
        res["f1_mean"], res["f1_per_class"] = mean, f1_list(per_class)
    elif kind == "mae":
        res["mae"] = mae(np.concatenate(preds), np.concatenate(gts))
    elif kind == "acc":
        res["accuracy"] = accuracy(torch.cat(preds), torch.cat(gts))
    else:
        res["mean_accuracy"] = mean_attribute_accuracy(np.concatenate(preds), np.concatenate(gts))
    return res


@torch.no_grad()
def evaluate_verification(model, path: str, head: str, batch_size: int = 64, device="cpu") -> dict:
    """10-fold accuracy on one insightface .bin set with flip-summed embeddings (DATASETS.md §18)."""
    import data
    images, issame = data.read_verification_bin(path)
    size = model.cfg.size_112
    embs = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        x = x if torch.is_tensor(x) else torch.stack([torch.as_tensor(v) for v in x])
        x = ((x.float() / 255.0) - 0.5) / 0.5
        if x.shape[-1] != size:
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)
        x = x.to(device)
        e = model.predict(images_112=x, tasks=[head])[head]["embedding"] + \
            model.predict(images_112=x.flip(-1), tasks=[head])[head]["embedding"]
        embs.append(e.float().cpu())
    e = torch.cat(embs)
    acc, std = verification_accuracy(e[0::2], e[1::2], issame)
    return {"accuracy": acc, "std": std, "pairs": len(issame)}


def evaluate_benchmarks(model, root: str, batch_size: int = 32, device="cpu", num_workers: int = 0) -> dict:
    """{protocol: metrics} for every test protocol whose folder is under `root` and whose head the model has."""
    import os
    import sys

    import data
    from model import TASKS
    results = {}
    for table, name, split, kind, extra in BENCHMARKS:
        folder = os.path.join(root, name)
        if name not in model.cfg.tasks or not os.path.isdir(folder):
            continue
        if kind == "nme" and TASKS[name].type != "landmarks":
            continue
        try:
            res = evaluate_protocol(model, name, folder, split, kind, extra, batch_size, device, num_workers)
        except data.DatasetError as e:                     # this split's files are not there
            print(f"skipping {name}/{split}: {str(e).splitlines()[0]}", file=sys.stderr)
            continue
        if res is not None:
            results[f"{name}/{split}"] = {"table": table, **res}
    rec = [t for t in model.cfg.tasks if TASKS[t].type == "recognition"]
    for vset in VERIFICATION_SETS if rec else ():
        for folder in (os.path.join(root, rec[0]), os.path.join(root, "verification"), root):
            path = os.path.join(folder, f"{vset}.bin")
            if os.path.isfile(path):
                results[f"verification/{vset}"] = {"table": "verification",
                                                   **evaluate_verification(model, path, rec[0], batch_size, device)}
                break
    return results


_TABLE_COLUMNS = {"landmarks": ("protocol", "nme", "auc@0.1", "fr@0.1"), "parsing": ("protocol", "f1_mean"),
                  "age": ("protocol", "mae"), "expression": ("protocol", "accuracy"),
                  "attributes": ("protocol", "mean_accuracy"), "verification": ("protocol", "accuracy", "std")}


def benchmark_tables(results: Mapping) -> str:
    """One markdown table per task type, metrics in percent except MAE (years)."""
    parts = []
    for table, columns in _TABLE_COLUMNS.items():
        rows = [{"protocol": k, **v} for k, v in results.items() if v["table"] == table]
        if not rows:
            continue
        if table == "age":
            rows = [{"protocol": r["protocol"], "mae": f"{r['mae']:.3f}"} for r in rows]
        parts.append(f"### {table}\n\n" + format_table(rows, columns))
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def main(argv=None):
    import argparse
    import json
    import os

    import train
    p = argparse.ArgumentParser(description="Evaluate a train.py checkpoint: the synthetic test split and every "
                                "benchmark protocol found under --data-root; prints paper-style tables.")
    p.add_argument("checkpoint", help="a checkpoint written by train.py")
    p.add_argument("--data-root", default=None, help="folder with one sub-folder per dataset (as for training)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--synthetic", choices=("auto", "on", "off"), default="auto",
                   help="evaluate the synthetic test split (auto: when the checkpoint was trained on it)")
    p.add_argument("--n-test", type=int, default=1000, help="synthetic test faces (also the verification pairs)")
    p.add_argument("--batch-size", type=int, default=64, help="faces per model.predict call")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--layer-attention", choices=("on", "off"), default="on",
                   help="stage-2 models: use Layer-Attention (on) or exactly the stage-1 memory (off)")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        ckpt = train.load_checkpoint(args.checkpoint)
        model = train.model_from_checkpoint(ckpt).to(device)
    except train.CheckpointError as e:
        raise SystemExit(f"evaluate.py: {e}")
    if args.layer_attention == "off" and hasattr(model, "set_layer_attention"):
        for t in model.cfg.tasks:
            model.set_layer_attention(t, False)
    results = {"checkpoint": args.checkpoint, "preset": ckpt["preset"], "stage": ckpt["stage"], "step": ckpt["step"]}
    title = f"{os.path.basename(args.checkpoint)} (preset {ckpt['preset']}, stage {ckpt['stage']}, step {ckpt['step']})"
    if args.synthetic == "on" or (args.synthetic == "auto" and ckpt["config"].get("data") == "synthetic"):
        res = evaluate_synthetic(model, ckpt["config"], n_test=args.n_test, batch_size=args.batch_size,
                                 device=device)
        results["synthetic"] = res
        print(f"## Synthetic test split: {title}\n")
        print(synthetic_table(res))
        print(f"\n{res['n_test']} test faces" + (f", {res['n_pairs']} verification pairs" if "n_pairs" in res else "")
              + "; baselines from training faces (mean shape, majority map / class / attribute, mean age)\n")
    if args.data_root:
        bench = evaluate_benchmarks(model, args.data_root, batch_size=args.batch_size, device=device)
        results["benchmarks"] = bench
        print(f"## Benchmarks under {args.data_root}: {title}\n")
        print(benchmark_tables(bench) if bench else "(no test protocol found)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=float)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
