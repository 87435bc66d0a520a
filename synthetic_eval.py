"""Evaluation on the built-in synthetic faces [ours; not in the paper]: the test split of identities never seen in
training, every head of the model that the synthetic faces label, and a constant baseline for each, scored by the
same code as the benchmarks (scoring.py). evaluate.py prints the table; train.py calls `evaluate_synthetic` for its
periodic evaluations.

Dense heads read the size_512 rendering, the others the size_112 rendering of the same faces. Heads scored:
  paper task types: landmarks (68, NME with the 300W inter-ocular unit), parsing (19 classes, F1), age (MAE),
    expression (accuracy), attributes (CelebA's 40, mean accuracy), recognition (verification on pairs of test
    faces, flip-summed embeddings);
  beyond the paper: head pose (MAE per angle and mean, degrees), landmark visibility (the 29 COFW points of
    cofw_visibility; recall at 80 % precision and ROC AUC), gender and race (the 5 skin-tone bands; accuracy);
  transfer schemes (paper Table 9 in spirit; data.synthetic_labels): aflw19 (19 points, NME with the outer eye
    corners as unit, as the synthetic faces have no AFLW face box), lapa (11 classes, F1), synth_attr (mean accuracy).
Baselines predict one constant for every face, from training faces: the mean normalised landmark shape, the
per-pixel majority class map, the mean age, the majority expression, the per-attribute majority, the mean angles,
the per-point majority visibility, the majority gender and race.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

import numpy as np
import torch

import data
from data import synthetic_labels
from metrics import verification_accuracy
from model import TASKS
from scoring import KINDS, Progress, baseline_outputs, format_percent, to_cpu


class SyntheticHead(NamedTuple):
    type: str                  # task type
    kind: str                  # scoring.KINDS entry
    queries: int | None        # N_t the head must have (None: any)
    scheme: str | None         # transfer scheme (data.synthetic.SCHEMES; the head of that name) or the drawn labels
    keys: dict                 # {metric of the kind: result key}; the first also gets a "_baseline" key


SYNTHETIC_HEADS = (
    SyntheticHead("landmarks", "nme", 68, None, {"nme": "nme"}),
    SyntheticHead("parsing", "f1", 19, None, {"f1_mean": "parsing_f1", "f1_per_class": "parsing_f1_per_class"}),
    SyntheticHead("age", "mae", None, None, {"mae": "age_mae"}),
    SyntheticHead("expression", "acc", None, None, {"accuracy": "expression_acc"}),
    SyntheticHead("attributes", "macc", 40, None, {"mean_accuracy": "attribute_macc"}),
    SyntheticHead("pose", "pose", None, None, {"mean": "pose_mae", "yaw": "pose_mae_yaw", "pitch": "pose_mae_pitch",
                                                "roll": "pose_mae_roll"}),
    SyntheticHead("visibility", "visibility", 29, "cofw_visibility", {"recall@p80": "visibility_recall",
                                                                           "auc": "visibility_auc"}),
    SyntheticHead("gender", "gender", None, None, {"accuracy": "gender_acc"}),
    SyntheticHead("race", "race", synthetic_labels.RACE_BANDS, None, {"accuracy": "race_acc"}),
    SyntheticHead("landmarks", "nme", 19, "aflw19", {"nme": "aflw19_nme"}),
    SyntheticHead("parsing", "f1", 11, "lapa", {"f1_mean": "lapa_f1", "f1_per_class": "lapa_f1_per_class"}),
    SyntheticHead("attributes", "macc", 11, "synth_attr", {"mean_accuracy": "synth_attr_macc"}),
)
_BASELINE_CACHE = {}


def _head_of(model, spec: SyntheticHead):
    """The model's head for `spec`: the scheme's head by name, else the first head of the type (and N_t)."""
    if spec.scheme is not None:
        return spec.scheme if spec.scheme in model.cfg.tasks else None
    for t in model.cfg.tasks:
        if TASKS[t].type == spec.type and (spec.queries is None or TASKS[t].queries == spec.queries):
            return t
    return None


def _synthetic_settings(train_cfg: Mapping) -> dict:
    return {"seed": int(train_cfg.get("synthetic_seed", 0)),
            "identities": int(train_cfg.get("synthetic_identities", 1000)),
            "length": int(train_cfg.get("synthetic_train_length", 40000)),
            "framing_112": str(train_cfg.get("synthetic_framing_112", "loose"))}


def _majority(labels, n: int) -> int:
    return int(np.bincount(labels, minlength=n).argmax())


def synthetic_baselines(size_512: int, settings: Mapping, n: int = 1000) -> dict:
    """Statistics of `n` training faces, cached per (size, settings, n): the mean normalised landmarks [68,2], the
    majority class map [S,S], the mean age, the majority expression, the per-attribute majority [40] (1/0), the mean
    pose [3], the majority gender and race; base["schemes"][head] holds the transfer schemes' own (aflw19 mean shape
    [19,2], cofw_visibility per-point majority [29], lapa class map, synth_attr majority [11])."""
    key = (size_512, tuple(sorted(settings.items())), n)
    if key in _BASELINE_CACHE:
        return _BASELINE_CACHE[key]
    ds = data.SyntheticFaces("train", size=size_512, length=settings["length"], seed=settings["seed"],
                             n_identities=settings["identities"])        # labels do not depend on the framing
    stride = max(1, len(ds) // n)
    counts = np.zeros((19, size_512, size_512), np.int64)
    got = {k: [] for k in ("landmarks", "age", "expression", "attributes", "pose", "gender", "race", "aflw19",
                           "visible29", "synth_attr")}
    for i in range(0, stride * n, stride):
        i = i % len(ds)
        it = ds[i]
        lm = (it["landmarks"].double().numpy() + 0.5) / size_512                        # normalised (x, y)
        mask = it["mask"].numpy()
        np.put_along_axis(counts, mask[None], np.take_along_axis(counts, mask[None], 0) + 1, 0)
        for k in ("age", "expression", "gender", "race"):
            got[k].append(it[k])
        got["landmarks"].append(lm), got["attributes"].append(it["attributes"].numpy())
        got["pose"].append(it["pose"].double().numpy())
        got["aflw19"].append(synthetic_labels.map_points(lm, synthetic_labels.AFLW19_FROM_68))
        got["visible29"].append(ds.relabel(it, i, "cofw_visibility")["visible"].numpy())
        got["synth_attr"].append(synthetic_labels.synth_attributes_of(ds.params(i)[0]))
    lapa_counts = np.stack([counts[np.asarray(synthetic_labels.LAPA_FROM_CELEBAMASK) == c].sum(0)
                            for c in range(11)])                                        # [11, S, S]
    base = {"landmarks": np.mean(got["landmarks"], 0), "mask": counts.argmax(0), "age": float(np.mean(got["age"])),
            "expression": _majority(got["expression"], 7),
            "attributes": (np.mean(got["attributes"], 0) > 0.5).astype(np.int64),
            "pose": np.mean(got["pose"], 0), "gender": _majority(got["gender"], 2),
            "race": _majority(got["race"], synthetic_labels.RACE_BANDS),
            "schemes": {"aflw19": {"landmarks": np.mean(got["aflw19"], 0)},
                        "cofw_visibility": {"visible": (np.mean(got["visible29"], 0) >= 0.5).astype(np.int64)},
                        "lapa": {"mask": lapa_counts.argmax(0), "classes": 11},
                        "synth_attr": {"attributes": (np.mean(got["synth_attr"], 0) > 0.5).astype(np.int64)}}}
    _BASELINE_CACHE[key] = base
    return base


def _label_batch(items) -> dict:
    """The labels of `items`, stacked as a collated batch would hold them."""
    first, out = items[0], {}
    for k in ("landmarks", "mask", "attributes", "pose", "visible"):
        if k in first:
            out[k] = torch.stack([it[k] for it in items])
    if "age" in first:
        out["age"] = torch.tensor([it["age"] for it in items], dtype=torch.float64)
    for k in ("expression", "gender", "race"):
        if k in first:
            out[k] = torch.tensor([it[k] for it in items], dtype=torch.int64)
    return out


def _synthetic_test_faces(size_512: int, size_112: int, settings: Mapping, n_test: int):
    """The test faces at both input sizes, two images per identity (for verification pairs)."""
    n_ids = max(5, n_test // 2)
    test512 = data.SyntheticFaces("test", size=size_512, length=2 * n_ids, seed=settings["seed"], n_identities=n_ids)
    test112 = data.SyntheticFaces("test", size=size_112, length=2 * n_ids, seed=settings["seed"], n_identities=n_ids,
                                  framing=settings["framing_112"])
    return test512, test112


def _synthetic_metrics(heads, states) -> dict:
    """Each head's (model, baseline) states reduced to the result keys of SYNTHETIC_HEADS."""
    res = {}
    for spec, t, ctx in heads:
        reduce = KINDS[spec.kind][1]
        got, baseline = reduce(states[t][0], ctx), reduce(states[t][1], ctx)
        for i, (metric, key) in enumerate(spec.keys.items()):
            res[key] = got[metric]
            if i == 0:
                res[key + "_baseline"] = baseline[metric]
    return res


def _collect_batch(heads, states, out, faces, base) -> None:
    """Score one batch: faces = {size: (dataset, items, indices)} of the faces kept for the per-head metrics."""
    labels = {}
    for spec, t, ctx in heads:
        size = TASKS[t].size
        ds, items, idx = faces[size]
        if (size, spec.scheme) not in labels:
            if spec.scheme is not None:
                items = [ds.relabel(it, i, spec.scheme) for it, i in zip(items, idx)]
            labels[size, spec.scheme] = _label_batch(items)
        n = len(idx)
        head_base = {**base, **base["schemes"].get(spec.scheme, {}), "race_classes": TASKS[t].queries}
        KINDS[spec.kind][0](states[t][0], {k: v[:n] for k, v in out[t].items()}, labels[size, spec.scheme], ctx)
        KINDS[spec.kind][0](states[t][1], baseline_outputs(head_base, spec.type, n), labels[size, spec.scheme], ctx)


@torch.no_grad()
def evaluate_synthetic(model, train_cfg: Mapping, n_test: int = 1000, n_pairs: int | None = None,
                       batch_size: int = 64, device="cpu", n_baseline: int = 1000, log_every: int = 0) -> dict:
    """Metrics of every head of `model` on the synthetic test split and their baselines (fractions; MAE in years or
    degrees).

    train_cfg: the training config dict (checkpoint["config"]) for the synthetic world's seed and identities.
    Keys (for the heads the model has): the result keys of SYNTHETIC_HEADS (nme, parsing_f1, age_mae, expression_acc,
    attribute_macc, pose_mae, visibility_recall, gender_acc, race_acc, aflw19_nme, lapa_f1, synth_attr_macc), the
    first of each head with a *_baseline twin; *_f1_per_class (None for a class absent from truth and prediction);
    verification_acc, verification_std, n_pairs; n_test.
    """
    model.eval()
    device = torch.device(device)
    s512, s112 = model.cfg.size_512, model.cfg.size_112
    settings = _synthetic_settings(train_cfg)
    heads = [(spec, _head_of(model, spec)) for spec in SYNTHETIC_HEADS]
    heads = [(spec, t, {"name": spec.scheme or "300w", "size": model.cfg.input_size(t), "unit": "inter_ocular"})
             for spec, t in heads if t is not None]
    rec = next((t for t in model.cfg.tasks if TASKS[t].type == "recognition"), None)
    test512, test112 = _synthetic_test_faces(s512, s112, settings, n_test)
    n = min(n_test, len(test512))
    dense = any(TASKS[t].size == 512 for _, t, _ in heads)
    base = synthetic_baselines(s512, settings, n_baseline) if heads else {}
    states = {t: ({}, {}) for _, t, _ in heads}                                      # (model, baseline)
    emb = torch.zeros(len(test112), model.cfg.embed_dim) if rec else None
    stop = len(test112) if rec else n
    progress = Progress("synthetic", stop, batch_size, log_every)
    for start in range(0, stop, batch_size):
        idx = range(start, min(start + batch_size, stop))
        keep = [i for i in idx if i < n]                                              # a prefix of idx
        items112 = [test112[i] for i in idx]
        items512 = [test512[i] for i in idx] if keep and dense else None
        x112 = data.normalize_images(torch.stack([it["image"] for it in items112]), "global").to(device)
        x512 = data.normalize_images(torch.stack([it["image"] for it in items512]), "dense").to(device) \
            if items512 else None
        run = [t for _, t, _ in heads if keep] + ([rec] if rec else [])
        out = model.predict(images_512=x512, images_112=x112, tasks=run)
        if rec:                                                                         # flip-summed embeddings
            flipped = model.predict(images_112=x112.flip(-1), tasks=[rec])
            emb[start:start + len(idx)] = to_cpu(out[rec]["embedding"] + flipped[rec]["embedding"]).float()
        if keep:
            faces = {112: (test112, items112[:len(keep)], keep)}
            if items512:
                faces[512] = (test512, items512[:len(keep)], keep)
            _collect_batch(heads, states, out, faces, base)
        progress.update(len(idx))
    res = {"n_test": n, **_synthetic_metrics(heads, states)}
    if rec:
        pairs = test112.verification_pairs(n_pairs or max(10, 10 * (len(test112) // 10)), seed=settings["seed"])
        a = emb[[p[0] for p in pairs]]
        b = emb[[p[1] for p in pairs]]
        res["verification_acc"], res["verification_std"] = verification_accuracy(a, b, [p[2] for p in pairs])
        res["n_pairs"] = len(pairs)
    return res


# (row name, result key, baseline key); keys in MAE_KEYS print as numbers (years, degrees), the rest as percent.
SYNTHETIC_ROWS = (("landmarks NME (300W inter-ocular) ↓", "nme", "nme_baseline"),
                  ("parsing F1 (fg mean) ↑", "parsing_f1", "parsing_f1_baseline"),
                  ("age MAE (years) ↓", "age_mae", "age_mae_baseline"),
                  ("expression accuracy ↑", "expression_acc", "expression_acc_baseline"),
                  ("attribute mean accuracy ↑", "attribute_macc", "attribute_macc_baseline"),
                  ("verification accuracy (unseen ids) ↑", "verification_acc", None),
                  ("head pose MAE (degrees, mean of yaw / pitch / roll) ↓", "pose_mae", "pose_mae_baseline"),
                  ("landmark occlusion recall at 80% precision (29 points) ↑", "visibility_recall",
                   "visibility_recall_baseline"),
                  ("landmark occlusion ROC AUC (29 points; 50 is chance, as any constant) ↑", "visibility_auc", None),
                  ("gender accuracy ↑", "gender_acc", "gender_acc_baseline"),
                  ("race (skin-tone band) accuracy ↑", "race_acc", "race_acc_baseline"),
                  ("transfer: 19-point landmarks NME (outer eye corners) ↓", "aflw19_nme", "aflw19_nme_baseline"),
                  ("transfer: 11-class parsing F1 (fg mean) ↑", "lapa_f1", "lapa_f1_baseline"),
                  ("transfer: synth_attr mean accuracy ↑", "synth_attr_macc", "synth_attr_macc_baseline"))
MAE_KEYS = ("age_mae", "pose_mae")


def synthetic_table(res: Mapping) -> str:
    """Markdown table: metric, model, baseline, ratio (percent for fractions, years / degrees for MAE)."""
    lines = ["| synthetic test | model | baseline | model / baseline |", "|---|---|---|---|"]
    for name, key, bkey in SYNTHETIC_ROWS:
        if key not in res:
            continue
        fmt = (lambda v: f"{v:.2f}") if key in MAE_KEYS else (lambda v: format_percent(v))
        b = res.get(bkey) if bkey else None
        ratio = f"{res[key] / b:.2f}x" if b else "-"
        lines.append(f"| {name} | {fmt(res[key])} | {fmt(b) if b is not None else '-'} | {ratio} |")
    return "\n".join(lines)
