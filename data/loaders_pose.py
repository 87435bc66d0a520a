"""Head pose data (a task type beyond the paper): 300W-LP (training) and AFLW2000-3D (test) in their native layout,
and the pose-aware 112-px transform.

Both sets store one MATLAB file beside each image, `<name>.mat` next to `<name>.jpg`, holding
  Pose_Para  [1, 7]: pitch, yaw, roll (radians), then translation and scale of the fitted 3D face;
  pt2d       [2, K]: 2-D landmarks (300W-LP: the 68 points; AFLW2000-3D: AFLW's 21 points, -1 where missing);
  pt3d_68    [3, 68] (AFLW2000-3D): the fitted 68 points, rows x, y (image pixels) and depth.
Items (transform=None): `image` uint8 [3,H,W], `pose` float32 [3] = (yaw, pitch, roll) in degrees in the
convention of data.conventions (yaw > 0: face turned towards image left; pitch > 0: looking up; roll > 0:
clockwise in the image), `landmarks` float32 [K,2] (pt3d_68 when present, else the valid pt2d points), `box` float32
[4] (x1, y1, x2, y2) = the landmark extent.

Choices [ours]:
- `max_angle` (default 99 degrees for AFLW2000-3D, as the usual protocol drops the 31 faces beyond it; None for
  300W-LP) filters faces whose |yaw|, |pitch| or |roll| exceeds it. Filtering reads every .mat when the dataset is
  built; without it the .mat files are read item by item.
- `PoseTransform` crops a square around the landmark box (side (1 + 2 m) * max(w, h), m = 0.2; in training
  m ~ U(0.1, 0.3) and the centre moves by up to 5% of the side), resizes it to 112 px, flips with p 0.5 (yaw and
  roll change sign), then applies Random Erasing. It applies no rotation, which would change the roll label.
  The output item keeps `image` and `pose` (and any scalar labels); landmarks and box are dropped.
BIWI is not read: its labels are rotation matrices relative to a depth camera and the face crop needs the camera
calibration, which does not fit the one-file-per-image layout above.
"""
import math
import os

import numpy as np
import torch
from PIL import Image

from .conventions import POSE_FLIP_SIGN
from .dataset_io import DatasetError, FaceDataset, decode_image, load_mat, mat_field, require
from .transforms import random_erasing

W300LP_FOLDERS = ("AFW", "HELEN", "IBUG", "LFPW")
W300LP_LAYOUT = """300W-LP root (the folder 300W_LP, or its parent):
  AFW/ HELEN/ IBUG/ LFPW/ (and the mirrored AFW_Flip/ ... LFPW_Flip/): <name>.jpg + <name>.mat (Pose_Para, pt2d)"""
AFLW2000_LAYOUT = """AFLW2000-3D root (the folder AFLW2000, or its parent):
  image00002.jpg + image00002.mat (Pose_Para, pt2d, pt3d_68), ..."""


def pose_from_pose_para(para) -> np.ndarray:
    """`Pose_Para` (pitch, yaw, roll in radians, first three values) -> (yaw, pitch, roll) in degrees."""
    pitch, yaw, roll = (math.degrees(float(a)) for a in np.asarray(para).ravel()[:3])
    return np.array([yaw, pitch, roll], np.float32)


def read_pose_mat(path: str, layout: str):
    """A 300W-LP / AFLW2000-3D .mat -> (pose [3] degrees as (yaw, pitch, roll), landmarks [K,2] or None)."""
    kind, mat = load_mat(path, layout)
    get = lambda name: np.asarray(mat_field(kind, mat, name, path), dtype=np.float64)   # noqa: E731
    try:
        para = get("Pose_Para").ravel()
        pts = None
        for name, rows in (("pt3d_68", 3), ("pt2d", 2)):
            if name in mat:
                p = get(name)
                p = p.T if kind == "h5" else p                                      # HDF5 stores the transpose
                if p.ndim != 2 or p.shape[0] != rows:
                    raise DatasetError(f"{path}: field {name!r} must be [{rows}, K] (x, y rows), got {p.shape}")
                pts = p[:2].T
                pts = pts[(pts >= 0).all(1)]                                        # AFLW marks missing points -1
                break
    finally:
        if kind == "h5":
            mat.close()
    if para.size < 3 or not np.isfinite(para[:3]).all():
        raise DatasetError(f"{path}: field 'Pose_Para' must hold at least 3 finite values (pitch, yaw, roll in "
                           f"radians), got {para[:7].tolist()}")
    return pose_from_pose_para(para), (pts if pts is not None and len(pts) else None)


def _image_pairs(folder: str):
    """Sorted (image path, .mat path) of every `<name>.jpg|.png` with a `<name>.mat` beside it in `folder`."""
    out = []
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() in (".jpg", ".jpeg", ".png") and os.path.exists(os.path.join(folder, stem + ".mat")):
            out.append((os.path.join(folder, name), os.path.join(folder, stem + ".mat")))
    return out


class PoseDataset(FaceDataset):
    """Records {'path', 'mat'} (+ 'pose', 'points' once read); `load` reads the .mat when not read yet."""

    task_type = "pose"
    layout = ""

    def _add(self, pairs, max_angle):
        for img, mat in pairs:
            rec = {"path": img, "mat": mat}
            if max_angle is not None:
                rec["pose"], rec["points"] = read_pose_mat(mat, self.layout)
                if np.abs(rec["pose"]).max() > max_angle:
                    self.dropped += 1
                    continue
            self.records.append(rec)

    def load(self, rec):
        pose, pts = (rec["pose"], rec["points"]) if "pose" in rec else read_pose_mat(rec["mat"], self.layout)
        img = decode_image(rec["path"])
        item = {"image": img, "pose": torch.from_numpy(pose.copy())}
        if pts is None:                                     # no landmarks: the whole image is the face box
            item["box"] = torch.tensor([0.0, 0.0, img.shape[2] - 1.0, img.shape[1] - 1.0])
        else:
            item["landmarks"] = torch.tensor(pts, dtype=torch.float32)
            item["box"] = torch.tensor([pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()],
                                       dtype=torch.float32)
        return item


class W300LP(PoseDataset):
    """300W-LP, split 'train' (the whole set); `flipped=False` leaves out the mirrored *_Flip folders."""

    layout = W300LP_LAYOUT

    def __init__(self, root, split, transform=None, skip_corrupt=False, flipped: bool = True,
                 max_angle: float = None):
        super().__init__(root, split, transform, skip_corrupt)
        self.check_split(("train",))
        require(root, W300LP_LAYOUT, "300W-LP root")
        if os.path.isdir(os.path.join(root, "300W_LP")):
            root = os.path.join(root, "300W_LP")
        folders = [f + s for f in W300LP_FOLDERS for s in (("", "_Flip") if flipped else ("",))]
        present = [f for f in folders if os.path.isdir(os.path.join(root, f))]
        if not present:
            raise DatasetError(f"no 300W-LP folder ({', '.join(folders)}) under {root}\nexpected layout:\n"
                               f"{W300LP_LAYOUT}")
        self.dropped = 0
        for f in present:
            self._add(_image_pairs(os.path.join(root, f)), max_angle)


class AFLW2000(PoseDataset):
    """AFLW2000-3D, split 'test'; faces with an angle beyond `max_angle` degrees are left out (None keeps all)."""

    layout = AFLW2000_LAYOUT

    def __init__(self, root, split, transform=None, skip_corrupt=False, max_angle: float = 99.0):
        super().__init__(root, split, transform, skip_corrupt)
        self.check_split(("test",))
        require(root, AFLW2000_LAYOUT, "AFLW2000-3D root")
        if os.path.isdir(os.path.join(root, "AFLW2000")):
            root = os.path.join(root, "AFLW2000")
        pairs = _image_pairs(root)
        if not pairs:
            raise DatasetError(f"no <name>.jpg + <name>.mat pairs in {root}\nexpected layout:\n{AFLW2000_LAYOUT}")
        self.dropped = 0
        self._add(pairs, max_angle)


def pose_rotation(pose) -> np.ndarray:
    """(yaw, pitch, roll) degrees -> the head's rotation R [3, 3] in the 3DMM frame of 300W-LP's fits: x to image
    right, y up, z towards the viewer; a point v of the frontal head moves to R v. R = R_x(pitch) R_y(yaw) R_z(roll)
    with R_x(a) = [[1, 0, 0], [0, c, s], [0, -s, c]], R_y(a) = [[c, 0, -s], [0, 1, 0], [s, 0, c]],
    R_z(a) = [[c, s, 0], [-s, c, 0], [0, 0, 1]] (c = cos a, s = sin a). The nose axis R (0, 0, 1) then points to
    image left for yaw > 0 and up for pitch > 0, and the ear-to-ear axis R (1, 0, 0) turns clockwise for roll > 0."""
    yaw, pitch, roll = (math.radians(float(a)) for a in np.asarray(pose, np.float64).ravel()[:3])

    def cs(a):
        return math.cos(a), math.sin(a)
    (cp, sp), (cy, sy), (cr, sr) = cs(pitch), cs(yaw), cs(roll)
    rx = np.array([[1, 0, 0], [0, cp, sp], [0, -sp, cp]])
    ry = np.array([[cy, 0, -sy], [0, 1, 0], [sy, 0, cy]])
    rz = np.array([[cr, sr, 0], [-sr, cr, 0], [0, 0, 1]])
    return rx @ ry @ rz


def nose_direction(pose) -> np.ndarray:
    """Image-plane direction (dx, dy; y down) of the nose axis of a head at `pose` (degrees); length sin(angle off
    the viewing axis). (0, 0) for a frontal face; e.g. yaw 30 -> (-0.5, 0)."""
    d = pose_rotation(pose) @ np.array([0.0, 0.0, 1.0])
    return np.array([d[0], -d[1]])


def flip_pose(item: dict) -> dict:
    """Mirror the image left-right: yaw and roll change sign, pitch stays (data.conventions.POSE_FLIP_SIGN)."""
    out = dict(item)
    out["image"] = item["image"].flip(-1)
    out["pose"] = item["pose"] * torch.tensor(POSE_FLIP_SIGN, dtype=item["pose"].dtype)
    return out


def _u(g: torch.Generator) -> float:
    return float(torch.rand((), generator=g))


class PoseTransform:
    """Square crop around `box` -> size x size (bilinear); in training random margin / shift, flip, Random Erasing."""

    def __init__(self, size: int = 112, train: bool = True, margin: float = 0.2, erasing: float = 0.25):
        self.size, self.train, self.margin, self.erasing = size, train, margin, erasing

    def __call__(self, item: dict, g: torch.Generator) -> dict:
        if "box" not in item or "pose" not in item:
            raise ValueError(f"PoseTransform: the item needs 'box' (x1, y1, x2, y2) and 'pose' (yaw, pitch, roll), "
                             f"got fields {sorted(item)}")
        x1, y1, x2, y2 = item["box"].double().tolist()
        m = self.margin + (0.2 * _u(g) - 0.1 if self.train else 0.0)
        side = (1 + 2 * m) * max(x2 - x1, y2 - y1, 1.0)
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        if self.train:
            cx, cy = cx + 0.1 * side * (_u(g) - 0.5), cy + 0.1 * side * (_u(g) - 0.5)
        extent = (cx - side / 2 + 0.5, cy - side / 2 + 0.5, cx + side / 2 + 0.5, cy + side / 2 + 0.5)  # pixel edges
        im = Image.fromarray(item["image"].permute(1, 2, 0).numpy())
        crop = im.transform((self.size, self.size), Image.EXTENT, extent, resample=Image.BILINEAR)
        out = {k: v for k, v in item.items() if k not in ("landmarks", "box")}
        out["image"] = torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1).contiguous()
        if self.train:
            if _u(g) < 0.5:
                out = flip_pose(out)
            out["image"] = random_erasing(out["image"], g, self.erasing)
        return out

