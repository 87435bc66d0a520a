"""Where a training run's weights come from (train.py): from scratch, `--from` a stage-1 checkpoint of ours (stage 2,
transfer), `--init farl PATH` / `--init official PATH`, or `--resume`.

    path, ckpt = find_resume(args, cfg, stage)                      # --resume: (None, None) without it
    model, mcfg, cfg, cosface = build_start(args, cfg, stage, ckpt, log)

Every checkpoint is read with torch.load(weights_only=True) (checkpoint.load_checkpoint); a checkpoint that does
not fit is one SystemExit naming the file and the keys. Loading is strict except for what the run adds: the five
new projections of stage 2 (initialised by model.init_stage2), for a transfer the new head's queries, and the
visibility type's point read-out (zero-initialised, i.e. exactly the read-out of a checkpoint without it).
Choice of ours (from scratch only): `init_readout` starts every heatmap logit near a negative offset.
"""
from __future__ import annotations

import os
import re

import torch
import torch.nn as nn

from checkpoint import (CheckpointError, checkpoints, initialised_by_model, load_checkpoint, load_farl, load_official,
                        resolve_checkpoint)
from model import TASKS, Faceptor, FaceptorConfig, build_model, init_stage2
from train_config import TrainConfig, model_config
from train_run import cosface_weights


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


def find_resume(args, cfg: TrainConfig, stage: int):
    """(path, checkpoint) of --resume, or (None, None)."""
    if not args.resume:
        return None, None
    try:
        path = resolve_checkpoint(cfg.out_dir if args.resume == "latest" else args.resume, stage)
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise SystemExit(f"--resume: {e}") from None
    if ckpt["stage"] != stage:
        raise SystemExit(f"--resume {path}: a stage-{ckpt['stage']} checkpoint, but --stage {stage}")
    return path, ckpt


def find_start(args, cfg: TrainConfig, stage: int):
    """(path, checkpoint) of the stage-1 checkpoint that stage 2 or a transfer run starts from."""
    src = args.from_ckpt or (cfg.out_dir if not args.tune else os.path.join("out", cfg.preset))
    if args.from_ckpt is None and not checkpoints(src, 1):
        raise SystemExit(f"stage {stage}: no stage-1 checkpoint found in {src!r}; run --stage 1 first or pass "
                         "--from PATH")
    try:
        path = resolve_checkpoint(src, 1)
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise SystemExit(f"--from: {e}") from None
    if ckpt["stage"] != 1:
        raise SystemExit(f"--from {path}: expected a stage-1 checkpoint, got stage {ckpt['stage']}")
    return path, ckpt


def load_start(model: nn.Module, ckpt: dict, stage: int, new_head: str | None, path: str):
    """Our stage-1 weights into a stage-2 or transfer model: strict except the new projections / the new head."""
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    new = rf"(queries\.{new_head}\.|.*\.{new_head}\.)" if new_head else "$^"
    bad = [k for k in missing if not (initialised_by_model(k, stage) or re.match(new, k))]
    if bad or unexpected:
        raise SystemExit(f"--from {path}: the checkpoint does not fit: missing {bad}, unexpected {unexpected}")
    if stage == 2:
        init_stage2(model)                      # new projections = the layer-12 one, L_t rows equal (model.py)


def init_weights(args, model: nn.Module, log) -> dict:
    """--init farl / official; returns the CosFace weights it brings ({head: weight})."""
    kind, path = args.init
    if kind == "farl":
        load_farl(model, path)
        log(f"encoder initialised from FaRL {path}")
        return {}
    if kind != "official":
        raise SystemExit(f"--init: KIND must be 'farl' or 'official', got {kind!r}")
    try:
        cosface, report = load_official(model, path, allow_new_heads=args.allow_new_heads)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    log(f"initialised from the authors' stage-{report['stage']} checkpoint {path}: {report['tensors']} tensors; "
        f"CosFace of {sorted(cosface) or 'no head'}; new heads {report['new_heads'] or 'none'}; heads left out "
        f"{report['dropped_heads'] or 'none'}")
    return cosface


def build_start(args, cfg: TrainConfig, stage: int, resume: dict | None, log):
    """The model, its config, the (possibly updated) training config, and the CosFace weights to start from."""
    torch.manual_seed(cfg.seed)                         # identical initialisation on every rank
    if resume is not None:                              # weights, optimiser and the rest come in `restore`
        cfg = TrainConfig(**{**resume["config"], "betas": tuple(resume["config"]["betas"])})
        mcfg = FaceptorConfig(**resume["model_config"])
        return build_model(cfg.model, mcfg), mcfg, cfg, {}
    mcfg, start, cosface = model_config(cfg, stage), None, {}
    if stage == 2 or args.tune:
        path, start = find_start(args, cfg, stage)
        base = dict(start["model_config"])
        tasks = list(base["tasks"]) + ([args.dataset] if args.tune and args.dataset not in base["tasks"] else [])
        mcfg = FaceptorConfig(**{**base, "tasks": tuple(tasks), "stage": stage})
        cfg.model = start["kind"]
        if stage == 2:                 # heads with queries; the identity head has nothing to train in stage 2
            if start["kind"] != "faceptor":
                raise SystemExit("stage 2 (Layer-Attention) exists only for Faceptor, not for Naive Faceptor")
            cfg.heads = {k: v for k, v in cfg.heads.items() if k in mcfg.tasks and TASKS[k].type != "recognition"}
        log(f"starting from {path} (step {start['step']})")
    model = build_model(cfg.model, mcfg)
    if start is None and not args.init:
        init_readout(model, cfg.readout_offset)                                        # from scratch only
    if start is not None:
        load_start(model, start, stage, args.dataset if args.tune else None, path)
        cosface = cosface_weights(start.get("cosface"), start["model_config"]["tasks"])
    if args.init:
        cosface = init_weights(args, model, log)
    return model, mcfg, cfg, cosface
