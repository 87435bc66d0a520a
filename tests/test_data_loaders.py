"""Every loader of data.build_dataset reads its native-format fixture (tests/fixtures.py) and returns exactly the
labels the fixture wrote; bad input fails with errors that name the file and line or list the layout."""
import os

import numpy as np
import pytest
import torch

import data
from data.conventions import CELEBAMASK_CLASSES, CELEBAMASK_PARTS, FERPLUS_TO_AFFECTNET, RAFDB_TO_AFFECTNET
from tests import fixtures as fx

try:
    import h5py  # noqa: F401
    HAVE_H5PY = True
except ImportError:
    HAVE_H5PY = False
needs_h5py = pytest.mark.skipif(not HAVE_H5PY, reason="h5py (optional) is not installed: MATLAB v7.3 files need it")


def _close(a, b, tol=1e-4):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = (a - b).abs()
    assert diff.max() <= tol, f"max diff {diff.max():.3g}, mean {diff.mean():.3g}"


# ------------------------------------------------------------------------------------------------ landmarks
def test_300w_native_splits_and_pts_convention(tmp_path):
    want = fx.write_300w(str(tmp_path))
    expect = {"train": ["afw", "helen/trainset", "lfpw/trainset"], "common": ["helen/testset", "lfpw/testset"],
              "challenge": ["ibug"], "full": ["helen/testset", "lfpw/testset", "ibug"],
              "test": ["01_Indoor", "02_Outdoor"]}
    for split, folders in expect.items():
        ds = data.build_dataset("300w", str(tmp_path), split)
        keys = [k for k in want if k.rsplit("/", 1)[0] in folders]
        assert len(ds) == len(keys), split
        got = {os.path.relpath(r["path"], tmp_path).replace(os.sep, "/"): r for r in ds.records}
        for k in keys:
            _close(got[k]["landmarks"], want[k], 1e-6)             # .pts is 1-based: loader subtracts 1
    item = data.build_dataset("300w", str(tmp_path), "challenge")[0]   # "image_092 _01.jpg" (with a space)
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 24, 20)
    lm = want["ibug/image_092 _01.jpg"]
    _close(item["box"], [lm[:, 0].min(), lm[:, 1].min(), lm[:, 0].max(), lm[:, 1].max()], 1e-4)
    png = data.build_dataset("300w", str(tmp_path), "test")[0]["image"]   # lossless png round trip
    from PIL import Image
    ref = np.array(Image.open(os.path.join(tmp_path, "01_Indoor", "indoor_001.png")))
    assert torch.equal(png, torch.from_numpy(ref).permute(2, 0, 1))
    assert len(data.build_dataset("300w", str(tmp_path), "valid_challenge")) == 1     # Faceptor's split name


def test_300w_hrnet_csv_subtracts_two(tmp_path):
    want = fx.write_300w_csv(str(tmp_path))
    for split, rows in want.items():
        ds = data.build_dataset("300w", str(tmp_path), split)
        assert len(ds) == len(rows)
        for i, (name, lm, (cx, cy)) in enumerate(rows):
            item = ds[i] if i == 0 else None
            _close(ds.records[i]["landmarks"], lm, 1e-6)
            _close(ds.records[i]["box"], [cx - 10, cy - 10, cx + 10, cy + 10], 1e-3)   # half = 100 * scale
            if item is not None:
                assert item["landmarks"].shape == (68, 2)


def test_wflw_native_and_subsets(tmp_path):
    want = fx.write_wflw(str(tmp_path))
    ds = data.build_dataset("wflw", str(tmp_path), "test")
    assert len(ds) == 3
    for i, (path, lm, rect, flags) in enumerate(want["test"]):
        item = ds[i]
        _close(item["landmarks"], lm, 1e-3)
        _close(item["box"], rect, 0)
        assert item["flags"].tolist() == flags
    names = ("largepose", "expression", "illumination", "makeup", "occlusion", "blur")
    for k, sub in enumerate(names):
        got = data.build_dataset("wflw", str(tmp_path), "test_" + sub)
        assert len(got) == sum(f[k] for _, _, _, f in want["test"]), sub
    assert len(data.build_dataset("wflw", str(tmp_path), "train")) == 2


@needs_h5py
def test_cofw_v73_hdf5(tmp_path):
    imgs, phis = fx.write_cofw_v73(str(tmp_path), "train")
    ds = data.build_dataset("cofw", str(tmp_path), "train")
    assert len(ds) == len(imgs)
    for i, (im, phi) in enumerate(zip(imgs, phis)):
        item = ds[i]
        ref = np.repeat(im[:, :, None], 3, 2) if im.ndim == 2 else im       # grey -> 3 channels
        assert torch.equal(item["image"], torch.from_numpy(ref).permute(2, 0, 1))
        _close(item["landmarks"], np.stack([phi[:29], phi[29:58]], 1), 1e-5)   # not interleaved
        assert item["visible"].tolist() == (1 - phi[58:]).astype(int).tolist()


def test_cofw_v5_scipy_and_box_rule(tmp_path):
    imgs, phis = fx.write_cofw_v5(str(tmp_path), "test")
    ds = data.build_dataset("cofw", str(tmp_path), "test")
    item = ds[1]
    assert torch.equal(item["image"][0], torch.from_numpy(imgs[1]))
    lm = np.stack([phis[1, :29], phis[1, 29:58]], 1)
    _close(item["landmarks"], lm, 1e-5)
    x0, y0 = np.floor(lm[:, 0].min()), np.floor(lm[:, 1].min())
    x1, y1 = np.ceil(lm[:, 0].max()), np.ceil(lm[:, 1].max())
    half = max(x1 - x0, y1 - y0) / 2
    _close(item["box"], [(x0 + x1) / 2 - half, (y0 + y1) / 2 - half, (x0 + x1) / 2 + half, (y0 + y1) / 2 + half])


def test_aflw19_split_rule_box_and_visibility(tmp_path):
    names, dat, bbox, mask, ra = fx.write_aflw(str(tmp_path))
    order = ra - 1
    train = data.build_dataset("aflw19", str(tmp_path), "train", n_train=4)
    test = data.build_dataset("aflw19", str(tmp_path), "test", n_train=4)
    frontal = data.build_dataset("aflw19", str(tmp_path), "frontal", n_train=4)
    assert [r["path"] for r in train.records] == [os.path.join(str(tmp_path), "data", "flickr", names[i])
                                                  for i in order[:4]]
    assert len(test) == 2
    assert len(frontal) == sum(mask[i].all() for i in order[4:])
    i = order[0]
    item = train[0]
    _close(item["landmarks"], dat[i].reshape(2, 19).T, 1e-5)
    left, right, top, bottom = bbox[i]
    _close(item["box"], [left, top, right, bottom], 0)
    assert item["visible"].tolist() == mask[i].astype(int).tolist()


# ------------------------------------------------------------------------------------------------ parsing
def test_celebamask_paints_in_farl_order(tmp_path):
    splits, labels = fx.write_celebamask(str(tmp_path))
    assert CELEBAMASK_CLASSES[CELEBAMASK_PARTS["eye_g"]] == "glass" and CELEBAMASK_PARTS["neck"] == 1
    for split, idx in splits.items():
        ds = data.build_dataset("celebamask_hq", str(tmp_path), split)
        assert [r["idx"] for r in ds.records] == idx, split
    ds = data.build_dataset("celebamask_hq", str(tmp_path), "train_val")
    assert sorted(r["idx"] for r in ds.records) == [0, 1, 3]
    item = data.build_dataset("celebamask_hq", str(tmp_path), "train")[0]
    assert item["image"].shape == (3, 32, 32)                       # resized to the mask size
    assert torch.equal(item["mask"], torch.from_numpy(labels[0]))
    # overlap: glasses (15) over the left eye (8), upper lip (13) over the inner mouth (11), cloth (3) over neck (1)
    assert item["mask"][13, 10] == 15 and item["mask"][20, 14] == 13 and item["mask"][30, 15] == 3


def test_lapa_labels_and_landmarks(tmp_path):
    want = fx.write_lapa(str(tmp_path))
    ds = data.build_dataset("lapa", str(tmp_path), "train_val")
    assert len(ds) == 3
    for i, (name, lab, lm) in enumerate(want["train"] + want["val"]):
        item = ds[i]
        assert torch.equal(item["mask"], torch.from_numpy(lab.astype(np.int64)))
        _close(item["landmarks"], lm, 1e-2)
    assert len(data.build_dataset("lapa", str(tmp_path), "test")) == 1


# ------------------------------------------------------------------------------------------------ age
def test_morph_faceptor_lists_and_native_names(tmp_path):
    split = fx.write_morph(str(tmp_path / "a"))
    ds = data.build_dataset("morph2", str(tmp_path / "a"), "train")
    assert [(os.path.basename(r["path"]), r["age"]) for r in ds.records] == \
        [(n, fx.MORPH_NAMES[n]) for n in split["train"]]
    fx.write_morph(str(tmp_path / "b"), layout="native")
    tr = data.build_dataset("morph2", str(tmp_path / "b"), "train")
    te = data.build_dataset("morph2", str(tmp_path / "b"), "test")
    got = {os.path.basename(r["path"]): r["age"] for r in tr.records + te.records}
    assert got == fx.MORPH_NAMES                                     # ages parsed from the file names
    assert isinstance(tr[0]["age"], float) if len(tr) else True


def test_utkface_csv_and_native(tmp_path):
    split = fx.write_utk(str(tmp_path / "a"))
    ds = data.build_dataset("utkface", str(tmp_path / "a"), "train")
    assert [os.path.basename(r["path"]) for r in ds.records] == [n + ".chip.jpg" for n in split["train"]]
    assert [r["age"] for r in ds.records] == [fx.UTK_NAMES[n] for n in split["train"]]
    assert ds[0]["image"].shape == (3, 24, 20)
    fx.write_utk(str(tmp_path / "b"), layout="native")
    tr = data.build_dataset("utkface", str(tmp_path / "b"), "train")
    te = data.build_dataset("utkface", str(tmp_path / "b"), "test")
    assert tr.malformed == 1                                         # the file without a race field
    got = {os.path.basename(r["path"])[:-9]: r["age"] for r in tr.records + te.records}
    assert got == fx.UTK_NAMES


# ------------------------------------------------------------------------------------------------ expression
def test_affectnet_native_drops_non_basic(tmp_path):
    want = fx.write_affectnet(str(tmp_path))
    for split in ("train", "test"):
        ds = data.build_dataset("affectnet", str(tmp_path), split)
        assert len(ds) == len(want[split])
        for i, (path, e, box, lm) in enumerate(want[split]):
            item = ds[i]
            assert item["expression"] == e
            _close(item["box"], box, 0)
            _close(item["landmarks"], lm, 1e-2)


def test_rafdb_remap_to_affectnet_order(tmp_path):
    lines = fx.write_rafdb(str(tmp_path))
    assert RAFDB_TO_AFFECTNET == {1: 3, 2: 4, 3: 5, 4: 1, 5: 2, 6: 6, 7: 0}
    for split in ("train", "test"):
        ds = data.build_dataset("rafdb", str(tmp_path), split)
        want = [(n, RAFDB_TO_AFFECTNET[l]) for n, l in lines if n.startswith(split)]
        assert [e["expression"] for e in (ds[i] for i in range(len(ds)))] == [w[1] for w in want]
        assert all(r["path"].endswith("_aligned.jpg") for r in ds.records)
    # names: Surprise (RAF 1) -> 3, Neutral (RAF 7) -> 0 in data.EXPRESSIONS
    assert data.EXPRESSIONS[RAFDB_TO_AFFECTNET[1]] == "surprise"
    assert data.EXPRESSIONS[RAFDB_TO_AFFECTNET[7]] == "neutral"


def test_ferplus_majority_and_remap(tmp_path):
    want = fx.write_ferplus(str(tmp_path))
    assert FERPLUS_TO_AFFECTNET[2] == 3 and data.EXPRESSIONS[FERPLUS_TO_AFFECTNET[4]] == "anger"
    for split, usage in (("train", "Training"), ("val", "PublicTest"), ("test", "PrivateTest")):
        ds = data.build_dataset("ferplus", str(tmp_path), split)
        assert len(ds) == len(want.get(usage, [])), split
        for i, (px, lab) in enumerate(want.get(usage, [])):
            item = ds[i]
            assert item["expression"] == FERPLUS_TO_AFFECTNET[lab]
            assert torch.equal(item["image"], torch.from_numpy(px)[None].expand(3, 48, 48))
    assert len(data.build_dataset("ferplus", str(tmp_path), "train_val")) == 3


# ------------------------------------------------------------------------------------------------ attributes
@pytest.mark.parametrize("flat", [False, True])
def test_celeba_lists_to_01(tmp_path, flat):
    names, attrs, groups = fx.write_celeba(str(tmp_path), flat=flat)
    for split, gs in (("train", (0,)), ("val", (1,)), ("trainval", (0, 1)), ("test", (2,))):
        ds = data.build_dataset("celeba", str(tmp_path), split)
        idx = [i for i, g in enumerate(groups) if g in gs]
        assert [os.path.basename(r["path"]) for r in ds.records] == [names[i] for i in idx]
        for j, i in enumerate(idx):
            assert ds[j]["attributes"].tolist() == attrs[i].tolist()


@pytest.mark.parametrize("v73", [False, pytest.param(True, marks=needs_h5py)])
def test_lfw73_lfwa_plus(tmp_path, v73):
    paths, label, train, test = fx.write_lfw73(str(tmp_path), v73=v73)
    for split, idx in (("train", train), ("test", test)):
        ds = data.build_dataset("lfw73", str(tmp_path), split)
        assert [r["path"] for r in ds.records] == [paths[i] for i in idx]
        assert ds[0]["attributes"].tolist() == label[idx[0]].tolist()
        assert ds[0]["attributes"].shape == (73,)


def test_lfw73_kumar_scores(tmp_path):
    from tests.fixtures import _write, save_image
    cols = ["person", "imagenum", "Male", "Asian", "Smiling"]
    _write(os.path.join(tmp_path, "lfw_attributes.txt"), "# comment line\n#" + "\t".join(cols) + "\n"
           "Aaron Eckhart\t1\t1.5\t-0.3\t0.2\nZoe Ball\t2\t-1.0\t0.7\t-2.0\n")
    rng = np.random.default_rng(0)
    for p in ("Aaron_Eckhart/Aaron_Eckhart_0001.jpg", "Zoe_Ball/Zoe_Ball_0002.jpg"):
        save_image(os.path.join(tmp_path, "lfw", p), fx._img(rng))
    ds = data.build_dataset("lfw73", str(tmp_path), "all")
    assert [ds[i]["attributes"].tolist() for i in range(2)] == [[1, 0, 1], [0, 1, 0]]
    assert ds.records[1]["path"].endswith(os.path.join("Zoe_Ball", "Zoe_Ball_0002.jpg"))


# ------------------------------------------------------------------------------------------------ identity
@pytest.mark.parametrize("header", [True, False])
def test_ms1mv3_recordio_identities(tmp_path, header):
    images = fx.write_ms1m(str(tmp_path), header=header)
    ds = data.build_dataset("ms1mv3", str(tmp_path), "train")
    if header:
        assert ds.records == [k for k, _, _ in images]               # identity records are not images
    for j, (key, ident, arr) in enumerate(images):
        item = ds[ds.records.index(key)]
        assert item["identity"] == ident                             # scalar and vector labels
        assert item["image"].shape == (3, 16, 16)
        assert torch.equal(item["image"], torch.from_numpy(arr.copy()).permute(2, 0, 1))   # same JPEG bytes
    assert ds.num_classes == 3


# ------------------------------------------------------------------------------------------------ errors
def test_missing_root_lists_layout(tmp_path):
    for name in data.DATASETS:
        with pytest.raises(data.DatasetError) as e:
            data.build_dataset(name, str(tmp_path / "nope"), data.DATASETS[name][1][0])
        assert "nope" in str(e.value) and "expected layout" in str(e.value), name
    with pytest.raises(data.DatasetError, match="unknown dataset"):
        data.build_dataset("imagenet", str(tmp_path), "train")


def test_malformed_lines_name_file_and_line(tmp_path):
    fx.write_300w(str(tmp_path / "w"))
    pts = tmp_path / "w" / "afw" / "222_1.pts"
    lines = pts.read_text().splitlines()
    lines[10] = "12.0 abc"
    pts.write_text("\n".join(lines) + "\n")
    with pytest.raises(data.DatasetError, match=r"222_1\.pts:11"):
        data.build_dataset("300w", str(tmp_path / "w"), "train")
    fx.write_celeba(str(tmp_path / "c"))
    attr = tmp_path / "c" / "Anno" / "list_attr_celeba.txt"
    text = attr.read_text().splitlines()
    text[3] = text[3].rsplit(" ", 1)[0] + " 2"
    attr.write_text("\n".join(text) + "\n")
    with pytest.raises(data.DatasetError, match=r"list_attr_celeba\.txt:4"):
        data.build_dataset("celeba", str(tmp_path / "c"), "train")
    fx.write_wflw(str(tmp_path / "f"))
    ann = tmp_path / "f" / "WFLW_annotations" / "list_98pt_rect_attr_train_test" / "list_98pt_rect_attr_train.txt"
    ann.write_text(ann.read_text().splitlines()[0] + "\n1 2 3\n")
    with pytest.raises(data.DatasetError, match=r"list_98pt_rect_attr_train\.txt:2"):
        data.build_dataset("wflw", str(tmp_path / "f"), "train")


def test_corrupt_image_error_or_counted_skip(tmp_path):
    fx.write_rafdb(str(tmp_path))
    bad = tmp_path / "Image" / "aligned" / "train_00002_aligned.jpg"
    bad.write_bytes(bad.read_bytes()[:60])                          # truncated JPEG
    ds = data.build_dataset("rafdb", str(tmp_path), "train")
    with pytest.raises(data.DatasetError, match="train_00002_aligned.jpg"):
        ds[1]
    ds = data.build_dataset("rafdb", str(tmp_path), "train", skip_corrupt=True)
    item = ds[1]
    assert ds.skipped == 1 and item["expression"] == RAFDB_TO_AFFECTNET[7]   # the next record
    (tmp_path / "Image" / "aligned" / "train_00001_aligned.jpg").write_bytes(b"not an image")
    with pytest.raises(data.DatasetError, match="train_00001_aligned.jpg"):
        data.build_dataset("rafdb", str(tmp_path), "train")[0]


def test_unknown_split_is_refused(tmp_path):
    fx.write_celeba(str(tmp_path))
    with pytest.raises(data.DatasetError, match="unknown split 'dev'"):
        data.build_dataset("celeba", str(tmp_path), "dev")


def test_missing_h5py_message(tmp_path, monkeypatch):
    import builtins
    (tmp_path / "COFW_train_color.mat").write_bytes(b"MATLAB 7.3".ljust(512, b" ") + b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "h5py":
            raise ImportError("no h5py")
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(data.DatasetError, match="needs the optional package h5py"):
        data.build_dataset("cofw", str(tmp_path), "train")


# ------------------------------------------------------------------------------------------------ converted layouts
def test_wflw_hrnet_csv_has_no_offset(tmp_path):
    rng = np.random.default_rng(0)
    lm = fx._points(rng, 98)
    fx.save_image(os.path.join(tmp_path, "data", "a", "x.jpg"), fx._img(rng))
    header = "image_name,scale,center_w,center_h," + ",".join(f"p{i}" for i in range(196))
    fx._write(os.path.join(tmp_path, "face_landmarks_wflw_test_blur.csv"),
              header + "\na/x.jpg,0.5,10,12," + ",".join(f"{v:.3f}" for v in lm.ravel()) + "\n")
    item = data.build_dataset("wflw", str(tmp_path), "test_blur")[0]
    _close(item["landmarks"], lm, 1e-3)
    _close(item["box"], [-40, -38, 60, 62], 1e-6)


def test_faceptor_label_files(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("train_1.jpg", "test_1.jpg", "train_2.jpg"):
        fx.save_image(os.path.join(tmp_path, "raf", "data", name), fx._img(rng))
    fx._write(os.path.join(tmp_path, "raf", "label.txt"), "train_1.jpg 1\ntest_1.jpg 7\ntrain_2.jpg 4\n")
    ds = data.build_dataset("rafdb", str(tmp_path / "raf"), "train")
    assert [ds[i]["expression"] for i in range(2)] == [3, 1]            # surprise, happiness
    fx.save_image(os.path.join(tmp_path, "aff", "data", "1", "a.jpg"), fx._img(rng))
    fx._write(os.path.join(tmp_path, "aff", "label", "train.txt"), "1/a.jpg 6\n1/b.jpg 7\n")
    ds = data.build_dataset("affectnet", str(tmp_path / "aff"), "train")
    assert len(ds) == 1 and ds[0]["expression"] == 6                    # contempt (7) dropped
    fx.save_image(os.path.join(tmp_path, "fer", "FER2013Valid", "fer1.png"), fx._img(rng, 48, 48))
    fx.save_image(os.path.join(tmp_path, "fer", "FER2013Valid", "fer2.png"), fx._img(rng, 48, 48))
    fx._write(os.path.join(tmp_path, "fer", "FER2013Valid", "label.csv"),
              "fer1.png,0,0,0,0,0,0,10,0,0,0\nfer2.png,0,0,0,0,0,0,0,10,0,0\n")
    ds = data.build_dataset("ferplus", str(tmp_path / "fer"), "val")
    assert len(ds) == 1 and ds[0]["expression"] == 4                    # FER+ fear (6) -> AffectNet 4
