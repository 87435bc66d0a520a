"""Reading primitives shared by the dataset loaders (docs/datasets.md): errors, images, text lines, `.mat` files,
and the common dataset base class.

- Errors name the file, the line or field, and what was expected. A missing root or file lists
  the layout the loader expects and raises DatasetMissing (a DatasetError), so callers can tell an absent split
  from corrupt data.
- Images decode with PIL to RGB uint8 [3,H,W]; a corrupt or truncated file raises an error naming it, or, with
  `skip_corrupt=True`, is skipped: the item at the next index is returned and `dataset.skipped` counts skips
  (per process).
- `.mat`: MATLAB v7.3 files are HDF5 and need the optional `h5py`; older files need `scipy`. Both are imported
  only when a `.mat` file is read; a missing one gives a message saying which package to install.
- Transforms are callables `transform(item, generator) -> item`; `dataset[i]` seeds the generator from i,
  `dataset.get(i, seed)` (the composer's path) from the given seed, so augmentation never uses global RNG state.
"""
import io
import os

import numpy as np
import torch
from PIL import Image


class DatasetError(ValueError):
    """Bad or missing dataset input; the message names the file and what was expected."""


class DatasetMissing(DatasetError):
    """A file or folder of the expected layout is not there (e.g. a split that was not downloaded), as opposed to
    data that is present but corrupt or malformed (a plain DatasetError)."""


def require(path: str, layout: str, what: str = "path") -> str:
    if not os.path.exists(path):
        raise DatasetMissing(f"missing {what}: {path}\nexpected layout:\n{layout}")
    return path


def first_existing(candidates, layout: str, what: str = "file") -> str:
    for c in candidates:
        if os.path.exists(c):
            return c
    raise DatasetMissing(f"none of these {what}s exists: {', '.join(candidates)}\nexpected layout:\n{layout}")


def decode_image(data_or_path, name: str = None) -> torch.Tensor:
    """Encoded bytes or a file path -> RGB uint8 [3,H,W]; errors name the file."""
    name = name or (data_or_path if isinstance(data_or_path, str) else "<bytes>")
    try:
        src = data_or_path if isinstance(data_or_path, str) else io.BytesIO(data_or_path)
        with Image.open(src) as im:
            arr = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DatasetError(f"image file not found: {name}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"cannot decode image {name}: {e} (corrupt or truncated file?)") from None
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def array_to_image(arr: np.ndarray) -> torch.Tensor:
    """uint8 [H,W] or [H,W,3] -> RGB uint8 [3,H,W] (grey replicated to three channels)."""
    arr = np.asarray(arr, dtype=np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def read_lines(path: str, layout: str = None):
    """[(line_number, stripped_line)] for non-empty lines; handles CRLF and a UTF-8 BOM."""
    if layout is not None:
        require(path, layout, "annotation file")
    with open(path, "r", encoding="utf-8-sig", errors="replace") as f:
        return [(i + 1, ln.strip()) for i, ln in enumerate(f) if ln.strip()]


def parse_floats(tokens, path: str, line: int, field: str = "values") -> list:
    try:
        return [float(t) for t in tokens]
    except ValueError:
        raise DatasetError(f"{path}:{line}: expected numbers for {field}, got {' '.join(tokens)[:120]!r}") from None


def bad_line(path: str, line: int, expected: str, got: str):
    return DatasetError(f"{path}:{line}: expected {expected}, got {got[:160]!r}")


# --------------------------------------------------------------------------------------------- .mat files
def is_hdf5_mat(path: str) -> bool:
    """MATLAB v7.3 files are HDF5: the HDF5 signature sits at byte 512 after the 512-byte MATLAB header."""
    with open(path, "rb") as f:
        head = f.read(520)
    return head[512:520] == b"\x89HDF\r\n\x1a\n" or head[:8] == b"\x89HDF\r\n\x1a\n"


def load_mat(path: str, layout: str):
    """('h5', h5py.File) for v7.3 files, ('scipy', dict) for older ones; clear messages when a package is missing."""
    require(path, layout, ".mat file")
    if is_hdf5_mat(path):
        try:
            import h5py
        except ImportError:
            raise DatasetError(f"{path} is a MATLAB v7.3 (HDF5) file; reading it needs the optional package h5py "
                               "(pip install h5py)") from None
        return "h5", h5py.File(path, "r")
    try:
        import scipy.io
    except ImportError:
        raise DatasetError(f"{path} is a MATLAB v5 file; reading it needs the optional package scipy "
                           "(pip install scipy)") from None
    try:
        return "scipy", scipy.io.loadmat(path)
    except Exception as e:                       # scipy raises several types for damaged files
        raise DatasetError(f"cannot read MATLAB file {path}: {e}") from None


def mat_field(kind: str, mat, name: str, path: str):
    if name not in mat:
        keys = [k for k in mat.keys() if not k.startswith("__")]
        raise DatasetError(f"{path}: variable {name!r} not found; it holds {keys}")
    return mat[name]


def h5_string(f, ref) -> str:
    """A MATLAB char array referenced from an HDF5 cell -> str (stored as uint16 code units)."""
    arr = np.asarray(f[ref]).ravel()
    return "".join(chr(int(c)) for c in arr)


def mat_string(x) -> str:
    """Unwrap scipy's nested cell/char arrays (e.g. nameList[i][0][0]) down to a str."""
    while isinstance(x, np.ndarray):
        if x.dtype.kind in "US":
            return str(x.ravel()[0]) if x.size else ""
        if x.size == 0:
            return ""
        x = x.ravel()[0]
    return str(x)


# --------------------------------------------------------------------------------------------- base class
class FaceDataset(torch.utils.data.Dataset):
    """Records (dicts) + `load(record) -> item`; subclasses fill `self.records` and implement `load`."""

    task_type = "attributes"

    def __init__(self, root: str, split: str, transform=None, skip_corrupt: bool = False):
        self.root, self.split, self.transform, self.skip_corrupt = root, split, transform, skip_corrupt
        self.records = []
        self.skipped = 0

    def check_split(self, splits) -> None:
        if self.split not in splits:
            raise DatasetError(f"{type(self).__name__}: unknown split {self.split!r}; expected one of {tuple(splits)}")

    def __len__(self):
        return len(self.records)

    def load(self, record: dict) -> dict:
        raise NotImplementedError

    def raw(self, index: int) -> dict:
        """The untransformed item; skips corrupt images forward when `skip_corrupt` is set."""
        for k in range(len(self.records)):
            try:
                return self.load(self.records[(index + k) % len(self.records)])
            except DatasetError:
                if not self.skip_corrupt:
                    raise
                self.skipped += 1
        raise DatasetError(f"{type(self).__name__} at {self.root}: every image failed to decode")

    def get(self, index: int, seed: int) -> dict:
        item = self.raw(index)
        if self.transform is not None:
            item = self.transform(item, torch.Generator().manual_seed(int(seed)))
        return item

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {len(self)}")
        return self.get(index % len(self), index)


def image_base(root: str, first_rel: str, dirs=("data", "")) -> str:
    """The folder holding the images: root/<dir> for the first dir where `first_rel` exists (the converted
    `data/` layout, then flat); root/<dirs[0]> when none does (the error then names the expected file)."""
    for d in dirs:
        base = os.path.join(root, d) if d else root
        if os.path.exists(os.path.join(base, first_rel)):
            return base
    return os.path.join(root, dirs[0]) if dirs[0] else root
