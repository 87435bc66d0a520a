"""From model outputs to benchmark metrics: one collect / reduce pair per task kind (paper Sec. 4, Tables 3-9).

collect(state, out, batch, ctx) adds one batch to `state` (a dict, empty at the start); reduce(state, ctx) returns
the metrics (metrics.py does the arithmetic). out: one head's outputs of model.predict (landmarks "coords" normalised
so that coords * S - 0.5 is the pixel, parsing "logits" [B, C, S, S], age "age", classes / attributes "logits");
batch: the labels in the model's input frame, with the warp state (warp_matrix, warp_factor) when the evaluation
transform warped the image; ctx: "name" (the dataset, for the NME unit), "size" (S, input pixels) and protocol
options: "auc" (the NME threshold of AUC / FR), "unit" (the NME unit, default the dataset's) and "raw" (the
untransformed dataset, whose masks LaPa's parsing is scored against at the original resolution; batch["index"] says
which item each row is).

Landmarks are scored in the original image: predictions, labels and the face box go back through the inverse of
the evaluation warp. evaluate.py runs these for the benchmark protocols and for the synthetic split (there without a
warp, and also on the outputs of constant baselines: baseline_outputs). Kinds beyond the paper: pose (MAE per
angle and mean, degrees), visibility (occlusion recall at 80 % precision), gender and race (accuracy). The table and
progress helpers shared by evaluate.py and synthetic_eval.py are at the end.
"""
from __future__ import annotations

import sys
import time
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from data.transforms import Warp
from metrics import (accuracy, auc_fr, f1_list, mae, mean_attribute_accuracy, nme_per_sample, parsing_confusion,
                     parsing_f1, pose_mae, visibility_auc, visibility_recall)


def to_cpu(t: torch.Tensor) -> torch.Tensor:
    """On the CPU; half precision widened to float32 (numpy has no bfloat16)."""
    t = t.detach().cpu()
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _collect_nme(state, out, batch, ctx):
    coords = to_cpu(out["coords"]).numpy() * ctx["size"] - 0.5                        # [B, K, 2] input pixels
    gts = batch["landmarks"].double().numpy()
    for j in range(coords.shape[0]):
        pred, gt = coords[j].astype(np.float64), gts[j]
        box = batch["box"][j].double().numpy().reshape(2, 2) if "box" in batch else None
        if "warp_matrix" in batch:                                                     # back to the original image
            w = Warp.from_item(batch, j)
            pred, gt = w.inverse_points(pred), w.inverse_points(gt)
            box = w.inverse_points(box) if box is not None else None
        state.setdefault("pred", []).append(pred)
        state.setdefault("gt", []).append(gt)
        if box is not None:
            state.setdefault("box", []).append(box.reshape(-1))                        # x1, y1, x2, y2


def _reduce_nme(state, ctx):
    boxes = np.stack(state["box"]) if "box" in state else None
    errors = nme_per_sample(np.stack(state["pred"]), np.stack(state["gt"]), ctx["name"], boxes, ctx.get("unit"))
    res = {"nme": float(errors.mean())}
    if ctx.get("auc"):
        res[f"auc@{ctx['auc']}"], res[f"fr@{ctx['auc']}"] = auc_fr(errors, ctx["auc"])
    return res


def _collect_f1(state, out, batch, ctx):
    logits = out["logits"]                                                             # [B, C, S, S]
    n_cls = logits.shape[1]
    conf = state.setdefault("conf", np.zeros((n_cls, n_cls), np.int64))
    if ctx.get("raw") is None:                                                         # in the input frame
        conf += parsing_confusion(logits.argmax(1).cpu().numpy(), batch["mask"].numpy(), n_cls)
        return
    for j in range(logits.shape[0]):                                                   # LaPa: original resolution
        w = Warp.from_item(batch, j)
        H, W = batch["orig_size"][j].tolist()
        pred = w.inverse_image(to_cpu(logits[j]).float(), (H, W)).argmax(0).numpy()
        conf += parsing_confusion(pred, ctx["raw"][int(batch["index"][j])]["mask"].numpy(), n_cls)


def _reduce_f1(state, ctx):
    per_class, mean = parsing_f1(state["conf"])
    return {"f1_mean": mean, "f1_per_class": f1_list(per_class)}


def _collect_mae(state, out, batch, ctx):
    state.setdefault("pred", []).append(to_cpu(out["age"]).numpy())                  # [B] years
    state.setdefault("gt", []).append(batch["age"].numpy())


def _reduce_mae(state, ctx):
    return {"mae": mae(np.concatenate(state["pred"]), np.concatenate(state["gt"]))}


def _collect_acc(state, out, batch, ctx):
    state.setdefault("pred", []).append(to_cpu(out["logits"]).numpy())               # [B, 7]
    state.setdefault("gt", []).append(batch["expression"].numpy())


def _reduce_acc(state, ctx):
    return {"accuracy": accuracy(np.concatenate(state["pred"]), np.concatenate(state["gt"]))}


def _collect_macc(state, out, batch, ctx):
    state.setdefault("pred", []).append(to_cpu(out["logits"]).numpy())               # [B, A]
    state.setdefault("gt", []).append(batch["attributes"].numpy())


def _reduce_macc(state, ctx):
    return {"mean_accuracy": mean_attribute_accuracy(np.concatenate(state["pred"]), np.concatenate(state["gt"]))}


def _collect_pose(state, out, batch, ctx):
    state.setdefault("pred", []).append(to_cpu(out["pose"]).double().numpy())        # [B, 3] degrees
    state.setdefault("gt", []).append(batch["pose"].double().numpy())


def _reduce_pose(state, ctx):
    return pose_mae(np.concatenate(state["pred"]), np.concatenate(state["gt"]))        # yaw, pitch, roll, mean


def _collect_visibility(state, out, batch, ctx):
    state.setdefault("pred", []).append(to_cpu(out["occluded"]).double().numpy())    # [B, K] P(occluded)
    state.setdefault("gt", []).append(batch["visible"].numpy())                       # [B, K] 1 / 0 / -1


def _reduce_visibility(state, ctx):
    pred, gt = np.concatenate(state["pred"]), np.concatenate(state["gt"])
    return {"recall@p80": visibility_recall(pred, gt, 0.8), "auc": visibility_auc(pred, gt)}


def _class_kind(field: str):
    """(collect, reduce) of top-1 accuracy on the class label `field` of the batch (gender, race)."""
    def collect(state, out, batch, ctx):
        state.setdefault("pred", []).append(to_cpu(out["logits"]).numpy())           # [B, C]
        state.setdefault("gt", []).append(batch[field].numpy())
    return collect, _reduce_acc


# kind -> (collect, reduce); BENCHMARKS and the synthetic split name their metrics by these kinds.
KINDS = {
    "nme": (_collect_nme, _reduce_nme),
    "f1": (_collect_f1, _reduce_f1),
    "mae": (_collect_mae, _reduce_mae),
    "acc": (_collect_acc, _reduce_acc),
    "macc": (_collect_macc, _reduce_macc),
    "pose": (_collect_pose, _reduce_pose),
    "visibility": (_collect_visibility, _reduce_visibility),
    "gender": _class_kind("gender"),
    "race": _class_kind("race"),
}


def baseline_outputs(base: Mapping, task_type: str, batch: int) -> dict:
    """model.predict's outputs of a constant predictor for `batch` faces. base holds what to predict for every face:
    the mean normalised landmarks [K,2], the class map [S,S] (of base["classes"] classes, 19 when absent), the age,
    the expression, the attributes [A] (1/0), the pose [3] degrees, the per-point visibility [K] (1/0), the gender
    and the race (class ids of base["race_classes"] classes, 5 when absent)."""
    if task_type == "landmarks":
        return {"coords": torch.from_numpy(base["landmarks"]).expand(batch, -1, -1)}          # [B, K, 2]
    if task_type == "parsing":
        one_hot = F.one_hot(torch.from_numpy(base["mask"]), base.get("classes", 19)).permute(2, 0, 1)  # [C, S, S]
        return {"logits": one_hot.expand(batch, -1, -1, -1)}
    if task_type == "age":
        return {"age": torch.full((batch,), base["age"], dtype=torch.float64)}
    if task_type == "expression":
        return {"logits": F.one_hot(torch.tensor(base["expression"]), 7).double().expand(batch, -1)}
    if task_type == "pose":
        return {"pose": torch.as_tensor(base["pose"], dtype=torch.float64).expand(batch, -1)}   # [B, 3]
    if task_type == "visibility":
        occluded = 1.0 - torch.as_tensor(base["visible"], dtype=torch.float64)                # [K] 1 = occluded
        return {"occluded": occluded.expand(batch, -1)}
    if task_type in ("gender", "race"):
        n = 2 if task_type == "gender" else base.get("race_classes", 5)
        return {"logits": F.one_hot(torch.tensor(base[task_type]), n).double().expand(batch, -1)}
    attrs = torch.from_numpy(np.where(base["attributes"] > 0, 1.0, -1.0))                      # logit sign
    return {"logits": attrs.expand(batch, -1)}


# ---------------------------------------------------------------------------------------------------------------
# Tables and progress (evaluate.py, synthetic_eval.py)
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
