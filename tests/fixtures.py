"""Fixture writers: tiny copies of every dataset in its native format (the layouts the loaders document), written from
scratch by the tests. Each writer returns the labels it wrote, in the loader's output conventions (0-based
pixel coordinates, AffectNet expression ids, 1/0 attributes), so tests compare loader output to them.
"""
import io
import os
import pickle
import struct

import numpy as np
from PIL import Image

from data.conventions import CELEBA_ATTRIBUTES, CELEBAMASK_PARTS
from data.recordio import pack_irheader, write_recordio

RNG_SEED = 1234


def _img(rng, h=24, w=20):
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def save_image(path, arr, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return arr


def jpeg_bytes(arr, quality=95):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _write(path, text, newline="\n"):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        f.write(text.replace("\n", newline))


def _points(rng, k, h=24, w=20):
    return np.round(np.stack([rng.uniform(0, w - 1, k), rng.uniform(0, h - 1, k)], 1), 3)


# ------------------------------------------------------------------------------------------------ landmarks
W300_FILES = {"afw": ["111_1.jpg", "222_1.jpg"], "helen/trainset": ["100032540_1.jpg"], "lfpw/trainset": ["a_1.png"],
              "helen/testset": ["300_1.jpg"], "lfpw/testset": ["b_2.png"], "ibug": ["image_092 _01.jpg"],
              "01_Indoor": ["indoor_001.png"], "02_Outdoor": ["outdoor_001.png"]}


def write_pts(path, lm1):
    body = "\n".join(f"{x:.3f} {y:.3f}" for x, y in lm1)
    _write(path, f"version: 1\nn_points:  {len(lm1)}\n{{\n{body}\n}}\n")


def write_300w(root):
    """Native 300W; returns {folder/file: 0-based landmarks [68,2]}."""
    rng = np.random.default_rng(RNG_SEED)
    out = {}
    for folder, names in W300_FILES.items():
        for name in names:
            save_image(os.path.join(root, folder, name), _img(rng))
            lm = _points(rng, 68)
            write_pts(os.path.join(root, folder, os.path.splitext(name)[0] + ".pts"), lm + 1.0)
            out[f"{folder}/{name}"] = lm
    return out


def write_300w_csv(root):
    """HRNet CSV variant (values = 0-based + 2.0, as Faceptor/FaRL read them); returns {split: [(name, lm)]}."""
    rng = np.random.default_rng(RNG_SEED + 1)
    out = {}
    for csv_split, split in (("train", "train"), ("valid_common", "common"), ("valid_challenge", "challenge"),
                             ("valid", "full"), ("test", "test")):
        rows, out[split] = ["image_name,scale,center_w,center_h," + ",".join(
            f"original_{i}_{a}" for i in range(68) for a in "xy")], []
        for k in range(2):
            name = f"{csv_split}/img_{k}.jpg"
            save_image(os.path.join(root, "data", name), _img(rng))
            lm = _points(rng, 68)
            cx, cy = lm.mean(0)
            rows.append(",".join([name, "0.1", f"{cx + 2:.3f}", f"{cy + 2:.3f}"] +
                                 [f"{v + 2:.3f}" for v in lm.ravel()]))
            out[split].append((name, lm, (cx, cy)))
        _write(os.path.join(root, f"face_landmarks_300w_{csv_split}.csv"), "\n".join(rows) + "\n")
    return out


def write_wflw(root):
    """Native WFLW; returns {'train': [(path, lm, rect, flags)], 'test': [...]}."""
    rng = np.random.default_rng(RNG_SEED + 2)
    out = {}
    flags_test = [[1, 0, 0, 0, 0, 1], [0, 1, 0, 1, 0, 0], [0, 0, 0, 0, 1, 0]]
    for part, n in (("train", 2), ("test", 3)):
        lines, out[part] = [], []
        for k in range(n):
            path = f"51--Dresses/51_Dresses_{part}_{k}.jpg"
            save_image(os.path.join(root, "WFLW_images", path), _img(rng))
            lm = _points(rng, 98)
            rect = [1, 2, 18, 22]
            flags = flags_test[k] if part == "test" else [0, 0, 1, 0, 0, 0]
            lines.append(" ".join([f"{v:.3f}" for v in lm.ravel()] + [str(v) for v in rect + flags] + [path]))
            out[part].append((path, lm, rect, flags))
        _write(os.path.join(root, "WFLW_annotations", "list_98pt_rect_attr_train_test",
                            f"list_98pt_rect_attr_{part}.txt"), "\n".join(lines) + "\n")
    return out


def _cofw_data(rng, n):
    imgs = [_img(rng, 20, 16) if i % 2 == 0 else rng.integers(0, 256, (18, 14), dtype=np.uint8) for i in range(n)]
    phis = np.zeros((n, 87))
    for i in range(n):
        lm = _points(rng, 29, 18, 14)
        phis[i, :29], phis[i, 29:58] = lm[:, 0], lm[:, 1]
        phis[i, 58:] = rng.integers(0, 2, 29)
    return imgs, phis


def write_cofw_v73(root, split="train", n=3):
    """COFW_<split>_color.mat as MATLAB v7.3 (HDF5 with a 512-byte user block, refs in '#refs#', transposed)."""
    import h5py
    rng = np.random.default_rng(RNG_SEED + 3)
    imgs, phis = _cofw_data(rng, n)
    sfx = "Tr" if split == "train" else "T"
    path = os.path.join(root, f"COFW_{split}_color.mat")
    os.makedirs(root, exist_ok=True)
    with h5py.File(path, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")
        rlist = []
        for i, im in enumerate(imgs):
            d = refs.create_dataset(f"i{i}", data=np.ascontiguousarray(im.T))   # (3,W,H) or (W,H)
            rlist.append(d.ref)
        f.create_dataset("Is" + sfx, data=np.array(rlist, dtype=h5py.ref_dtype).reshape(1, n))
        f.create_dataset("phis" + sfx, data=phis.T)
        f.create_dataset("bboxes" + sfx, data=np.ones((4, n)))
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 .")
    return imgs, phis


def write_cofw_v5(root, split="test", n=3):
    """The grayscale-release naming (COFW_<split>.mat) as a MATLAB v5 file written by scipy (cells = object arrays)."""
    import scipy.io
    rng = np.random.default_rng(RNG_SEED + 4)
    imgs, phis = _cofw_data(rng, n)
    sfx = "Tr" if split == "train" else "T"
    cell = np.empty((n, 1), dtype=object)
    for i, im in enumerate(imgs):
        cell[i, 0] = im
    os.makedirs(root, exist_ok=True)
    scipy.io.savemat(os.path.join(root, f"COFW_{split}.mat"),
                     {"Is" + sfx: cell, "phis" + sfx: phis, "bboxes" + sfx: np.ones((n, 4))})
    return imgs, phis


def write_aflw(root, n=6):
    """AFLWinfo_release.mat (v5) + images; returns (names, data [N,38], bbox, mask_new, ra)."""
    import scipy.io
    rng = np.random.default_rng(RNG_SEED + 5)
    names = [f"{(0, 2, 3)[i % 3]}/image{i:05d}.jpg" for i in range(n)]
    data = np.zeros((n, 38))
    for i, name in enumerate(names):
        save_image(os.path.join(root, "data", "flickr", name), _img(rng))
        lm = _points(rng, 19)
        data[i, :19], data[i, 19:] = lm[:, 0], lm[:, 1]
    bbox = np.array([[1 + i, 15 + i, 2, 20] for i in range(n)], dtype=np.float64)   # left, right, top, bottom
    mask = np.ones((n, 19))
    mask[[1, 4], 3] = 0
    ra = (rng.permutation(n) + 1).astype(np.float64)[None]
    cell = np.empty((n, 1), dtype=object)
    for i, nm in enumerate(names):
        cell[i, 0] = np.array([nm])
    scipy.io.savemat(os.path.join(root, "AFLWinfo_release.mat"),
                     {"bbox": bbox, "data": data, "mask_new": mask, "nameList": cell, "ra": ra, "extra": np.zeros(3)})
    return names, data, bbox, mask, ra.ravel().astype(int)


# ------------------------------------------------------------------------------------------------ parsing
def write_celebamask(root):
    """CelebAMask-HQ with 4 HQ images (64 px) and 32-px part masks; returns ({split: [hq idx]}, {idx: label})."""
    rng = np.random.default_rng(RNG_SEED + 6)
    # partition lines: CelebA file -> group; the mapping covers only some of them
    mapping = {0: "000010.jpg", 1: "000020.jpg", 2: "000030.jpg", 3: "000040.jpg"}
    groups = {"000005.jpg": 0, "000010.jpg": 0, "000020.jpg": 1, "000030.jpg": 2, "000040.jpg": 0, "000050.jpg": 2}
    _write(os.path.join(root, "CelebA-HQ-to-CelebA-mapping.txt"),
           "idx         orig_idx    orig_file\n" + "".join(f"{i}           {int(f[:6]) - 1}    {f}\n"
                                                           for i, f in mapping.items()))
    _write(os.path.join(root, "list_eval_partition.txt"), "".join(f"{f} {g}\n" for f, g in groups.items()), "\r\n")
    labels = {}
    rects = {"skin": (4, 4, 28, 28), "hair": (0, 0, 32, 10), "l_eye": (8, 12, 12, 15), "eye_g": (6, 10, 26, 17),
             "neck": (10, 26, 22, 32), "cloth": (0, 28, 32, 32), "mouth": (12, 20, 20, 24), "u_lip": (12, 19, 20, 21)}
    for i in mapping:
        save_image(os.path.join(root, "CelebA-HQ-img", f"{i}.jpg"), _img(rng, 64, 64))
        lab = np.zeros((32, 32), np.int64)
        parts = list(rects) if i != 2 else ["skin", "hair"]
        for part, value in sorted(CELEBAMASK_PARTS.items(), key=lambda kv: kv[1]):
            if part in parts:
                x0, y0, x1, y1 = rects[part]
                m = np.zeros((32, 32), np.uint8)
                m[y0:y1, x0:x1] = 255
                save_image(os.path.join(root, "CelebAMask-HQ-mask-anno", str(i // 2000), f"{i:05d}_{part}.png"), m)
                lab[m > 0] = value
        labels[i] = lab
    return {"train": [0, 3], "val": [1], "test": [2]}, labels


def write_lapa(root):
    rng = np.random.default_rng(RNG_SEED + 7)
    out = {}
    for part, n in (("train", 2), ("val", 1), ("test", 1)):
        out[part] = []
        for k in range(n):
            name = f"{part}_{k}"
            save_image(os.path.join(root, part, "images", name + ".jpg"), _img(rng))
            lab = rng.integers(0, 11, (24, 20)).astype(np.uint8)
            save_image(os.path.join(root, part, "labels", name + ".png"), lab)
            lm = _points(rng, 106)
            _write(os.path.join(root, part, "landmarks", name + ".txt"),
                   "106\n" + "".join(f"{x:.2f} {y:.2f}\n" for x, y in lm))
            out[part].append((name, lab, lm))
    return out


# ------------------------------------------------------------------------------------------------ age
MORPH_NAMES = {"070081_2F36.JPG": 36, "332200_02M32.JPG": 32, "123456_1M18.JPG": 18, "654321_12F61.JPG": 61}


def write_morph(root, layout="faceptor"):
    rng = np.random.default_rng(RNG_SEED + 8)
    base = os.path.join(root, "data") if layout == "faceptor" else root
    for name in MORPH_NAMES:
        save_image(os.path.join(base, name), _img(rng), fmt="JPEG")
    if layout == "faceptor":
        names = list(MORPH_NAMES)
        split = {"train": names[:3], "test": names[3:]}
        for s, ns in split.items():
            _write(os.path.join(root, "label", "RANDOM_80_20", f"{s}.txt"),
                   "".join(f"{n} {MORPH_NAMES[n]}\n" for n in ns))
        return split
    return None


UTK_NAMES = {"36_0_1_20170117163203851.jpg": 36, "25_1_2_20170116174525125.jpg": 25, "59_0_0_20170111200721211.jpg": 59}


def write_utk(root, layout="faceptor"):
    rng = np.random.default_rng(RNG_SEED + 9)
    if layout == "faceptor":
        for name in UTK_NAMES:
            save_image(os.path.join(root, "data", name + ".chip.jpg"), _img(rng), fmt="JPEG")
        names = list(UTK_NAMES)
        for s, ns in (("train", names[:2]), ("test", names[2:])):
            _write(os.path.join(root, "label", f"{s}.csv"), ",filename,age,database\n" +
                   "".join(f"{i},{n},{UTK_NAMES[n]},utk\n" for i, n in enumerate(ns)))
        return {"train": names[:2], "test": names[2:]}
    for name in list(UTK_NAMES) + ["61_1_20170109142408075.jpg"]:                 # last one lacks the race field
        save_image(os.path.join(root, "UTKFace", name + ".chip.jpg"), _img(rng), fmt="JPEG")
    return None


# ------------------------------------------------------------------------------------------------ expression
def write_affectnet(root):
    """Native AffectNet CSVs; labels 7 (contempt), 8 and 10 must be dropped. Returns {split: [(path, e, box, lm)]}."""
    rng = np.random.default_rng(RNG_SEED + 10)
    header = ("subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,"
              "arousal\n")
    out = {}
    for fname, split, labels in (("training.csv", "train", [1, 7, 6, 8, 0]), ("validation.csv", "test", [3, 10, 5])):
        rows, out[split] = [], []
        for k, e in enumerate(labels):
            path = f"{100 + k}/{split}_{k}.jpg"
            save_image(os.path.join(root, "Manually_Annotated_Images", path), _img(rng))
            lm = _points(rng, 68)
            rows.append(f"{path},2,3,10,12,{';'.join(f'{v:.2f}' for v in lm.ravel())},{e},0.5,-0.1\n")
            if e < 7:
                out[split].append((path, e, [2, 3, 12, 15], lm))
        _write(os.path.join(root, "Manually_Annotated_file_lists", fname), header + "".join(rows))
    return out


RAF_LINES = [("train_00001.jpg", 5), ("train_00002.jpg", 1), ("train_00003.jpg", 7), ("test_0001.jpg", 4),
             ("test_0002.jpg", 2), ("test_0003.jpg", 3), ("train_00004.jpg", 6)]


def write_rafdb(root):
    rng = np.random.default_rng(RNG_SEED + 11)
    for name, _ in RAF_LINES:
        save_image(os.path.join(root, "Image", "aligned", name[:-4] + "_aligned.jpg"), _img(rng))
    _write(os.path.join(root, "EmoLabel", "list_patition_label.txt"), "".join(f"{n} {l}\n" for n, l in RAF_LINES))
    return RAF_LINES


# (usage, image name, 10 counts, kept FER+ label or None)
FER_ROWS = [("Training", "fer0000000.png", [4, 0, 0, 1, 3, 2, 0, 0, 0, 0], None),    # 4 of 9 after outliers: no
            ("Training", "fer0000001.png", [0, 8, 0, 0, 0, 1, 1, 0, 0, 0], 1),
            ("Training", "", [0, 0, 0, 0, 0, 0, 0, 0, 0, 10], None),                    # not a face
            ("Training", "fer0000003.png", [0, 0, 0, 0, 0, 0, 0, 9, 1, 0], None),       # contempt
            ("PublicTest", "fer0000004.png", [0, 0, 7, 3, 0, 0, 0, 0, 0, 0], 2),
            ("PrivateTest", "fer0000005.png", [1, 0, 0, 0, 6, 0, 3, 0, 0, 0], 4),
            ("PrivateTest", "fer0000006.png", [0, 0, 0, 2, 0, 0, 8, 0, 0, 0], 6),
            ("Training", "fer0000007.png", [0, 0, 0, 10, 0, 0, 0, 0, 0, 0], 3)]


def write_ferplus(root):
    """fer2013.csv + fer2013new.csv paired by position; returns {usage: [(pixels [48,48], FER+ label)]}."""
    rng = np.random.default_rng(RNG_SEED + 12)
    old, new, out = ["emotion,pixels,Usage\n"], [
        "Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF\n"], {}
    for usage, name, counts, keep in FER_ROWS:
        px = rng.integers(0, 256, (48, 48))
        old.append(f"0,{' '.join(map(str, px.ravel()))},{usage}\n")
        new.append(f"{usage},{name},{','.join(map(str, counts))}\n")
        if keep is not None:
            out.setdefault(usage, []).append((px.astype(np.uint8), keep))
    _write(os.path.join(root, "fer2013.csv"), "".join(old))
    _write(os.path.join(root, "fer2013new.csv"), "".join(new))
    return out


# ------------------------------------------------------------------------------------------------ attributes
def write_celeba(root, flat=False, n=5):
    rng = np.random.default_rng(RNG_SEED + 13)
    attrs = rng.choice([-1, 1], size=(n, 40))
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    groups = [0, 0, 1, 2, 2][:n]
    img_dir = os.path.join(root, "img_align_celeba") if flat else os.path.join(root, "Img", "img_align_celeba")
    for name in names:
        save_image(os.path.join(img_dir, name), _img(rng), fmt="JPEG")
    lines = [f"{n}", " ".join(CELEBA_ATTRIBUTES) + " "] + \
            [f"{nm} " + " ".join(f"{v:2d}" for v in a) for nm, a in zip(names, attrs)]
    _write(os.path.join(root, "list_attr_celeba.txt" if flat else "Anno/list_attr_celeba.txt"),
           "\n".join(lines) + "\n", "\r\n")
    _write(os.path.join(root, "list_eval_partition.txt" if flat else "Eval/list_eval_partition.txt"),
           "".join(f"{nm} {g}\n" for nm, g in zip(names, groups)), "\r\n")
    return names, (attrs > 0).astype(np.int64), groups


def write_lfw73(root, n=5, v73=False):
    """LFWA+ pair of .mat files (v5 via scipy, or v7.3 via h5py) + lfw/ images; returns (paths, labels, train, test)."""
    rng = np.random.default_rng(RNG_SEED + 14)
    people = ["Aaron_Eckhart", "Zoe_Ball"]
    names = [f"{people[i % 2]}\\{people[i % 2]}_{i + 1:04d}.jpg" for i in range(n)]
    for nm in names:
        save_image(os.path.join(root, "lfw", *nm.split("\\")), _img(rng), fmt="JPEG")
    label = rng.integers(0, 2, (n, 73)).astype(np.float64)
    train, test = np.array([1, 3, 5]), np.array([2, 4])
    attr_names = [f"attr{k}" for k in range(73)]
    if v73:
        import h5py

        def strings(f, group, items):
            refs = []
            for j, s in enumerate(items):
                d = group.create_dataset(f"s{len(group)}_{j}", data=np.array([[ord(c)] for c in s], np.uint16))
                refs.append(d.ref)
            return np.array(refs, dtype=h5py.ref_dtype).reshape(1, -1)

        with h5py.File(os.path.join(root, "lfw_att_73.mat"), "w", userblock_size=512) as f:
            g = f.create_group("#refs#")
            f.create_dataset("name", data=strings(f, g, names))
            f.create_dataset("AttrName", data=strings(f, g, attr_names))
            f.create_dataset("label", data=label.T)
        with h5py.File(os.path.join(root, "indices_train_test.mat"), "w", userblock_size=512) as f:
            f.create_dataset("indices_img_train", data=train[None].astype(np.float64))
            f.create_dataset("indices_img_test", data=test[None].astype(np.float64))
    else:
        import scipy.io
        cell = np.empty((n, 1), dtype=object)
        for i, nm in enumerate(names):
            cell[i, 0] = np.array([nm])
        an = np.empty((1, 73), dtype=object)
        for k, a in enumerate(attr_names):
            an[0, k] = np.array([a])
        scipy.io.savemat(os.path.join(root, "lfw_att_73.mat"), {"name": cell, "label": label, "AttrName": an})
        scipy.io.savemat(os.path.join(root, "indices_train_test.mat"),
                         {"indices_img_train": train[:, None].astype(np.float64),
                          "indices_img_test": test[:, None].astype(np.float64)})
    paths = [os.path.join(root, "lfw", *nm.split("\\")) for nm in names]
    return paths, label.astype(np.int64), train - 1, test - 1


# ------------------------------------------------------------------------------------------------ identity
MAGIC_BYTES = struct.pack("<I", 0xCED7230A)


def write_ms1m(root, n_ids=3, per_id=2, header=True, vector_labels=(2,)):
    """insightface-style train.rec/.idx: header record 0, images, identity records; record 3's payload carries
    the RecordIO magic at an aligned offset (forces a split record). Returns [(key, identity, decoded RGB)]."""
    rng = np.random.default_rng(RNG_SEED + 15)
    os.makedirs(root, exist_ok=True)
    images, records = [], []
    key = 1
    for ident in range(n_ids):
        for _ in range(per_id):
            arr = _img(rng, 16, 16)
            data = jpeg_bytes(arr)
            if key == 3:
                pad = (-(24 + len(data))) % 4                              # JPEG decoders ignore trailing bytes
                data = data + b"\0" * pad + MAGIC_BYTES + b"tail" + MAGIC_BYTES
            label = [float(ident), 0.0] if key in vector_labels else float(ident)
            records.append((key, pack_irheader(label, data, key)))
            images.append((key, ident, np.asarray(Image.open(io.BytesIO(jpeg_bytes(arr))).convert("RGB"))))
            key += 1
    a = key
    ident_records = [(a + i, pack_irheader([1.0 + i * per_id, 1.0 + (i + 1) * per_id], b"")) for i in range(n_ids)]
    head = [(0, pack_irheader([float(a), float(a + n_ids)], b""))] if header else []
    write_recordio(os.path.join(root, "train.rec"), os.path.join(root, "train.idx"), head + records + ident_records)
    _write(os.path.join(root, "property"), f"{n_ids},112,112\n")
    return images


def write_verification_bin(path, n_pairs=20, size=16, py2=False):
    """insightface .bin: pickle of (list of JPEG bytes, list of bools); py2=True hand-assembles a protocol-2
    pickle with SHORT_BINSTRING/BINSTRING image strings (Python 2 str), which a default load cannot decode."""
    rng = np.random.default_rng(RNG_SEED + 16)
    arrays = [_img(rng, size, size) for _ in range(2 * n_pairs)]
    bins = [jpeg_bytes(a) for a in arrays]
    issame = [i % 2 == 0 for i in range(n_pairs)]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if not py2:
        with open(path, "wb") as f:
            pickle.dump((bins, issame), f, protocol=pickle.HIGHEST_PROTOCOL)
        return arrays, issame
    out = bytearray(b"\x80\x02")                      # PROTO 2
    out += b"]q\x00("                                 # EMPTY_LIST, BINPUT 0, MARK
    for b in bins:
        if len(b) < 256:
            out += b"U" + bytes([len(b)]) + b         # SHORT_BINSTRING
        else:
            out += b"T" + struct.pack("<i", len(b)) + b   # BINSTRING
    out += b"e"                                       # APPENDS
    out += b"]q\x01("
    for s in issame:
        out += b"\x88" if s else b"\x89"              # NEWTRUE / NEWFALSE
    out += b"e\x86q\x02."                             # APPENDS, TUPLE2, BINPUT 2, STOP
    with open(path, "wb") as f:
        f.write(bytes(out))
    return arrays, issame
