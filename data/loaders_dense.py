"""Loaders for the dense tasks in their native formats (docs/datasets.md): 300W, WFLW, COFW, AFLW-19
(landmarks) and CelebAMask-HQ, LaPa (parsing). Items (transform=None): `image` uint8 [3,H,W], `landmarks` float32 [K,2]
0-based pixel coordinates of that image, `box` float32 [4] as (x1, y1, x2, y2), `mask` int64 [H,W].

Conventions and divergences:
- 300W `.pts` are 1-based (menpo convention) and are shifted by -1. The HRNet CSV variant follows Faceptor/FaRL and
  subtracts 2.0 from landmarks and centre; its box is centre +- 100*scale. Native box: landmark extent.
- WFLW, COFW, AFLW-19 and LaPa coordinates are used as stored (as Faceptor does). COFW box: Faceptor's rule from
  the landmark extent (the official bbox is ignored); `visible` = 1 - occlusion flag. AFLW-19 box from `bbox`
  (left, right, top, bottom); `visible` = `mask_new`; the train/test cut (20,000) is the `n_train` argument.
- CelebAMask-HQ: the 1024-px image is resized (bilinear) to the 512-px mask size, as Faceptor reads it; the label
  map is painted in the FaRL class order (conventions.CELEBAMASK_PARTS), later classes overwriting earlier ones.
"""
import math
import os

import numpy as np
import torch
from PIL import Image

from .dataset_io import (DatasetError, FaceDataset, array_to_image, bad_line, decode_image, first_existing,
                        h5_string, image_base, load_mat, mat_field, mat_string, parse_floats, read_lines, require)
from .conventions import CELEBAMASK_PARTS


def _extent_box(lm: np.ndarray) -> np.ndarray:
    return np.array([lm[:, 0].min(), lm[:, 1].min(), lm[:, 0].max(), lm[:, 1].max()], dtype=np.float32)


def read_pts(path: str) -> np.ndarray:
    """A `.pts` file -> float64 [N,2] as written (1-based); errors name the file and line."""
    lines = read_lines(path)
    if len(lines) < 3 or not lines[0][1].lower().startswith("version"):
        raise bad_line(path, lines[0][0] if lines else 1, "'version: 1'", lines[0][1] if lines else "<empty>")
    key, _, val = lines[1][1].partition(":")
    if key.strip() != "n_points" or not val.strip().isdigit():
        raise bad_line(path, lines[1][0], "'n_points: <count>'", lines[1][1])
    n = int(val.strip())
    if lines[2][1] != "{":
        raise bad_line(path, lines[2][0], "'{'", lines[2][1])
    if len(lines) != n + 4 or lines[-1][1] != "}":
        raise DatasetError(f"{path}: expected {n} points between '{{' and '}}', found {len(lines) - 4} lines "
                           f"and last line {lines[-1][1]!r}")
    pts = []
    for ln, text in lines[3:3 + n]:
        tok = text.split()
        if len(tok) != 2:
            raise bad_line(path, ln, "'x y'", text)
        pts.append(parse_floats(tok, path, ln, "x y"))
    return np.array(pts, dtype=np.float64)


def read_hrnet_csv(path: str, n_points: int, offset: float):
    """HRNet landmark CSV -> [(image_name, box [4], landmarks [K,2])], minus `offset` (2.0 for 300W, as FaRL)."""
    out = []
    for ln, text in read_lines(path)[1:]:
        tok = text.split(",")
        if len(tok) != 4 + 2 * n_points:
            raise bad_line(path, ln, f"{4 + 2 * n_points} comma-separated fields (name, scale, centre, "
                           f"{n_points} points)", text)
        vals = np.array(parse_floats(tok[1:], path, ln, "scale, centre and coordinates"))
        scale, cx, cy = vals[0], vals[1] - offset, vals[2] - offset
        lm = vals[3:].reshape(n_points, 2) - offset
        half = 100.0 * scale
        out.append((tok[0].strip(), np.array([cx - half, cy - half, cx + half, cy + half], np.float32), lm))
    return out


class LandmarkDataset(FaceDataset):
    task_type = "landmarks"

    def load(self, rec):
        img = rec["array"] if "array" in rec else decode_image(rec["path"])
        item = {"image": img, "landmarks": torch.tensor(rec["landmarks"], dtype=torch.float32),
                "box": torch.tensor(rec["box"], dtype=torch.float32)}
        for k in ("visible", "flags"):
            if k in rec:
                item[k] = torch.tensor(rec[k], dtype=torch.int64)
        return item


# ------------------------------------------------------------------------------------------------ 300W
W300_LAYOUT = """300W/  (native)                         or  300W root with HRNet CSVs
  afw/*.jpg + *.pts                            face_landmarks_300w_{train,valid,valid_common,valid_challenge,test}.csv
  helen/{trainset,testset}/*.jpg + *.pts      data/<image_name from the CSV>
  lfpw/{trainset,testset}/*.png + *.pts
  ibug/*.jpg + *.pts
  01_Indoor/, 02_Outdoor/  (official test set, split 'test')"""
W300_FOLDERS = {"train": ["afw", "helen/trainset", "lfpw/trainset"], "common": ["helen/testset", "lfpw/testset"],
                "challenge": ["ibug"], "test": ["01_Indoor", "02_Outdoor"]}
W300_FOLDERS["full"] = W300_FOLDERS["common"] + W300_FOLDERS["challenge"]
W300_ALIASES = {"valid": "full", "valid_common": "common", "valid_challenge": "challenge"}
W300_CSV = {"train": "train", "common": "valid_common", "challenge": "valid_challenge", "full": "valid", "test": "test"}


def _find_image(stem: str) -> str:
    for ext in (".jpg", ".png", ".JPG", ".PNG", ".jpeg"):
        if os.path.exists(stem + ext):
            return stem + ext
    base, sep, tail = stem.rpartition("_")              # "<img>_<k>.pts" next to "<img>.jpg"
    if sep and tail.isdigit():
        for ext in (".jpg", ".png"):
            if os.path.exists(base + ext):
                return base + ext
    return stem + ".jpg"


class W300(LandmarkDataset):
    def __init__(self, root, split, transform=None, skip_corrupt=False):
        super().__init__(root, W300_ALIASES.get(split, split), transform, skip_corrupt)
        self.check_split(W300_FOLDERS)
        require(root, W300_LAYOUT, "300W root")
        csv = os.path.join(root, f"face_landmarks_300w_{W300_CSV[self.split]}.csv")
        if os.path.exists(csv):
            rows = read_hrnet_csv(csv, 68, offset=2.0)
            base = image_base(root, rows[0][0]) if rows else root
            for name, box, lm in rows:
                path = os.path.join(base, name)
                if not os.path.exists(path) and "image_092_01" in name:   # HRNet drops the space of this ibug file
                    path = os.path.join(base, name.replace("image_092_01", "image_092 _01"))
                self.records.append({"path": path, "landmarks": lm, "box": box})
            return
        for folder in W300_FOLDERS[self.split]:
            d = require(os.path.join(root, folder), W300_LAYOUT, "300W folder")
            for name in sorted(os.listdir(d)):
                if name.endswith(".pts"):
                    lm = read_pts(os.path.join(d, name)) - 1.0                   # 1-based -> 0-based
                    if lm.shape != (68, 2):
                        raise DatasetError(f"{os.path.join(d, name)}: expected 68 points, got {len(lm)}")
                    self.records.append({"path": _find_image(os.path.join(d, name[:-4])), "landmarks": lm,
                                         "box": _extent_box(lm)})


# ------------------------------------------------------------------------------------------------ WFLW
WFLW_LAYOUT = """WFLW/  (native)                                            or  HRNet CSVs
  WFLW_images/<event>/<name>.jpg                                   face_landmarks_wflw_<split>.csv
  WFLW_annotations/list_98pt_rect_attr_train_test/                 data/<image_name>
    list_98pt_rect_attr_{train,test}.txt   (207 tokens per line)"""
WFLW_SUBSETS = ("largepose", "expression", "illumination", "makeup", "occlusion", "blur")
WFLW_SPLITS = ("train", "test") + tuple("test_" + s for s in WFLW_SUBSETS)


class WFLW(LandmarkDataset):
    def __init__(self, root, split, transform=None, skip_corrupt=False):
        super().__init__(root, split, transform, skip_corrupt)
        self.check_split(WFLW_SPLITS)
        require(root, WFLW_LAYOUT, "WFLW root")
        csv = os.path.join(root, f"face_landmarks_wflw_{split}.csv")
        if os.path.exists(csv):
            rows = read_hrnet_csv(csv, 98, offset=0.0)
            base = image_base(root, rows[0][0]) if rows else root
            self.records = [{"path": os.path.join(base, n), "landmarks": lm, "box": b} for n, b, lm in rows]
            return
        part = "train" if split == "train" else "test"
        ann = os.path.join(root, "WFLW_annotations", "list_98pt_rect_attr_train_test",
                           f"list_98pt_rect_attr_{part}.txt")
        subset = WFLW_SUBSETS.index(split[5:]) if split.startswith("test_") else None
        for ln, text in read_lines(ann, WFLW_LAYOUT):
            tok = text.split()
            if len(tok) < 207:
                raise bad_line(ann, ln, "207 tokens (196 coordinates, 4 box values, 6 flags, image path)", text)
            name = " ".join(tok[206:])
            vals = parse_floats(tok[:200], ann, ln, "coordinates and box")
            flags = [int(t) for t in tok[200:206] if t in ("0", "1")]
            if len(flags) != 6:
                raise bad_line(ann, ln, "six 0/1 attribute flags in tokens 200-205", " ".join(tok[200:206]))
            if subset is not None and not flags[subset]:
                continue
            self.records.append({"path": os.path.join(root, "WFLW_images", name),
                                 "landmarks": np.array(vals[:196]).reshape(98, 2), "box": np.array(vals[196:200]),
                                 "flags": flags})


# ------------------------------------------------------------------------------------------------ COFW
COFW_LAYOUT = """COFW root:
  COFW_train_color.mat, COFW_test_color.mat   (MATLAB v7.3; IsTr/phisTr/bboxesTr, IsT/phisT/bboxesT)
  or the grayscale release COFW_train.mat, COFW_test.mat"""


def read_cofw(path: str, train: bool):
    """-> (list of images uint8 [H,W,3] or [H,W], phis float64 [N,87]), normalising h5py and scipy views."""
    kind, mat = load_mat(path, COFW_LAYOUT)
    suffix = "Tr" if train else "T"
    imgs_v, phis_v = mat_field(kind, mat, "Is" + suffix, path), mat_field(kind, mat, "phis" + suffix, path)
    if kind == "h5":
        with mat:
            refs = np.asarray(imgs_v).ravel()
            images = [np.asarray(mat[r]).T for r in refs]         # (3,W,H) -> (H,W,3); (W,H) -> (H,W)
            phis = np.asarray(phis_v).T                            # (87,N) -> (N,87)
    else:
        images = [np.asarray(x) for x in np.asarray(imgs_v).ravel()]
        phis = np.asarray(phis_v)
    if phis.ndim != 2 or phis.shape[1] != 87 or len(images) != phis.shape[0]:
        raise DatasetError(f"{path}: expected phis{suffix} of shape (N, 87) for N={len(images)} images, "
                           f"got {phis.shape}")
    return images, phis.astype(np.float64)


class COFW(LandmarkDataset):
    def __init__(self, root, split, transform=None, skip_corrupt=False):
        super().__init__(root, split, transform, skip_corrupt)
        self.check_split(("train", "test"))
        require(root, COFW_LAYOUT, "COFW root")
        tag = "train" if split == "train" else "test"
        path = first_existing([os.path.join(root, f"COFW_{tag}_color.mat"), os.path.join(root, f"COFW_{tag}.mat")],
                              COFW_LAYOUT, "COFW .mat file")
        images, phis = read_cofw(path, split == "train")
        for img, phi in zip(images, phis):
            lm = phi[:58].reshape(2, 29).T                          # not interleaved: x0..x28, y0..y28
            x0, y0 = math.floor(lm[:, 0].min()), math.floor(lm[:, 1].min())
            x1, y1 = math.ceil(lm[:, 0].max()), math.ceil(lm[:, 1].max())
            cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) / 2
            self.records.append({"array": array_to_image(img), "landmarks": lm,
                                 "box": np.array([cx - half, cy - half, cx + half, cy + half]),
                                 "visible": (1 - phi[58:87]).round().astype(np.int64)})


# ------------------------------------------------------------------------------------------------ AFLW-19
AFLW_LAYOUT = """AFLW root:
  AFLWinfo_release.mat     (bbox, data, mask_new, nameList, ra)
  data/flickr/{0,2,3}/imageNNNNN.jpg"""


class AFLW19(LandmarkDataset):
    def __init__(self, root, split, transform=None, skip_corrupt=False, n_train: int = 20000):
        super().__init__(root, split, transform, skip_corrupt)
        self.check_split(("train", "test", "full", "frontal"))
        path = os.path.join(require(root, AFLW_LAYOUT, "AFLW root"), "AFLWinfo_release.mat")
        kind, mat = load_mat(path, AFLW_LAYOUT)
        get = lambda k: mat_field(kind, mat, k, path)               # noqa: E731
        if kind == "h5":
            with mat:
                bbox, data, vis = (np.asarray(get(k)).T for k in ("bbox", "data", "mask_new"))
                ra = np.asarray(get("ra")).ravel()
                names = [h5_string(mat, r) for r in np.asarray(get("nameList")).ravel()]
        else:
            bbox, data, vis = (np.asarray(get(k)) for k in ("bbox", "data", "mask_new"))
            ra = np.asarray(get("ra")).ravel()
            names = [mat_string(x) for x in np.asarray(get("nameList")).ravel()]
        n = len(names)
        if data.shape != (n, 38) or bbox.shape != (n, 4) or vis.shape != (n, 19) or len(ra) != n:
            raise DatasetError(f"{path}: expected data (N,38), bbox (N,4), mask_new (N,19), ra N for N={n}; got "
                               f"{data.shape}, {bbox.shape}, {vis.shape}, {len(ra)}")
        order = ra.astype(np.int64) - 1                               # MATLAB 1-based permutation
        if sorted(order.tolist()) != list(range(n)):
            raise DatasetError(f"{path}: field 'ra' must be a permutation of 1..{n}")
        idx = order[:n_train] if split == "train" else order[n_train:]
        if split == "frontal":
            idx = [i for i in idx if vis[i].all()]
        for i in idx:
            left, right, top, bottom = bbox[i]
            self.records.append({"path": os.path.join(root, "data", "flickr", names[i]),
                                 "landmarks": data[i].reshape(2, 19).T, "box": np.array([left, top, right, bottom]),
                                 "visible": vis[i].astype(np.int64)})


# ------------------------------------------------------------------------------------------------ parsing
CELEBAMASK_LAYOUT = """CelebAMask-HQ/
  CelebA-HQ-img/{0..29999}.jpg
  CelebAMask-HQ-mask-anno/{0..14}/{%05d}_{part}.png     (part: skin, nose, eye_g, l_eye, ... , cloth)
  CelebA-HQ-to-CelebA-mapping.txt                      (header, then 'idx orig_idx orig_file')
  list_eval_partition.txt                              (copied from CelebA: '<file> <0|1|2>')"""
_PAINT_ORDER = sorted(CELEBAMASK_PARTS.items(), key=lambda kv: kv[1])


class CelebAMaskHQ(FaceDataset):
    task_type = "parsing"
    SPLITS = {"train": (0,), "val": (1,), "train_val": (0, 1), "trainval": (0, 1), "test": (2,)}

    def __init__(self, root, split, transform=None, skip_corrupt=False):
        super().__init__(root, split, transform, skip_corrupt)
        self.check_split(self.SPLITS)
        require(root, CELEBAMASK_LAYOUT, "CelebAMask-HQ root")
        mp = os.path.join(root, "CelebA-HQ-to-CelebA-mapping.txt")
        hq = {}
        for ln, text in read_lines(mp, CELEBAMASK_LAYOUT)[1:]:
            tok = text.split()
            if len(tok) != 3 or not tok[0].isdigit():
                raise bad_line(mp, ln, "'idx orig_idx orig_file'", text)
            hq[tok[2]] = int(tok[0])
        part = first_existing([os.path.join(root, "list_eval_partition.txt"),
                               os.path.join(root, "Eval", "list_eval_partition.txt")], CELEBAMASK_LAYOUT)
        for ln, text in read_lines(part):
            tok = text.split()
            if len(tok) != 2 or tok[1] not in ("0", "1", "2"):
                raise bad_line(part, ln, "'<celeba file> <0|1|2>'", text)
            if tok[0] in hq and int(tok[1]) in self.SPLITS[split]:
                self.records.append({"idx": hq[tok[0]]})

    def load(self, rec):
        i = rec["idx"]
        img = decode_image(os.path.join(self.root, "CelebA-HQ-img", f"{i}.jpg"))
        folder = os.path.join(self.root, "CelebAMask-HQ-mask-anno", str(i // 2000))
        label = None
        for part, value in _PAINT_ORDER:
            p = os.path.join(folder, f"{i:05d}_{part}.png")
            if os.path.exists(p):
                m = decode_image(p)[0] > 0
                label = torch.zeros(m.shape, dtype=torch.int64) if label is None else label
                if m.shape != label.shape:
                    raise DatasetError(f"{p}: mask size {tuple(m.shape)} differs from the other parts "
                                       f"{tuple(label.shape)}")
                label[m] = value
        if label is None:
            label = torch.zeros((512, 512), dtype=torch.int64)
        if tuple(img.shape[1:]) != tuple(label.shape):
            pil = Image.fromarray(img.permute(1, 2, 0).numpy()).resize(label.shape[::-1], Image.BILINEAR)
            img = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).contiguous()
        return {"image": img, "mask": label}


LAPA_LAYOUT = """LaPa/{train,val,test}/
  images/<name>.jpg
  labels/<name>.png        (uint8, values 0..10, same size as the image)
  landmarks/<name>.txt     (106, then 106 lines 'x y')"""


def read_lapa_landmarks(path: str) -> np.ndarray:
    lines = read_lines(path)
    tokens = " ".join(t for _, t in lines).split()
    if not tokens or tokens[0] != "106" or len(tokens) != 213:
        raise DatasetError(f"{path}: expected '106' then 106 'x y' lines (213 numbers), got {len(tokens)} tokens "
                           f"starting {tokens[:1]}")
    return np.array(parse_floats(tokens[1:], path, 2, "landmarks")).reshape(106, 2)


class LaPa(FaceDataset):
    task_type = "parsing"
    SPLITS = {"train": ("train",), "val": ("val",), "train_val": ("train", "val"), "trainval": ("train", "val"),
              "test": ("test",)}

    def __init__(self, root, split, transform=None, skip_corrupt=False):
        super().__init__(root, split, transform, skip_corrupt)
        self.check_split(self.SPLITS)
        require(root, LAPA_LAYOUT, "LaPa root")
        for part in self.SPLITS[split]:
            d = require(os.path.join(root, part, "images"), LAPA_LAYOUT, "LaPa folder")
            for name in sorted(os.listdir(d)):
                stem = os.path.splitext(name)[0]
                lab = os.path.join(root, part, "labels", stem + ".png")
                lmk = os.path.join(root, part, "landmarks", stem + ".txt")
                for p in (lab, lmk):                   # the image is there: a missing annotation is corrupt data
                    if not os.path.exists(p):
                        raise DatasetError(f"{p}: missing annotation of image {os.path.join(d, name)}")
                self.records.append({"path": os.path.join(d, name), "label": lab, "lmk": lmk})

    def load(self, rec):
        img = decode_image(rec["path"])
        try:
            with Image.open(rec["label"]) as im:
                lab = np.asarray(im.convert("L") if im.mode not in ("L", "P") else im)
        except (OSError, SyntaxError) as e:
            raise DatasetError(f"cannot decode label image {rec['label']}: {e}") from None
        if lab.max(initial=0) > 10:
            raise DatasetError(f"{rec['label']}: label value {lab.max()} outside the 11 LaPa classes 0..10")
        if lab.shape != tuple(img.shape[1:]):
            raise DatasetError(f"{rec['label']}: size {lab.shape} differs from image {tuple(img.shape[1:])}")
        lm = read_lapa_landmarks(rec["lmk"])
        return {"image": img, "mask": torch.from_numpy(lab.astype(np.int64)),
                "landmarks": torch.tensor(lm, dtype=torch.float32)}
