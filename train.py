"""Two-stage multi-task training of Faceptor (paper Sec. 3.3 and 4.1; docs/design.md sections 6-7), nanoGPT style.

    python train.py --stage 1                                        # demo preset: synthetic faces, tiny model, CPU
    torchrun --standalone --nproc_per_node=2 train.py --stage 1      # the same on 2 processes (DDP, gloo on CPU)
    torchrun --standalone --nproc_per_node=2 train.py --stage 2      # Layer-Attention on top of the latest stage 1
    torchrun --nproc_per_node=4 train.py --preset faceptor-base --data-root DATA --init farl FaRL-ep64.pth
    python train.py --preset faceptor-base --tune prompt --dataset aflw19 --from out/faceptor-base/stage1_....pt
    python train.py --resume                                         # continue the latest checkpoint of the preset

One step draws one batch of n_t samples from every task head of the preset (per process), runs the encoder once
per input size (all 112-px samples together, all 512-px samples together), and minimises eq. (8),
sum_t alpha_t L_t / sum_t alpha_t. AdamW (0.9, 0.999), weight decay 0.05, two groups (encoder lr, the rest 10x),
linear warm-up from 1e-6, then cosine to 0, gradient clipping at global norm 5.
Stage 2 loads a stage-1 checkpoint into a stage-2 model (strict except the five new projections) and trains only
`model.stage2_parameters` (L_t of the heads and the Layer-Attention projections).

Divergences and choices (ours):
  * n_t of Tables 2 and 10 are per process (the authors trained on 4 GPUs with these per-GPU batch sizes).
  * Weight decay 0.05 applies to every trainable tensor (the paper names no exclusions).
  * The demo presets are not in the paper: a tiny model on the built-in synthetic faces (synthetic.py) so the
    whole pipeline runs on a CPU; their sizes, batches and weights are tuned for that setting.
  * bf16 autocast (CUDA) is an option; the authors computed in fp32.
  * Stage 2 starts next to the stage-1 function: the new projections are copies of the layer-12 one and each
    head's L_t rows equal its first row (model.init_stage2); random values made the demo's stage 2 end below stage 1.
  * MKL_CBWR=AUTO,STRICT is set by default so CPU runs are bit-reproducible (a resumed run equals an
    uninterrupted one); export another value to override.

Checkpoints (`out/<preset>/stage{s}_step{N}.pt`, the last K kept) hold only tensors and plain Python values
(torch.load(weights_only=True) reads them): the model and CosFace state dicts, optimiser, schedule, GradScaler,
every rank's batch-composer position and RNG states, the training and model configs as dicts.
"""
from __future__ import annotations

import os

# Bit-reproducible CPU runs (resume == uninterrupted): MKL's GEMM otherwise picks code paths by memory alignment,
# which varies between processes. Must be set before MKL initialises, i.e. before torch is imported.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import argparse
import dataclasses
import glob
import hashlib
import json
import math
import random
import re
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import losses
import ops
from data.composer import MultiTaskComposer
from checkpoint import (CHECKPOINT_FORMAT, CheckpointError, atomic_save, checkpoints, convert_official_state_dict,  # noqa: F401
                        load_checkpoint, load_farl, model_from_checkpoint)
from model import TASKS, Faceptor, FaceptorConfig, NaiveFaceptor, build_model, init_stage2, stage2_parameters

# ----------------------------------------------------------------------------------------------------------------
# Configuration: one dataclass; presets are named instances of it.

@dataclass
class TrainConfig:
    preset: str = "demo"
    model: str = "faceptor"                    # faceptor | naive
    arch: str = "tiny"                         # FaceptorConfig constructor: tiny | base | full
    arch_overrides: dict = field(default_factory=dict)   # FaceptorConfig fields changed from that constructor
    heads: dict = field(default_factory=dict)  # task head -> [n_t (per process), alpha_t]   (Tables 2 and 10)
    data: str = "synthetic"                    # synthetic | real (one folder per dataset under --data-root)
    synthetic_train_length: int = 40000        # items of the synthetic training split
    synthetic_identities: int = 1000           # training identities (CosFace classes of the recognition head)
    synthetic_seed: int = 0
    synthetic_framing_112: str = "aligned"    # face framing of the 112-px group's synthetic faces (aligned crops)
    synthetic_cache: bool = True               # keep drawn synthetic faces in memory (epochs after the first are free)
    readout_offset: float = 0.0                # dense read-out initialisation: heatmap logits start at this value
    steps: int = 600                           # stage-1 steps
    warmup: int = 40
    stage2_steps: int = 150
    stage2_warmup: int = 15
    lr: float = 5e-4                           # encoder peak lr; the rest gets lr * lr_mult
    lr_mult: float = 10.0
    warmup_start_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.999)
    grad_clip: float = 5.0
    seed: int = 1337
    log_every: int = 20
    eval_every: int = 0                        # 0: only at the end
    eval_samples: int = 300                    # synthetic test faces in periodic evaluation
    ckpt_every: int = 200
    keep_last: int = 3
    max_nonfinite: int = 10                    # abort after this many non-finite losses in a row
    num_workers: int = 0
    dtype: str = "fp32"                        # fp32 | bf16 (autocast, CUDA) | fp16 (autocast + GradScaler, CUDA)
    out_dir: str = ""                          # default out/<preset>

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


def _plain(x):
    """Tuples -> lists recursively, so a checkpoint holds only what torch.load(weights_only=True) accepts."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


BASE_HEADS = {"300w": [4, 1000.0], "celebamask_hq": [4, 100.0], "morph2": [64, 6.0], "affectnet": [64, 4.0],
              "rafdb": [16, 1.0], "celeba": [64, 2.0], "ms1mv3": [256, 5.0]}                       # Table 2, Base
FULL_HEADS = {"300w": [4, 250.0], "wflw": [4, 250.0], "cofw": [4, 250.0], "aflw19": [4, 250.0],
              "celebamask_hq": [4, 100.0], "lapa": [4, 100.0], "morph2": [64, 4.0], "utkface": [16, 1.0],
              "affectnet": [64, 6.66], "rafdb": [16, 1.67], "ferplus": [16, 1.67], "celeba": [64, 2.0],
              "ms1mv3": [256, 5.0]}                                                                  # Table 2, Full
PAPER = dict(arch="base", data="real", steps=50000, warmup=2000, stage2_steps=20000, stage2_warmup=2000, lr=5e-5,
             log_every=50, eval_every=5000, ckpt_every=1000, keep_last=3, num_workers=4, dtype="bf16")
# Demo presets [ours]: a from-scratch tiny Faceptor on SyntheticFaces, sized for 2 CPU processes. The loss weights
# balance the heads' gradient norms on the shared encoder at initialisation (landmark and parsing losses are small,
# attribute and CosFace losses large); with the paper's weights the 112-px heads starve. lr_mult = 1: the encoder
# is trained from scratch too, so it gets the same learning rate as the rest. The identity head gets a larger batch:
# with 16 faces per process, CosFace stays on its margin plateau and verification stays near chance.
DEMO_ARCH = dict(vit_width=96, vit_layers=6, vit_heads=4, patch_size=8, pos_grid=8, dec_dim=64, dec_heads=4,
                 dec_layers=2, dec_ffn=128, embed_dim=64, clip_dim=64, la_layers=(1, 2, 3, 4, 5), size_512=64,
                 size_112=48)
DEMO_HEADS = {"300w": [16, 100.0], "celebamask_hq": [16, 15.0], "morph2": [16, 0.5], "affectnet": [16, 5.0],
              "celeba": [16, 0.5], "ms1mv3": [48, 2.0]}
DEMO = dict(arch_overrides=DEMO_ARCH, heads=DEMO_HEADS, lr=1e-3, lr_mult=1.0, readout_offset=-6.0,
            synthetic_train_length=12000, log_every=50, eval_samples=300)

PRESETS = {
    "demo": TrainConfig(preset="demo", steps=700, warmup=35, stage2_steps=500, stage2_warmup=25, ckpt_every=100,
                        **DEMO),
    # demo-long: the same recipe, 96-px dense inputs (the small parts: eyes, brows, lips) and a heavier parsing loss.
    "demo-long": TrainConfig(preset="demo-long", steps=2600, warmup=130, stage2_steps=300, stage2_warmup=15,
                             eval_every=650, ckpt_every=200, **{
                                 **DEMO, "synthetic_train_length": 40000,
                                 "arch_overrides": {**DEMO_ARCH, "size_512": 96},
                                 "heads": {**DEMO_HEADS, "celebamask_hq": [16, 30.0]}}),
    "faceptor-base": TrainConfig(preset="faceptor-base", heads=BASE_HEADS, **PAPER),
    "faceptor-full": TrainConfig(preset="faceptor-full", heads=FULL_HEADS, **{**PAPER, "arch": "full"}),
    # Naive Faceptor: Base datasets and batch sizes, every weight 1.0 (Sec. 4.1).
    "naive": TrainConfig(preset="naive", model="naive", heads={k: [v[0], 1.0] for k, v in BASE_HEADS.items()},
                         **PAPER),
    # Auxiliary supervised learning (Table 10).
    "asl-age": TrainConfig(preset="asl-age", heads={"morph2": [64, 10.0], "300w": [4, 1000.0],
                                                    "celebamask_hq": [4, 100.0], "ms1mv3": [256, 10.0]}, **PAPER),
    "asl-expression": TrainConfig(preset="asl-expression", heads={
        "affectnet": [64, 80.0], "rafdb": [16, 20.0], "300w": [2, 1000.0], "celebamask_hq": [2, 100.0],
        "ms1mv3": [64, 1.0]}, **PAPER),
}
# Cross-dataset transfer (Table 9, appendix B.3): batch sizes of the new heads; 20,000 steps, 2,000 warm-up.
TRANSFER_BATCH = {"aflw19": 8, "lapa": 8, "lfw73": 32}


def model_config(cfg: TrainConfig, stage: int) -> FaceptorConfig:
    make = {"tiny": FaceptorConfig.tiny, "base": FaceptorConfig.base, "full": FaceptorConfig.full}[cfg.arch]
    return make(**{**cfg.arch_overrides, "tasks": tuple(cfg.heads), "stage": stage})


# ----------------------------------------------------------------------------------------------------------------
# Learning-rate schedule: linear warm-up from `start`, then cosine to 0 at `total`.

def lr_at(step: int, total: int, warmup: int, peak: float, start: float = 1e-6) -> float:
    """Learning rate of optimiser step `step` (0-based) of `total`."""
    if step < warmup:
        return start + (peak - start) * step / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1.0 + math.cos(math.pi * min(1.0, t)))


# ----------------------------------------------------------------------------------------------------------------
# Data

def synthetic_dataset(head: str, cfg: TrainConfig, mcfg: FaceptorConfig, split: str = "train", length=None,
                      identities=None):
    from data.synthetic import SyntheticFaces
    framing = cfg.synthetic_framing_112 if TASKS[head].size == 112 else "loose"
    return SyntheticFaces(split=split, size=mcfg.input_size(head), length=length or cfg.synthetic_train_length,
                          seed=cfg.synthetic_seed, n_identities=identities or cfg.synthetic_identities,
                          task=TASKS[head].type, framing=framing, cache=cfg.synthetic_cache)


def init_readout(model: nn.Module, offset: float):
    """Dense read-out initialisation [ours, for from-scratch training]: E_pixel gets a constant unit channel (the
    last ConvT's bias) and the dense MLP's output a matching bias, so every heatmap logit starts near `offset`.
    With offset < 0 the sigmoid-weighted soft-argmax is not pulled to the map centre by thousands of background
    pixels at sigmoid(0) = 0.5 before any peak has formed. Only initial values change, not the architecture."""
    if not offset or not isinstance(model, Faceptor):
        return
    with torch.no_grad():
        model.pixel_decoder[-1].bias.zero_()
        model.pixel_decoder[-1].bias[0] = 1.0
        model.dense_head.layers[-1].bias.zero_()
        model.dense_head.layers[-1].bias[0] = offset


def real_dataset(head: str, root: str, mcfg: FaceptorConfig, split: str = "train"):
    import data
    folder = os.path.join(root, head)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--data-root: no folder {folder!r} for task head {head!r} "
                                f"(expected one folder per dataset, named as the head)")
    transform = data.default_transform(head, train=split == "train", size=mcfg.input_size(head))
    return data.build_dataset(head, folder, split, transform=transform)


def num_identities(dataset) -> int:
    for name in ("num_classes", "n_identities", "num_identities"):
        if getattr(dataset, name, None) is not None:
            return int(getattr(dataset, name))
    raise ValueError(f"the recognition dataset {type(dataset).__name__} does not say how many identities it has "
                     "(attribute num_classes / n_identities)")


# ----------------------------------------------------------------------------------------------------------------
# The multi-task forward: encoder once per input size, then every head on its slice (paper Sec. 4.1).

class MultiTaskStep(nn.Module):
    """model + CosFace classifier; forward(batches) -> {head: L_t}. One DDP forward per training step."""

    def __init__(self, model: nn.Module, cosface: nn.Module | None):
        super().__init__()
        self.model, self.cosface = model, cosface

    def forward(self, batches: dict) -> dict:
        outputs = self.model.forward_tasks({h: b["image"] for h, b in batches.items()})  # encoder once per size
        return {h: losses.task_loss(TASKS[h].type, outputs[h], batches[h], self.cosface) for h in batches}


def _rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    st = {"torch": torch.get_rng_state(),
          "numpy_key": torch.from_numpy(np_state[1].astype(np.int64)),
          "numpy_pos": int(np_state[2]), "numpy_gauss": [int(np_state[3]), float(np_state[4])],
          "python": torch.tensor(py_state[1], dtype=torch.int64),
          "python_gauss": py_state[2]}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _set_rng_state(st: dict):
    torch.set_rng_state(st["torch"])
    np.random.set_state(("MT19937", st["numpy_key"].numpy().astype(np.uint32), st["numpy_pos"],
                         st["numpy_gauss"][0], st["numpy_gauss"][1]))
    random.setstate((3, tuple(int(v) for v in st["python"].tolist()), st["python_gauss"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


# ----------------------------------------------------------------------------------------------------------------
# Distributed helpers

def _gather(obj, world: int):
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _any(flag: bool, device) -> bool:
    """True on every rank if `flag` is true on any rank."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def parameter_checksum(module: nn.Module) -> str:
    """sha256 (16 hex digits) over every parameter's name and bytes (buffers such as BN statistics excluded:
    DDP re-broadcasts them from rank 0 at the next forward)."""
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes() if p.dtype != torch.bfloat16
                 else p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train Faceptor (stage 1 / stage 2 / transfer). "
                                "Runs under python and torchrun.")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="named training configuration")
    p.add_argument("--stage", type=int, default=1, choices=(1, 2), help="1: multi-task training; "
                   "2: Layer-Attention on top of a stage-1 checkpoint")
    p.add_argument("--from", dest="from_ckpt", default=None, help="stage 2 / transfer: the stage-1 checkpoint to "
                   "start from (default: the latest stage-1 checkpoint in the preset's out dir)")
    p.add_argument("--tune", choices=("prompt", "decoder", "full"), default=None, help="cross-dataset transfer "
                   "(Table 9): train the new head's queries / the decoders and outputs / everything")
    p.add_argument("--dataset", default=None, help="transfer: the new task head (e.g. aflw19, lapa, lfw73)")
    p.add_argument("--init", nargs=2, metavar=("KIND", "PATH"), default=None,
                   help="initialise from 'farl PATH' (encoder) or 'official PATH' (the authors' checkpoint)")
    p.add_argument("--data-root", default=None, help="folder with one sub-folder per dataset (real presets)")
    p.add_argument("--out-dir", default=None, help="where checkpoints and logs go (default out/<preset>)")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue a run: a checkpoint path, or no value for the latest one of this stage")
    p.add_argument("--max-steps", type=int, default=None, help="override the number of steps of this stage")
    p.add_argument("--warmup", type=int, default=None, help="override the warm-up steps of this stage")
    p.add_argument("--lr", type=float, default=None, help="override the encoder peak learning rate")
    p.add_argument("--batch-scale", type=float, default=None, help="multiply every n_t (at least 1)")
    p.add_argument("--seed", type=int, default=None, help="override the seed (rank r uses seed + r)")
    p.add_argument("--log-every", type=int, default=None, help="progress line every N steps")
    p.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (0: only at the end)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluations (periodic and final)")
    p.add_argument("--eval-samples", type=int, default=None, help="synthetic test faces per evaluation")
    p.add_argument("--ckpt-every", type=int, default=None, help="checkpoint every N steps")
    p.add_argument("--keep-last", type=int, default=None, help="keep the last K checkpoints")
    p.add_argument("--max-nonfinite", type=int, default=None, help="abort after N non-finite losses in a row")
    p.add_argument("--num-workers", type=int, default=None, help="data-loading worker processes per rank")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="autocast precision on CUDA (CPU always runs fp32)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--synthetic-length", type=int, default=None, help="items in the synthetic training split")
    p.add_argument("--synthetic-identities", type=int, default=None, help="identities in the synthetic training split")
    p.add_argument("--debug-checksums", action="store_true",
                   help="every rank appends a parameter checksum per step to checksums_rank<r>.jsonl")
    p.add_argument("--debug-nonfinite-at", default="", help="comma-separated steps (1-based) whose loss is made NaN (testing)")
    p.add_argument("--debug-sleep", type=float, default=0.0, help="seconds to sleep after each step (testing)")
    return p.parse_args(argv)


def resolve_config(args) -> TrainConfig:
    cfg = dataclasses.replace(PRESETS[args.preset])
    cfg.heads = {k: list(v) for k, v in cfg.heads.items()}
    cfg.arch_overrides = dict(cfg.arch_overrides)
    overrides = {"lr": args.lr, "seed": args.seed, "log_every": args.log_every, "eval_every": args.eval_every,
                 "eval_samples": args.eval_samples, "ckpt_every": args.ckpt_every, "keep_last": args.keep_last,
                 "max_nonfinite": args.max_nonfinite, "num_workers": args.num_workers, "dtype": args.dtype,
                 "synthetic_train_length": args.synthetic_length, "synthetic_identities": args.synthetic_identities,
                 "out_dir": args.out_dir}
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg, k, v)
    if args.stage == 1:
        cfg.steps = args.max_steps if args.max_steps is not None else cfg.steps
        cfg.warmup = args.warmup if args.warmup is not None else cfg.warmup
    else:
        cfg.stage2_steps = args.max_steps if args.max_steps is not None else cfg.stage2_steps
        cfg.stage2_warmup = args.warmup if args.warmup is not None else cfg.stage2_warmup
    if args.tune:
        if args.dataset not in TRANSFER_BATCH:
            raise SystemExit(f"--tune needs --dataset, one of {sorted(TRANSFER_BATCH)}; got {args.dataset!r}")
        cfg.steps, cfg.warmup = (args.max_steps or 20000), (args.warmup if args.warmup is not None else 2000)
        cfg.heads = {args.dataset: [TRANSFER_BATCH[args.dataset], 1.0]}
    if args.batch_scale:
        for v in cfg.heads.values():
            v[0] = max(1, int(round(v[0] * args.batch_scale)))
    if not cfg.out_dir:
        cfg.out_dir = os.path.join("out", cfg.preset + (f"-{args.tune}-{args.dataset}" if args.tune else ""))
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# Training

def main(argv=None):
    args = parse_args(argv)
    cfg = resolve_config(args)

    # -- distributed set-up (DDP detected from RANK, as torchrun sets it) --------------------------------------
    ddp = int(os.environ.get("RANK", -1)) != -1
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if ddp:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        if device_name.startswith("cuda"):
            torch.cuda.set_device(local)
            device_name = f"cuda:{local}"
        dist.init_process_group(backend="nccl" if device_name.startswith("cuda") else "gloo")
    else:
        rank, world = 0, 1
    device = torch.device(device_name)
    master = rank == 0
    os.makedirs(cfg.out_dir, exist_ok=True)
    stage = args.stage
    total = cfg.steps if stage == 1 else cfg.stage2_steps
    warmup = cfg.warmup if stage == 1 else cfg.stage2_warmup

    def log(msg):
        if master:
            print(msg, flush=True)

    # -- resume / start checkpoint ------------------------------------------------------------------------------
    resume = None
    if args.resume:
        path = args.resume
        if path == "latest":
            found = checkpoints(cfg.out_dir, stage)
            if not found:
                raise SystemExit(f"--resume: no stage-{stage} checkpoint in {cfg.out_dir!r}")
            path = found[-1]
        resume = load_checkpoint(path)
        if resume["stage"] != stage:
            raise SystemExit(f"--resume {path}: a stage-{resume['stage']} checkpoint, but --stage {stage}")
        log(f"resuming from {path} (step {resume['step']})")

    # -- model ----------------------------------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)                         # identical initialisation on every rank
    mcfg = model_config(cfg, stage)
    start_from = None
    if resume is None and (stage == 2 or args.tune):
        src = args.from_ckpt
        if src is None:
            found = checkpoints(cfg.out_dir if not args.tune else os.path.join("out", cfg.preset), 1)
            if not found:
                raise SystemExit(f"stage {stage}: no stage-1 checkpoint found in {cfg.out_dir!r}; "
                                 "run --stage 1 first or pass --from PATH")
            src = found[-1]
        start_from = load_checkpoint(src)
        if start_from["stage"] != 1:
            raise SystemExit(f"--from {src}: expected a stage-1 checkpoint, got stage {start_from['stage']}")
        base = dict(start_from["model_config"])
        tasks = list(base["tasks"]) + ([args.dataset] if args.tune and args.dataset not in base["tasks"] else [])
        mcfg = FaceptorConfig(**{**base, "tasks": tuple(tasks), "stage": stage})
        cfg.model = start_from["kind"]
        if stage == 2:                 # heads with queries; the identity head has nothing to train in stage 2
            if start_from["kind"] != "faceptor":
                raise SystemExit("stage 2 (Layer-Attention) exists only for Faceptor, not for Naive Faceptor")
            cfg.heads = {k: v for k, v in cfg.heads.items() if k in mcfg.tasks and TASKS[k].type != "recognition"}
        log(f"starting from {src} (step {start_from['step']})")
    if resume is not None:
        mcfg = FaceptorConfig(**resume["model_config"])
        cfg = TrainConfig(**{**resume["config"], "betas": tuple(resume["config"]["betas"])})
        total = cfg.steps if stage == 1 else cfg.stage2_steps
        warmup = cfg.warmup if stage == 1 else cfg.stage2_warmup
    model = build_model(cfg.model, mcfg)
    if stage == 1 and start_from is None and resume is None and not args.init:
        init_readout(model, cfg.readout_offset)                                        # from scratch only

    if start_from is not None and resume is None:
        missing, unexpected = model.load_state_dict(start_from["model"], strict=False)
        ok = [k for k in missing if (stage == 2 and re.match(r"projection\.convs\.[1-9]\d*\.", k))
              or (args.tune and k.startswith(f"queries.{args.dataset}."))
              or (args.tune and cfg.model == "naive" and f".{args.dataset}." in k)]
        if [k for k in missing if k not in ok] or unexpected:
            raise SystemExit(f"--from: the checkpoint does not fit: missing {[k for k in missing if k not in ok]}, "
                             f"unexpected {unexpected}")
        if stage == 2:
            init_stage2(model)                  # new projections = the layer-12 one, L_t rows equal (model.py)
    if args.init and resume is None:
        kind, path = args.init
        if kind == "farl":
            load_farl(model, path)
            log(f"encoder initialised from FaRL {path}")
        elif kind == "official":
            raw = torch.load(path, map_location="cpu", weights_only=True)
            sd, extras = convert_official_state_dict(raw)
            missing, unexpected = model.load_state_dict(sd, strict=False)
            log(f"initialised from the authors' checkpoint {path}: {len(missing)} missing, "
                f"{len(unexpected)} unexpected tensors")
            start_from = {"cosface": {"weight": w} for t, w in extras.get("cosface", {}).items() if t in cfg.heads}
        else:
            raise SystemExit(f"--init: KIND must be 'farl' or 'official', got {kind!r}")
    model.to(device)

    # -- data -----------------------------------------------------------------------------------------------------
    datasets = {}
    for head in cfg.heads:
        if cfg.data == "synthetic":
            datasets[head] = synthetic_dataset(head, cfg, mcfg)
        else:
            if not args.data_root:
                raise SystemExit(f"preset {cfg.preset!r} trains on real datasets: pass --data-root")
            datasets[head] = real_dataset(head, args.data_root, mcfg)
    composer = MultiTaskComposer([(h, datasets[h], int(cfg.heads[h][0])) for h in cfg.heads], seed=cfg.seed,
                                 rank=rank, world_size=world, num_workers=cfg.num_workers)
    weights = {h: float(v[1]) for h, v in cfg.heads.items()}

    cosface = None
    rec = [h for h in cfg.heads if TASKS[h].type == "recognition"]
    if rec:
        n_ids = cfg.synthetic_identities if cfg.data == "synthetic" else num_identities(datasets[rec[0]])
        cosface = losses.CosFace(mcfg.embed_dim, n_ids)
        if start_from is not None and start_from.get("cosface") is not None:
            cosface.load_state_dict(start_from["cosface"])
        cosface.to(device)

    # -- trainable parameters and optimiser ------------------------------------------------------------------
    for p in model.parameters():
        p.requires_grad_(False)
    if stage == 2:
        trainable = stage2_parameters(model, [h for h in cfg.heads if h in model.queries])
    elif args.tune == "prompt":
        trainable = list(model.queries[args.dataset].parameters()) if cfg.model == "faceptor" else \
            [p for n, p in model.named_parameters() if f".{args.dataset}." in n]
    elif args.tune == "decoder":
        trainable = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
    else:
        unused = ("encoder.ln_post.", "encoder.proj")          # CLIP's read-out, kept only for loading
        trainable = [p for n, p in model.named_parameters() if not n.startswith(unused)]
    for p in trainable:
        p.requires_grad_(True)
    if cosface is not None and stage == 2:
        cosface.requires_grad_(False)
    enc_ids = {id(p) for p in model.encoder.parameters()}
    enc = [p for p in trainable if id(p) in enc_ids]
    rest = [p for p in trainable if id(p) not in enc_ids]
    if cosface is not None and stage == 1:
        rest += list(cosface.parameters())
    groups = [g for g in ({"params": enc, "peak": cfg.lr, "name": "encoder"},
                          {"params": rest, "peak": cfg.lr * cfg.lr_mult, "name": "rest"}) if g["params"]]
    optimizer = torch.optim.AdamW([{"params": g["params"], "lr": cfg.warmup_start_lr} for g in groups],
                                  betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    peaks = [g["peak"] for g in groups]
    use_cuda = device.type == "cuda"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.dtype) if use_cuda else None
    autocast = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype else nullcontext()
    scaler = torch.amp.GradScaler("cuda" if use_cuda else "cpu", enabled=amp_dtype == torch.float16)

    step_module = MultiTaskStep(model, cosface).to(device)
    if ddp:
        ddp_kw = {"device_ids": [device.index]} if use_cuda else {}
        runner = nn.parallel.DistributedDataParallel(step_module, find_unused_parameters=True, **ddp_kw)
    else:
        runner = step_module

    # -- restore the training state -------------------------------------------------------------------------
    step, nonfinite_total = 0, 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        if cosface is not None:
            cosface.load_state_dict(resume["cosface"])
        optimizer.load_state_dict(resume["optimizer"])
        scaler.load_state_dict(resume["scaler"])
        step, nonfinite_total = int(resume["step"]), int(resume.get("nonfinite_total", 0))
        if resume["world_size"] == world:
            composer.load_state_dict(resume["composer"][rank])
            _set_rng_state(resume["rng"][rank])
        else:
            raise SystemExit(f"--resume: the checkpoint was written by {resume['world_size']} processes, this run "
                             f"has {world}; resume with the same number of processes")
    else:
        torch.manual_seed(cfg.seed + rank)               # seed offset by rank (drop-path, dropout)
        np.random.seed(cfg.seed + rank)
        random.seed(cfg.seed + rank)

    # -- signals: save and exit cleanly -------------------------------------------------------------------------
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def save(step_done: int, final: bool = False) -> str:
        comp = _gather(composer.state_dict(), world)
        rng = _gather(_rng_state(), world)
        path = os.path.join(cfg.out_dir, f"stage{stage}_step{step_done:07d}.pt")
        if master:
            ckpt = {"format": CHECKPOINT_FORMAT, "kind": cfg.model, "preset": cfg.preset, "stage": stage,
                    "step": step_done, "total_steps": total, "config": cfg.to_dict(),
                    "model_config": _plain(mcfg.to_dict()), "model": model.state_dict(),
                    "cosface": cosface.state_dict() if cosface is not None else None,
                    "optimizer": optimizer.state_dict(), "scheduler": {"step": step_done, "total": total,
                                                                       "warmup": warmup, "peaks": peaks},
                    "scaler": scaler.state_dict(), "composer": comp, "rng": rng, "world_size": world,
                    "nonfinite_total": nonfinite_total, "tune": args.tune or "", "final": final}
            atomic_save(ckpt, path)
            for old in checkpoints(cfg.out_dir, stage)[:-cfg.keep_last]:
                os.remove(old)
        if ddp:
            dist.barrier()
        return path

    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    checksum_path = os.path.join(cfg.out_dir, f"checksums_rank{rank}.jsonl")
    nan_steps = {int(s) for s in args.debug_nonfinite_at.split(",") if s.strip()}

    def record(entry: dict):
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def run_eval(step_done: int):
        if args.no_eval or cfg.data != "synthetic":
            return None
        result = None
        if master:
            import evaluate
            t = time.time()
            result = evaluate.evaluate_synthetic(model, cfg.to_dict(), n_test=cfg.eval_samples, device=device)
            model.train(stage == 1)
            log(f"eval @ {step_done}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()
                                                     if isinstance(v, float)) + f" ({time.time() - t:.1f}s)")
            record({"type": "eval", "stage": stage, "step": step_done, **result})
        if ddp:
            dist.barrier()
        return result

    n_trainable = sum(p.numel() for p in trainable)
    log(f"preset {cfg.preset} | stage {stage}{' | tune ' + args.tune if args.tune else ''} | {cfg.model} "
        f"{sum(p.numel() for p in model.parameters()):,} params ({n_trainable:,} trained) | {world} process(es) on "
        f"{device.type} | {total} steps | heads " + ", ".join(f"{h}:{v[0]}x{v[1]:g}" for h, v in cfg.heads.items()))
    record({"type": "start", "stage": stage, "step": step, "world_size": world, "config": cfg.to_dict()})

    # -- the loop -------------------------------------------------------------------------------------------------
    model.train(stage == 1)            # stage 2: everything but L_t and the new projections is frozen (no BN drift)
    nonfinite_run, t0, last_t, first_step, images_since = 0, time.time(), time.time(), step, 0
    per_step_images = sum(int(v[0]) for v in cfg.heads.values()) * world
    loss_sums, loss_count = {}, 0
    path = None
    while step < total:
        for g, peak in zip(optimizer.param_groups, peaks):
            g["lr"] = lr_at(step, total, warmup, peak, cfg.warmup_start_lr)
        batches = composer.next_batch()
        batches = {h: {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in b.items()}
                   for h, b in batches.items()}
        with autocast:
            head_losses = runner(batches)
        loss = losses.multitask_loss({h: l.float() for h, l in head_losses.items()}, weights)   # Eq. (8)
        if step + 1 in nan_steps:
            loss = loss * float("nan")
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        finite = bool(torch.isfinite(loss).item()) and bool(torch.isfinite(grad_norm).item())
        finite = not _any(not finite, device)
        if finite:
            scaler.step(optimizer)
            scaler.update()
            nonfinite_run = 0
            for h, l in head_losses.items():
                loss_sums[h] = loss_sums.get(h, 0.0) + float(l.detach())
            loss_sums["total"] = loss_sums.get("total", 0.0) + float(loss.detach())
            loss_count += 1
        else:
            scaler.update()
            nonfinite_run += 1
            nonfinite_total += 1
            log(f"step {step + 1}: non-finite loss or gradient, step skipped ({nonfinite_run} in a row, "
                f"{nonfinite_total} in total)")
            record({"type": "nonfinite", "stage": stage, "step": step + 1, "in_a_row": nonfinite_run,
                    "total": nonfinite_total, "losses": {h: float(l.detach()) for h, l in head_losses.items()}})
        optimizer.zero_grad(set_to_none=True)
        if nonfinite_run >= cfg.max_nonfinite:
            log(f"aborting: {nonfinite_run} non-finite losses in a row at step {step + 1} (limit {cfg.max_nonfinite},"
                f" --max-nonfinite); the last finite checkpoint is {checkpoints(cfg.out_dir, stage)[-1:] or 'none'}; "
                "lower the learning rate or check the data")
            if ddp:
                dist.destroy_process_group()
            sys.exit(3)
        step += 1
        images_since += per_step_images
        if args.debug_checksums:
            with open(checksum_path, "a") as f:
                f.write(json.dumps({"step": step, "rank": rank, "checksum": parameter_checksum(step_module)}) + "\n")
        if step % cfg.log_every == 0 or step == total:
            now = time.time()
            ips = images_since / max(now - last_t, 1e-9)
            eta = (now - t0) / max(step - first_step, 1) * (total - step)
            avg = {h: v / max(loss_count, 1) for h, v in loss_sums.items()}
            log(f"step {step}/{total} | loss {avg.get('total', float('nan')):.4f} | "
                + " ".join(f"{h} {v:.3f}" for h, v in avg.items() if h != "total")
                + " | lr " + "/".join(f"{g['lr']:.2e}" for g in optimizer.param_groups)
                + f" | {ips:.0f} img/s | eta {eta / 60:.1f} min")
            record({"type": "train", "stage": stage, "step": step, "losses": avg,
                    "lr": [g["lr"] for g in optimizer.param_groups], "images_per_s": ips,
                    "elapsed_s": now - t0, "nonfinite_total": nonfinite_total})
            loss_sums, loss_count, last_t, images_since = {}, 0, now, 0
        if args.debug_sleep:
            time.sleep(args.debug_sleep)
        stopping = _any(stop["signal"] is not None, device)
        if stopping:
            path = save(step)
            log(f"stopped by signal at step {step}/{total}; checkpoint {path}; continue with --resume")
            if ddp:
                dist.destroy_process_group()
            return path
        if step % cfg.ckpt_every == 0 and step < total:
            path = save(step)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
            run_eval(step)

    path = save(step, final=True)
    result = run_eval(step)
    elapsed = time.time() - t0
    log(f"done: stage {stage}, {step} steps in {elapsed / 60:.1f} min, {nonfinite_total} non-finite step(s) skipped")
    log(f"checkpoint: {path}")
    if master and cfg.data == "synthetic":
        log(f"next: python evaluate.py {path}" + ("" if stage == 2 else
            f"   |   torchrun --standalone --nproc_per_node={world} train.py --preset {cfg.preset} --stage 2"))
    record({"type": "done", "stage": stage, "step": step, "checkpoint": path, "elapsed_s": elapsed,
            "eval": result})
    if ddp:
        dist.destroy_process_group()
    return path


if __name__ == "__main__":
    main()
