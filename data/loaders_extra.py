"""Loaders for the task types beyond the paper other than head pose (see loaders_pose.py): gender and race from
UTKFace and FairFace, landmark visibility from COFW. Items (transform=None): `image` uint8 [3,H,W] plus
  UTKFace: `age` float, `gender` int (0 male, 1 female), `race` int (0..4: White, Black, Asian, Indian, Others);
  FairFace: `gender` int (same ids), `race` int (conventions.FAIRFACE_RACES order), `age_group` int
            (conventions.FAIRFACE_AGE_GROUPS order);
  COFW visibility: the COFW landmark item, whose `visible` int64 [29] (1 visible, 0 occluded) is the label.

Choices [ours]:
- UTKFace: gender and race are read from the file name `<age>_<gender>_<race>_<date&time>.jpg[.chip.jpg]`, in
  every layout the age loader accepts (its CSV lists name the files). A few real files lack a field; they are
  counted in `malformed` and skipped, or raise with `strict=True`. Split rule as for age (crc32 fold or the lists).
- FairFace publishes no test labels: split 'test' is the validation set (fairface_label_val.csv), on which papers
  report; 'val' names the same set.
"""
import csv
import os

from .conventions import FAIRFACE_AGE_GROUPS, FAIRFACE_GENDERS, FAIRFACE_RACES, UTKFACE_RACES
from .dataset_io import DatasetError, require
from .loaders_dense import COFW
from .loaders_global import UTK_NAME, LabelledImages, UTKFace


class UTKFaceDemographics(UTKFace):
    """UTKFace with `gender` and `race` from each file name (and `age` as the age loader reads it)."""

    task_type = "gender"
    task_types = ("gender", "race")           # one file-name layout labels both heads

    def __init__(self, root, split, transform=None, skip_corrupt=False, test_fold: int = 0, strict: bool = False):
        super().__init__(root, split, transform, skip_corrupt, test_fold)
        kept = []
        for rec in self.records:
            name = os.path.basename(rec["path"])
            m = UTK_NAME.match(name)
            if m is None or int(m.group(3)) >= len(UTKFACE_RACES):
                if strict:
                    raise DatasetError(f"{rec['path']}: UTKFace file name must read <age>_<gender 0|1>_<race 0-4>_"
                                       f"<date&time>.jpg[.chip.jpg], got {name!r}")
                self.malformed += 1
                continue
            kept.append({**rec, "gender": int(m.group(2)), "race": int(m.group(3))})
        self.records = kept


FAIRFACE_LAYOUT = """FairFace root:
  fairface_label_train.csv, fairface_label_val.csv   (header 'file,age,gender,race[,service_test]')
  train/1.jpg ..., val/1.jpg ...                     (the 'file' column, relative to the root)"""
FAIRFACE_HEADER = ("file", "age", "gender", "race")


class FairFace(LabelledImages):
    task_type = "race"
    task_types = ("gender", "race")           # one CSV labels both heads
    SPLITS = {"train": "train", "val": "val", "test": "val"}

    def __init__(self, root, split, transform=None, skip_corrupt=False):
        super().__init__(root, split, transform, skip_corrupt)
        self.check_split(self.SPLITS)
        require(root, FAIRFACE_LAYOUT, "FairFace root")
        path = require(os.path.join(root, f"fairface_label_{self.SPLITS[split]}.csv"), FAIRFACE_LAYOUT, "label file")
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
        if not rows or tuple(c.strip() for c in rows[0][:4]) != FAIRFACE_HEADER:
            raise DatasetError(f"{path}:1: expected header starting {','.join(FAIRFACE_HEADER)}, "
                               f"got {','.join(rows[0]) if rows else '<empty>'}")
        fields = (("age", FAIRFACE_AGE_GROUPS), ("gender", FAIRFACE_GENDERS), ("race", FAIRFACE_RACES))
        for ln, row in enumerate(rows[1:], 2):
            if not row:
                continue
            if len(row) < 4 or not row[0].strip():
                raise DatasetError(f"{path}:{ln}: expected 'file,age,gender,race', got {','.join(row)!r}")
            rec = {"path": os.path.join(root, *row[0].strip().split("/"))}
            for col, (key, names) in enumerate(fields, 1):
                value = row[col].strip()
                if value not in names:
                    raise DatasetError(f"{path}:{ln}: field {key!r} must be one of {list(names)}, got {value!r}")
                rec["age_group" if key == "age" else key] = names.index(value)
            self.records.append(rec)


class COFWVisibility(COFW):
    """COFW read by the landmark loader; its `visible` flags are the labels of the visibility task."""

    task_type = "visibility"
