"""Faceptor and Naive Faceptor (Qin et al., ECCV 2024): task table and model assemblies.

Paper sections: 3.2 (Faceptor: eq. (1) encoder, eqs. (2)-(5) decoders and outputs), 3.3 (Layer-Attention,
eqs. (6)-(7)), appendix A.2 (Naive Faceptor). Design: docs/design.md, sections 1-5.

    cfg = FaceptorConfig.base()                  # or .full(), .tiny()
    model = Faceptor(cfg)
    out = model(images, "300w")                  # {"heatmap": [B,68,H/4,W/4], "coords": [B,68,2]}
    outs = model.predict(images_512=x512, images_112=x112)   # every head, one decoder pass

The encoder (eq. (1), the CLIP-format ViT) is in encoder.py, with its own divergences.
Divergences from the paper (each also listed in docs/design.md, sections 12-13):
  * L_t is per task head (paper eq. (7)); the authors' code shares one table.
  * In stage 2 the encoder runs in eval mode (no drop-path), since it is frozen.
Training choice of ours: train.py starts stage 2 with `init_stage2` (new projections = copies of the
layer-12 one, each head's L_t rows equal), so stage 2 begins next to the stage-1 function.
Checkpoint loading and conversion live in checkpoint.py.

Beyond the paper: task types pose (yaw, pitch, roll), visibility (per-landmark occlusion), gender and race, each a
TASKS entry read through the shared `value_head` (heads.value_readout; visibility tokens are landmark tokens too, read
through `dense_head` as well, and their occlusion logit also through `point_head`, heads.PointOutput:
docs/new_task_types.md); they are in neither preset, so the paper's
models, parameter counts and outputs are unchanged. Adding a head of an existing type is one TASKS entry; a new
type also needs its read-out (heads.value_readout), its loss (losses.task_loss) and its metric (metrics.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import ops
from decoder import AnchorPosition, PixelDecoder, Projection, QueryGroup, TaskQueries, TransformerDecoder
from encoder import VisionTransformer
from heads import DenseOutput, IdentityOutput, MLCAHead, PointOutput, UperNetHead, ValueOutput, value_readout


# ----------------------------------------------------------------------------------------------------------------
# Task table (paper Table 2; docs/design.md section 1). For the model, a new dataset of an existing task type is one
# entry here: queries, L_t, outputs and Naive Faceptor's final layer follow from it. Training and evaluating it on
# real data also take a loader (data.DATASETS), a preset entry (train.PRESETS) and, for a benchmark, a row of
# evaluate.BENCHMARKS; a new task *type* is code in the model, losses, data, evaluate and predict. The full list is
# in docs/design.md ("Adding a task head"); tests/test_vocabulary.py checks every per-task table against this one.

class TaskSpec(NamedTuple):
    type: str          # one of TASK_TYPES
    queries: int       # N_t (landmark points, parsing classes incl. background, age bins, classes, attributes,
                       # 3 pose angles, points whose visibility is predicted)
    size: int          # input size group in the paper: 512 (dense tasks) or 112 (the rest)


TASKS: Dict[str, TaskSpec] = {
    "300w": TaskSpec("landmarks", 68, 512),
    "wflw": TaskSpec("landmarks", 98, 512),
    "cofw": TaskSpec("landmarks", 29, 512),
    "aflw19": TaskSpec("landmarks", 19, 512),
    "celebamask_hq": TaskSpec("parsing", 19, 512),
    "lapa": TaskSpec("parsing", 11, 512),
    "morph2": TaskSpec("age", 101, 112),
    "utkface": TaskSpec("age", 101, 112),
    "affectnet": TaskSpec("expression", 7, 112),
    "rafdb": TaskSpec("expression", 7, 112),
    "ferplus": TaskSpec("expression", 7, 112),
    "celeba": TaskSpec("attributes", 40, 112),
    "lfw73": TaskSpec("attributes", 73, 112),
    "ms1mv3": TaskSpec("recognition", 0, 112),
    # Task types beyond the paper (not in BASE_TASKS / FULL_TASKS); each reads its tokens through `value_head`.
    "300wlp": TaskSpec("pose", 3, 112),                  # yaw, pitch, roll (degrees); tested on AFLW2000-3D
    "cofw_visibility": TaskSpec("visibility", 29, 512),  # one occlusion logit per COFW point
    "utkface_gender": TaskSpec("gender", 2, 112),        # male, female
    "utkface_race": TaskSpec("race", 5, 112),            # White, Black, Asian, Indian, Others
    "fairface_gender": TaskSpec("gender", 2, 112),
    "fairface_race": TaskSpec("race", 7, 112),           # FairFace's seven groups (data.conventions)
    # A transfer-only attribute set of the built-in synthetic faces (data.synthetic_labels.SYNTH_ATTRIBUTES).
    "synth_attr": TaskSpec("attributes", 11, 112),
}
TASK_TYPES = ("landmarks", "parsing", "age", "expression", "attributes", "recognition",
              "pose", "visibility", "gender", "race")
BASE_TASKS = ("300w", "celebamask_hq", "morph2", "affectnet", "rafdb", "celeba", "ms1mv3")
FULL_TASKS = ("300w", "wflw", "cofw", "aflw19", "celebamask_hq", "lapa", "morph2", "utkface",
              "affectnet", "rafdb", "ferplus", "celeba", "ms1mv3")


@dataclass
class FaceptorConfig:
    vit_width: int = 768          # C_en
    vit_layers: int = 12
    vit_heads: int = 12
    patch_size: int = 16          # S
    pos_grid: int = 32            # the stored position table is pos_grid x pos_grid (+ class row)
    drop_path: float = 0.2        # rises linearly from 0 over the blocks (stage 1)
    dec_dim: int = 256            # C_de
    dec_heads: int = 8
    dec_layers: int = 9
    dec_ffn: int = 2048
    embed_dim: int = 512          # identity embedding
    clip_dim: int = 512           # width of CLIP's unused `proj`, kept so checkpoints load
    tasks: Tuple[str, ...] = BASE_TASKS
    stage: int = 1
    la_layers: Tuple[int, ...] = (2, 4, 6, 8, 10)   # extra encoder layers (1-based) of Layer-Attention, stage 2
    size_512: int = 512           # pixel size used for the tasks of the 512-px group
    size_112: int = 112           # pixel size used for the tasks of the 112-px group

    def __post_init__(self):
        self.tasks = tuple(self.tasks)
        self.la_layers = tuple(self.la_layers)
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"FaceptorConfig.tasks: unknown task(s) {unknown}; expected names from {list(TASKS)}")
        if self.stage not in (1, 2):
            raise ValueError(f"FaceptorConfig.stage must be 1 or 2, got {self.stage}")
        if self.vit_width % self.vit_heads or self.dec_dim % self.dec_heads:
            raise ValueError("FaceptorConfig: vit_width must be divisible by vit_heads and dec_dim by dec_heads")
        if self.dec_dim % 2:
            raise ValueError("FaceptorConfig.dec_dim must be even (2-D sine code)")
        if any(not 1 <= n < self.vit_layers for n in self.la_layers):
            raise ValueError(f"FaceptorConfig.la_layers {self.la_layers} must lie in 1..{self.vit_layers - 1}")
        for s in (self.size_512, self.size_112):
            if s % self.patch_size:
                raise ValueError(f"FaceptorConfig: input size {s} is not divisible by patch_size {self.patch_size}")

    @classmethod
    def base(cls, **kw) -> "FaceptorConfig":
        return cls(**{"tasks": BASE_TASKS, **kw})

    @classmethod
    def full(cls, **kw) -> "FaceptorConfig":
        return cls(**{"tasks": FULL_TASKS, **kw})

    @classmethod
    def tiny(cls, **kw) -> "FaceptorConfig":
        """Small dimensions for tests and CPU demos; Base task set unless `tasks` is given."""
        d = dict(vit_width=64, vit_layers=6, vit_heads=4, patch_size=8, pos_grid=8, drop_path=0.0, dec_dim=32,
                 dec_heads=4, dec_layers=2, dec_ffn=64, embed_dim=32, clip_dim=32, tasks=BASE_TASKS,
                 la_layers=(1, 2, 3, 4, 5), size_512=64, size_112=32)
        d.update(kw)
        return cls(**d)

    @property
    def levels(self) -> int:
        """Rows of L_t: layer 12 plus the Layer-Attention layers."""
        return 1 + len(self.la_layers)

    def input_size(self, task: str) -> int:
        return self.size_512 if TASKS[task].size == 512 else self.size_112

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_images(images, patch_size: int, what: str = "images"):
    if not torch.is_tensor(images) or images.dim() != 4:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"{what}: expected a float tensor [B, 3, H, W], got {shape}")
    if images.shape[1] != 3:
        raise ValueError(f"{what}: expected 3 channels (RGB) in dim 1, got shape {tuple(images.shape)}")
    if images.shape[-1] % patch_size or images.shape[-2] % patch_size:
        raise ValueError(f"{what}: height and width must be divisible by the patch size {patch_size}, "
                         f"got {tuple(images.shape[-2:])}")
    if not images.is_floating_point():
        raise ValueError(f"{what}: expected a normalised float tensor, got dtype {images.dtype}")


def _group_by_size(model, batches: Dict[str, torch.Tensor]) -> Dict[Tuple[int, int], List[str]]:
    """Check {task: images} and group the task names by input size (the encoder runs once per size)."""
    by_size: Dict[Tuple[int, int], List[str]] = {}
    for t, x in batches.items():
        model._check_task(t)
        _check_images(x, model.cfg.patch_size, f"images of {t!r}")
        by_size.setdefault(tuple(x.shape[-2:]), []).append(t)
    return by_size


# ----------------------------------------------------------------------------------------------------------------
# Faceptor

class Faceptor(nn.Module):
    """Single encoder, dual decoders (transformer decoder with task queries + pixel decoder), shared outputs."""

    def __init__(self, cfg: FaceptorConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = VisionTransformer.from_config(cfg)
        proj_layers = (cfg.vit_layers,) + (cfg.la_layers if cfg.stage == 2 else ())
        self.projection = Projection(cfg.vit_width, cfg.dec_dim, proj_layers)
        self.anchor_pos = AnchorPosition(cfg.dec_dim)
        self.queries = nn.ModuleDict({t: TaskQueries(TASKS[t].queries, cfg.dec_dim, cfg.levels)
                                      for t in cfg.tasks if TASKS[t].type != "recognition"})
        self.decoder = TransformerDecoder(cfg.dec_dim, cfg.dec_heads, cfg.dec_layers, cfg.dec_ffn)
        self.pixel_decoder = PixelDecoder(cfg.dec_dim)
        self.dense_head = DenseOutput(cfg.dec_dim)
        self.value_head = ValueOutput(cfg.dec_dim)
        if any(TASKS[t].type == "visibility" for t in cfg.tasks):                       # beyond the paper [ours]
            self.point_head = PointOutput(cfg.vit_width)
        self.identity_head = IdentityOutput(cfg.vit_width, cfg.embed_dim)
        self.layer_attention_off = set()       # task heads that see only the layer-12 memory in stage 2
        self.attention_impl = "auto"           # cross-attention path: auto | ref | fused

    # -- switches ------------------------------------------------------------------------------------------------
    def set_layer_attention(self, task: str, enabled: bool):
        """Per-head Layer-Attention switch at inference (stage 2). Off = exactly the stage-1 memory for that head."""
        self._check_task(task)
        (self.layer_attention_off.discard if enabled else self.layer_attention_off.add)(task)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.cfg.stage == 2:
            self.encoder.eval()        # frozen in stage 2: no drop-path [ours]
        return self

    # -- helpers -------------------------------------------------------------------------------------------------
    def _check_task(self, task: str):
        if task not in self.cfg.tasks:
            raise ValueError(f"unknown task {task!r}: this model has task heads {list(self.cfg.tasks)}")

    def _group(self, task: str, start: int, memory: int = 0, levels: Optional[int] = None) -> QueryGroup:
        """The query block of `task`; its L_t (cut to the memory's `levels`) only when Layer-Attention is on."""
        q = self.queries[task]
        la = self.cfg.stage == 2 and task not in self.layer_attention_off
        return QueryGroup(start, start + q.content.shape[0], memory, q.level[:levels] if la else None)

    def _memory(self, feats):
        """-> memory [B, L, HW, C_de] (Eq. (3)), P [HW, C_de], projected F^12 map [B, C_de, h, w]."""
        B, _, gh, gw = feats[-1].shape
        mem = self.projection(feats)                                                    # Eq. (3)
        f12 = mem[:, 0].transpose(1, 2).reshape(B, -1, gh, gw)                          # [B, C_de, h, w]
        return mem, self.anchor_pos(gh, gw), f12

    def _outputs(self, task, tokens, f12, feats, size, cache=None):
        kind = TASKS[task].type
        if kind == "recognition":
            return {"embedding": self.identity_head(feats[-1])}
        if kind in ("landmarks", "parsing", "visibility"):
            cache = {} if cache is None else cache
            if id(f12) not in cache:                                                    # once per input in predict
                cache[id(f12)] = self.pixel_decoder(f12)                                # Eq. (5) [B, C_de, H/4, W/4]
            pixel = cache[id(f12)]
            logits = self.dense_head(tokens, pixel)                                     # [B, N_t, H/4, W/4]
            if kind == "landmarks":
                return {"heatmap": logits, "coords": ops.heatmap_to_coords(logits)}
            if kind == "visibility":            # landmark tokens that also say whether their point is occluded
                coords = ops.heatmap_to_coords(logits)                                  # [B, N_t, 2]
                occluded = self.value_head(tokens) + self.point_head(feats[-1], coords)  # [B, N_t]
                return {**value_readout(kind, occluded), "heatmap": logits, "coords": coords}
            return {"logits": F.interpolate(logits, size=size, mode="bilinear", align_corners=False)}
        logits = self.value_head(tokens)                                                # [B, N_t]
        return value_readout(kind, logits)

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, task: str) -> Dict[str, torch.Tensor]:
        """One task head on a batch of normalised images [B, 3, H, W]."""
        return self.forward_tasks({task: images})[task]

    def forward_tasks(self, batches: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, torch.Tensor]]:
        """Training step forward (Sec. 4.1): {task: images [n_t, 3, H, W]} -> {task: outputs}. The encoder runs once
        per input size on all samples of that size together; each head is then decoded on its own samples."""
        by_size = _group_by_size(self, batches)
        out = {}
        for size, names in by_size.items():
            feats = self.encoder(torch.cat([batches[t] for t in names]))                  # Eq. (1), once per size
            mem = pos = f12 = None
            start = 0
            for t in names:
                n = batches[t].shape[0]
                fs = [f[start:start + n] for f in feats]
                start += n
                if TASKS[t].type == "recognition":
                    out[t] = self._outputs(t, None, None, fs, size)
                    continue
                if mem is None:
                    mem, pos, f12 = self._memory(feats)                                  # Eq. (3), once per size
                g = self._group(t, 0, levels=mem.shape[1])
                m = mem[start - n:start, :1] if g.level is None else mem[start - n:start]  # layer-12 memory only
                q = self.queries[t]
                tokens = self.decoder(q.content.expand(n, -1, -1), q.pos.expand(n, -1, -1), [m], [pos], [g],
                                      self.attention_impl)                               # Eq. (4)
                out[t] = self._outputs(t, tokens, f12[start - n:start], fs, size)
        return {t: out[t] for t in batches}

    @torch.no_grad()
    def predict(self, images_512: Optional[torch.Tensor] = None, images_112: Optional[torch.Tensor] = None,
                tasks: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, torch.Tensor]]:
        """Every requested head at once: the encoder once per input size, all query heads in ONE decoder pass
        (self-attention block-diagonal per head). Dense heads read `images_512`, the others `images_112`;
        both hold the same B faces. Returns {task: outputs}."""
        tasks = list(self.cfg.tasks if tasks is None else tasks)
        for t in tasks:
            self._check_task(t)
        inputs = {512: images_512, 112: images_112}
        need = {TASKS[t].size for t in tasks}
        for s in need:
            if inputs[s] is None:
                names = [t for t in tasks if TASKS[t].size == s]
                raise ValueError(f"predict: tasks {names} need images_{s}")
            _check_images(inputs[s], self.cfg.patch_size, f"images_{s}")
        sizes = sorted(need, reverse=True)
        batch = [inputs[s].shape[0] for s in sizes]          # a list, not a set: symbolic sizes under torch.export
        if any(b != batch[0] for b in batch):
            raise ValueError(f"predict: images_512 and images_112 must hold the same faces, got batch sizes {batch}")
        enc = {s: self.encoder(inputs[s]) for s in sizes}                                # Eq. (1), once per size
        memories, pos, f12, groups, contents, qposes, order = [], [], {}, [], [], [], []
        start = 0
        for m, s in enumerate(sizes):
            qtasks = [t for t in tasks if TASKS[t].size == s and TASKS[t].type != "recognition"]
            if not qtasks:
                memories.append(None), pos.append(None)
                continue
            mem, p, f12[s] = self._memory(enc[s])
            if all(self._group(t, 0).level is None for t in qtasks):
                mem = mem[:, :1]
            memories.append(mem), pos.append(p)
            for t in qtasks:
                g = self._group(t, start, m, levels=mem.shape[1])
                groups.append(g), order.append((t, s, g))
                contents.append(self.queries[t].content), qposes.append(self.queries[t].pos)
                start = g.stop
        out = {}
        if groups:
            B = batch[0]
            content = torch.cat(contents).expand(B, -1, -1)                             # [B, sum N_t, C_de]
            qpos = torch.cat(qposes).expand(B, -1, -1)
            tokens = self.decoder(content, qpos, memories, pos, groups, self.attention_impl)  # Eq. (4), one pass
            pixel = {}
            for t, s, g in order:
                out[t] = self._outputs(t, tokens[:, g.start:g.stop], f12[s], enc[s], inputs[s].shape[-2:], pixel)
        for t in tasks:
            if TASKS[t].type == "recognition":
                out[t] = self._outputs(t, None, None, enc[112], None)
        return {t: out[t] for t in tasks}


def stage2_parameters(model: Faceptor, tasks: Optional[Sequence[str]] = None) -> List[nn.Parameter]:
    """The parameters stage 2 trains: L_t of the chosen heads + the projections of the Layer-Attention layers."""
    if model.cfg.stage != 2:
        raise ValueError("stage2_parameters: the model is a stage-1 model (cfg.stage == 1)")
    tasks = [t for t in (tasks or model.queries.keys())]
    for t in tasks:
        if t not in model.queries:
            raise ValueError(f"stage2_parameters: {t!r} is not a query head of this model ({list(model.queries)})")
    params = [model.queries[t].level for t in tasks]
    for conv in list(model.projection.convs)[1:]:
        params += list(conv.parameters())
    return params



@torch.no_grad()
def init_stage2(model: Faceptor) -> None:
    """Start stage 2 next to the stage-1 function [ours]: every new projection becomes a copy of the layer-12
    projection and every head's L_t rows become its first (N(0,1)) row.

    Were the six encoder layers' maps equal, the queries would then see six identical copies of the layer-12 memory
    and attend exactly as in stage 1 (softmax over repeated keys with equal values). The maps differ, so the start is
    close to, not equal to, the stage-1 output. With random projections and rows (eq. (7)'s N(0,1) per row), the demo
    model's step-0 expression accuracy fell from 52 to 29 % and its parsing F1 from 21.1 to 18.6 (300 synthetic test
    faces); with this start they stayed at 53 % and 21.0.
    """
    if model.cfg.stage != 2:
        raise ValueError("init_stage2: the model is a stage-1 model (cfg.stage == 1)")
    first = model.projection.convs[0]
    for conv in list(model.projection.convs)[1:]:
        conv.weight.copy_(first.weight)
        conv.bias.copy_(first.bias)
    for q in model.queries.values():
        q.level.copy_(q.level[:1].expand_as(q.level))

# ----------------------------------------------------------------------------------------------------------------
# Naive Faceptor (appendix A.2)

NAIVE_HEAD_TYPES = {"landmarks": "dense", "parsing": "dense", "age": "mlca", "expression": "mlca",
                    "attributes": "mlca", "recognition": "identity",
                    "pose": "mlca", "visibility": "mlca", "gender": "mlca", "race": "mlca"}   # beyond the paper


class NaiveFaceptor(nn.Module):
    """Shared encoder; one head per task type (UperNet / MLCA / identity), a per-dataset final layer."""

    def __init__(self, cfg: FaceptorConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = VisionTransformer.from_config(cfg)
        scale = lambda ns: tuple(max(1, round(n * cfg.vit_layers / 12)) for n in ns)   # noqa: E731
        self.dense_layers, self.mlca_layers = scale(UperNetHead.layers), scale(MLCAHead.layers)
        heads = {}
        for kind in TASK_TYPES:
            outs = {t: TASKS[t].queries for t in cfg.tasks if TASKS[t].type == kind}
            if not outs:
                continue
            if NAIVE_HEAD_TYPES[kind] == "dense":
                heads[kind] = UperNetHead(cfg.vit_width, outs)
            elif NAIVE_HEAD_TYPES[kind] == "mlca":
                heads[kind] = MLCAHead(cfg.vit_width, outs)
            else:
                heads[kind] = IdentityOutput(cfg.vit_width, cfg.embed_dim)
        self.heads = nn.ModuleDict(heads)

    def _check_task(self, task: str):
        if task not in self.cfg.tasks:
            raise ValueError(f"unknown task {task!r}: this model has task heads {list(self.cfg.tasks)}")

    def forward(self, images: torch.Tensor, task: str) -> Dict[str, torch.Tensor]:
        self._check_task(task)
        _check_images(images, self.cfg.patch_size)
        return self._outputs(task, self.encoder(images), images.shape[-2:])

    def forward_tasks(self, batches: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, torch.Tensor]]:
        """Training step forward: {task: images} -> {task: outputs}, the encoder once per input size."""
        by_size = _group_by_size(self, batches)
        out = {}
        for size, names in by_size.items():
            feats = self.encoder(torch.cat([batches[t] for t in names]))
            start = 0
            for t in names:
                n = batches[t].shape[0]
                out[t] = self._outputs(t, [f[start:start + n] for f in feats], size)
                start += n
        return {t: out[t] for t in batches}

    def _outputs(self, task: str, feats, size) -> Dict[str, torch.Tensor]:
        kind = TASKS[task].type
        head = self.heads[kind]
        if kind == "recognition":
            return {"embedding": head(feats[-1])}
        if kind in ("landmarks", "parsing"):
            logits = head(feats, task, self.dense_layers)                               # [B, N, H/4, W/4]
            if kind == "landmarks":
                return {"heatmap": logits, "coords": ops.heatmap_to_coords(logits)}
            return {"logits": F.interpolate(logits, size=size, mode="bilinear", align_corners=False)}
        logits = head(feats, task, self.mlca_layers)
        return value_readout(kind, logits)


MODELS = {"faceptor": Faceptor, "naive": NaiveFaceptor}     # the model registry: checkpoint field 'kind'


def build_model(kind: str, mcfg: FaceptorConfig) -> nn.Module:
    """The model named `kind` in MODELS, built from `mcfg`."""
    if kind not in MODELS:
        raise ValueError(f"model kind must be one of {sorted(MODELS)}, got {kind!r}")
    return MODELS[kind](mcfg)
