"""Evaluation of Faceptor (paper Sec. 4, Tables 3-9): the benchmark protocols under --data-root, the synthetic
test split, paper-style tables and the command line. Metrics: metrics.py (numpy only) via scoring.py.

    python evaluate.py out/demo --json out/demo/eval.json                 # synthetic test table (+ JSON)
    python evaluate.py CHECKPOINT --data-root DATA --json results.json    # every protocol found under DATA

Protocols (BENCHMARKS), one row per test split in the order of the paper's tables: landmark NME in the original
image, inter-ocular unit (300W, WFLW, COFW) or face-box diagonal (AFLW-19), AUC and failure rate at 0.1 (WFLW,
COFW); parsing F1 of one confusion matrix over the set (CelebAMask-HQ in the 512-px aligned frame, LaPa at the
original resolution); age MAE; expression top-1 accuracy; attribute mean accuracy; 10-fold verification accuracy
on insightface .bin sets with flip-summed embeddings. Beyond the paper: head pose MAE per angle and mean in degrees
(AFLW2000-3D, read by the 300wlp head), landmark occlusion recall at 80 % precision (COFW), gender and race
accuracy (UTKFace, FairFace).

Missing and corrupt data: an absent dataset folder is not evaluated; a split whose files are absent from a present
folder (e.g. 300W without ibug/) is listed as "absent" with the missing path. A corrupt image or a malformed label
line is an error naming the file (and line); with --skip-corrupt, images that fail to load are left out and counted
("skipped" in the JSON, a note in the table); annotation errors and corrupt .bin sets stay errors.

Synthetic split [ours; not in the paper]: synthetic_eval.py (every head the synthetic faces label, including the
new task types and the transfer schemes, each next to a constant baseline).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
from typing import Mapping

import torch
import torch.nn.functional as F

import checkpoint
import data
from metrics import verification_accuracy
from model import TASKS
from scoring import KINDS, Progress, baseline_outputs, format_percent, format_table, to_cpu  # noqa: F401
from synthetic_eval import (SYNTHETIC_HEADS, SYNTHETIC_ROWS, _synthetic_settings, evaluate_synthetic,  # noqa: F401
                            synthetic_baselines, synthetic_table)


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
    # task types beyond the paper; AFLW2000-3D is read by the 300wlp head (data.EVAL_HEAD)
    ("pose", "aflw2000", "test", "pose", {}), ("visibility", "cofw_visibility", "test", "visibility", {}),
    ("gender", "utkface_gender", "test", "gender", {}), ("gender", "fairface_gender", "test", "gender", {}),
    ("race", "utkface_race", "test", "race", {}), ("race", "fairface_race", "test", "race", {}),
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
    """One test protocol of dataset `name` on `root` (the dataset's folder), read by the head of that name or by
    data.EVAL_HEAD[name]: {"n": images, metrics...}.

    options: {"auc": NME threshold} for AUC / FR, {"inverse": True} for parsing at the original resolution.
    A corrupt item raises data.DatasetError naming its file; with skip_corrupt it is left out and counted
    ("skipped", "skipped_errors"). loader_options go to data.build_dataset (e.g. AFLW-19 n_train).
    """
    head = data.EVAL_HEAD.get(name, name)
    size = model.cfg.input_size(head)
    opts = dict(loader_options or {})
    ds = data.build_dataset(name, root, split, transform=data.default_transform(name, train=False, size=size), **opts)
    if len(ds) == 0:
        return {"n": 0, "status": "empty"}
    raw = data.build_dataset(name, root, split, **opts) if options.get("inverse") else None
    collect, reduce = KINDS[kind]
    ctx = {"name": name, "size": size, "raw": raw, **options}
    group = data.input_group(TASKS[head].type)
    images_key = "images_512" if TASKS[head].size == 512 else "images_112"
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
            out = model.predict(**{images_key: b["image"].to(device)}, tasks=[head])[head]
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
        if data.EVAL_HEAD.get(name, name) not in model.cfg.tasks or not os.path.isdir(folder):
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
                  "expression": ("accuracy",), "attributes": ("mean_accuracy",), "verification": ("accuracy", "std"),
                  "pose": ("mean", "yaw", "pitch", "roll"), "visibility": ("recall@p80", "auc"), "gender": ("accuracy",),
                  "race": ("accuracy",)}
_DEGREES_OR_YEARS = {"age": ("mae",), "pose": ("mean", "yaw", "pitch", "roll")}


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
        for key in _DEGREES_OR_YEARS.get(table, ()):                  # numbers, not percent
            rows = [{**r, key: f"{r[key]:.3f}"} if key in r else r for r in rows]
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
              + "; baselines: constants from training faces (mean shape / age / angles, "
              "majority map / class / attribute / visibility)\n")
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
