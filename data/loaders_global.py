"""Loaders for the 112-px tasks in their native formats (docs/datasets.md): MORPH II and UTKFace (age),
AffectNet, RAF-DB and FERPlus (expression, remapped to AffectNet order), CelebA and LFW-73 (attributes),
MS1MV3 (identity, RecordIO via recordio.py). Items (transform=None): `image` uint8 [3,H,W] plus `age` float,
`expression` int, `attributes` int64 [N] (1/0), or `identity` int; AffectNet also `box` and `landmarks`.

Divergences and choices:
- MORPH II / UTKFace without a split list: the fold is crc32(file name) % 5, fold `test_fold` (0) is the test
  split [ours: the paper's fold assignment is unpublished]. With lists, the listed files and ages are used.
- FERPlus from the two CSVs uses the FER+ majority rule (counts of 1 zeroed; winner needs > half of the rest);
  unknown, not-a-face and contempt winners are dropped (7-class version).
- LFW-73 reads the LFWA+ `.mat` pair; Kumar's `lfw_attributes.txt` (real-valued scores, binarised at > 0) is split
  `all`.
"""
import csv
import os
import re
import zlib

import numpy as np
import torch

from .conventions import CELEBA_ATTRIBUTES, FERPLUS_TO_AFFECTNET, RAFDB_TO_AFFECTNET
from .dataset_io import (DatasetError, FaceDataset, array_to_image, bad_line, decode_image, first_existing, h5_string,
                        image_base, load_mat, mat_field, mat_string, parse_floats, read_lines, require)
from .recordio import RecordIOReader, image_keys, record_label, unpack_irheader


class LabelledImages(FaceDataset):
    """Records {'path': ..., <label>: ...}; the label keys of the record are copied into the item."""

    def load(self, rec):
        img = rec["array"] if "array" in rec else decode_image(rec["path"])
        item = {"image": img}
        for k, v in rec.items():
            if k not in ("path", "array"):
                item[k] = torch.tensor(v) if isinstance(v, (list, np.ndarray)) else v
        return item


def _fold(name: str) -> int:
    return zlib.crc32(os.path.basename(name).encode()) % 5


def _path_label_list(path: str, base: str, key: str, convert, keep=lambda v: True):
    """'<path> <label>' lines (no header) -> records; errors give file and line."""
    out = []
    for ln, text in read_lines(path):
        tok = text.split()
        if len(tok) < 2:
            raise bad_line(path, ln, "'<path> <label>'", text)
        try:
            value = convert(tok[-1])
        except ValueError:
            raise bad_line(path, ln, f"a numeric {key} label as the last field", text) from None
        if keep(value):
            out.append({"path": os.path.join(base, " ".join(tok[:-1])), key: value})
    return out


# ------------------------------------------------------------------------------------------------ age
MORPH_LAYOUT = """MORPH II root, one of:
  label/RANDOM_80_20/{train,test}.txt ('<file> <age>') + data/<file>      (Faceptor layout)
  Setting_3.txt ('filename<TAB>fold<TAB>age<TAB>database' + header) + images in data/ or the root
  the image folder itself: <6-digit id>_<index><M|F><age>.JPG"""
MORPH_NAME = re.compile(r"^\d+_\d+[MFmf](\d{2})\.(jpe?g|png)$", re.IGNORECASE)


class Morph2(LabelledImages):
    task_type = "age"

    def __init__(self, root, split, transform=None, skip_corrupt=False, test_fold: int = 0):
        super().__init__(root, split, transform, skip_corrupt)
        self.check_split(("train", "test"))
        require(root, MORPH_LAYOUT, "MORPH II root")
        lst = os.path.join(root, "label", "RANDOM_80_20", f"{split}.txt")
        if os.path.exists(lst):
            self.records = _path_label_list(lst, os.path.join(root, "data"), "age", float)
            return
        setting = os.path.join(root, "Setting_3.txt")
        if os.path.exists(setting):
            lines = read_lines(setting)
            base = image_base(root, lines[1][1].split()[0]) if len(lines) > 1 else root
            for ln, text in lines[1:]:
                tok = text.split()
                if len(tok) < 3 or not tok[1].isdigit():
                    raise bad_line(setting, ln, "'filename<TAB>fold<TAB>age<TAB>database'", text)
                if (int(tok[1]) == test_fold) == (split == "test"):
                    self.records.append({"path": os.path.join(base, tok[0]),
                                         "age": parse_floats([tok[2]], setting, ln, "age")[0]})
            return
        base = os.path.join(root, "data") if os.path.isdir(os.path.join(root, "data")) else root
        for name in sorted(os.listdir(base)):
            m = MORPH_NAME.match(name)
            if m and (_fold(name) == test_fold) == (split == "test"):
                self.records.append({"path": os.path.join(base, name), "age": float(m.group(1))})
        if not self.records:
            raise DatasetError(f"no MORPH II images or split lists under {root}\nexpected layout:\n{MORPH_LAYOUT}")


UTK_LAYOUT = """UTKFace root, one of:
  label/{train,test}.csv + data/<file>     (MWR/CORAL csv: header ',filename,age,database'; Faceptor layout)
  UTK_{train,test}_coral.csv + UTKFace/ or the images in the root
  the image folder itself: <age>_<gender>_<race>_<datetime>.jpg[.chip.jpg]"""
UTK_NAME = re.compile(r"^(\d+)_([01])_(\d)_(\d+)\.jpg(\.chip\.jpg)?$")


class UTKFace(LabelledImages):
    task_type = "age"

    def __init__(self, root, split, transform=None, skip_corrupt=False, test_fold: int = 0):
        super().__init__(root, split, transform, skip_corrupt)
        self.check_split(("train", "test"))
        require(root, UTK_LAYOUT, "UTKFace root")
        self.malformed = 0
        lst = [p for p in (os.path.join(root, "label", f"{split}.csv"), os.path.join(root, f"UTK_{split}_coral.csv"))
               if os.path.exists(p)]
        if lst:
            lines = read_lines(lst[0])[1:]
            first = lines[0][1].split(",")[1] if lines else ""
            base = image_base(root, first, ("data", "UTKFace", "")) if lines else root
            if lines and not os.path.exists(os.path.join(base, first)):
                base = image_base(root, first + ".chip.jpg", ("data", "UTKFace", ""))
            for ln, text in lines:
                tok = text.split(",")
                if len(tok) < 3:
                    raise bad_line(lst[0], ln, "',filename,age,database' (index, file, age)", text)
                path = os.path.join(base, tok[1])
                if not os.path.exists(path) and os.path.exists(path + ".chip.jpg"):
                    path += ".chip.jpg"
                self.records.append({"path": path, "age": parse_floats([tok[2]], lst[0], ln, "age")[0]})
            return
        dirs = [d for d in ("UTKFace", "part1", "part2", "part3", "data") if os.path.isdir(os.path.join(root, d))]
        for d in dirs or [""]:
            base = os.path.join(root, d)
            for name in sorted(os.listdir(base)):
                if not name.lower().endswith(".jpg"):
                    continue
                m = UTK_NAME.match(name)
                if m is None:                                     # a few real files lack a field: counted, skipped
                    self.malformed += 1
                elif (_fold(name) == test_fold) == (split == "test"):
                    self.records.append({"path": os.path.join(base, name), "age": float(m.group(1))})


# ------------------------------------------------------------------------------------------------ expression
AFFECTNET_LAYOUT = """AffectNet root, one of:
  Manually_Annotated_file_lists/{training,validation}.csv + Manually_Annotated_Images/<subDirectory_filePath>
  label/{train,test}.txt ('<path> <label>') + data/<path>      (Faceptor layout)"""
AFFECTNET_HEADER = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "facial_landmarks",
                    "expression")


class AffectNet(LabelledImages):
    task_type = "expression"

    def __init__(self, root, split, transform=None, skip_corrupt=False):
        super().__init__(root, split, transform, skip_corrupt)
        self.check_split(("train", "test"))
        require(root, AFFECTNET_LAYOUT, "AffectNet root")
        native = os.path.join(root, "Manually_Annotated_file_lists",
                              "training.csv" if split == "train" else "validation.csv")
        if not os.path.exists(native):
            lst = require(os.path.join(root, "label", f"{split}.txt"), AFFECTNET_LAYOUT, "label file")
            self.records = _path_label_list(lst, os.path.join(root, "data"), "expression", int, lambda v: 0 <= v < 7)
            return
        with open(native, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
        if not rows or tuple(rows[0][:7]) != AFFECTNET_HEADER:
            raise DatasetError(f"{native}:1: expected header starting {','.join(AFFECTNET_HEADER)}, "
                               f"got {','.join(rows[0][:7]) if rows else '<empty>'}")
        base = os.path.join(root, "Manually_Annotated_Images")
        for ln, row in enumerate(rows[1:], 2):
            if not row:
                continue
            if len(row) < 7 or not row[6].strip().lstrip("-").isdigit():
                raise bad_line(native, ln, "9 comma-separated fields with an integer expression", ",".join(row))
            e = int(row[6])
            if not 0 <= e < 7:                                      # contempt, none, uncertain, no-face
                continue
            x, y, w, h = parse_floats(row[1:5], native, ln, "face box")
            lm = parse_floats([t for t in row[5].split(";") if t], native, ln, "facial_landmarks")
            rec = {"path": os.path.join(base, row[0]), "expression": e,
                   "box": np.array([x, y, x + w, y + h], np.float32)}
            if len(lm) == 136:
                rec["landmarks"] = np.array(lm, np.float32).reshape(68, 2)
            self.records.append(rec)


RAFDB_LAYOUT = """RAF-DB basic/ root, one of:
  EmoLabel/list_patition_label.txt ('<name> <1..7>') + Image/aligned/<stem>_aligned.jpg (or Image/original/<name>)
  label.txt + data/<name>      (Faceptor layout)"""


class RAFDB(LabelledImages):
    task_type = "expression"

    def __init__(self, root, split, transform=None, skip_corrupt=False):
        super().__init__(root, split, transform, skip_corrupt)
        self.check_split(("train", "test"))
        require(root, RAFDB_LAYOUT, "RAF-DB root")
        lst = first_existing([os.path.join(root, "EmoLabel", "list_patition_label.txt"),
                              os.path.join(root, "label.txt")], RAFDB_LAYOUT, "label file")
        native = lst.endswith("list_patition_label.txt")
        aligned = native and os.path.isdir(os.path.join(root, "Image", "aligned"))
        for ln, text in read_lines(lst):
            tok = text.split()
            if len(tok) != 2 or tok[1] not in ("1", "2", "3", "4", "5", "6", "7"):
                raise bad_line(lst, ln, "'<name> <label 1..7>'", text)
            if not tok[0].startswith(split):
                continue
            if aligned:
                stem, ext = os.path.splitext(tok[0])
                path = os.path.join(root, "Image", "aligned", f"{stem}_aligned{ext}")
            else:
                path = os.path.join(root, "Image", "original", tok[0]) if native else os.path.join(root, "data", tok[0])
            self.records.append({"path": path, "expression": RAFDB_TO_AFFECTNET[int(tok[1])]})


FERPLUS_LAYOUT = """FERPlus root, one of:
  fer2013.csv (emotion,pixels,Usage) + fer2013new.csv (Usage,Image name,10 vote counts), same row order
  FER2013{Train,Valid,Test}/ with label.csv ('<png>,<10 vote counts>', no header) and the PNGs
  label/{train,val,test}.txt ('<path> <FER+ label>') + data/<path>      (Faceptor layout)"""
FERPLUS_USAGE = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
FERPLUS_FOLDER = {"train": "FER2013Train", "val": "FER2013Valid", "test": "FER2013Test"}


def ferplus_majority(counts) -> int:
    """FER+ majority label (column index 0..9) or -1 when there is no majority."""
    c = np.array(counts, dtype=np.float64)
    c[c == 1] = 0                                                  # outlier votes
    total = c.sum()
    if total <= 0:
        return -1
    k = int(np.argmax(c))
    return k if c[k] > total / 2 else -1


class FERPlus(LabelledImages):
    task_type = "expression"
    SPLITS = {"train": ("train",), "val": ("val",), "train_val": ("train", "val"), "trainval": ("train", "val"),
              "test": ("test",)}

    def __init__(self, root, split, transform=None, skip_corrupt=False):
        super().__init__(root, split, transform, skip_corrupt)
        self.check_split(self.SPLITS)
        require(root, FERPLUS_LAYOUT, "FERPlus root")
        parts = self.SPLITS[split]
        new = os.path.join(root, "fer2013new.csv")
        if os.path.exists(new):
            self._from_csv(new, parts)
        elif os.path.isdir(os.path.join(root, FERPLUS_FOLDER[parts[0]])):
            for part in parts:
                lab = os.path.join(root, FERPLUS_FOLDER[part], "label.csv")
                for ln, text in read_lines(lab, FERPLUS_LAYOUT):
                    tok = text.split(",")
                    if len(tok) != 11:
                        raise bad_line(lab, ln, "'<png>,<10 vote counts>'", text)
                    k = ferplus_majority(parse_floats(tok[1:], lab, ln, "vote counts"))
                    if 0 <= k < 7:
                        self.records.append({"path": os.path.join(root, FERPLUS_FOLDER[part], tok[0]),
                                             "expression": FERPLUS_TO_AFFECTNET[k]})
        else:
            for part in parts:
                lst = require(os.path.join(root, "label", f"{part}.txt"), FERPLUS_LAYOUT, "label file")
                recs = _path_label_list(lst, os.path.join(root, "data"), "expression", int, lambda v: 0 <= v < 7)
                for r in recs:
                    r["expression"] = FERPLUS_TO_AFFECTNET[r["expression"]]
                self.records += recs

    def _from_csv(self, new: str, parts) -> None:
        old = first_existing([os.path.join(self.root, "fer2013.csv"),
                              os.path.join(self.root, "fer2013", "fer2013.csv")], FERPLUS_LAYOUT, "fer2013.csv")
        with open(old, newline="") as f:
            old_rows = list(csv.reader(f))
        with open(new, newline="") as f:
            new_rows = list(csv.reader(f))
        if old_rows[0][:3] != ["emotion", "pixels", "Usage"]:
            raise bad_line(old, 1, "header 'emotion,pixels,Usage'", ",".join(old_rows[0]))
        if len(new_rows[0]) != 12 or new_rows[0][:2] != ["Usage", "Image name"]:
            raise bad_line(new, 1, "header 'Usage,Image name,' + 10 emotion columns", ",".join(new_rows[0]))
        if len(old_rows) != len(new_rows):
            raise DatasetError(f"{new} has {len(new_rows) - 1} rows but {old} has {len(old_rows) - 1}; "
                               "they pair by position")
        for ln, (o, n) in enumerate(zip(old_rows[1:], new_rows[1:]), 2):
            if len(n) != 12:
                raise bad_line(new, ln, "12 fields (Usage, Image name, 10 counts)", ",".join(n))
            if not n[1].strip() or FERPLUS_USAGE.get(n[0]) not in parts:
                continue
            k = ferplus_majority(parse_floats(n[2:], new, ln, "vote counts"))
            if not 0 <= k < 7:
                continue
            px = o[1].split()
            if len(px) != 48 * 48:
                raise bad_line(old, ln, "2304 space-separated pixel values (48x48)", f"{len(px)} values")
            arr = np.array(parse_floats(px, old, ln, "pixels"), dtype=np.float64).reshape(48, 48)
            self.records.append({"array": array_to_image(arr.clip(0, 255)), "expression": FERPLUS_TO_AFFECTNET[k]})


# ------------------------------------------------------------------------------------------------ attributes
CELEBA_LAYOUT = """CelebA root (Google Drive layout, or the same files flat):
  Img/img_align_celeba/000001.jpg ...
  Anno/list_attr_celeba.txt         (count, 40 names, '<file> <40 x 1|-1>')
  Eval/list_eval_partition.txt      ('<file> <0|1|2>')"""


class CelebA(LabelledImages):
    task_type = "attributes"
    SPLITS = {"train": (0,), "val": (1,), "trainval": (0, 1), "train_val": (0, 1), "test": (2,)}

    def __init__(self, root, split, transform=None, skip_corrupt=False):
        super().__init__(root, split, transform, skip_corrupt)
        self.check_split(self.SPLITS)
        require(root, CELEBA_LAYOUT, "CelebA root")
        attr = first_existing([os.path.join(root, "Anno", "list_attr_celeba.txt"),
                               os.path.join(root, "list_attr_celeba.txt")], CELEBA_LAYOUT)
        part = first_existing([os.path.join(root, "Eval", "list_eval_partition.txt"),
                               os.path.join(root, "list_eval_partition.txt")], CELEBA_LAYOUT)
        imgs = first_existing([os.path.join(root, "Img", "img_align_celeba"), os.path.join(root, "img_align_celeba")],
                              CELEBA_LAYOUT, "image folder")
        groups = {}
        for ln, text in read_lines(part):
            tok = text.split()
            if len(tok) != 2 or tok[1] not in ("0", "1", "2"):
                raise bad_line(part, ln, "'<file> <0|1|2>'", text)
            groups[tok[0]] = int(tok[1])
        lines = read_lines(attr)
        if len(lines) < 2 or tuple(lines[1][1].split()) != CELEBA_ATTRIBUTES:
            raise DatasetError(f"{attr}:2: expected the 40 CelebA attribute names in the standard order")
        for ln, text in lines[2:]:
            tok = text.split()
            if len(tok) != 41 or any(t not in ("1", "-1") for t in tok[1:]):
                raise bad_line(attr, ln, "'<file>' and 40 values of 1 or -1", text)
            if tok[0] not in groups:
                raise DatasetError(f"{attr}:{ln}: {tok[0]} has no line in {part}")
            if groups[tok[0]] in self.SPLITS[split]:
                self.records.append({"path": os.path.join(imgs, tok[0]),
                                     "attributes": np.array([t == "1" for t in tok[1:]], np.int64)})


LFW73_LAYOUT = """LFW-73 root, one of:
  lfw_att_73.mat (AttrName, label, name) + indices_train_test.mat (indices_img_train/test, 1-based) + lfw/<path>
  lfw_attributes.txt (Kumar et al., tab-separated scores; split 'all') + lfw/<Name>/<Name>_<%04d>.jpg"""


class LFW73(LabelledImages):
    task_type = "attributes"

    def __init__(self, root, split, transform=None, skip_corrupt=False):
        super().__init__(root, split, transform, skip_corrupt)
        require(root, LFW73_LAYOUT, "LFW-73 root")
        mat_path = os.path.join(root, "lfw_att_73.mat")
        imgs = os.path.join(root, "lfw") if os.path.isdir(os.path.join(root, "lfw")) else root
        if not os.path.exists(mat_path):
            self.check_split(("all",))
            self._from_kumar(first_existing([os.path.join(root, "lfw_attributes.txt")], LFW73_LAYOUT), imgs)
            return
        self.check_split(("train", "test"))
        kind, mat = load_mat(mat_path, LFW73_LAYOUT)
        if kind == "h5":
            with mat:
                label = np.asarray(mat_field(kind, mat, "label", mat_path)).T
                names = [h5_string(mat, r) for r in np.asarray(mat_field(kind, mat, "name", mat_path)).ravel()]
                self.attr_names = [h5_string(mat, r) for r in np.asarray(mat["AttrName"]).ravel()] \
                    if "AttrName" in mat else []
        else:
            label = np.asarray(mat_field(kind, mat, "label", mat_path))
            names = [mat_string(x) for x in np.asarray(mat_field(kind, mat, "name", mat_path)).ravel()]
            self.attr_names = [mat_string(x) for x in np.asarray(mat.get("AttrName", np.zeros(0))).ravel()]
        if label.shape != (len(names), 73):
            raise DatasetError(f"{mat_path}: expected 'label' of shape (N, 73) for N={len(names)} names "
                               f"(h5py shows 73 x N), got {label.shape}")
        ind_path = os.path.join(root, "indices_train_test.mat")
        kind, ind = load_mat(ind_path, LFW73_LAYOUT)
        field = "indices_img_train" if split == "train" else "indices_img_test"
        idx = np.asarray(mat_field(kind, ind, field, ind_path)).ravel().astype(np.int64) - 1
        if kind == "h5":
            ind.close()
        if idx.size and (idx.min() < 0 or idx.max() >= len(names)):
            raise DatasetError(f"{ind_path}: {field} must hold 1-based indices in 1..{len(names)}")
        for i in idx:
            self.records.append({"path": os.path.join(imgs, *names[i].split("\\")),
                                 "attributes": (label[i] > 0).astype(np.int64)})

    def _from_kumar(self, path: str, imgs: str) -> None:
        lines = read_lines(path)
        header = next((t for _, t in lines if t.startswith("#") and "person" in t), None)
        if header is None:
            raise DatasetError(f"{path}: expected a '#person<TAB>imagenum<TAB>...' column line")
        cols = [c for c in header.lstrip("#").split("\t") if c.strip()]
        self.attr_names = cols[2:]
        for ln, text in lines:
            if text.startswith("#"):
                continue
            tok = text.split("\t")
            if len(tok) != len(cols) or not tok[1].strip().isdigit():
                raise bad_line(path, ln, f"{len(cols)} tab-separated fields (person, imagenum, scores)", text)
            person = tok[0].strip().replace(" ", "_")
            scores = parse_floats(tok[2:], path, ln, "attribute scores")
            self.records.append({"path": os.path.join(imgs, person, f"{person}_{int(tok[1]):04d}.jpg"),
                                 "attributes": (np.array(scores) > 0).astype(np.int64)})


# ------------------------------------------------------------------------------------------------ identity
MS1M_LAYOUT = """MS1MV3 folder:
  train.rec, train.idx     (MXNet RecordIO; record 0 = header [A, B] in insightface packs)
  property                 ('num_ids,112,112', optional)"""


class MS1MV3(FaceDataset):
    task_type = "recognition"

    def __init__(self, root, split, transform=None, skip_corrupt=False):
        super().__init__(root, split, transform, skip_corrupt)
        self.check_split(("train",))
        require(root, MS1M_LAYOUT, "MS1MV3 folder")
        self.reader = RecordIOReader(require(os.path.join(root, "train.rec"), MS1M_LAYOUT, "file"),
                                     require(os.path.join(root, "train.idx"), MS1M_LAYOUT, "file"))
        self.records = image_keys(self.reader)
        prop = os.path.join(root, "property")
        self.num_classes = None
        if os.path.exists(prop):
            first = read_lines(prop)[0][1].split(",")[0]
            self.num_classes = int(first) if first.strip().isdigit() else None

    def load(self, key):
        _, label, _, _, data = unpack_irheader(self.reader.read(key))
        return {"image": decode_image(data, f"{self.reader.rec_path} record {key}"), "identity": record_label(label)}
