"""Per-head framing of a face in a photo: the crop each task head saw in training, built from the face's five points
(ArcFace order: image-left eye centre, image-right eye centre, nose tip, image-left mouth corner, image-right mouth
corner) or its box, and the way back to the photo's coordinates.

Every framing is a `data.transforms.Warp` (a 3x3 map from photo pixels to the head's input pixels, with LaPa's
Tanh-warping where it applies), so predictions go back through `Warp.inverse_points` and `Warp.inverse_image`,
the same code evaluation uses. The dense real-data framings call the evaluation transform of their dataset
(`data.default_transform(name, train=False)`) on a box or five points made from the face; the 112-px framings
map the face onto its dataset's aligned crop and then resize that crop to 112 px as `GlobalTransform` does.
Which framing each head uses is derived from the task table and the checkpoint's training configuration
(`head_framings`); README "Framing" lists every choice with its source.

Divergences [ours]:
  * A photo's face is turned upright first (the rotation of the five points against the ArcFace template is
    removed) before the box framings of the landmark heads and of AffectNet / FER+; their datasets show faces at
    any roll, but their heads saw little roll in training (+-10 degrees of augmentation).
  * Boxes made from five points use average face proportions (`EXTENT_BOX_112`, `DETECTOR_BOX_112`, in the
    ArcFace 112-px frame); the detector's or the user's box is used where a head's data were framed by a box.
  * MORPH II, UTKFace, RAF-DB and LFW-73 ship crops aligned on the eyes; their exact templates are not published
    with the data, so these heads get the ArcFace template (`aligned_112`). CelebA's template is the mean of its
    aligned landmarks (rounded).
"""
from __future__ import annotations

import math
from typing import Dict, NamedTuple, Optional

import numpy as np
import torch

import data
from data.conventions import LAPA_ALIGN_POINTS
from data.transforms import ARCFACE_5, Warp, fit_similarity
from model import TASKS

# SyntheticFaces framings: mean five points as fractions of the picture side ((p + 0.5) / S), of faces drawn with
# FRAMING "loose" and "aligned" (data/synthetic.py), after Procrustes alignment (rotation removed, mean centre and
# mean scale kept). `synthetic_template` recomputes them; tests/test_predict_framing.py checks the constants.
SYNTHETIC_5 = {
    "loose": np.array([[0.4084, 0.4689], [0.5983, 0.4690], [0.5034, 0.5807], [0.4325, 0.6641], [0.5740, 0.6656]]),
    "aligned": np.array([[0.3756, 0.4703], [0.6318, 0.4703], [0.5038, 0.6211], [0.4081, 0.7338], [0.5993, 0.7358]]),
}
# CelebA img_align_celeba (178 x 218): mean of list_landmarks_align_celeba.txt, rounded to a pixel.
CELEBA_5 = np.array([[69.0, 111.0], [108.0, 111.0], [88.0, 134.0], [72.0, 152.0], [106.0, 152.0]])
# Boxes in the ArcFace 112-px frame (x1, y1, x2, y2): the 68-point extent of an average face (brows to chin, jaw
# to jaw) and the box MTCNN draws around it (forehead to chin).
EXTENT_BOX_112 = np.array([17.0, 37.0, 95.0, 117.0])
DETECTOR_BOX_112 = np.array([22.0, 17.0, 90.0, 110.0])

# framing name -> (input size group, source); the table README "Framing" reproduces.
FRAMINGS = {
    "synthetic_loose": (512, "SyntheticFaces framing 'loose', five points fitted to its mean"),
    "synthetic_aligned": (112, "SyntheticFaces framing 'aligned', five points fitted to its mean"),
    "synthetic_loose_112": (112, "SyntheticFaces framing 'loose' at the 112-px size"),
    "landmark_box": (512, "300W/WFLW/COFW: box = 68-point extent, evaluation crop of default_transform (scale 0.8)"),
    "aflw_box": (512, "AFLW-19: the face box, evaluation crop of default_transform (scale 1.0)"),
    "celebahq": (512, "CelebAMask-HQ: CelebA-HQ's alignment from eyes and mouth (Karras et al. 2018), whole image"),
    "lapa": (512, "LaPa: five points to the LaPa template with Tanh-warping 0.8 (default_transform)"),
    "arcface": (112, "MS1MV3: ArcFace 112-px template"),
    "celeba": (112, "CelebA: img_align_celeba 178x218 template, resized to 112x112"),
    "aligned_112": (112, "MORPH II, UTKFace, RAF-DB, LFW-73: eye-aligned crops, ArcFace template"),
    "box_112": (112, "AffectNet, FER+, 300W-LP, FairFace: square face box resized to 112"),
}
REAL_FRAMING = {"300w": "landmark_box", "wflw": "landmark_box", "cofw": "landmark_box", "aflw19": "aflw_box",
                "celebamask_hq": "celebahq", "lapa": "lapa", "ms1mv3": "arcface", "celeba": "celeba",
                "morph2": "aligned_112", "utkface": "aligned_112", "rafdb": "aligned_112", "lfw73": "aligned_112",
                "affectnet": "box_112", "ferplus": "box_112",
                # heads beyond the paper: as the datasets they read (COFW, UTKFace) or their crops around the box
                "cofw_visibility": "landmark_box", "utkface_gender": "aligned_112", "utkface_race": "aligned_112",
                "300wlp": "box_112", "fairface_gender": "box_112", "fairface_race": "box_112"}


class FaceGeometry(NamedTuple):
    points5: np.ndarray             # [5, 2] photo pixels, pixel centres at integers
    box: Optional[np.ndarray]       # [4] x1, y1, x2, y2 from the detector or the user, else None
    score: Optional[float] = None   # detection score; None when the face was given


def head_framings(tasks, train_config: Optional[dict]) -> Dict[str, str]:
    """{task: framing name}. Checkpoints trained on SyntheticFaces use the framings they were trained on (dense
    heads 'loose', 112-px heads the configured `synthetic_framing_112`); all others their datasets' framings."""
    if train_config and train_config.get("data") == "synthetic":
        f112 = str(train_config.get("synthetic_framing_112", "loose"))
        name112 = {"aligned": "synthetic_aligned", "loose": "synthetic_loose_112"}[f112]
        return {t: "synthetic_loose" if TASKS[t].size == 512 else name112 for t in tasks}
    return {t: REAL_FRAMING[t] for t in tasks}


def points_from_box(box) -> np.ndarray:
    """Five points of an average face in a detector-style box (used when only --box is given)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    bx1, by1, bx2, by2 = DETECTOR_BOX_112
    u = (ARCFACE_5 - [bx1, by1]) / [bx2 - bx1, by2 - by1]                        # [5, 2] fractions of the box
    return np.stack([x1 + u[:, 0] * (x2 - x1), y1 + u[:, 1] * (y2 - y1)], 1)


def _to_template(points5: np.ndarray, template: np.ndarray) -> np.ndarray:
    return fit_similarity(np.asarray(points5, np.float64), np.asarray(template, np.float64))


def _upright(points5: np.ndarray):
    """(U, k): U is the rotation (about the origin) that turns the face upright; k photo pixels per ArcFace px."""
    A = _to_template(points5, ARCFACE_5)
    k = math.hypot(A[0, 0], A[1, 0])
    U = np.eye(3)
    U[:2, :2] = A[:2, :2] / k
    return U, 1.0 / k


def template_box(points5, box_112) -> tuple:
    """(U, box in the upright frame) for a box given in the ArcFace frame."""
    U, _ = _upright(points5)
    A = _to_template(points5, ARCFACE_5)
    to_upright = U @ np.linalg.inv(A)                                             # ArcFace frame -> upright frame
    x1, y1, x2, y2 = box_112
    c = np.array([[x1, y1, 1.0], [x2, y2, 1.0]]) @ to_upright.T
    return U, np.array([c[0, 0], c[0, 1], c[1, 0], c[1, 1]])


def _dense_box(name: str, S: int, U: np.ndarray, box_upright: np.ndarray) -> Warp:
    t = data.default_transform(name, train=False, size=S)
    m = t.matrix({"box": torch.from_numpy(box_upright), "image": torch.zeros(3, 1, 1)}, None)
    return Warp(m @ U, S, t.w)


def _resize_matrix(w: float, h: float, S: int) -> np.ndarray:
    """A w x h crop resized to S x S, pixel centres at integers (as GlobalTransform maps landmarks)."""
    sx, sy = S / w, S / h
    return np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1.0]])


def celebahq_matrix(points5: np.ndarray, S: int) -> np.ndarray:
    """CelebA-HQ's crop: centre = eye midpoint + 0.1 x (eye-to-mouth); half side = max(2 x eye distance,
    1.8 x eye-to-mouth distance); oriented by eye-to-eye minus the eye-to-mouth vector turned by 90 degrees."""
    p = np.asarray(points5, np.float64)
    eye_avg, mouth_avg = (p[0] + p[1]) / 2, (p[3] + p[4]) / 2
    eye_to_eye, eye_to_mouth = p[1] - p[0], mouth_avg - eye_avg
    x = eye_to_eye - np.array([-eye_to_mouth[1], eye_to_mouth[0]])               # eye_to_mouth turned by -90 deg
    x = x / np.linalg.norm(x) * max(2.0 * np.linalg.norm(eye_to_eye), 1.8 * np.linalg.norm(eye_to_mouth))
    c = eye_avg + 0.1 * eye_to_mouth
    k = S / (2 * np.linalg.norm(x))                                                # output px per photo px
    cos, sin = x / np.linalg.norm(x)
    R = np.array([[cos, sin], [-sin, cos]]) * k                                    # x direction -> +x
    t = np.array([(S - 1) / 2, (S - 1) / 2]) - R @ c
    return np.array([[R[0, 0], R[0, 1], t[0]], [R[1, 0], R[1, 1], t[1]], [0, 0, 1.0]])


def build_warp(framing: str, face: FaceGeometry, S: int) -> Warp:
    """The Warp (photo -> S x S head input) of one framing for one face."""
    p5 = np.asarray(face.points5, np.float64)
    if framing.startswith("synthetic_"):
        template = SYNTHETIC_5["aligned" if framing == "synthetic_aligned" else "loose"] * S - 0.5
        return Warp(_to_template(p5, template), S)
    if framing == "landmark_box":
        return _dense_box("300w", S, *template_box(p5, EXTENT_BOX_112))
    if framing == "aflw_box":
        if face.box is not None:
            return _dense_box("aflw19", S, np.eye(3), np.asarray(face.box, np.float64))
        return _dense_box("aflw19", S, *template_box(p5, DETECTOR_BOX_112))
    if framing == "celebahq":
        return Warp(celebahq_matrix(p5, S), S)
    if framing == "lapa":
        t = data.default_transform("lapa", train=False, size=S)
        lm = torch.zeros(max(LAPA_ALIGN_POINTS) + 1, 2, dtype=torch.float64)
        lm[list(LAPA_ALIGN_POINTS)] = torch.from_numpy(p5)
        return Warp(t.matrix({"landmarks": lm, "image": torch.zeros(3, 1, 1)}, None), S, t.w)
    if framing in ("arcface", "aligned_112"):
        return Warp(_resize_matrix(112, 112, S) @ _to_template(p5, ARCFACE_5), S)
    if framing == "celeba":
        return Warp(_resize_matrix(178, 218, S) @ _to_template(p5, CELEBA_5), S)
    if framing == "box_112":
        U, box = template_box(p5, DETECTOR_BOX_112)
        x1, y1, x2, y2 = box
        side = max(x2 - x1, y2 - y1)
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        crop = np.array([[1, 0, side / 2 - cx], [0, 1, side / 2 - cy], [0, 0, 1.0]])   # edges: box -> [0, side]
        return Warp(_resize_matrix(side, side, S) @ crop @ U, S)
    raise ValueError(f"unknown framing {framing!r}; expected one of {sorted(FRAMINGS)}")


def synthetic_template(framing: str, n: int = 300, size: int = 128, seed: int = 0) -> np.ndarray:
    """Mean five points ((p + 0.5) / S) of n SyntheticFaces drawn with `framing`, Procrustes-aligned: every
    face's points are rotated about their centroid onto the running mean shape; centre and scale are averaged."""
    from data.synthetic import SyntheticFaces
    ds = SyntheticFaces("train", size=size, length=n, seed=seed, framing=framing, occlusion=0.0, clutter=False)
    pts = np.stack([five_points_68(ds[i]["landmarks"].double().numpy()) for i in range(n)])
    pts = (pts + 0.5) / size                                                       # [n, 5, 2]
    centres = pts.mean(1, keepdims=True)
    shapes = pts - centres
    mean = shapes[0]
    for _ in range(5):
        mean = np.stack([_rotate_onto(s, mean) for s in shapes]).mean(0)
    mean = _rotate_onto(mean, shapes.mean(0))                                     # orientation of the plain mean
    scale = np.linalg.norm(shapes, axis=(1, 2)).mean() / np.linalg.norm(mean)
    return mean * scale + centres.mean(0)


def _rotate_onto(s: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Centred shape s [5, 2] rotated (no reflection) to best match the centred target."""
    u, _, vt = np.linalg.svd(s.T @ target)
    d = np.sign(np.linalg.det(u @ vt)) or 1.0
    return s @ (u @ np.diag([1.0, d]) @ vt)


def five_points_68(lm: np.ndarray) -> np.ndarray:
    """Five points from 68 points (300W layout): eye centres (mean of each eye's six points), nose tip (30),
    mouth corners (48, 54)."""
    return np.stack([lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48], lm[54]])
