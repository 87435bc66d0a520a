"""Process set-up and per-process state for train.py: one process or torchrun's DDP, nanoGPT style.

  * `setup(device)`: DDP is detected from `RANK` (torchrun sets it); gloo on CPU, NCCL on CUDA, one GPU per
    local rank. Returns a `Dist` (rank, world size, device, whether this process logs and saves).
  * `gather(obj, world)` / `any_rank(flag, device)`: the two collectives the training loop needs besides DDP's
    gradient all-reduce (every rank's state into a checkpoint; "stop" or "skip this step" agreed by all ranks).
  * `rng_state()` / `set_rng_state(st)`: torch, numpy, Python (and CUDA) generators as tensors and plain values,
    so a checkpoint that holds them is read by torch.load(weights_only=True) and a resumed run draws the same
    numbers as an uninterrupted one.
  * `parameter_checksum(module)`: a short hash of every parameter, to compare ranks step by step.
"""
from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class Dist:
    ddp: bool
    rank: int
    world: int
    device: torch.device

    @property
    def master(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.ddp:
            dist.barrier()

    def close(self):
        if self.ddp and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str | None = None) -> Dist:
    """DDP when torchrun launched us (RANK set), otherwise a single process. `device`: cpu | cuda | None (auto)."""
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if int(os.environ.get("RANK", -1)) == -1:
        return Dist(False, 0, 1, torch.device(name))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if name.startswith("cuda"):
        torch.cuda.set_device(local)
        name = f"cuda:{local}"
    dist.init_process_group(backend="nccl" if name.startswith("cuda") else "gloo")
    return Dist(True, rank, world, torch.device(name))


def gather(obj, world: int) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, device) -> bool:
    """True on every rank if `flag` is true on any rank."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def rng_state() -> dict:
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


def set_rng_state(st: dict):
    torch.set_rng_state(st["torch"])
    np.random.set_state(("MT19937", st["numpy_key"].numpy().astype(np.uint32), st["numpy_pos"],
                         st["numpy_gauss"][0], st["numpy_gauss"][1]))
    random.setstate((3, tuple(int(v) for v in st["python"].tolist()), st["python_gauss"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def seed_everything(seed: int):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def parameter_checksum(module: nn.Module) -> str:
    """sha256 (16 hex digits) over every parameter's name and bytes (buffers such as BN statistics excluded:
    DDP re-broadcasts them from rank 0 at the next forward)."""
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes() if p.dtype != torch.bfloat16
                 else p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
