"""MXNet RecordIO (`.rec` + `.idx`) and insightface verification `.bin` files without mxnet.

Implements the formats of docs/datasets.md, "Recognition": the byte format of dmlc-core RecordIO, mxnet's IRHeader
packing, insightface's header and identity records, and the `.bin` pickle. Divergences: none in format. The reader
opens its file lazily and once per process (the handle is dropped when the object is pickled into a DataLoader
worker), so random access works from several workers. `.bin` files are read through a restricted unpickler that
allows no global except the two that Python-3 protocol-2 pickles of `bytes` need (`_codecs.encode`,
`builtins.bytes`); anything else (any other class or function reference) is refused before it is resolved.
"""
import os
import pickle
import struct

import numpy as np
import torch
import torch.nn.functional as F

from .dataset_io import DatasetError, decode_image

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_CHUNK = struct.Struct("<II")                  # magic, lrec (bits 0-28 length, 29-31 cflag)
IRHEADER = struct.Struct("<IfQQ")              # flag, label, id, id2 (24 bytes)


# ---------------------------------------------------------------------------------------------- writing
def pack_irheader(label, data: bytes, id_: int = 0, id2: int = 0) -> bytes:
    """IRHeader + optional float32 label vector + data (mxnet's recordio.pack)."""
    if isinstance(label, (int, float, np.integer, np.floating)):
        return IRHEADER.pack(0, float(label), id_, id2) + data
    vec = np.asarray(label, dtype=np.float32).ravel()
    return IRHEADER.pack(len(vec), 0.0, id_, id2) + vec.tobytes() + data


def pack_record(payload: bytes) -> bytes:
    """One logical record as chunks: split where the magic sits at a 4-aligned payload offset (dropped)."""
    cuts, start = [], 0
    for off in range(0, len(payload) - 3, 4):
        if payload[off:off + 4] == _MAGIC_BYTES:
            cuts.append(payload[start:off])
            start = off + 4
    pieces = cuts + [payload[start:]]
    out = bytearray()
    for i, piece in enumerate(pieces):
        cflag = 0 if len(pieces) == 1 else (1 if i == 0 else (3 if i == len(pieces) - 1 else 2))
        if len(piece) >= 1 << 29:
            raise ValueError(f"record chunk of {len(piece)} bytes exceeds the RecordIO limit of 2^29")
        out += _CHUNK.pack(MAGIC, (cflag << 29) | len(piece)) + piece + b"\0" * ((4 - len(piece) % 4) % 4)
    return bytes(out)


def write_recordio(rec_path: str, idx_path: str, records) -> None:
    """records: iterable of (key, payload) written in order; the `.idx` gets `key<TAB>offset` lines."""
    with open(rec_path, "wb") as rec, open(idx_path, "w") as idx:
        for key, payload in records:
            idx.write(f"{key}\t{rec.tell()}\n")
            rec.write(pack_record(payload))


# ---------------------------------------------------------------------------------------------- reading
def unpack_irheader(payload: bytes):
    """-> (flag, label float or float32 vector, id, id2, data bytes)."""
    if len(payload) < IRHEADER.size:
        raise DatasetError(f"record payload of {len(payload)} bytes is shorter than the 24-byte IRHeader")
    flag, label, id_, id2 = IRHEADER.unpack_from(payload)
    if flag > 0:
        end = IRHEADER.size + 4 * flag
        if len(payload) < end:
            raise DatasetError(f"record header announces {flag} label values but the payload has {len(payload)} bytes")
        return flag, np.frombuffer(payload, np.float32, flag, IRHEADER.size).copy(), id_, id2, payload[end:]
    return flag, label, id_, id2, payload[IRHEADER.size:]


class RecordIOReader:
    """Random access to `.rec` records by `.idx` key; safe to pickle into DataLoader workers."""

    def __init__(self, rec_path: str, idx_path: str):
        for p in (rec_path, idx_path):
            if not os.path.exists(p):
                raise DatasetError(f"missing RecordIO file {p} (expected both {rec_path} and {idx_path})")
        self.rec_path, self.idx_path = rec_path, idx_path
        self.offsets = {}
        with open(idx_path, "r") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.split()
                if len(parts) != 2 or not parts[0].lstrip("-").isdigit() or not parts[1].isdigit():
                    raise DatasetError(f"{idx_path}:{n}: expected '<key><TAB><offset>', got {line.strip()[:80]!r}")
                self.offsets[int(parts[0])] = int(parts[1])
        self._file, self._pid = None, None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"], state["_pid"] = None, None
        return state

    def _handle(self):
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = open(self.rec_path, "rb"), os.getpid()
        return self._file

    def keys(self):
        return list(self.offsets)

    def read(self, key: int) -> bytes:
        """The payload of record `key`, chunks joined with the magic bytes they were split at."""
        if key not in self.offsets:
            raise DatasetError(f"{self.idx_path}: no record with key {key}")
        f = self._handle()
        f.seek(self.offsets[key])
        out = bytearray()
        while True:
            head = f.read(8)
            if len(head) < 8:
                raise DatasetError(f"{self.rec_path}: truncated record {key} at byte {f.tell()}")
            magic, lrec = _CHUNK.unpack(head)
            if magic != MAGIC:
                raise DatasetError(f"{self.rec_path}: bad magic 0x{magic:08X} in record {key} at byte "
                                   f"{f.tell() - 8} (expected 0x{MAGIC:08X}; is the .idx from this .rec?)")
            cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
            data = f.read(length + (4 - length % 4) % 4)
            if len(data) < length:
                raise DatasetError(f"{self.rec_path}: truncated record {key}: wanted {length} bytes")
            out += data[:length]
            if cflag in (0, 3):
                return bytes(out)
            out += _MAGIC_BYTES

    def header(self, key: int):
        return unpack_irheader(self.read(key))

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


def image_keys(reader: RecordIOReader) -> list:
    """insightface convention: record 0 with flag > 0 holds [A, B]; images are keys 1..A-1; else every key."""
    if 0 in reader.offsets:
        flag, label, _, _, _ = reader.header(0)
        if flag > 0:
            return list(range(1, int(label[0])))
    return sorted(reader.offsets)


def record_label(label) -> int:
    return int(label if np.isscalar(label) else label[0])


# ---------------------------------------------------------------------------------------------- .bin sets
class RestrictedUnpickler(pickle.Unpickler):
    """Allows only `_codecs.encode` and `builtins.bytes` (how protocol-2 pickles spell bytes); refuses the rest."""

    ALLOWED = {("_codecs", "encode"), ("builtins", "bytes"), ("__builtin__", "bytes")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: a verification .bin holds only a "
                                     "list of encoded images and a list of bools")


def read_verification_bin(path: str, image_size: int = None):
    """insightface `.bin` -> (images uint8 [2N,3,H,W], issame bool [N]); pair i is images 2i and 2i+1.

    Images are decoded to RGB; with `image_size`, images whose size differs are resized (bilinear) to it.
    """
    if not os.path.exists(path):
        raise DatasetError(f"missing verification file {path} (an insightface .bin: pickle of (bins, issame_list))")
    try:
        with open(path, "rb") as f:
            obj = RestrictedUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise DatasetError(f"{path}: {e}") from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError) as e:
        raise DatasetError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[0], (list, tuple))
            and isinstance(obj[1], (list, tuple))):
        raise DatasetError(f"{path}: expected a pickled 2-tuple (bins, issame_list), got {type(obj).__name__}")
    bins, issame = obj
    if len(bins) != 2 * len(issame):
        raise DatasetError(f"{path}: {len(bins)} images for {len(issame)} pairs (expected 2 per pair)")
    for i, b in enumerate(bins):
        if not isinstance(b, (bytes, bytearray, str)):
            raise DatasetError(f"{path}: image {i} is a {type(b).__name__}, expected encoded image bytes")
    for i, s in enumerate(issame):
        if not isinstance(s, (bool, int)) or isinstance(s, int) and s not in (0, 1):
            raise DatasetError(f"{path}: issame entry {i} is {s!r}, expected a bool")
    images = []
    for i, b in enumerate(bins):
        data = b.encode("latin1") if isinstance(b, str) else bytes(b)
        img = decode_image(data, f"{path} image {i}")
        if image_size is not None and tuple(img.shape[1:]) != (image_size, image_size):
            img = F.interpolate(img[None].float(), size=(image_size, image_size), mode="bilinear",
                                align_corners=False).round().clamp(0, 255).to(torch.uint8)[0]
        images.append(img)
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise DatasetError(f"{path}: images of different sizes {sorted(shapes)}; pass image_size to resize them")
    return torch.stack(images), torch.tensor([bool(s) for s in issame], dtype=torch.bool)
