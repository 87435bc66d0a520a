"""Training configuration: the `TrainConfig` dataclass, the named presets (the paper's Tables 2 and 10, Naive
Faceptor, and our CPU demo presets), and what a configuration determines before any data or weights exist: the model
config, the schedule length and the learning rate at each step (paper Sec. 4.1 and appendix B).

    from train_config import PRESETS, model_config
    cfg = PRESETS["faceptor-base"]                 # n_t per process and alpha_t per head, steps, lr, ...
    mcfg = model_config(cfg, stage=1)              # the FaceptorConfig it trains

Divergences (ours): n_t are per process; the demo presets are not in the paper (a from-scratch tiny model on the
built-in synthetic faces, sized for 2 CPU processes; their weights, batches and learning rates are tuned for that).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from train_run import _plain
from model import TASKS, FaceptorConfig

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
    final_eval_samples: int = 1000             # ... and in the end-of-run evaluation (README's tables: 1,000)
    ckpt_every: int = 200
    keep_last: int = 3
    max_nonfinite: int = 10                    # abort after this many non-finite losses in a row
    num_workers: int = 0                       # data-loading worker processes per rank
    data_pool: str = "shared"                  # shared: one worker pool builds whole steps | per_head: one per head
    dtype: str = "fp32"                        # fp32 | bf16 (autocast, CUDA) | fp16 (autocast + GradScaler, CUDA)
    out_dir: str = ""                          # default out/<preset>

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


BASE_HEADS = {"300w": [4, 1000.0], "celebamask_hq": [4, 100.0], "morph2": [64, 6.0], "affectnet": [64, 4.0],
              "rafdb": [16, 1.0], "celeba": [64, 2.0], "ms1mv3": [256, 5.0]}                       # Table 2, Base
FULL_HEADS = {"300w": [4, 250.0], "wflw": [4, 250.0], "cofw": [4, 250.0], "aflw19": [4, 250.0],
              "celebamask_hq": [4, 100.0], "lapa": [4, 100.0], "morph2": [64, 4.0], "utkface": [16, 1.0],
              "affectnet": [64, 6.66], "rafdb": [16, 1.67], "ferplus": [16, 1.67], "celeba": [64, 2.0],
              "ms1mv3": [256, 5.0]}                                                                  # Table 2, Full
PAPER = dict(arch="base", data="real", steps=50000, warmup=2000, stage2_steps=20000, stage2_warmup=2000, lr=5e-5,
             log_every=50, eval_every=5000, ckpt_every=1000, keep_last=3, num_workers=10, dtype="bf16")
# num_workers: one shared pool per rank; a Base step's data costs about 1.1-1.2 CPU-seconds on a 2-core EPYC
# (BENCHMARKS.md, `bench.py loaders`), so 10 workers keep up with a step of about 120 ms.
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
    # demo (README's first command): 480 steps at 1.5x DEMO's lr, parsing weight 60 and attribute weight 1 (0.69x the
    # arithmetic of DEMO's 700 steps; BENCHMARKS.md has the recipes tried). demo-long and demo-plus keep DEMO.
    "demo": TrainConfig(preset="demo", steps=480, warmup=25, stage2_steps=500, stage2_warmup=25, ckpt_every=100,
                        **{**DEMO, "lr": 1.5e-3, "heads": {**DEMO_HEADS, "celebamask_hq": [16, 60.0],
                                                           "celeba": [16, 1.0]}}),
    # demo-long: DEMO's recipe, 96-px dense inputs (the small parts: eyes, brows, lips) and a heavier parsing loss.
    "demo-long": TrainConfig(preset="demo-long", steps=2600, warmup=130, stage2_steps=300, stage2_warmup=15,
                             eval_every=650, ckpt_every=200, **{
                                 **DEMO, "synthetic_train_length": 40000,
                                 "arch_overrides": {**DEMO_ARCH, "size_512": 96},
                                 "heads": {**DEMO_HEADS, "celebamask_hq": [16, 30.0]}}),
    # demo-plus [ours]: DEMO's recipe with the task types beyond the paper (pose, landmark visibility on COFW's
    # 29 points, gender, race) trained beside the paper's six.
    "demo-plus": TrainConfig(preset="demo-plus", steps=700, warmup=35, stage2_steps=500, stage2_warmup=25,
                             ckpt_every=100, **{**DEMO, "heads": {**DEMO_HEADS, "300wlp": [16, 10.0],
                                                                  "cofw_visibility": [16, 30.0],
                                                                  "utkface_gender": [16, 1.0],
                                                                  "utkface_race": [16, 1.0]}}),
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
TRANSFER_BATCH = {"aflw19": 8, "lapa": 8, "lfw73": 32, "cofw": 8, "synth_attr": 32}
# The same on the demo presets' synthetic faces [ours]: their transfer label schemes (data.SYNTHETIC_SCHEMES: 19 and
# 29 points, LaPa's 11 classes, 11 new attributes), a short schedule that fits a CPU, lr 1e-3 for decoder and full
# tuning. Prompt tuning trains only N(0,1)-scale queries: at 1e-3 its 300 steps move them too little (19-point NME
# 36.61, worse than the mean shape's 25.84), at 1e-2 it learns (17.50); measured on a default run's checkpoint.
DEMO_TRANSFER = dict(steps=300, warmup=15, lr=1e-3, prompt_lr=1e-2)

# Stage-1 wall-clock of the demo presets on the reference machine (2 CPU cores, 2 processes; README's results).
# A run that measures less than half this speed says so at its first progress line.
REFERENCE_MINUTES = {"demo": (480, 5.9), "demo-long": (2600, 50.9)}        # preset -> (steps, minutes)


def reference_images_per_s(cfg: TrainConfig, run) -> float | None:
    """Images per second of the preset's reference run (None: no reference for this run's batches)."""
    if cfg.preset not in REFERENCE_MINUTES or run.stage != 1 or run.tune or cfg.heads != PRESETS[cfg.preset].heads:
        return None
    steps, minutes = REFERENCE_MINUTES[cfg.preset]
    return steps * sum(int(v[0]) for v in PRESETS[cfg.preset].heads.values()) * 2 / (minutes * 60)


def cached_synthetic(cfg: TrainConfig) -> bool:
    return cfg.data == "synthetic" and cfg.synthetic_cache


def epoch_steps(cfg: TrainConfig, run) -> dict | None:
    """{head: steps until its faces are all drawn} when drawn items are cached (synthetic faces), else None.
    The heads of one input size share a rank's faces (fixed partition), so the fastest of them fills the cache."""
    if not cached_synthetic(cfg):
        return None
    steps = {h: -(-cfg.synthetic_train_length // (int(v[0]) * run.env.world)) for h, v in cfg.heads.items()}
    return {h: min(s for g, s in steps.items() if TASKS[g].size == TASKS[h].size) for h in steps}


def model_config(cfg: TrainConfig, stage: int) -> FaceptorConfig:
    make = {"tiny": FaceptorConfig.tiny, "base": FaceptorConfig.base, "full": FaceptorConfig.full}[cfg.arch]
    return make(**{**cfg.arch_overrides, "tasks": tuple(cfg.heads), "stage": stage})


def schedule_length(cfg: TrainConfig, stage: int) -> tuple:
    """(total steps, warm-up steps) of a stage."""
    return (cfg.steps, cfg.warmup) if stage == 1 else (cfg.stage2_steps, cfg.stage2_warmup)


# ----------------------------------------------------------------------------------------------------------------
# Learning-rate schedule: linear warm-up from `start`, then cosine to 0 at `total`.

def lr_at(step: int, total: int, warmup: int, peak: float, start: float = 1e-6) -> float:
    """Learning rate of optimiser step `step` (0-based) of `total`."""
    if step < warmup:
        return start + (peak - start) * step / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1.0 + math.cos(math.pi * min(1.0, t)))
