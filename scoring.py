"""From model outputs to benchmark metrics: one collect / reduce pair per task kind (paper Sec. 4, Tables 3-9).

collect(state, out, batch, ctx) adds one batch to `state` (a dict, empty at the start); reduce(state, ctx) returns
the metrics (metrics.py does the arithmetic). out: one head's outputs of model.predict (landmarks "coords" normalised
so that coords * S - 0.5 is the pixel, parsing "logits" [B, C, S, S], age "age", classes / attributes "logits");
batch: the labels in the model's input frame, with the warp state (warp_matrix, warp_factor) when the evaluation
transform warped the image; ctx: "name" (the dataset, for the NME unit), "size" (S, input pixels) and protocol
options: "auc" (the NME threshold of AUC / FR) and "raw" (the untransformed dataset, whose masks LaPa's parsing is
scored against at the original resolution; batch["index"] says which item each row is).

Landmarks are scored in the original image: predictions, labels and the face box go back through the inverse of
the evaluation warp. evaluate.py runs these for the benchmark protocols and for the synthetic split (there without a
warp, and also on the outputs of constant baselines: baseline_outputs).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from data.transforms import Warp
from metrics import (accuracy, auc_fr, f1_list, mae, mean_attribute_accuracy, nme_per_sample, parsing_confusion,
                     parsing_f1)


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
    errors = nme_per_sample(np.stack(state["pred"]), np.stack(state["gt"]), ctx["name"], boxes)
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


# kind -> (collect, reduce); BENCHMARKS and the synthetic split name their metrics by these kinds.
KINDS = {
    "nme": (_collect_nme, _reduce_nme),
    "f1": (_collect_f1, _reduce_f1),
    "mae": (_collect_mae, _reduce_mae),
    "acc": (_collect_acc, _reduce_acc),
    "macc": (_collect_macc, _reduce_macc),
}


def baseline_outputs(base: Mapping, task_type: str, batch: int) -> dict:
    """model.predict's outputs of a constant predictor for `batch` faces: base holds the mean normalised landmarks
    [68,2], the class map [S,S], the age, the expression and the attributes [40] (1/0) to predict for every face."""
    if task_type == "landmarks":
        return {"coords": torch.from_numpy(base["landmarks"]).expand(batch, -1, -1)}          # [B, 68, 2]
    if task_type == "parsing":
        one_hot = F.one_hot(torch.from_numpy(base["mask"]), 19).permute(2, 0, 1)             # [19, S, S]
        return {"logits": one_hot.expand(batch, -1, -1, -1)}
    if task_type == "age":
        return {"age": torch.full((batch,), base["age"], dtype=torch.float64)}
    if task_type == "expression":
        return {"logits": F.one_hot(torch.tensor(base["expression"]), 7).double().expand(batch, -1)}
    attrs = torch.from_numpy(np.where(base["attributes"] > 0, 1.0, -1.0))                      # logit sign
    return {"logits": attrs.expand(batch, -1)}
