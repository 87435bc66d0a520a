"""Two-stage multi-task training of Faceptor (paper Sec. 3.3 and 4.1), nanoGPT style.

    python train.py --stage 1                                        # demo preset: synthetic faces, tiny model, CPU
    torchrun --standalone --nproc_per_node=2 train.py --stage 1      # the same on 2 processes (DDP, gloo on CPU)
    torchrun --standalone --nproc_per_node=2 train.py --stage 2      # Layer-Attention on top of the latest stage 1
    torchrun --nproc_per_node=4 train.py --preset faceptor-base --data-root DATA --init farl FaRL-ep64.pth
    python train.py --preset faceptor-base --tune prompt --dataset aflw19 --from out/faceptor-base
    python train.py --resume                                         # continue the latest checkpoint of the preset

One step draws one batch of n_t samples from every task head of the preset (per process), runs the encoder once
per input size (all 112-px samples together, all 512-px samples together), and minimises eq. (8),
sum_t alpha_t L_t / sum_t alpha_t. AdamW (0.9, 0.999), weight decay 0.05, two groups (encoder lr, the rest 10x),
linear warm-up from 1e-6, then cosine to 0, gradient clipping at global norm 5.
Stage 2 loads a stage-1 checkpoint into a stage-2 model (strict except the five new projections) and trains only
`model.stage2_parameters` (L_t of the heads and the Layer-Attention projections).

Where the weights come from: from scratch (stage 1), `--from` a stage-1 checkpoint of ours (stage 2, transfer),
`--init farl PATH` (the encoder) or `--init official PATH` (the authors' checkpoint, every tensor checked; a head
the checkpoint lacks is an error unless `--allow-new-heads`; each recognition head keeps its CosFace classifier),
or `--resume` (everything, including the optimiser, the batch order and the random state).

Divergences and choices (ours):
  * n_t of Tables 2 and 10 are per process (the authors trained on 4 GPUs with these per-GPU batch sizes); the
    presets and the schedule are in train_config.py.
  * Weight decay 0.05 applies to every trainable tensor (the paper names no exclusions).
  * The demo presets are not in the paper: a tiny model on the built-in synthetic faces (data/synthetic.py) so
    the whole pipeline runs on a CPU; their sizes, batches and weights are tuned for that setting.
  * bf16 autocast (CUDA) is an option; the authors computed in fp32.
  * Stage 2 starts next to the stage-1 function: the new projections are copies of the layer-12 one and each
    head's L_t rows equal its first row (model.init_stage2); random values made the demo's stage 2 end below stage 1.
  * Parts that do not train run in eval mode (no drop-path, frozen BatchNorm statistics): in stage 2 and in
    transfer the frozen encoder (and, for `--tune prompt`, the whole model) behave as at test time.
  * `--compile` (torch.compile of the training forward) is off by default: on CPU the first compile takes minutes.
  * MKL_CBWR=AUTO,STRICT is set by default so CPU runs are bit-reproducible (a resumed run equals an
    uninterrupted one); export another value to override.

Checkpoints (`out/<preset>/stage{s}_step{N}.pt`, the last K kept) hold only tensors and plain Python values
(torch.load(weights_only=True) reads them): the model state dict, one CosFace classifier per recognition head,
optimiser, schedule, GradScaler, every rank's batch-composer position and RNG states, the training and model
configs as dicts. SIGTERM or Ctrl-C saves one and exits; `--resume` continues exactly where it stopped.
"""
from __future__ import annotations

import os

# Bit-reproducible CPU runs (resume == uninterrupted): MKL's GEMM otherwise picks code paths by memory alignment,
# which varies between processes. Must be set before MKL initialises, i.e. before torch is imported.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import argparse
import dataclasses
import signal
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn

import distributed
import losses
from train_run import DebugHooks, Progress, Run, report_nonfinite, restore, save
from train_config import (DEMO_TRANSFER, PRESETS, TRANSFER_BATCH, TrainConfig, cached_synthetic, epoch_steps, lr_at,
                          reference_images_per_s, schedule_length)
from data.composer import POOLS, MultiTaskComposer
from data.synthetic import SCHEMES as SYNTHETIC_SCHEMES
from model import TASKS, FaceptorConfig, stage2_parameters
from train_start import build_start, find_resume

# ----------------------------------------------------------------------------------------------------------------
# Data

def synthetic_dataset(head: str, cfg: TrainConfig, mcfg: FaceptorConfig, split: str = "train", length=None,
                      identities=None):
    from data.synthetic import SyntheticFaces
    framing = cfg.synthetic_framing_112 if TASKS[head].size == 112 else "loose"
    return SyntheticFaces(split=split, size=mcfg.input_size(head), length=length or cfg.synthetic_train_length,
                          seed=cfg.synthetic_seed, n_identities=identities or cfg.synthetic_identities,
                          task=TASKS[head].type, framing=framing, cache=cfg.synthetic_cache,
                          head=head if head in SYNTHETIC_SCHEMES else None)       # transfer label schemes (19 points, ...)


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


def build_data(cfg: TrainConfig, mcfg: FaceptorConfig, data_root, env) -> tuple:
    """(composer drawing one batch per head, {head: dataset})."""
    if cfg.data != "synthetic" and not data_root:
        raise SystemExit(f"preset {cfg.preset!r} trains on real datasets: pass --data-root")
    datasets = {h: synthetic_dataset(h, cfg, mcfg) if cfg.data == "synthetic" else real_dataset(h, data_root, mcfg)
                for h in cfg.heads}
    composer = MultiTaskComposer([(h, datasets[h], int(cfg.heads[h][0])) for h in cfg.heads], seed=cfg.seed,
                                 rank=env.rank, world_size=env.world, num_workers=cfg.num_workers,
                                 pool=cfg.data_pool, fixed_partition=cached_synthetic(cfg))
    return composer, datasets


# ----------------------------------------------------------------------------------------------------------------
# The multi-task forward (encoder once per input size, then every head on its slice), CosFace, optimiser

def build_cosface(cfg: TrainConfig, mcfg: FaceptorConfig, datasets: dict, start: dict) -> nn.ModuleDict:
    """One CosFace classifier per recognition head, from `start` ({head: weight}) where it has one."""
    cosface = nn.ModuleDict()
    for h in (h for h in cfg.heads if TASKS[h].type == "recognition"):
        n_ids = cfg.synthetic_identities if cfg.data == "synthetic" else num_identities(datasets[h])
        cosface[h] = losses.CosFace(mcfg.embed_dim, n_ids)
        if h in start:
            if tuple(start[h].shape) != tuple(cosface[h].weight.shape):
                raise SystemExit(f"CosFace classifier of {h!r}: the starting weights are {tuple(start[h].shape)}, "
                                 f"this run needs {tuple(cosface[h].weight.shape)} (identities x embedding)")
            with torch.no_grad():
                cosface[h].weight.copy_(start[h])
    return cosface


class MultiTaskStep(nn.Module):
    """model + CosFace classifiers; forward(batches) -> {head: L_t}. One DDP forward per training step."""

    def __init__(self, model: nn.Module, cosface: nn.ModuleDict):
        super().__init__()
        self.model, self.cosface = model, cosface

    def forward(self, batches: dict) -> dict:
        outputs = self.model.forward_tasks({h: b["image"] for h, b in batches.items()})  # encoder once per size
        return {h: losses.task_loss(TASKS[h].type, outputs[h], batches[h], self.cosface[h] if h in self.cosface
                                    else None) for h in batches}


def set_train_mode(module: nn.Module) -> nn.Module:
    """Train mode exactly where something trains: a sub-module none of whose parameters requires a gradient runs
    in eval mode (no drop-path, BatchNorm statistics frozen); parameter-free children follow their parent."""
    module.training = any(p.requires_grad for p in module.parameters())
    for child in module.children():
        if any(True for _ in child.parameters()):
            set_train_mode(child)
        else:
            child.train(module.training)
    return module


def trainable_parameters(model: nn.Module, cfg: TrainConfig, stage: int, tune: str | None, dataset: str | None):
    """Freeze everything, then unfreeze what this stage / transfer mode trains; returns those parameters."""
    model.requires_grad_(False)
    if stage == 2:
        trainable = stage2_parameters(model, [h for h in cfg.heads if h in model.queries])
    elif tune == "prompt":
        trainable = list(model.queries[dataset].parameters()) if cfg.model == "faceptor" else \
            [p for n, p in model.named_parameters() if f".{dataset}." in n]
    elif tune == "decoder":
        trainable = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
    else:
        unused = ("encoder.ln_post.", "encoder.proj")          # CLIP's read-out, kept only for loading
        trainable = [p for n, p in model.named_parameters() if not n.startswith(unused)]
    for p in trainable:
        p.requires_grad_(True)
    return trainable


def make_optimizer(cfg: TrainConfig, model: nn.Module, trainable: list, cosface: nn.ModuleDict, stage: int):
    """AdamW with two groups (encoder at lr, the rest at lr * lr_mult); returns (optimiser, peak lr per group)."""
    cosface.requires_grad_(stage == 1)
    enc_ids = {id(p) for p in model.encoder.parameters()}
    enc = [p for p in trainable if id(p) in enc_ids]
    rest = [p for p in trainable if id(p) not in enc_ids] + (list(cosface.parameters()) if stage == 1 else [])
    groups = [g for g in ({"params": enc, "peak": cfg.lr}, {"params": rest, "peak": cfg.lr * cfg.lr_mult})
              if g["params"]]
    optimizer = torch.optim.AdamW([{"params": g["params"], "lr": cfg.warmup_start_lr} for g in groups],
                                  betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    return optimizer, [g["peak"] for g in groups]


# ----------------------------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train Faceptor (stage 1 / stage 2 / transfer). "
                                "Runs under python and torchrun.")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="named training configuration")
    p.add_argument("--stage", type=int, default=1, choices=(1, 2), help="1: multi-task training; "
                   "2: Layer-Attention on top of a stage-1 checkpoint")
    p.add_argument("--from", dest="from_ckpt", default=None, help="stage 2 / transfer: the stage-1 checkpoint (or "
                   "its run folder) to start from (default: the latest stage-1 checkpoint of the preset)")
    p.add_argument("--tune", choices=("prompt", "decoder", "full"), default=None, help="cross-dataset transfer "
                   "(Table 9): train the new head's queries / the decoders and outputs / everything")
    p.add_argument("--dataset", default=None, help="transfer: the new task head (e.g. aflw19, lapa, lfw73)")
    p.add_argument("--init", nargs=2, metavar=("KIND", "PATH"), default=None,
                   help="initialise from 'farl PATH' (encoder) or 'official PATH' (the authors' checkpoint)")
    p.add_argument("--allow-new-heads", action="store_true", help="--init official: heads the checkpoint lacks "
                   "start from their initial values instead of being an error")
    p.add_argument("--data-root", default=None, help="folder with one sub-folder per dataset (real presets)")
    p.add_argument("--out-dir", default=None, help="where checkpoints and logs go (default out/<preset>)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, help="continue a run: a checkpoint or run "
                   "folder, or no value for the latest checkpoint of this stage in the out dir")
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
    p.add_argument("--data-pool", choices=POOLS, default=None, help="worker pool: one per rank building whole "
                   "steps (shared, default) or one per task head (per_head, num_workers each)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="autocast precision on CUDA (CPU always runs fp32)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward (off by default)")
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
                 "max_nonfinite": args.max_nonfinite, "num_workers": args.num_workers, "data_pool": args.data_pool,
                 "dtype": args.dtype,
                 "synthetic_train_length": args.synthetic_length, "synthetic_identities": args.synthetic_identities,
                 "out_dir": args.out_dir}
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg, k, v)
    if args.eval_samples is not None:                  # --eval-samples: every evaluation, the final one too
        cfg.final_eval_samples = args.eval_samples
    if args.stage == 1:
        cfg.steps = args.max_steps if args.max_steps is not None else cfg.steps
        cfg.warmup = args.warmup if args.warmup is not None else cfg.warmup
    else:
        cfg.stage2_steps = args.max_steps if args.max_steps is not None else cfg.stage2_steps
        cfg.stage2_warmup = args.warmup if args.warmup is not None else cfg.stage2_warmup
    if args.tune:
        if args.dataset not in TRANSFER_BATCH:
            raise SystemExit(f"--tune needs --dataset, one of {sorted(TRANSFER_BATCH)}; got {args.dataset!r}")
        synthetic = cfg.data == "synthetic" and not args.data_root
        length = DEMO_TRANSFER if synthetic else dict(steps=20000, warmup=2000)     # Table 9: 20,000 steps
        cfg.steps = args.max_steps if args.max_steps is not None else length["steps"]
        cfg.warmup = args.warmup if args.warmup is not None else length["warmup"]
        cfg.heads = {args.dataset: [TRANSFER_BATCH[args.dataset], 1.0]}
        if synthetic and args.lr is None:
            cfg.lr = DEMO_TRANSFER["prompt_lr" if args.tune == "prompt" else "lr"]
        if synthetic and args.dataset not in SYNTHETIC_SCHEMES:
            raise SystemExit(f"--tune --dataset {args.dataset} on preset {cfg.preset!r}: the synthetic faces have no "
                             f"{args.dataset} labels (they have {sorted(SYNTHETIC_SCHEMES)}); pass --data-root with a "
                             f"{args.dataset}/ folder")
        if cfg.data == "synthetic" and args.data_root:
            cfg.data = "real"
    if args.batch_scale:
        for v in cfg.heads.values():
            v[0] = max(1, int(round(v[0] * args.batch_scale)))
    if not cfg.out_dir:
        cfg.out_dir = os.path.join("out", cfg.preset + (f"-{args.tune}-{args.dataset}" if args.tune else ""))
    return cfg


def evaluate_now(run: Run, n_test: int | None = None):
    """Synthetic test metrics of the model (rank 0) on `n_test` faces (default: cfg.eval_samples), logged and
    recorded; None for real-data presets."""
    if run.cfg.data != "synthetic" or not run.evaluate:
        return None
    result = None
    if run.env.master:
        import evaluate
        t = time.time()
        result = evaluate.evaluate_synthetic(run.model, run.cfg.to_dict(), n_test=n_test or run.cfg.eval_samples,
                                             device=run.env.device)
        set_train_mode(run.model)
        run.log(f"eval @ {run.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()
                                                   if isinstance(v, float)) + f" ({time.time() - t:.1f}s)")
        run.record({"type": "eval", "stage": run.stage, "step": run.step, **result})
    run.env.barrier()
    return result


def train_loop(run: Run, hooks: DebugHooks, stop: dict) -> str | None:
    """Steps until `total`; returns the checkpoint written when a signal stopped the run, else None."""
    cfg, opt, device = run.cfg, run.optimizer, run.env.device
    weights = {h: float(v[1]) for h, v in cfg.heads.items()}
    params = [p for g in opt.param_groups for p in g["params"]]
    progress, in_a_row = Progress(run, reference_images_per_s(cfg, run), epoch_steps(cfg, run)), 0
    while run.step < run.total:
        for g, peak in zip(opt.param_groups, run.peaks):
            g["lr"] = lr_at(run.step, run.total, run.warmup, peak, cfg.warmup_start_lr)
        batches = {h: {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in b.items()}
                   for h, b in progress.next_batch().items()}
        with run.autocast:
            head_losses = run.runner(batches)
        loss = losses.multitask_loss({h: l.float() for h, l in head_losses.items()}, weights)   # Eq. (8)
        loss = hooks.poison(run.step + 1, loss)
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(opt)
        grad_norm = nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        finite = bool(torch.isfinite(loss).item()) and bool(torch.isfinite(grad_norm).item())
        if not distributed.any_rank(not finite, device):
            run.scaler.step(opt)
            progress.add(head_losses, loss)
            in_a_row = 0
        else:                                                                   # skip the step on every rank
            in_a_row, run.nonfinite_total = in_a_row + 1, run.nonfinite_total + 1
            report_nonfinite(run, head_losses, in_a_row)
        run.scaler.update()
        opt.zero_grad(set_to_none=True)
        run.step += 1
        hooks.after_step(run.step)
        progress.step_done(run.step)
        if progress.due(run.step):
            progress.report(run.step)
        if distributed.any_rank(stop["signal"] is not None, device):
            path = save(run)
            run.log(f"stopped by signal at step {run.step}/{run.total}; checkpoint {path}; continue with --resume")
            return path
        if run.step % cfg.ckpt_every == 0 and run.step < run.total:
            save(run)
        if cfg.eval_every and run.step % cfg.eval_every == 0 and run.step < run.total and run.evaluate:
            evaluate_now(run)
    return None


# ----------------------------------------------------------------------------------------------------------------
# Training

def main(argv=None):
    args = parse_args(argv)
    cfg = resolve_config(args)
    stage = args.stage
    env = distributed.setup(args.device)                     # DDP detected from RANK, as torchrun sets it
    log = print if env.master else (lambda *a, **k: None)

    resume_path, resume = find_resume(args, cfg, stage)      # where the weights come from
    if resume is not None:
        log(f"resuming from {resume_path} (step {resume['step']})")
    model, mcfg, cfg, cosface_start = build_start(args, cfg, stage, resume, lambda m: log(m, flush=True))
    os.makedirs(cfg.out_dir, exist_ok=True)
    model.to(env.device)
    composer, datasets = build_data(cfg, mcfg, args.data_root, env)
    cosface = build_cosface(cfg, mcfg, datasets, cosface_start).to(env.device)

    trainable = trainable_parameters(model, cfg, stage, args.tune, args.dataset)
    optimizer, peaks = make_optimizer(cfg, model, trainable, cosface, stage)
    use_cuda = env.device.type == "cuda"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.dtype) if use_cuda else None
    scaler = torch.amp.GradScaler("cuda" if use_cuda else "cpu", enabled=amp_dtype == torch.float16)
    step_module = MultiTaskStep(model, cosface).to(env.device)
    runner = torch.compile(step_module) if args.compile else step_module
    if env.ddp:
        runner = nn.parallel.DistributedDataParallel(runner, find_unused_parameters=True,
                                                     **({"device_ids": [env.device.index]} if use_cuda else {}))
    total, warmup = schedule_length(cfg, stage)
    run = Run(cfg, mcfg, stage, args.tune or "", env, model, cosface, runner, optimizer, peaks, scaler,
              torch.autocast("cuda", dtype=amp_dtype) if amp_dtype else nullcontext(), composer, total, warmup,
              evaluate=not args.no_eval)
    restore(run, resume)

    log(f"preset {cfg.preset} | stage {stage}{' | tune ' + args.tune if args.tune else ''} | {cfg.model} "
        f"{sum(p.numel() for p in model.parameters()):,} params ({sum(p.numel() for p in trainable):,} trained) | "
        f"{env.world} process(es) on {env.device.type} | {total} steps | heads "
        + ", ".join(f"{h}:{v[0]}x{v[1]:g}" for h, v in cfg.heads.items()), flush=True)
    run.record({"type": "start", "stage": stage, "step": run.step, "world_size": env.world, "config": cfg.to_dict()})

    set_train_mode(model)                    # frozen parts (stage 2, transfer) run as at test time
    t0 = time.time()
    with stop_on_signal() as stop:
        stopped = train_loop(run, DebugHooks(args, run, step_module), stop)
    path = stopped or finish(run, t0)
    env.close()
    return path


@contextmanager
def stop_on_signal():
    """SIGTERM / Ctrl-C set stop["signal"]; the loop then saves at the end of its step and returns. The previous
    handlers come back afterwards."""
    stop = {"signal": None}
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.update(signal=signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def finish(run: Run, t0: float) -> str:
    """The final checkpoint and evaluation, and what to run next."""
    path = save(run, final=True)
    result = evaluate_now(run, run.cfg.final_eval_samples)
    run.log(f"done: stage {run.stage}, {run.step} steps in {(time.time() - t0) / 60:.1f} min, "
            f"{run.nonfinite_total} non-finite step(s) skipped")
    run.log(f"checkpoint: {path}")
    if run.cfg.data == "synthetic":
        run.log(f"next: python evaluate.py {run.cfg.out_dir}" + ("" if run.stage == 2 else
                f"   |   torchrun --standalone --nproc_per_node={run.env.world} train.py --preset {run.cfg.preset} "
                "--stage 2"))
    run.record({"type": "done", "stage": run.stage, "step": run.step, "checkpoint": path,
                "elapsed_s": time.time() - t0, "eval": result})
    return path


if __name__ == "__main__":
    main()
