"""Loaders of the task types beyond the paper read fixtures written in their native formats (tests/fixtures_extra.py)
and return what was written; bad input names the file, the field and what was expected."""
import math
import os

import numpy as np
import pytest
import torch

import data
from data.composer import collate
from data.conventions import FAIRFACE_AGE_GROUPS, FAIRFACE_RACES
from data.loaders_pose import flip_pose
from tests.fixtures_extra import (FAIRFACE_ROWS, UTK_MALFORMED, write_300wlp, write_aflw2000, write_cofw_flags,
                                  write_fairface, write_utk_demographics)


def _by_path(ds):
    return {rec["path"]: ds.raw(i) for i, rec in enumerate(ds.records)}


# -- head pose -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("parent", [True, False])
def test_300wlp_reads_pose_in_degrees_yaw_pitch_roll(tmp_path, parent):
    written = write_300wlp(str(tmp_path), parent=parent)
    ds = data.build_dataset("300wlp", str(tmp_path), "train")   # root = 300W_LP or its parent
    got = _by_path(ds)
    assert sorted(got) == sorted(written)
    for path, (pose, pts) in written.items():
        item = got[path]
        np.testing.assert_allclose(item["pose"].numpy(), pose, atol=1e-4)
        np.testing.assert_allclose(item["landmarks"].numpy(), pts, atol=1e-4)
        np.testing.assert_allclose(item["box"].numpy(), [pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(),
                                                         pts[:, 1].max()], atol=1e-4)
        assert item["image"].shape == (3, 40, 36) and item["image"].dtype == torch.uint8
    no_flip = data.build_dataset("300wlp", str(tmp_path), "train", flipped=False)
    assert len(no_flip) == 2 and not any("_Flip" in r["path"] for r in no_flip.records)


def test_300wlp_mirrored_copy_has_yaw_and_roll_negated(tmp_path):
    """The dataset's own *_Flip copies follow the flip rule that flip_pose applies."""
    write_300wlp(str(tmp_path))
    got = {os.path.basename(os.path.dirname(p)): it for p, it in _by_path(data.build_dataset("300wlp", str(tmp_path),
                                                                                             "train")).items()}
    flipped = flip_pose(got["AFW"])
    np.testing.assert_allclose(flipped["pose"].numpy(), got["AFW_Flip"]["pose"].numpy(), atol=1e-4)
    assert torch.equal(flipped["image"], got["AFW"]["image"].flip(-1))
    assert torch.equal(flip_pose(flipped)["pose"], got["AFW"]["pose"])


def test_aflw2000_filters_beyond_99_degrees_and_reads_pt3d(tmp_path):
    written = write_aflw2000(str(tmp_path))
    ds = data.build_dataset("aflw2000", str(tmp_path), "test")
    assert len(ds) == 2 and ds.dropped == 1
    every = data.build_dataset("aflw2000", str(tmp_path), "test", max_angle=None)
    assert len(every) == 3
    got = _by_path(every)
    for path, (pose, pts) in written.items():
        np.testing.assert_allclose(got[path]["pose"].numpy(), pose, atol=1e-4)
        np.testing.assert_allclose(got[path]["landmarks"].numpy(), pts, atol=1e-4)     # pt3d_68, not pt2d


def test_pose_errors_name_file_and_field(tmp_path):
    import scipy.io
    write_aflw2000(str(tmp_path))
    mat = os.path.join(str(tmp_path), "AFLW2000", "image00002.mat")
    scipy.io.savemat(mat, {"Pose_Para": np.zeros((1, 2)), "pt3d_68": np.zeros((3, 68))})
    with pytest.raises(data.DatasetError, match=r"image00002\.mat.*'Pose_Para'.*at least 3"):
        data.build_dataset("aflw2000", str(tmp_path), "test")
    scipy.io.savemat(mat, {"pt3d_68": np.zeros((3, 68))})
    with pytest.raises(data.DatasetError, match=r"image00002\.mat.*'Pose_Para' not found"):
        data.build_dataset("aflw2000", str(tmp_path), "test")
    scipy.io.savemat(mat, {"Pose_Para": np.zeros((1, 7)), "pt3d_68": np.zeros((68, 3))})
    with pytest.raises(data.DatasetError, match=r"image00002\.mat.*'pt3d_68' must be \[3, K\]"):
        data.build_dataset("aflw2000", str(tmp_path), "test")
    with pytest.raises(data.DatasetError, match="no 300W-LP folder"):
        data.build_dataset("300wlp", str(tmp_path), "train")
    with pytest.raises(data.DatasetError, match="unknown split"):
        data.build_dataset("300wlp", str(tmp_path), "test")


def test_pose_transform_crops_the_box():
    """Eval crop: the box's colour fills the centre, the outside colour the corners (margin 0.2 each side)."""
    img = torch.zeros(3, 100, 120, dtype=torch.uint8)
    img[2] = 255                                                        # blue outside
    img[:, 30:70, 40:80] = torch.tensor([255, 0, 0], dtype=torch.uint8)[:, None, None]   # red box 40 x 40
    item = {"image": img, "pose": torch.tensor([10.0, -5.0, 3.0]), "box": torch.tensor([40.0, 30.0, 79.0, 69.0])}
    out = data.PoseTransform(112, train=False)(item, torch.Generator().manual_seed(0))
    assert set(out) == {"image", "pose"} and out["image"].shape == (3, 112, 112)
    assert out["image"][:, 56, 56].tolist() == [255, 0, 0]
    assert out["image"][:, 3, 3].tolist() == [0, 0, 255]
    side = 1.4 * 39                                                      # (1 + 2 * 0.2) * box width (centres)
    edge = (side - 40) / 2 * 112 / side                                  # red starts here in the crop (pixels)
    assert out["image"][0, 56, int(edge) + 2] == 255 and out["image"][0, 56, int(edge) - 2] == 0
    assert torch.equal(out["pose"], item["pose"])


def test_pose_transform_train_flips_labels_with_image():
    img = torch.zeros(3, 64, 64, dtype=torch.uint8)
    img[0, :, :20] = 255                                                 # red on the left
    item = {"image": img, "pose": torch.tensor([10.0, -5.0, 3.0]), "box": torch.tensor([8.0, 8.0, 55.0, 55.0])}
    t = data.PoseTransform(32, train=True, erasing=0.0)
    seen = set()
    for seed in range(20):
        out = t(item, torch.Generator().manual_seed(seed))
        left_red = out["image"][0, :, :8].float().mean() > out["image"][0, :, -8:].float().mean()
        expected = [10.0, -5.0, 3.0] if left_red else [-10.0, -5.0, -3.0]
        assert out["pose"].tolist() == expected
        seen.add(bool(left_red))
    assert seen == {True, False}


# -- gender and race -----------------------------------------------------------------------------------------------

def test_utkface_gender_race_from_file_names(tmp_path):
    written = write_utk_demographics(str(tmp_path))
    got = {}
    for split in ("train", "test"):
        ds = data.build_dataset("utkface_race", str(tmp_path), split)
        assert ds.malformed >= 1                   # the name without a race field, seen in either fold
        for i, rec in enumerate(ds.records):
            item = ds.raw(i)
            got[os.path.basename(rec["path"])[:-len(".chip.jpg")]] = (item["age"], item["gender"], item["race"])
    assert got == {k: (float(a), g, r) for k, (a, g, r) in written.items()}      # malformed names left out
    assert not set(UTK_MALFORMED) & set(got)
    errors = []
    for split in ("train", "test"):                # the race-7 name lies in one of the two folds
        try:
            data.UTKFaceDemographics(str(tmp_path), split, strict=True)
        except data.DatasetError as e:
            errors.append(str(e))
    assert len(errors) == 1 and "30_0_7_20170109142408076.jpg" in errors[0] and "<race 0-4>" in errors[0]


def test_utkface_gender_race_in_the_csv_list_layout(tmp_path):
    """label/{train,test}.csv + data/<name>.chip.jpg: the lists name the files, the names carry the labels."""
    names = list(write_utk_demographics(str(tmp_path / "src")).items())
    os.makedirs(tmp_path / "label")
    for split, part in (("train", names[:4]), ("test", names[4:])):
        with open(tmp_path / "label" / f"{split}.csv", "w") as f:
            f.write(",filename,age,database\n" + "".join(f"{i},{n},{a},utk\n" for i, (n, (a, _, _)) in enumerate(part)))
        for n, _ in part:
            os.renames(tmp_path / "src" / "UTKFace" / (n + ".chip.jpg"), tmp_path / "data" / (n + ".chip.jpg"))
    for split, part in (("train", names[:4]), ("test", names[4:])):
        ds = data.build_dataset("utkface_gender", str(tmp_path), split)
        got = [(ds.raw(i)["age"], ds.raw(i)["gender"], ds.raw(i)["race"]) for i in range(len(ds))]
        assert got == [(float(a), g, r) for _, (a, g, r) in part]


def test_fairface_reads_csv_labels(tmp_path):
    write_fairface(str(tmp_path))
    for split, part in (("train", "train"), ("val", "val"), ("test", "val")):
        ds = data.build_dataset("fairface_race", str(tmp_path), split)
        assert len(ds) == len(FAIRFACE_ROWS[part])
        for i, (file, age, gender, race, _) in enumerate(FAIRFACE_ROWS[part]):
            item = ds.raw(i)
            assert ds.records[i]["path"] == os.path.join(str(tmp_path), *file.split("/"))
            assert item["race"] == FAIRFACE_RACES.index(race)
            assert item["gender"] == ("Male", "Female").index(gender)
            assert item["age_group"] == FAIRFACE_AGE_GROUPS.index(age)
            assert item["image"].shape == (3, 40, 36)


def test_fairface_older_header_without_service_test(tmp_path):
    write_fairface(str(tmp_path), header="file,age,gender,race")
    assert len(data.build_dataset("fairface_gender", str(tmp_path), "train")) == 3


@pytest.mark.parametrize("kw,match", [
    ({"header": "name,age,sex,race"}, r"fairface_label_train\.csv:1: expected header starting file,age,gender,race"),
    ({"bad_row": "val/2.jpg,20-29,Female,Martian,True"}, r"fairface_label_val\.csv:3: field 'race' must be one of"),
    ({"bad_row": "val/2.jpg,20-29,F,Black,True"}, r"fairface_label_val\.csv:3: field 'gender' must be one of"),
    ({"bad_row": "val/2.jpg,21,Female,Black,True"}, r"fairface_label_val\.csv:3: field 'age' must be one of"),
])
def test_fairface_errors(tmp_path, kw, match):
    write_fairface(str(tmp_path), **kw)
    with pytest.raises(data.DatasetError, match=match):
        data.build_dataset("fairface_race", str(tmp_path), "train" if "header" in kw else "val")


# -- landmark visibility -------------------------------------------------------------------------------------------

def test_cofw_visibility_labels_are_one_minus_occlusion_flags(tmp_path):
    flags = write_cofw_flags(str(tmp_path))
    ds = data.build_dataset("cofw_visibility", str(tmp_path), "test")
    assert ds.task_type == "visibility" and len(ds) == len(flags)
    for i in range(len(ds)):
        assert ds.raw(i)["visible"].tolist() == (1 - flags[i]).tolist()


# -- every new dataset through its default transform and the collate function --------------------------------------

@pytest.mark.parametrize("name,split,writer,keys", [
    ("300wlp", "train", write_300wlp, {"pose": (3,)}),
    ("aflw2000", "test", write_aflw2000, {"pose": (3,)}),
    ("cofw_visibility", "test", write_cofw_flags, {"visible": (29,), "landmarks": (29, 2)}),
    ("utkface_gender", "train", write_utk_demographics, {"gender": (), "race": ()}),
    ("fairface_race", "train", write_fairface, {"gender": (), "race": ()}),
])
@pytest.mark.parametrize("train", [True, False])
def test_default_transform_and_collate(tmp_path, name, split, writer, keys, train):
    writer(str(tmp_path))
    size = 64 if data.DATASETS[name][2] == "visibility" else 32
    ds = data.build_dataset(name, str(tmp_path), split, transform=data.default_transform(name, train, size=size))
    group = data.input_group(data.DATASETS[name][2])
    batch = collate([ds[i] for i in range(len(ds))], group, name)
    assert batch["image"].shape == (len(ds), 3, size, size) and batch["image"].dtype == torch.float32
    for k, shape in keys.items():
        assert tuple(batch[k].shape) == (len(ds),) + shape, k


# -- the pose convention -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pose,direction", [
    ((30.0, 0.0, 0.0), (-0.5, 0.0)),            # yaw > 0: the nose points to image left (the subject's right)
    ((-30.0, 0.0, 0.0), (0.5, 0.0)),
    ((0.0, 30.0, 0.0), (0.0, -0.5)),            # pitch > 0: looking up (image y points down)
    ((0.0, 0.0, 40.0), (0.0, 0.0)),             # roll alone keeps the nose on the viewing axis
])
def test_nose_direction_follows_the_stated_convention(pose, direction):
    np.testing.assert_allclose(data.nose_direction(pose), direction, atol=1e-12)


def test_roll_turns_clockwise_and_flip_rule_matches_the_rotation():
    r = data.pose_rotation((0.0, 0.0, 30.0)) @ np.array([1.0, 0.0, 0.0])     # ear-to-ear axis, y up
    np.testing.assert_allclose(r, [math.cos(math.pi / 6), -0.5, 0.0], atol=1e-12)  # goes down on the right
    mirror = np.diag([-1.0, 1.0, 1.0])                                         # left-right flip of the 3D frame
    for pose in ((25.0, -10.0, 7.0), (-60.0, 35.0, -20.0)):
        flipped = flip_pose({"image": torch.zeros(3, 2, 2), "pose": torch.tensor(pose)})["pose"].tolist()
        np.testing.assert_allclose(mirror @ data.pose_rotation(pose) @ mirror, data.pose_rotation(flipped), atol=1e-6)


def test_input_groups_of_new_types():
    assert data.input_group("visibility") == "dense"
    assert {data.input_group(t) for t in ("pose", "gender", "race")} == {"global"}
