"""Evaluation of Faceptor (paper Sec. 4, Tables 3-9): the benchmark protocols under --data-root, the synthetic
test split, paper-style tables and the command line. Metrics: metrics.py (numpy only) via scoring.py.

    python evaluate.py out/demo --json out/demo/eval.json                 # synthetic test table (+ JSON)
    python evaluate.py CHECKPOINT --data-root DATA --json results.json    # every protocol found under DATA

Protocols (BENCHMARKS), one row per test split in the order of the paper's tables: landmark NME in the original
image, inter-ocular unit (300W, WFLW, COFW) or face-box diagonal (AFLW-19), AUC and failure rate at 0.1 (WFLW,
COFW); parsing F1 of one confusion matrix over the set (CelebAMask-HQ in the 512-px aligned frame, LaPa at the
original resolution); age MAE; expression top-1 accuracy; attribute mean accuracy; 10-fold verification accuracy
on insightface .bin sets with flip-summed embeddings.

Missing and corrupt data: an absent dataset folder is not evaluated; a split whose files are absent from a present
folder (e.g. 300W without ibug/) is listed as "absent" with the missing path. A corrupt image or a malformed label
line is an error naming the file (and line); with --skip-corrupt, images that fail to load are left out and counted
("skipped" in the JSON, a note in the table); annotation errors and corrupt .bin sets stay errors.

Synthetic split [ours; not in the paper]: faces of identities never seen in training. Dense heads read the size_512
rendering, the others the size_112 rendering of the same faces; NME uses the 300W inter-ocular unit. Baselines are
constant predictors fed through the same metric code: the mean normalised landmark shape of training faces, the
per-pixel majority class map, the mean age, the majority expression, the per-attribute majority.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

import checkpoint
import data
from metrics import verification_accuracy
from model import TASKS
from scoring import KINDS, baseline_outputs, to_cpu


# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------

def format_percent(value, digits: int = 2) -> str:
    """A fraction as a percent string ('-' for None or NaN); strings pass through, integers (counts) print as is."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(value)
    value = float(value)
    return "-" if np.isnan(value) else f"{100.0 * value:.{digits}f}"


def format_table(rows: Sequence[Mapping], columns: Sequence[str], digits: int = 2) -> str:
    """A markdown table: one row per mapping, one column per name; fractions print as percent, counts as integers.

    Missing entries print as '-'; string entries (e.g. a dataset name) print as they are.
    """
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(format_percent(row.get(c), digits) for c in columns) + " |")
    return "\n".join(lines)


class Progress:
    """A line every `every` batches (0: silent) on stderr: batches, images, images per second and the ETA."""

    def __init__(self, label: str, n_images: int, batch_size: int, every: int, stream=None):
        self.label, self.n, self.every, self.stream = label, n_images, every, stream or sys.stderr
        self.total, self.batches, self.done, self.start = -(-n_images // batch_size), 0, 0, time.time()

    def update(self, n: int) -> None:
        self.batches, self.done = self.batches + 1, self.done + n
        if self.every <= 0 or (self.batches % self.every and self.batches != self.total):
            return
        elapsed = max(time.time() - self.start, 1e-9)
        eta = (self.n - self.done) * elapsed / max(self.done, 1)
        print(f"{self.label}: batch {self.batches}/{self.total} ({self.done}/{self.n} images, "
              f"{self.done / elapsed:.1f} img/s, eta {int(eta // 60)}m{int(eta % 60):02d}s)",
              file=self.stream, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Synthetic test split
# ---------------------------------------------------------------------------------------------------------------

# (task type, kind, N_t or None, {metric of the kind: result key}); the first metric also gets a "_baseline" key.
SYNTHETIC_HEADS = (
    ("landmarks", "nme", 68, {"nme": "nme"}),
    ("parsing", "f1", 19, {"f1_mean": "parsing_f1", "f1_per_class": "parsing_f1_per_class"}),
    ("age", "mae", None, {"mae": "age_mae"}),
    ("expression", "acc", None, {"accuracy": "expression_acc"}),
    ("attributes", "macc", 40, {"mean_accuracy": "attribute_macc"}),
)
_BASELINE_CACHE = {}


def _first_head(model, kind: str, queries: int | None = None):
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
    key = (size_512, tuple(sorted(settings.items())), n)
    if key not in _BASELINE_CACHE:
        ds = data.SyntheticFaces("train", size=size_512, length=settings["length"], seed=settings["seed"],
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


def _label_batch(items: Sequence[Mapping], keep: Sequence[int]) -> dict:
    """The labels of items[j] for j in keep, stacked as a collated batch would hold them."""
    first, out = items[keep[0]], {}
    for k in ("landmarks", "mask", "attributes"):
        if k in first:
            out[k] = torch.stack([items[j][k] for j in keep])
    if "age" in first:
        out["age"] = torch.tensor([items[j]["age"] for j in keep], dtype=torch.float64)
    if "expression" in first:
        out["expression"] = torch.tensor([items[j]["expression"] for j in keep], dtype=torch.int64)
    return out


def _synthetic_test_faces(size_512: int, size_112: int, settings: Mapping, n_test: int):
    """The test faces at both input sizes, two images per identity (for verification pairs)."""
    n_ids = max(5, n_test // 2)
    test512 = data.SyntheticFaces("test", size=size_512, length=2 * n_ids, seed=settings["seed"], n_identities=n_ids)
    test112 = data.SyntheticFaces("test", size=size_112, length=2 * n_ids, seed=settings["seed"], n_identities=n_ids,
                                  framing=settings["framing_112"])
    return test512, test112


def _synthetic_metrics(heads, states, ctx) -> dict:
    """Each head's (model, baseline) states reduced to the result keys of SYNTHETIC_HEADS."""
    res = {}
    for (_, kind, _, names), t in heads:
        reduce = KINDS[kind][1]
        got, baseline = reduce(states[t][0], ctx), reduce(states[t][1], ctx)
        for i, (metric, key) in enumerate(names.items()):
            res[key] = got[metric]
            if i == 0:
                res[key + "_baseline"] = baseline[metric]
    return res


@torch.no_grad()
def evaluate_synthetic(model, train_cfg: Mapping, n_test: int = 1000, n_pairs: int | None = None,
                       batch_size: int = 64, device="cpu", n_baseline: int = 1000, log_every: int = 0) -> dict:
    """Metrics of every head of `model` on the synthetic test split and their baselines (fractions; MAE in years).

    train_cfg: the training config dict (checkpoint["config"]) for the synthetic world's seed and identities.
    Keys (for the heads the model has): nme, parsing_f1, age_mae, expression_acc, attribute_macc, each with a
    *_baseline twin; parsing_f1_per_class (CelebAMask-HQ order, None for a class absent from truth and
    prediction); verification_acc, verification_std, n_pairs; n_test.
    """
    model.eval()
    device = torch.device(device)
    s512, s112 = model.cfg.size_512, model.cfg.size_112
    settings = _synthetic_settings(train_cfg)
    heads = [(spec, _first_head(model, spec[0], spec[2])) for spec in SYNTHETIC_HEADS]
    heads = [(spec, t) for spec, t in heads if t is not None]
    rec = _first_head(model, "recognition")
    test512, test112 = _synthetic_test_faces(s512, s112, settings, n_test)
    n = min(n_test, len(test512))
    dense = any(TASKS[t].size == 512 for _, t in heads)
    base = synthetic_baselines(s512, settings, n_baseline)
    states = {t: ({}, {}) for _, t in heads}                                         # (model, baseline)
    ctx = {"name": "300w", "size": s512}
    emb = torch.zeros(len(test112), model.cfg.embed_dim) if rec else None
    stop = len(test112) if rec else n
    progress = Progress("synthetic", stop, batch_size, log_every)
    for start in range(0, stop, batch_size):
        idx = range(start, min(start + batch_size, stop))
        keep = [j for j, i in enumerate(idx) if i < n]
        items112 = [test112[i] for i in idx]
        items512 = [test512[i] for i in idx] if keep and dense else None
        x112 = data.normalize_images(torch.stack([it["image"] for it in items112]), "global").to(device)
        x512 = data.normalize_images(torch.stack([it["image"] for it in items512]), "dense").to(device) \
            if items512 else None
        run = [t for _, t in heads if keep] + ([rec] if rec else [])
        out = model.predict(images_512=x512, images_112=x112, tasks=run)
        if rec:                                                                         # flip-summed embeddings
            flipped = model.predict(images_112=x112.flip(-1), tasks=[rec])
            emb[start:start + len(idx)] = to_cpu(out[rec]["embedding"] + flipped[rec]["embedding"]).float()
        if keep:
            labels = {512: _label_batch(items512, keep) if items512 else None, 112: _label_batch(items112, keep)}
            for (task_type, kind, _, _), t in heads:
                collect = KINDS[kind][0]
                batch = labels[TASKS[t].size]
                collect(states[t][0], {k: v[keep] for k, v in out[t].items()}, batch, ctx)
                collect(states[t][1], baseline_outputs(base, task_type, len(keep)), batch, ctx)
        progress.update(len(idx))
    res = {"n_test": n, **_synthetic_metrics(heads, states, ctx)}
    if rec:
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
# Benchmark protocols: every test set found under the data root
# ---------------------------------------------------------------------------------------------------------------

# (table, dataset folder / head, split, kind, protocol options) in the order the paper's tables list them.
BENCHMARKS = (
    ("landmarks", "300w", "common", "nme", {}), ("landmarks", "300w", "challenge", "nme", {}),
    ("landmarks", "300w", "full", "nme", {}),
    ("landmarks", "wflw", "test", "nme", {"auc": 0.1}), ("landmarks", "cofw", "test", "nme", {"auc": 0.1}),
    ("landmarks", "aflw19", "test", "nme", {}), ("landmarks", "aflw19", "frontal", "nme", {}),
    ("parsing", "celebamask_hq", "test", "f1", {}), ("parsing", "lapa", "test", "f1", {"inverse": True}),
    ("age", "morph2", "test", "mae", {}), ("age", "utkface", "test", "mae", {}),
    ("expression", "rafdb", "test", "acc", {}), ("expression", "ferplus", "test", "acc", {}),
    ("expression", "affectnet", "test", "acc", {}),
    ("attributes", "celeba", "test", "macc", {}), ("attributes", "lfw73", "test", "macc", {}),
)
VERIFICATION_SETS = ("lfw", "cfp_fp", "agedb_30", "calfw", "cplfw")


class _Guarded(torch.utils.data.Dataset):
    """Items of `dataset` tagged with their index; an item that fails to load becomes {"index", "error"}, so the
    main process decides between an error and a counted skip, also when DataLoader workers load the items."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return {**self.dataset[index], "index": index}
        except data.DatasetError as e:
            return {"index": index, "error": str(e)}


def _collate_guarded(items: list, group: str) -> dict:
    good = [it for it in items if "error" not in it]
    batch = data.collate(good, group) if good else {}
    batch["failed"] = [(it["index"], it["error"]) for it in items if "error" in it]
    return batch


@torch.no_grad()
def evaluate_protocol(model, name: str, root: str, split: str, kind: str, options: Mapping, batch_size: int = 32,
                      device="cpu", num_workers: int = 0, skip_corrupt: bool = False, log_every: int = 0,
                      loader_options: Mapping | None = None) -> dict:
    """One test protocol of head `name` on `root` (the dataset's folder): {"n": images, metrics...}.

    options: {"auc": NME threshold} for AUC / FR, {"inverse": True} for parsing at the original resolution.
    A corrupt item raises data.DatasetError naming its file; with skip_corrupt it is left out and counted
    ("skipped", "skipped_errors"). loader_options go to data.build_dataset (e.g. AFLW-19 n_train).
    """
    size = model.cfg.input_size(name)
    opts = dict(loader_options or {})
    ds = data.build_dataset(name, root, split, transform=data.default_transform(name, train=False, size=size), **opts)
    if len(ds) == 0:
        return {"n": 0, "status": "empty"}
    raw = data.build_dataset(name, root, split, **opts) if options.get("inverse") else None
    collect, reduce = KINDS[kind]
    ctx = {"name": name, "size": size, "raw": raw, **options}
    group = data.input_group(TASKS[name].type)
    images_key = "images_512" if TASKS[name].size == 512 else "images_112"
    loader = torch.utils.data.DataLoader(_Guarded(ds), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=functools.partial(_collate_guarded, group=group))
    progress = Progress(f"{name}/{split}", len(ds), batch_size, log_every)
    state, skipped = {}, []
    for b in loader:
        for index, error in b["failed"]:
            if not skip_corrupt:
                raise data.DatasetError(f"{name}/{split} item {index}: {error}\n(evaluate.py --skip-corrupt leaves "
                                        "such images out and counts them)")
            skipped.append(error)
        if "image" in b:
            out = model.predict(**{images_key: b["image"].to(device)}, tasks=[name])[name]
            collect(state, out, b, ctx)
        progress.update(len(b["failed"]) + (len(b["image"]) if "image" in b else 0))
    if not state:
        raise data.DatasetError(f"{name}/{split} at {root}: all {len(ds)} images failed to load; first: {skipped[0]}")
    res = {"n": len(ds) - len(skipped), **reduce(state, ctx)}
    if skip_corrupt:
        res["skipped"], res["skipped_errors"] = len(skipped), skipped
    return res


@torch.no_grad()
def evaluate_verification(model, path: str, head: str, batch_size: int = 64, device="cpu") -> dict:
    """10-fold accuracy on one insightface .bin set with flip-summed embeddings."""
    images, issame = data.read_verification_bin(path)
    size = model.cfg.size_112
    embs = []
    for start in range(0, len(images), batch_size):
        x = ((images[start:start + batch_size].float() / 255.0) - 0.5) / 0.5
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)
        x = x.to(device)
        e = model.predict(images_112=x, tasks=[head])[head]["embedding"] + \
            model.predict(images_112=x.flip(-1), tasks=[head])[head]["embedding"]
        embs.append(to_cpu(e).float())
    e = torch.cat(embs)
    acc, std = verification_accuracy(e[0::2], e[1::2], issame)
    return {"accuracy": acc, "std": std, "pairs": len(issame)}


def evaluate_benchmarks(model, root: str, batch_size: int = 32, device="cpu", num_workers: int = 0,
                        skip_corrupt: bool = False, log_every: int = 0,
                        loader_options: Mapping[str, Mapping] | None = None) -> dict:
    """{protocol: metrics} for every protocol whose dataset folder is under `root` and whose head the model has.

    A split whose files are missing from a present folder gets {"status": "absent", "reason": ...}; corrupt data
    raises data.DatasetError (see evaluate_protocol for skip_corrupt). loader_options: {dataset: keyword arguments
    of its loader}.
    """
    results = {}
    for table, name, split, kind, options in BENCHMARKS:
        folder = os.path.join(root, name)
        if name not in model.cfg.tasks or not os.path.isdir(folder):
            continue
        try:
            res = evaluate_protocol(model, name, folder, split, kind, options, batch_size, device, num_workers,
                                    skip_corrupt, log_every, (loader_options or {}).get(name))
        except data.DatasetMissing as e:                   # only a split that is not there may be passed over
            results[f"{name}/{split}"] = {"table": table, "status": "absent", "reason": str(e).splitlines()[0]}
            continue
        results[f"{name}/{split}"] = {"table": table, **res}
    rec = [t for t in model.cfg.tasks if TASKS[t].type == "recognition"]
    folders = [os.path.join(root, rec[0]), os.path.join(root, "verification"), root] if rec else []
    found = {v: next((p for p in (os.path.join(f, f"{v}.bin") for f in folders) if os.path.isfile(p)), None)
             for v in VERIFICATION_SETS}
    for vset, path in found.items():
        if path is not None:
            results[f"verification/{vset}"] = {"table": "verification",
                                               **evaluate_verification(model, path, rec[0], batch_size, device)}
        elif any(found.values()):                          # some sets are there: say which are not
            results[f"verification/{vset}"] = {"table": "verification", "status": "absent",
                                               "reason": f"no {vset}.bin in {', '.join(folders)}"}
    return results


_TABLE_COLUMNS = {"landmarks": ("nme", "auc@0.1", "fr@0.1"), "parsing": ("f1_mean",), "age": ("mae",),
                  "expression": ("accuracy",), "attributes": ("mean_accuracy",), "verification": ("accuracy", "std")}


def _note(res: Mapping) -> str:
    if res.get("status") == "absent":
        return f"absent: {res['reason']}"
    if res.get("status") == "empty":
        return "empty split"
    k = res.get("skipped", 0)
    return f"{k} corrupt image{'s' if k > 1 else ''} skipped" if k else ""


def benchmark_tables(results: Mapping) -> str:
    """One markdown table per task type: metrics in percent except MAE (years), the images evaluated and a note
    (absent split, corrupt images skipped)."""
    parts = []
    for table, metrics in _TABLE_COLUMNS.items():
        rows = [{**v, "protocol": k, "n": v.get("n", v.get("pairs")), "note": _note(v)}
                for k, v in results.items() if v["table"] == table]
        if not rows:
            continue
        if table == "age":
            rows = [{**r, "mae": f"{r['mae']:.3f}"} if "mae" in r else r for r in rows]
        parts.append(f"### {table}\n\n" + format_table(rows, ("protocol", "n") + metrics + ("note",)))
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def compile_model(model, backend: str = "inductor"):
    """torch.compile the tensor-in, tensor-out parts of `model` in place: the ViT encoder (most of the compute) and
    the pixel decoder. model.predict itself stays eager: it takes the task list as a Python argument, and compiling
    it would recompile for every protocol. Parameter names (the state dict) do not change."""
    for part in ("encoder", "pixel_decoder"):
        module = getattr(model, part, None)
        if isinstance(module, torch.nn.Module):
            module.compile(backend=backend)
    return model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a train.py checkpoint: the synthetic test split and every "
                                "benchmark protocol found under --data-root; prints paper-style tables.")
    p.add_argument("checkpoint", help="a checkpoint written by train.py, or its run folder (latest checkpoint)")
    p.add_argument("--data-root", default=None, help="folder with one sub-folder per dataset (as for training)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--synthetic", choices=("auto", "on", "off"), default="auto",
                   help="evaluate the synthetic test split (auto: when the checkpoint was trained on it)")
    p.add_argument("--n-test", type=int, default=1000, help="synthetic test faces (also the verification pairs)")
    p.add_argument("--batch-size", type=int, default=64, help="faces per model.predict call")
    p.add_argument("--num-workers", type=int, default=4,
                   help="DataLoader processes decoding and warping benchmark images (0: in the main process)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the encoder and pixel decoder (slow start, faster on long test sets)")
    p.add_argument("--skip-corrupt", action="store_true",
                   help="leave out images that fail to load and count them in the table and JSON (default: error)")
    p.add_argument("--log-every", type=int, default=20,
                   help="print a progress line with the ETA every this many batches (0: quiet)")
    p.add_argument("--layer-attention", choices=("on", "off"), default="on",
                   help="stage-2 models: use Layer-Attention (on) or exactly the stage-1 memory (off)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        ckpt = checkpoint.load_checkpoint(checkpoint.resolve_checkpoint(args.checkpoint))
        model = checkpoint.model_from_checkpoint(ckpt).to(device)
    except checkpoint.CheckpointError as e:
        raise SystemExit(f"evaluate.py: {e}")
    if args.layer_attention == "off" and hasattr(model, "set_layer_attention"):
        for t in model.cfg.tasks:
            model.set_layer_attention(t, False)
    if args.compile:
        compile_model(model)
    results = {"checkpoint": args.checkpoint, "preset": ckpt["preset"], "stage": ckpt["stage"], "step": ckpt["step"]}
    title = f"{os.path.basename(args.checkpoint)} (preset {ckpt['preset']}, stage {ckpt['stage']}, step {ckpt['step']})"
    if args.synthetic == "on" or (args.synthetic == "auto" and ckpt["config"].get("data") == "synthetic"):
        res = evaluate_synthetic(model, ckpt["config"], n_test=args.n_test, batch_size=args.batch_size,
                                 device=device, log_every=args.log_every)
        results["synthetic"] = res
        print(f"## Synthetic test split: {title}\n")
        print(synthetic_table(res))
        print(f"\n{res['n_test']} test faces" + (f", {res['n_pairs']} verification pairs" if "n_pairs" in res else "")
              + "; baselines from training faces (mean shape, majority map / class / attribute, mean age)\n")
    if args.data_root:
        try:
            bench = evaluate_benchmarks(model, args.data_root, args.batch_size, device, args.num_workers,
                                        args.skip_corrupt, args.log_every)
        except data.DatasetError as e:
            raise SystemExit(f"evaluate.py: {e}")
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
