"""The bookkeeping of a training run (train.py): the `Run` record that the loop, the checkpoints and the
evaluations share; checkpoints written and restored with every process's state; progress lines with images/s and
the ETA; the test hooks (--debug-*).

A checkpoint holds only tensors and plain Python values, so torch.load(weights_only=True) reads it: the model
state dict, one CosFace classifier per recognition head ({head: {"weight": W}}), optimiser, schedule, GradScaler,
every rank's batch-composer position and RNG states, the training and model configs as dicts. Restoring one
continues the run exactly: a resumed run equals an uninterrupted one, bit for bit on CPU.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

import distributed
from checkpoint import CHECKPOINT_FORMAT, atomic_save, checkpoints
from data.composer import MultiTaskComposer
from model import TASKS, FaceptorConfig


def _plain(x):
    """Tuples -> lists recursively, so a checkpoint holds only what torch.load(weights_only=True) accepts."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x




def cosface_weights(saved: dict | None, heads) -> dict:
    """{head: weight} from a checkpoint's "cosface" field ({head: {"weight": W}}; {"weight": W} for the one
    recognition head in checkpoints written before heads were named)."""
    if not saved:
        return {}
    if "weight" in saved and torch.is_tensor(saved["weight"]):
        rec = [h for h in heads if TASKS[h].type == "recognition"]
        return {rec[0]: saved["weight"]} if rec else {}
    return {h: sd["weight"] for h, sd in saved.items()}




@dataclass
class Run:
    cfg: object                         # train.TrainConfig
    mcfg: FaceptorConfig
    stage: int
    tune: str
    env: distributed.Dist
    model: nn.Module
    cosface: nn.ModuleDict
    runner: nn.Module                   # MultiTaskStep, compiled and / or wrapped in DDP
    optimizer: torch.optim.Optimizer
    peaks: list                         # peak lr per parameter group
    scaler: torch.amp.GradScaler
    autocast: object
    composer: MultiTaskComposer
    total: int
    warmup: int
    evaluate: bool = True               # periodic and final synthetic evaluations (--no-eval: off)
    step: int = 0
    nonfinite_total: int = 0

    def log(self, msg: str):
        if self.env.master:
            print(msg, flush=True)

    def record(self, entry: dict):
        if self.env.master:
            with open(os.path.join(self.cfg.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(entry) + "\n")


def restore(run: Run, ckpt: dict | None):
    """Continue a checkpoint exactly (weights, optimiser, scaler, batch order, RNG), or seed a fresh run."""
    if ckpt is None:
        distributed.seed_everything(run.cfg.seed + run.env.rank)     # seed offset by rank (drop-path, dropout)
        return
    if ckpt["world_size"] != run.env.world:
        raise SystemExit(f"--resume: the checkpoint was written by {ckpt['world_size']} processes, this run has "
                         f"{run.env.world}; resume with the same number of processes")
    run.model.load_state_dict(ckpt["model"])
    for h, w in cosface_weights(ckpt["cosface"], run.mcfg.tasks).items():
        run.cosface[h].load_state_dict({"weight": w})
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scaler.load_state_dict(ckpt["scaler"])
    run.step, run.nonfinite_total = int(ckpt["step"]), int(ckpt.get("nonfinite_total", 0))
    run.composer.load_state_dict(ckpt["composer"][run.env.rank])
    distributed.set_rng_state(ckpt["rng"][run.env.rank])


def save(run: Run, final: bool = False) -> str:
    """Write stage{s}_step{N}.pt atomically (rank 0; every rank's composer and RNG state gathered into it)."""
    comp = distributed.gather(run.composer.state_dict(), run.env.world)
    rng = distributed.gather(distributed.rng_state(), run.env.world)
    path = os.path.join(run.cfg.out_dir, f"stage{run.stage}_step{run.step:07d}.pt")
    if run.env.master:
        ckpt = {"format": CHECKPOINT_FORMAT, "kind": run.cfg.model, "preset": run.cfg.preset, "stage": run.stage,
                "step": run.step, "total_steps": run.total, "config": run.cfg.to_dict(),
                "model_config": _plain(run.mcfg.to_dict()), "model": run.model.state_dict(),
                "cosface": {h: m.state_dict() for h, m in run.cosface.items()},
                "optimizer": run.optimizer.state_dict(),
                "scheduler": {"step": run.step, "total": run.total, "warmup": run.warmup, "peaks": run.peaks},
                "scaler": run.scaler.state_dict(), "composer": comp, "rng": rng, "world_size": run.env.world,
                "nonfinite_total": run.nonfinite_total, "tune": run.tune, "final": final}
        atomic_save(ckpt, path)
        for old in checkpoints(run.cfg.out_dir, run.stage)[:-run.cfg.keep_last]:
            os.remove(old)
    run.env.barrier()
    return path




class DebugHooks:
    """The test hooks (--debug-*): NaN losses at given steps, a parameter checksum per step, a sleep per step."""

    def __init__(self, args, run: Run, module: nn.Module):
        self.nan_steps = {int(s) for s in args.debug_nonfinite_at.split(",") if s.strip()}
        self.checksums = os.path.join(run.cfg.out_dir, f"checksums_rank{run.env.rank}.jsonl") \
            if args.debug_checksums else None
        self.sleep, self.rank, self.module = args.debug_sleep, run.env.rank, module

    def poison(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if step in self.nan_steps else loss

    def after_step(self, step: int):
        if self.checksums:
            with open(self.checksums, "a") as f:
                f.write(json.dumps({"step": step, "rank": self.rank,
                                    "checksum": distributed.parameter_checksum(self.module)}) + "\n")
        if self.sleep:
            time.sleep(self.sleep)


class Progress:
    """Loss averages between progress lines, images/s and the ETA. The first line comes after at most 10 steps;
    it says so when the machine trains at less than half of `reference_ips` (images per second).

    ETA: compute time per step times the steps left, plus data time. The first step is left out of the compute
    rate once a second one is done (it carries one-time costs: allocations, kernel selection). `epoch_steps`
    ({head: steps per epoch}) is given when drawn items are cached (synthetic faces): each head then draws for one
    epoch after the process starts and is nearly free afterwards, so the data time is charged per item still to
    draw, not per step."""

    def __init__(self, run: Run, reference_ips: float | None = None, epoch_steps: dict | None = None):
        self.run, self.first, self.reference_ips = run, run.step, reference_ips
        self.batch = {h: int(v[0]) for h, v in run.cfg.heads.items()}
        self.images_per_step = sum(self.batch.values()) * run.env.world
        self.epoch_steps, self.data_s = epoch_steps, 0.0
        self.sums, self.count, self.t0 = {}, 0, time.time()
        self.t_last, self.step_last, self.warned = self.t0, run.step, False
        self.first_compute = None                  # compute seconds of the first step (one-time costs included)

    def next_batch(self) -> dict:
        t = time.time()
        batches = self.run.composer.next_batch()
        self.data_s += time.time() - t
        return batches

    def step_done(self, step: int):
        """Call after every step: keeps the first step's compute time apart."""
        if step == self.first + 1:
            self.first_compute = time.time() - self.t0 - self.data_s

    def eta(self, step: int, elapsed: float) -> float:
        done, left = max(step - self.first, 1), self.run.total - step
        compute = elapsed - self.data_s
        if done > 1 and self.first_compute is not None:
            per_step = (compute - self.first_compute) / (done - 1)
        else:
            per_step = compute / done
        if not self.epoch_steps:
            return per_step * left + self.data_s / done * left
        ends = {h: self.first + e for h, e in self.epoch_steps.items()}              # caches full at these steps
        drawn = sum(n * (min(step, ends[h]) - self.first) for h, n in self.batch.items())
        to_draw = sum(n * max(0, min(ends[h], self.run.total) - step) for h, n in self.batch.items())
        return per_step * left + self.data_s / max(drawn, 1) * to_draw

    def add(self, head_losses: dict, loss: torch.Tensor):
        for h, l in head_losses.items():
            self.sums[h] = self.sums.get(h, 0.0) + float(l.detach())
        self.sums["total"] = self.sums.get("total", 0.0) + float(loss.detach())
        self.count += 1

    def due(self, step: int) -> bool:
        every = self.run.cfg.log_every
        return step % every == 0 or step == self.run.total or (self.step_last == self.first
                                                               and step - self.first == min(every, 10))

    def report(self, step: int):
        run, now = self.run, time.time()
        ips = (step - self.step_last) * self.images_per_step / max(now - self.t_last, 1e-9)
        eta = self.eta(step, now - self.t0)
        avg = {h: v / max(self.count, 1) for h, v in self.sums.items()}
        lrs = [g["lr"] for g in run.optimizer.param_groups]
        run.log(f"step {step}/{run.total} | loss {avg.get('total', float('nan')):.4f} | "
                + " ".join(f"{h} {v:.3f}" for h, v in avg.items() if h != "total")
                + " | lr " + "/".join(f"{lr:.2e}" for lr in lrs) + f" | {ips:.0f} img/s | eta {eta / 60:.1f} min")
        run.record({"type": "train", "stage": run.stage, "step": step, "losses": avg, "lr": lrs,
                    "images_per_s": ips, "elapsed_s": now - self.t0, "nonfinite_total": run.nonfinite_total})
        self.slow_warning(ips, eta)
        self.sums, self.count, self.t_last, self.step_last = {}, 0, now, step

    def slow_warning(self, ips: float, eta: float):
        if self.warned or not self.reference_ips:
            return
        self.warned = True
        if ips < 0.5 * self.reference_ips:
            self.run.log(f"note: {ips:.0f} img/s is {self.reference_ips / ips:.1f}x slower than the reference machine "
                         f"({self.reference_ips:.0f} img/s on 2 CPU cores); this stage will take about "
                         f"{eta / 60:.0f} min. Other work on the machine, fewer cores, or more threads than cores "
                         "slow it down; --max-steps shortens the run.")


def report_nonfinite(run: Run, head_losses: dict, in_a_row: int):
    step = run.step + 1
    run.log(f"step {step}: non-finite loss or gradient, step skipped ({in_a_row} in a row, {run.nonfinite_total} "
            "in total)")
    run.record({"type": "nonfinite", "stage": run.stage, "step": step, "in_a_row": in_a_row,
                "total": run.nonfinite_total, "losses": {h: float(l.detach()) for h, l in head_losses.items()}})
    if in_a_row >= run.cfg.max_nonfinite:
        run.log(f"aborting: {in_a_row} non-finite losses in a row at step {step} (limit {run.cfg.max_nonfinite}, "
                f"--max-nonfinite); the last finite checkpoint is {checkpoints(run.cfg.out_dir, run.stage)[-1:] or 'none'}"
                "; lower the learning rate or check the data")
        run.env.close()
        sys.exit(3)


