"""Evaluation of Faceptor (paper Sec. 4, Tables 3-9): the synthetic test split, the benchmark protocols under
--data-root, paper-style tables and the command line. The metric functions live in metrics.py.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

import checkpoint
from metrics import (accuracy, auc_fr, f1_list, mae, mean_attribute_accuracy, nme, nme_per_sample,  # noqa: F401
                     parsing_confusion, parsing_f1, verification_accuracy)


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
# flip-summed embeddings (docs/datasets.md, "Metrics"). NME uses the 300W inter-ocular unit (points 36 and 45).

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
    from data.synthetic import SyntheticFaces
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
    from data.composer import normalize_images
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
    from data.synthetic import SyntheticFaces
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
# Benchmark protocols (docs/datasets.md): every test set found under the data root
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
    from data.composer import collate
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=lambda items: collate(items, group))
    yield from loader


@torch.no_grad()
def evaluate_protocol(model, name: str, root: str, split: str, kind: str, extra: Mapping, batch_size: int = 32,
                      device="cpu", num_workers: int = 0) -> dict:
    """One test protocol (docs/datasets.md) of head `name` on `root` (the dataset's folder)."""
    import data
    from data.transforms import Warp
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
    """10-fold accuracy on one insightface .bin set with flip-summed embeddings (docs/datasets.md, "Metrics")."""
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
        ckpt = checkpoint.load_checkpoint(checkpoint.resolve_checkpoint(args.checkpoint))
        model = checkpoint.model_from_checkpoint(ckpt).to(device)
    except checkpoint.CheckpointError as e:
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
