"""RecordIO without mxnet and verification .bin files (docs/datasets.md, "Recognition")."""
import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

import data
from data.recordio import MAGIC, RecordIOReader, image_keys, pack_irheader, pack_record, unpack_irheader, write_recordio
from tests import fixtures as fx

MAGIC_BYTES = struct.pack("<I", MAGIC)


def _chunks(blob: bytes):
    """[(cflag, length)] of a packed record."""
    out, off = [], 0
    while off < len(blob):
        magic, lrec = struct.unpack_from("<II", blob, off)
        assert magic == MAGIC
        n = lrec & ((1 << 29) - 1)
        out.append((lrec >> 29, n))
        off += 8 + n + (4 - n % 4) % 4
    return out


def test_chunk_layout_matches_dmlc_format():
    blob = pack_record(b"abcde")
    assert blob[:4] == bytes([0x0A, 0x23, 0xD7, 0xCE])             # magic bytes on disk
    assert _chunks(blob) == [(0, 5)] and len(blob) == 16             # 8 header + 5 + 3 padding
    split = pack_record(b"abcd" + MAGIC_BYTES + b"efgh" + MAGIC_BYTES + b"ij")
    assert _chunks(split) == [(1, 4), (2, 4), (3, 2)]                # magic dropped at each cut
    unaligned = pack_record(b"ab" + MAGIC_BYTES + b"cd")             # magic at offset 2: not a cut
    assert _chunks(unaligned) == [(0, 8)]


@settings(max_examples=25, deadline=None)
@given(parts=st.lists(st.binary(max_size=13), min_size=1, max_size=5), label=st.integers(0, 10 ** 6))
def test_recordio_round_trip_with_magic_inside(tmp_path_factory, parts, label):
    d = tmp_path_factory.mktemp("rec")
    payloads = []
    for k, p in enumerate(parts):                                    # glue pieces with aligned magic words
        body = b"".join(x + b"\0" * ((-len(x)) % 4) + MAGIC_BYTES for x in parts[:k + 1]) + p
        payloads.append(pack_irheader(float(label + k) if k % 2 else [float(label + k), 7.0], body, id_=k))
    keys = [5, 2, 9, 0, 7][:len(payloads)]                           # not contiguous, not sorted
    write_recordio(str(d / "t.rec"), str(d / "t.idx"), list(zip(keys, payloads)))
    reader = RecordIOReader(str(d / "t.rec"), str(d / "t.idx"))
    for k, payload in zip(keys, payloads):
        assert reader.read(k) == payload
    flag, lab, id_, id2, body = unpack_irheader(reader.read(keys[0]))
    assert flag == 2 and lab.tolist() == [float(label), 7.0] and id_ == 0
    reader.close()


def test_idx_offsets_and_header_record(tmp_path):
    images = fx.write_ms1m(str(tmp_path))
    lines = (tmp_path / "train.idx").read_text().splitlines()
    assert lines[0] == "0\t0" and lines[1] == "1\t40"                # header record: 8 + 24 + 2*4 bytes
    reader = RecordIOReader(str(tmp_path / "train.rec"), str(tmp_path / "train.idx"))
    flag, label, _, _, _ = reader.header(0)
    assert flag == 2 and label.tolist() == [7.0, 10.0]               # A = 6 images + 1, B = A + 3 identities
    assert image_keys(reader) == [k for k, _, _ in images]
    flag, label, _, _, _ = reader.header(7)                          # first identity record: [start, end)
    assert label.tolist() == [1.0, 3.0]
    raw = (tmp_path / "train.rec").read_bytes()
    off3 = dict(tuple(map(int, ln.split("\t"))) for ln in lines)[3]
    assert _chunks(raw[off3:off3 + 2000])[0][0] == 1                 # record 3 was split by the writer


def test_reader_in_dataloader_workers(tmp_path):
    images = fx.write_ms1m(str(tmp_path), n_ids=4, per_id=3)
    ds = data.build_dataset("ms1mv3", str(tmp_path), "train")
    ds[0]                                                            # opens a handle in this process
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    ids = torch.cat([b["identity"] for b in loader]).tolist()
    assert ids == [i for _, i, _ in images]


def test_bad_idx_and_magic(tmp_path):
    fx.write_ms1m(str(tmp_path))
    (tmp_path / "bad.idx").write_text("0\t0\n1 forty\n")
    with pytest.raises(data.DatasetError, match=r"bad\.idx:2"):
        RecordIOReader(str(tmp_path / "train.rec"), str(tmp_path / "bad.idx"))
    (tmp_path / "shift.idx").write_text("1\t4\n")
    with pytest.raises(data.DatasetError, match="bad magic"):
        RecordIOReader(str(tmp_path / "train.rec"), str(tmp_path / "shift.idx")).read(1)


@pytest.mark.parametrize("py2", [False, True])
def test_verification_bin(tmp_path, py2):
    path = str(tmp_path / "lfw.bin")
    arrays, issame = fx.write_verification_bin(path, n_pairs=20, py2=py2)
    if py2:
        with open(path, "rb") as f, pytest.raises(UnicodeDecodeError):
            pickle.load(f)                                           # the default load fails on Python-2 str
    images, same = data.read_verification_bin(path)
    assert images.shape == (40, 3, 16, 16) and images.dtype == torch.uint8
    assert same.dtype == torch.bool and same.tolist() == issame
    ref = np.asarray(Image.open(io.BytesIO(fx.jpeg_bytes(arrays[3]))).convert("RGB"))
    assert torch.equal(images[3], torch.from_numpy(ref.copy()).permute(2, 0, 1))
    resized, _ = data.read_verification_bin(path, image_size=8)
    assert resized.shape == (40, 3, 8, 8)


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize("payload", [
    ([b"x", b"y"], [_Evil()]),
    ([np.zeros(2), b"y"], [True]),
    (_Evil(), []),
])
def test_bin_refuses_other_pickled_types(tmp_path, payload):
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(data.DatasetError, match="refusing to load global"):
        data.read_verification_bin(str(path))


def test_bin_structure_checks(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b", b"c"], [True])))
    with pytest.raises(data.DatasetError, match="3 images for 1 pairs"):
        data.read_verification_bin(str(path))
    path.write_bytes(pickle.dumps(([b"a", 5], [True])))
    with pytest.raises(data.DatasetError, match="image 1 is a int"):
        data.read_verification_bin(str(path))
    path.write_bytes(pickle.dumps(([fx.jpeg_bytes(np.zeros((4, 4, 3), np.uint8))] * 2, ["yes"])))
    with pytest.raises(data.DatasetError, match="issame entry 0"):
        data.read_verification_bin(str(path))
    path.write_bytes(pickle.dumps(([b"not a jpeg", b"x"], [True])))
    with pytest.raises(data.DatasetError, match="odd.bin image 0"):
        data.read_verification_bin(str(path))
