"""Loading FaRL encoders and converting the authors' Faceptor checkpoints into this project's layout.

Design: docs/design.md section 11. The names and shapes of every tensor of the authors' stage-1 Base/Full,
stage-2 and Naive checkpoints are in tests/data/official_keys_*.tsv (the converter tests build checkpoints from them).

  * `load_farl(model, path_or_state_dict)`: FaRL ships a whole CLIP model under `state_dict`; the `visual.*`
    tensors are the encoder. The 14x14 (+1) position table is resized once (bicubic) to the model's pos_grid.
  * `convert_official_state_dict(sd, levels=6)` -> (state_dict, extras): their stage-1 (Base, Full), stage-2 and
    Naive checkpoints, with or without DDP's `module.` prefix. Every source tensor must be used. Their level
    table is shared by all tasks ([level_embed; new_level_embed]); it is copied into every head's L_t (rows of the
    Layer-Attention layers are zero for a stage-1 checkpoint). The CosFace classifier goes to
    extras["cosface"][task]; extras also says "kind", "stage" and the "tasks" found.
  * `load_official(model, path, allow_new_heads=False)`: converts and loads strictly (names and shapes); a head of
    the model that the checkpoint lacks is an error naming it unless allowed; returns every CosFace classifier.
Files are read with torch.load(weights_only=True): no pickled code is ever run.
"""
from __future__ import annotations

import glob
import os
import re
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import TASKS, FaceptorConfig, NaiveFaceptor, build_model

OFFICIAL_TASK_NAMES = {
    "align_300w": "300w", "align_wflw": "wflw", "align_cofw": "cofw", "align_aflw": "aflw19",
    "parsing_celebam": "celebamask_hq", "parsing_lapa": "lapa", "age_morph2": "morph2", "age_utkface": "utkface",
    "affect_affectnet": "affectnet", "affect_rafdb": "rafdb", "affect_ferplus": "ferplus",
    "biattr_celeba": "celeba", "recog_ms1mv3": "ms1mv3",
}
# Naive Faceptor: their head names per task type, and the dataset of the final layers that carry no task name.
NAIVE_HEADS = {"recog": "recognition", "age": "age", "biattr": "attributes", "affect": "expression",
               "parsing": "parsing", "align": "landmarks"}
NAIVE_UNNAMED_CLASSIFIER = {"parsing": "celebamask_hq", "align": "300w"}


def _load(path_or_sd, what: str) -> dict:
    if isinstance(path_or_sd, (str, os.PathLike)):
        try:
            obj = torch.load(path_or_sd, map_location="cpu", weights_only=True)
        except Exception as e:   # the restricted unpickler refuses code; a broken file fails to parse
            raise ValueError(f"{what}: cannot read {os.fspath(path_or_sd)!r} as a weights-only checkpoint "
                             f"({type(e).__name__}: {e})") from e
    else:
        obj = path_or_sd
    if not isinstance(obj, dict):
        raise ValueError(f"{what}: expected a dict of tensors, got {type(obj).__name__}")
    for k in ("state_dict", "model"):
        if k in obj and isinstance(obj[k], dict):
            obj = obj[k]
            break
    return obj


def _visual_key(k: str) -> str:
    """CLIP `visual.*` name (prefix removed) -> our encoder name."""
    return "encoder." + k.replace("transformer.resblocks.", "blocks.")


def resize_position_table(pe: torch.Tensor, grid: int) -> torch.Tensor:
    """[1 + g*g, C] -> [1 + grid*grid, C] (bicubic, align_corners=False); the class row is kept as is."""
    g = int(round((pe.shape[0] - 1) ** 0.5))
    if g * g + 1 != pe.shape[0]:
        raise ValueError(f"positional_embedding: expected 1 + g*g rows, got {pe.shape[0]}")
    if g == grid:
        return pe
    x = pe[1:].float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([pe[:1].float(), x.permute(0, 2, 3, 1).reshape(grid * grid, -1)]).to(pe.dtype)


def _check_and_load(module, sd: Dict[str, torch.Tensor], what: str, prefix: str = ""):
    own = {prefix + k: v for k, v in module.state_dict().items()}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
           for k in sorted(set(sd) & set(own)) if sd[k].shape != own[k].shape]
    if missing or unexpected or bad:
        msg = [f"{what} does not match the model:"]
        if missing:
            msg.append(f"  missing keys ({len(missing)}): {missing[:20]}")
        if unexpected:
            msg.append(f"  unexpected keys ({len(unexpected)}): {unexpected[:20]}")
        if bad:
            msg.append(f"  shape mismatches ({len(bad)}): {bad[:20]}")
        raise ValueError("\n".join(msg))
    module.load_state_dict({k[len(prefix):]: v for k, v in sd.items()}, strict=True)


def load_farl(model, path_or_state_dict):
    """Load a FaRL (CLIP-format) visual tower into `model.encoder`, strict on every visual tensor."""
    sd = _load(path_or_state_dict, "load_farl")
    visual = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    if not visual:
        raise ValueError("load_farl: no 'visual.*' tensors found (expected a FaRL/CLIP checkpoint whose "
                         "'state_dict' holds keys like 'visual.conv1.weight')")
    ours = {_visual_key(k)[len("encoder."):]: v for k, v in visual.items()}
    if "positional_embedding" in ours:
        ours["positional_embedding"] = resize_position_table(ours["positional_embedding"], model.encoder.pos_grid)
    _check_and_load(model.encoder, ours, "load_farl: the 'visual.*' tensors")
    return model


def _strip_prefix(sd: dict) -> dict:
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def convert_official_state_dict(sd, levels: int = 6) -> Tuple[Dict[str, torch.Tensor], dict]:
    """The authors' checkpoint (dict, or a path) -> (our state_dict, extras). Raises ValueError listing any
    source tensor that has no place in our layout."""
    src = _strip_prefix(_load(sd, "convert_official_state_dict"))
    out: Dict[str, torch.Tensor] = {}
    used = set()
    naive = any(k.startswith("heads_module.heads.") for k in src)
    stage = 2 if "heads_module.decoder.new_level_embed.weight" in src else 1
    extras = {"kind": "naive" if naive else "faceptor", "stage": stage, "cosface": {}}
    tasks = set()

    def take(k, new_key=None, value=None):
        used.add(k)
        if new_key is not None:
            out[new_key] = src[k] if value is None else value

    for k, v in src.items():
        if k.startswith("backbone_module.visual."):
            name = k[len("backbone_module.visual."):]
            take(k, _visual_key(name))
        elif k.startswith("losses_module.losses.") and k.endswith(".classifier"):
            off = k[len("losses_module.losses."):-len(".classifier")]
            if off not in OFFICIAL_TASK_NAMES:
                continue
            extras["cosface"][OFFICIAL_TASK_NAMES[off]] = v
            tasks.add(OFFICIAL_TASK_NAMES[off])
            used.add(k)

    if naive:
        _convert_naive(src, take, tasks)
    else:
        _convert_faceptor(src, take, tasks, stage, levels)

    left = sorted(set(src) - used)
    if left:
        raise ValueError(f"convert_official_state_dict: {len(left)} source tensor(s) have no place in this "
                         f"layout: {left[:30]}")
    extras["tasks"] = tuple(t for t in TASKS if t in tasks)                  # in the task table's order
    return out, extras


def _head_of(key: str) -> str | None:
    """The task head a tensor of our layout belongs to (queries.<t>.*, heads.*.fcs.<t>.*), None if shared."""
    return next((part for part in key.split(".") if part in TASKS), None)


def load_official(model: nn.Module, path_or_sd, allow_new_heads: bool = False, what: str = "--init official"):
    """Load the authors' checkpoint into `model` strictly; returns (cosface, report).

    cosface: {task: classifier weight [identities, embed_dim]} for every recognition head of the model that the
    checkpoint has. A head of the model that the checkpoint lacks is an error naming it, unless
    `allow_new_heads` (it then keeps its initial values). Heads of the checkpoint that the model does not have
    are left out and named in the report. Every other tensor must match by name and shape."""
    name = os.fspath(path_or_sd) if isinstance(path_or_sd, (str, os.PathLike)) else "the state dict"
    sd, extras = convert_official_state_dict(path_or_sd, levels=model.cfg.levels)
    kind = "naive" if isinstance(model, NaiveFaceptor) else "faceptor"
    if extras["kind"] != kind:
        raise ValueError(f"{what} {name}: a {extras['kind']} checkpoint, but the model is {kind}")
    mine, theirs = tuple(model.cfg.tasks), tuple(extras["tasks"])
    new = [t for t in mine if t not in theirs]
    if new and not allow_new_heads:
        raise ValueError(f"{what} {name}: the checkpoint has no head {new} (it has {list(theirs)}); pass "
                         "--allow-new-heads to start these heads from their initial values")
    dropped = [t for t in theirs if t not in mine]
    sd = {k: v for k, v in sd.items() if _head_of(k) not in dropped}
    own = model.state_dict()
    missing = sorted(k for k in set(own) - set(sd) if _head_of(k) not in new)
    unexpected = sorted(set(sd) - set(own))
    bad = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
           for k in sorted(set(sd) & set(own)) if sd[k].shape != own[k].shape]
    if missing or unexpected or bad:
        raise ValueError(f"{what} {name} does not fit the model: missing {missing[:10]}, unexpected "
                         f"{unexpected[:10]}, shape mismatches {bad[:10]}")
    model.load_state_dict(sd, strict=False)
    cosface = {t: w for t, w in extras["cosface"].items() if t in mine}
    return cosface, {"stage": extras["stage"], "new_heads": new, "dropped_heads": dropped,
                     "tensors": len(sd)}


def _convert_faceptor(src, take, tasks, stage, levels):
    dec = "heads_module.decoder."
    itp = "heads_module.interpreters."
    level = src.get(dec + "level_embed.weight")
    new_level = src.get(dec + "new_level_embed.weight")
    if level is None:
        raise ValueError(f"convert_official_state_dict: {dec}level_embed.weight is missing")
    take(dec + "level_embed.weight")
    if new_level is not None:
        take(dec + "new_level_embed.weight")
        if new_level.shape[0] != levels - 1:
            raise ValueError(f"convert_official_state_dict: new_level_embed has {new_level.shape[0]} rows, "
                             f"expected {levels - 1} (levels={levels})")
    else:
        new_level = level.new_zeros(levels - 1, level.shape[1])
    table = torch.cat([level, new_level])                                              # [6, C_de] shared by all
    simple = [
        (r"input_proj\.0\.(weight|bias)", "projection.convs.0.{0}"),
        (r"new_input_proj\.(\d+)\.(weight|bias)", None),
        (r"transformer_cross_attention_layers\.(\d+)\.multihead_attn\.(.+)", "decoder.layers.{0}.cross_attn.{1}"),
        (r"transformer_cross_attention_layers\.(\d+)\.norm\.(.+)", "decoder.layers.{0}.cross_attn.norm.{1}"),
        (r"transformer_self_attention_layers\.(\d+)\.self_attn\.(.+)", "decoder.layers.{0}.self_attn.{1}"),
        (r"transformer_self_attention_layers\.(\d+)\.norm\.(.+)", "decoder.layers.{0}.self_attn.norm.{1}"),
        (r"transformer_ffn_layers\.(\d+)\.(.+)", "decoder.layers.{0}.ffn.{1}"),
        (r"adapt_pos2d\.(\d+)\.(.+)", "anchor_pos.mlp.{0}.{1}"),
    ]
    for k in src:
        if k.startswith(dec):
            name = k[len(dec):]
            m = re.fullmatch(r"query_(feat|embed)\.(\w+)\.weight", name)
            if m:
                if m.group(2) not in OFFICIAL_TASK_NAMES:
                    continue
                t = OFFICIAL_TASK_NAMES[m.group(2)]
                tasks.add(t)
                take(k, f"queries.{t}.{'content' if m.group(1) == 'feat' else 'pos'}")
                if m.group(1) == "feat":
                    take(k, f"queries.{t}.level", table.clone())
                continue
            for pat, tmpl in simple:
                m = re.fullmatch(pat, name)
                if m:
                    if tmpl is None:                                                   # new_input_proj.i -> i+1
                        take(k, f"projection.convs.{int(m.group(1)) + 1}.{m.group(2)}")
                    else:
                        take(k, tmpl.format(*m.groups()))
                    break
        elif k.startswith(itp):
            name = k[len(itp):]
            if name.startswith("feature_v2."):
                take(k, "identity_head." + name[len("feature_v2."):])
            elif name.startswith("value.fc."):
                take(k, "value_head.fc." + name[len("value.fc."):])
            elif re.fullmatch(r"map_v2\.mask_map\.1\.ln\.(weight|bias)", name):
                take(k)                                                                # second name of mask_map.1
            elif name.startswith("map_v2.mask_map."):
                take(k, "pixel_decoder." + name[len("map_v2.mask_map."):])
            elif name.startswith("map_v2.mask_embed.layers."):
                take(k, "dense_head.layers." + name[len("map_v2.mask_embed.layers."):])
    tasks.add("ms1mv3") if any(k.startswith(itp + "feature_v2.") for k in src) else None


def _convert_naive(src, take, tasks):
    pre = "heads_module.heads."
    for k in src:
        if not k.startswith(pre):
            continue
        head, _, rest = k[len(pre):].partition(".")
        if head not in NAIVE_HEADS:
            continue
        kind = NAIVE_HEADS[head]
        m = re.fullmatch(r"fcs\.(\w+)\.(weight|bias)", rest)
        if m and m.group(1) in OFFICIAL_TASK_NAMES:
            t = OFFICIAL_TASK_NAMES[m.group(1)]
            tasks.add(t)
            take(k, f"heads.{kind}.fcs.{t}.{m.group(2)}")
        elif re.fullmatch(r"head\.conv_seg\.(weight|bias)", rest):
            t = NAIVE_UNNAMED_CLASSIFIER[head]
            tasks.add(t)
            take(k, f"heads.{kind}.head.conv_seg.{t}.{rest.rsplit('.', 1)[1]}")
        else:
            if kind == "recognition":
                tasks.add("ms1mv3")
            take(k, f"heads.{kind}.{rest}")


# ----------------------------------------------------------------------------------------------------------------
# Our training checkpoints (train.py writes them)

CHECKPOINT_FORMAT = "faceptor-train-1"


class CheckpointError(ValueError):
    pass


def load_checkpoint(path: str) -> dict:
    """Read a training checkpoint with torch.load(weights_only=True); refuse anything else with a clear error."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights only" in str(e).lower() or "unsupported global" in str(e).lower():
            raise CheckpointError(f"checkpoint {path!r}: refused, it holds pickled objects other than tensors and "
                                  f"plain values (possibly code); only weights-only checkpoints are loaded "
                                  f"({msg})") from e
        raise CheckpointError(f"checkpoint {path!r}: unreadable or corrupt ({type(e).__name__}: {msg})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"checkpoint {path!r}: field 'format' is {got!r}, expected {CHECKPOINT_FORMAT!r} "
                              "(a checkpoint written by train.py)")
    for key in ("model", "model_config", "config", "stage", "step", "kind"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint {path!r}: missing field {key!r}")
    return ckpt


def initialised_by_model(key: str, stage: int) -> bool:
    """Whether a checkpoint of ours may lack parameter `key` because the model sets it itself: the new projections
    of stage 2 (model.init_stage2) and the visibility point read-out (heads.PointOutput, zero-initialised, i.e.
    exactly the read-out of a checkpoint written before it)."""
    return (stage == 2 and re.match(r"projection\.convs\.[1-9]\d*\.", key) is not None) or \
        key.startswith("point_head.")


def model_from_checkpoint(ckpt: dict, stage: int | None = None) -> nn.Module:
    """The model of a checkpoint (eval mode). stage=2 on a stage-1 checkpoint builds the stage-2 model."""
    mcfg = FaceptorConfig(**{**ckpt["model_config"], "stage": stage or ckpt["stage"]})
    model = build_model(ckpt["kind"], mcfg)
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    bad_missing = [k for k in missing if not initialised_by_model(k, mcfg.stage)]
    if bad_missing or unexpected:
        raise CheckpointError(f"checkpoint does not fit its model: missing {bad_missing[:5]}, "
                              f"unexpected {list(unexpected)[:5]}")
    return model.eval()


def atomic_save(obj, path: str):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoints(out_dir: str, stage: int) -> list:
    """Checkpoints of a stage in out_dir, oldest first."""
    paths = glob.glob(os.path.join(out_dir, f"stage{stage}_step*.pt"))
    return sorted(paths, key=lambda p: int(re.search(r"step(\d+)\.pt$", p).group(1)))


def resolve_checkpoint(path: str, stage: int | None = None) -> str:
    """`path` if it is a file; for a run folder (e.g. out/demo) its newest checkpoint, of `stage` when given,
    else of the highest stage present. The one place where a command line turns a run into a file."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r}: no such file or folder (give a .pt written by train.py or "
                              "its run folder, e.g. out/demo)")
    for s in ([stage] if stage else [2, 1]):
        found = checkpoints(path, s)
        if found:
            return found[-1]
    raise CheckpointError(f"checkpoint folder {path!r}: no stage{stage or '{1,2}'}_step*.pt inside")


# ----------------------------------------------------------------------------------------------------------------
# The authors' released checkpoints as models (predict.py): dimensions read from the tensors

def model_from_official(path: str) -> Tuple[nn.Module, dict]:
    """(model in eval mode, extras) from the authors' checkpoint file (e.g. checkpoint_rank0_iter_50000.pth.tar:
    Faceptor Base / Full stage 1, stage 2, or Naive Faceptor). Widths, depths, the position grid and the task
    heads are read from the tensors; attention heads follow the authors' configurations (encoder width / 64,
    decoder 8); the 512-px group runs at the position table's native size (patch x grid, 512 for theirs) and the
    112-px group at 112. Layer-Attention layers: 2, 4, 6, 8, 10 of 12 (spread alike over other depths)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r}: no such file")
    try:
        sd, extras = convert_official_state_dict(path)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path!r}: not one of the authors' Faceptor checkpoints ({e})") from e
    need = ("encoder.conv1.weight", "encoder.positional_embedding", "encoder.proj")
    if not extras["tasks"] or any(k not in sd for k in need):
        raise CheckpointError(f"checkpoint {path!r}: expected the authors' 'state_dict' with backbone_module.visual.* "
                              f"and task heads; found tasks {list(extras['tasks'])}")
    conv = sd["encoder.conv1.weight"]                                                  # [C_en, 3, P, P]
    width, patch = conv.shape[0], conv.shape[-1]
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.blocks."))
    grid = int(round((sd["encoder.positional_embedding"].shape[0] - 1) ** 0.5))
    kw = dict(vit_width=width, vit_layers=layers, vit_heads=max(1, width // 64), patch_size=patch, pos_grid=grid,
              drop_path=0.0, clip_dim=sd["encoder.proj"].shape[1], tasks=extras["tasks"], stage=extras["stage"],
              la_layers=tuple(max(1, min(layers - 1, round(i * layers / 6))) for i in range(1, 6)),
              size_512=patch * grid, size_112=112 if 112 % patch == 0 else patch * max(1, round(112 / patch)))
    if extras["kind"] == "faceptor":
        dec = sorted({int(k.split(".")[2]) for k in sd if k.startswith("decoder.layers.")})
        kw.update(dec_dim=sd["projection.convs.0.weight"].shape[0], dec_layers=len(dec),
                  dec_ffn=sd["decoder.layers.0.ffn.linear1.weight"].shape[0])
        kw["dec_heads"] = 8 if kw["dec_dim"] % 8 == 0 else 1
    emb = [sd[k] for k in ("identity_head.head.2.weight", "heads.recognition.head.2.weight") if k in sd]
    if emb:
        kw["embed_dim"] = emb[0].shape[0]                                              # [embed, C_en]
    try:
        model = build_model(extras["kind"], FaceptorConfig(**kw))
        model.load_state_dict(sd, strict=True)
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path!r}: its tensors do not fit a {extras['kind']} model of the "
                              f"dimensions read from it ({str(e).splitlines()[0]})") from e
    return model.eval(), extras
