"""Face detection with MTCNN (Zhang et al. 2016, "Joint Face Detection and Alignment using Multi-task Cascaded
Convolutional Networks") in plain PyTorch: a proposal network (P-Net) slid over an image pyramid, a refinement
network (R-Net) and an output network (O-Net) on resized crops, non-maximum suppression between the stages, box
regression after each, and five landmarks from O-Net.

    det = MTCNN.from_weights()                 # weights of the facenet-pytorch 2.6.0 wheel, or a folder
    faces = det.detect(uint8_hwc_array)        # [Face(box, points5, score)], best score first

Weights: the three state dicts `pnet.pt`, `rnet.pt`, `onet.pt` that ship inside the facenet-pytorch 2.6.0 wheel
(MIT licence, `pip install --no-deps facenet-pytorch==2.6.0`); they are found with importlib, never imported as a
package, and read with torch.load(weights_only=True). Points come in ArcFace order: image-left eye centre,
image-right eye centre, nose tip, image-left mouth corner, image-right mouth corner.

Coordinates: the networks were trained with MATLAB-style boxes (inclusive integer corners, one-based crops); this
file keeps that arithmetic inside and returns boxes as pixel edges [x1, y1, x2, y2] and points with pixel centres at
integers (origin top-left).
Divergences [ours]: pyramid levels are resized with antialiased bilinear interpolation (the original uses area
resampling); NMS is a greedy loop in torch (no torchvision).
"""
from __future__ import annotations

import importlib.util
import math
import os
from typing import List, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

INSTALL_HINT = ("the face detector needs the MTCNN weights: pip install --no-deps facenet-pytorch==2.6.0 "
                "(or pass --detector-weights DIR with pnet.pt, rnet.pt, onet.pt)")
WEIGHT_FILES = ("pnet.pt", "rnet.pt", "onet.pt")


class DetectorError(RuntimeError):
    pass


class Face(NamedTuple):
    box: np.ndarray        # [4] x1, y1, x2, y2 (pixel edges)
    points5: np.ndarray    # [5, 2] (x, y), pixel centres at integers
    score: float


def _conv_prelu(c_in, c_out, k):
    return [nn.Conv2d(c_in, c_out, k), nn.PReLU(c_out)]


class PNet(nn.Module):
    """12x12 proposal network, fully convolutional: face probability and box offsets per 2-px stride."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = _conv_prelu(3, 10, 3)
        self.conv2, self.prelu2 = _conv_prelu(10, 16, 3)
        self.conv3, self.prelu3 = _conv_prelu(16, 32, 3)
        self.conv4_1, self.conv4_2 = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

    def forward(self, x):                                                   # [B, 3, H, W]
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 2, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), F.softmax(self.conv4_1(x), 1)[:, 1]         # [B, 4, h, w], [B, h, w]


class RNet(nn.Module):
    """24x24 refinement network: face probability and box offsets per crop."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = _conv_prelu(3, 28, 3)
        self.conv2, self.prelu2 = _conv_prelu(28, 48, 3)
        self.conv3, self.prelu3 = _conv_prelu(48, 64, 2)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

    def forward(self, x):                                                   # [N, 3, 24, 24]
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(x))                                      # [N, 64, 3, 3]
        x = self.prelu4(self.dense4(x.permute(0, 3, 2, 1).flatten(1)))     # weights expect (w, h, c) order
        return self.dense5_2(x), F.softmax(self.dense5_1(x), 1)[:, 1]


class ONet(nn.Module):
    """48x48 output network: face probability, box offsets and five landmarks per crop."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = _conv_prelu(3, 32, 3)
        self.conv2, self.prelu2 = _conv_prelu(32, 64, 3)
        self.conv3, self.prelu3 = _conv_prelu(64, 64, 3)
        self.conv4, self.prelu4 = _conv_prelu(64, 128, 2)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.dense6_2, self.dense6_3 = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(256, 10)

    def forward(self, x):                                                   # [N, 3, 48, 48]
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu4(self.conv4(x))                                      # [N, 128, 3, 3]
        x = self.prelu5(self.dense5(x.permute(0, 3, 2, 1).flatten(1)))
        return self.dense6_2(x), self.dense6_3(x), F.softmax(self.dense6_1(x), 1)[:, 1]


def find_weights(folder: str | None = None) -> str:
    """The folder holding pnet.pt, rnet.pt, onet.pt: `folder`, or facenet_pytorch/data of an installed wheel."""
    if folder is None:
        spec = importlib.util.find_spec("facenet_pytorch")
        if spec is None or not spec.submodule_search_locations:
            raise DetectorError(INSTALL_HINT)
        folder = os.path.join(list(spec.submodule_search_locations)[0], "data")
    missing = [f for f in WEIGHT_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise DetectorError(f"detector weights {folder!r}: missing {missing}; {INSTALL_HINT}")
    return folder


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, by_min: bool = False) -> torch.Tensor:
    """Greedy non-maximum suppression; boxes [N, 4] inclusive corners. Overlap = intersection over union, or over
    the smaller box (by_min). Returns kept indices, best score first."""
    order = scores.argsort(descending=True)
    b = boxes[order]
    area = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    lt = torch.maximum(b[:, None, :2], b[None, :, :2])
    rb = torch.minimum(b[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt + 1).clamp(min=0).prod(-1)                              # [N, N]
    denom = torch.minimum(area[:, None], area[None]) if by_min else area[:, None] + area[None] - inter
    suppress = (inter / denom > threshold).tolist()
    alive, keep = [True] * len(b), []
    for i in range(len(b)):
        if alive[i]:
            keep.append(i)
            alive = [a and not s for a, s in zip(alive, suppress[i])]
    return order[torch.tensor(keep, dtype=torch.long)]


def _regress(boxes: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    wh = (boxes[:, 2:4] - boxes[:, :2] + 1).repeat(1, 2)                    # [N, 4]
    return boxes[:, :4] + reg * wh


def _square(boxes: torch.Tensor) -> torch.Tensor:
    wh = boxes[:, 2:4] - boxes[:, :2]
    side = wh.max(1).values
    lt = boxes[:, :2] + wh / 2 - side[:, None] / 2
    return torch.cat([lt, lt + side[:, None]], 1)


def _crops(img: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """img [3, H, W] float; boxes [N, 4] inclusive integer corners (may leave the image: zeros outside)
    -> [N, 3, size, size]. The image is zero-padded once by the farthest overreach; each crop is a slice of it."""
    if len(boxes) == 0:
        return img.new_zeros(0, 3, size, size)
    H, W = img.shape[1:]
    b = boxes.round().long()
    pad = int(max(0, -b[:, 0].min(), -b[:, 1].min(), b[:, 2].max() - W + 1, b[:, 3].max() - H + 1))
    padded = F.pad(img, (pad, pad, pad, pad)) if pad else img
    out = [F.interpolate(padded[None, :, y1 + pad:y2 + pad + 1, x1 + pad:x2 + pad + 1], size=(size, size),
                         mode="bilinear", align_corners=False, antialias=True)
           for x1, y1, x2, y2 in b.tolist()]
    return torch.cat(out)

class MTCNN(nn.Module):
    """The three-stage cascade. min_face: smallest face side searched (px); thresholds: per-stage scores;
    factor: pyramid step."""

    def __init__(self, min_face: float = 20.0, thresholds=(0.6, 0.7, 0.7), factor: float = 0.709):
        super().__init__()
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        self.min_face, self.thresholds, self.factor = float(min_face), tuple(thresholds), float(factor)

    @classmethod
    def from_weights(cls, folder: str | None = None, **kw) -> "MTCNN":
        folder = find_weights(folder)
        det = cls(**kw)
        for name, net in zip(WEIGHT_FILES, (det.pnet, det.rnet, det.onet)):
            path = os.path.join(folder, name)
            try:
                net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            except Exception as e:
                raise DetectorError(f"detector weights {path!r}: not an MTCNN {name[:4].upper()} state dict "
                                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
        return det.eval()

    def scales(self, H: int, W: int) -> List[float]:
        """Pyramid: the first level maps min_face to P-Net's 12 px, then steps of `factor` while >= 12 px."""
        s, side, out = 12.0 / self.min_face, min(H, W), []
        while side * s >= 12.0:
            out.append(s)
            s *= self.factor
        return out

    def _propose(self, img: torch.Tensor) -> torch.Tensor:
        """Stage 1: rows (x1, y1, x2, y2, score, 4 offsets), inclusive 0-based corners in the image."""
        H, W = img.shape[1:]
        found = []
        for s in self.scales(H, W):
            level = F.interpolate(img[None], size=(math.ceil(H * s), math.ceil(W * s)), mode="bilinear",
                                  align_corners=False, antialias=True)
            reg, prob = self.pnet(level)                                    # [1, 4, h, w], [1, h, w]
            yx = (prob[0] >= self.thresholds[0]).nonzero()                 # [n, 2]
            if len(yx) == 0:
                continue
            xy = yx.flip(1).to(img.dtype)
            q1, q2 = torch.floor((2 * xy + 1) / s) - 1, torch.floor((2 * xy + 12) / s) - 1
            rows = torch.cat([q1, q2, prob[0][yx[:, 0], yx[:, 1]][:, None], reg[0][:, yx[:, 0], yx[:, 1]].T], 1)
            found.append(rows[nms(rows[:, :4], rows[:, 4], 0.5)])
        if not found:
            return img.new_zeros(0, 9)
        rows = torch.cat(found)
        return rows[nms(rows[:, :4], rows[:, 4], 0.7)]

    def _refine(self, img: torch.Tensor, boxes: torch.Tensor, net: nn.Module, size: int, threshold: float):
        """Stages 2 and 3: crops of the squared boxes through R-Net / O-Net; keep those above threshold."""
        boxes = torch.floor(boxes)
        outs = net(_crops(img, boxes, size))
        keep = outs[-1] > threshold
        return boxes[keep], outs[-1][keep], [o[keep] for o in outs[:-1]]

    @torch.no_grad()
    def detect(self, image: np.ndarray) -> List[Face]:
        """image: uint8 [H, W, 3] RGB -> faces, best score first."""
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"MTCNN.detect: expected an RGB array [H, W, 3], got shape {tuple(image.shape)}")
        img = (torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() - 127.5) * 0.0078125
        rows = self._propose(img)
        if len(rows) == 0:
            return []
        boxes = _square(_regress(rows[:, :4], rows[:, 5:9]))
        boxes, score, (reg,) = self._refine(img, boxes, self.rnet, 24, self.thresholds[1])
        if len(boxes) == 0:
            return []
        keep = nms(boxes, score, 0.7)
        boxes = _square(_regress(boxes[keep], reg[keep]))
        boxes, score, (reg, pts) = self._refine(img, boxes, self.onet, 48, self.thresholds[2])
        if len(boxes) == 0:
            return []
        wh = boxes[:, 2:4] - boxes[:, :2] + 1                               # [N, 2]
        points = torch.stack([pts[:, :5], pts[:, 5:]], -1) * wh[:, None] + boxes[:, None, :2]   # [N, 5, 2]
        boxes = _regress(boxes, reg)
        keep = nms(boxes, score, 0.7, by_min=True)
        return [Face(boxes[i].double().numpy(), points[i].double().numpy(), float(score[i])) for i in keep.tolist()]
