"""Fixture writers for the task types beyond the paper: tiny copies of 300W-LP, AFLW2000-3D, UTKFace (gender /
race file names), FairFace and COFW in their native formats. Each writer returns what it wrote, in the loaders'
output conventions (degrees as (yaw, pitch, roll), 0-based pixels, class ids), for the tests to compare against.
"""
import math
import os

import numpy as np
from PIL import Image

RNG_SEED = 4321


def _img(rng, h=40, w=36):
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _save(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


def _pose_para(yaw, pitch, roll):
    """Pose_Para [1, 7] as the datasets store it: pitch, yaw, roll in radians, then translation and scale."""
    return np.array([[math.radians(pitch), math.radians(yaw), math.radians(roll), 10.0, 20.0, 0.0, 0.001]])


def _write_pose_pair(folder, stem, rng, pose, fields):
    import scipy.io
    _save(os.path.join(folder, stem + ".jpg"), _img(rng))
    scipy.io.savemat(os.path.join(folder, stem + ".mat"), {"Pose_Para": _pose_para(*pose), **fields})


def write_300wlp(root, parent=True):
    """300W_LP/{AFW,AFW_Flip,HELEN}/<name>.jpg + .mat (Pose_Para, pt2d [2, 68]).
    Returns {image path: (pose (yaw, pitch, roll) degrees, landmarks [68, 2])}."""
    rng = np.random.default_rng(RNG_SEED)
    base = os.path.join(root, "300W_LP") if parent else root
    out = {}
    for folder, stem, pose in (("AFW", "AFW_134212_1_0", (30.0, -10.0, 5.0)),
                               ("AFW_Flip", "AFW_134212_1_0", (-30.0, -10.0, -5.0)),
                               ("HELEN", "HELEN_232194_1_3", (-75.5, 12.25, -2.0))):
        pts = np.stack([rng.uniform(5, 30, 68), rng.uniform(5, 35, 68)])                     # [2, 68]
        _write_pose_pair(os.path.join(base, folder), stem, rng, pose, {"pt2d": pts, "roi": np.zeros((1, 4))})
        out[os.path.join(base, folder, stem + ".jpg")] = (pose, pts.T)
    return out


def write_aflw2000(root):
    """AFLW2000/image0000k.jpg + .mat (Pose_Para, pt2d [2, 21] with -1 for missing points, pt3d_68 [3, 68]); the
    third face has |yaw| > 99 degrees. Returns {image path: (pose degrees, landmarks [68, 2] from pt3d_68)}."""
    rng = np.random.default_rng(RNG_SEED + 1)
    base = os.path.join(root, "AFLW2000")
    out = {}
    for k, pose in enumerate(((10.0, 20.0, -30.0), (-45.0, 0.5, 8.0), (120.0, 5.0, 0.0))):
        pt2d = np.stack([rng.uniform(5, 30, 21), rng.uniform(5, 35, 21)])
        pt2d[:, 3] = -1
        pt3d = np.stack([rng.uniform(4, 31, 68), rng.uniform(4, 36, 68), rng.uniform(-10, 10, 68)])
        stem = f"image{k + 2:05d}"
        _write_pose_pair(base, stem, rng, pose, {"pt2d": pt2d, "pt3d_68": pt3d})
        out[os.path.join(base, stem + ".jpg")] = (pose, pt3d[:2].T)
    return out


UTK_DEMOGRAPHIC_NAMES = {"26_0_3_20170119180000001.jpg": (26, 0, 3), "40_1_0_20170117200000002.jpg": (40, 1, 0),
                         "7_1_4_20170110200000003.jpg": (7, 1, 4), "33_0_1_20170116200000004.jpg": (33, 0, 1),
                         "52_1_2_20170109200000005.jpg": (52, 1, 2), "18_0_0_20170104200000006.jpg": (18, 0, 0)}
UTK_MALFORMED = ("61_1_20170109142408075.jpg", "30_0_7_20170109142408076.jpg")     # no race; race code 7


def write_utk_demographics(root):
    """UTKFace/<age>_<gender>_<race>_<date>.jpg.chip.jpg (+ two malformed names). Returns {name: (age, g, r)}."""
    rng = np.random.default_rng(RNG_SEED + 2)
    for name in list(UTK_DEMOGRAPHIC_NAMES) + list(UTK_MALFORMED):
        _save(os.path.join(root, "UTKFace", name + ".chip.jpg"), _img(rng))
    return dict(UTK_DEMOGRAPHIC_NAMES)


FAIRFACE_ROWS = {"train": [("train/1.jpg", "50-59", "Male", "East Asian", "True"),
                           ("train/2.jpg", "30-39", "Female", "Indian", "False"),
                           ("train/3.jpg", "more than 70", "Female", "Latino_Hispanic", "True")],
                 "val": [("val/1.jpg", "3-9", "Male", "Middle Eastern", "False"),
                         ("val/2.jpg", "20-29", "Female", "Black", "True")]}


def write_fairface(root, header="file,age,gender,race,service_test", bad_row=None):
    """fairface_label_{train,val}.csv + train/*.jpg, val/*.jpg; `bad_row` replaces the second val row."""
    rng = np.random.default_rng(RNG_SEED + 3)
    for part, rows in FAIRFACE_ROWS.items():
        lines = [header] + [",".join(r) for r in rows]
        if part == "val" and bad_row is not None:
            lines[2] = bad_row
        for r in rows:
            _save(os.path.join(root, *r[0].split("/")), _img(rng))
        with open(os.path.join(root, f"fairface_label_{part}.csv"), "w", newline="") as f:
            f.write("\r\n".join(lines) + "\r\n")
    return FAIRFACE_ROWS


def write_cofw_flags(root, split="test", n=3):
    """COFW_<split>.mat (MATLAB v5): images and phis [N, 87] = x (29), y (29), occlusion flags (29).
    Returns the flags [N, 29] (1 occluded)."""
    import scipy.io
    rng = np.random.default_rng(RNG_SEED + 4)
    phis = np.zeros((n, 87))
    cell = np.empty((n, 1), dtype=object)
    for i in range(n):
        cell[i, 0] = _img(rng, 30, 26)
        phis[i, :29], phis[i, 29:58] = rng.uniform(2, 24, 29), rng.uniform(2, 28, 29)
        phis[i, 58:] = rng.integers(0, 2, 29)
    sfx = "Tr" if split == "train" else "T"
    os.makedirs(root, exist_ok=True)
    scipy.io.savemat(os.path.join(root, f"COFW_{split}.mat"),
                     {"Is" + sfx: cell, "phis" + sfx: phis, "bboxes" + sfx: np.ones((n, 4))})
    return phis[:, 58:].astype(np.int64)
