"""Transforms of paper Sec. 4.1 on PIL/torch (no torchvision): FaRL-style dense warps with their inverse, and the 112-px
pipeline (resize, horizontal flip, RandAugment 2 ops magnitude 9 std 0.5, Random Erasing p 0.25).

Every transform is `transform(item, generator) -> item` and draws its randomness only from the torch.Generator
it is given (the composer seeds it per item), never from global RNG state. Images stay uint8; normalisation per
input group happens at collation (composer.normalize_images).

Dense warp. A similarity M maps original pixel coordinates (pixel centres at integers) to an aligned frame of
size S; with Tanh-warping (Lin et al. 2019; factor w = 0.8 for LaPa) the output coordinate u in [-1, 1] relates
to the aligned coordinate n by u = tanh(w n) / w, so the aligned square fills the centre and the surroundings
are compressed towards the border. `Warp.points` / `Warp.inverse_points` map landmarks both ways (exact inverses);
`Warp.inverse_image` takes predictions (heatmaps, logits, masks) back to the original image for evaluation.
Random ranges (docs/design.md): landmarks rotation U(+-10 deg), scale U(0.8 +- 0.1) (AFLW-19 1.0 +- 0.1), shift
U(+-0.05)·S; parsing rotation N(0, 0.314 rad), scale N(1, 0.1), shift U(+-0.01)·S.
Divergences [ours, FaRL's exact values are not documented here]: occlusion p 0.3 (landmarks only, a box of
10-40 % of S filled with a colour or noise), noise blend p 0.25 (weight U(0, 0.3)), gray p 0.2, gamma p 0.2
(U(0.5, 1.5)), blur p 0.3 (Gaussian sigma U(0.5, 2) px at 512, scaled with S). Random Erasing fills with
uniform random uint8 pixels before normalisation (timm's 'pixel' mode draws normal noise after it).
The LaPa 5-point template (eye centres, nose tip, mouth corners) is the ArcFace 112-px template scaled by 0.5
about the centre [ours]; points map to it by a least-squares similarity.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

from .conventions import CELEBAMASK_FLIP, LANDMARK_FLIP, LAPA_ALIGN_POINTS


def _rand(g) -> float:
    return float(torch.rand((), generator=g, dtype=torch.float64))


def _normal(g) -> float:
    return float(torch.randn((), generator=g, dtype=torch.float64))


# ============================================================================================ dense warp
class Warp:
    """Similarity (3x3, original -> aligned pixels) + optional Tanh-warping, output size S x S."""

    def __init__(self, matrix, out_size: int, warp_factor: float = 0.0):
        self.matrix = np.asarray(matrix, dtype=np.float64).reshape(3, 3)
        self.inv = np.linalg.inv(self.matrix)
        self.S, self.w = int(out_size), float(warp_factor)

    # ---- aligned <-> output coordinates (the tanh part)
    def _to_out(self, a: np.ndarray) -> np.ndarray:
        if self.w <= 0:
            return a
        n = (a + 0.5) / self.S * 2.0 - 1.0
        return (np.tanh(self.w * n) / self.w + 1.0) / 2.0 * self.S - 0.5

    def _to_aligned(self, q: np.ndarray) -> np.ndarray:
        if self.w <= 0:
            return q
        u = (q + 0.5) / self.S * 2.0 - 1.0
        n = np.arctanh(np.clip(self.w * u, -1 + 1e-12, 1 - 1e-12)) / self.w
        return (n + 1.0) / 2.0 * self.S - 0.5

    def points(self, pts) -> np.ndarray:
        """Original pixel coordinates [..., 2] -> output pixel coordinates."""
        p = np.asarray(pts, dtype=np.float64)
        a = p @ self.matrix[:2, :2].T + self.matrix[:2, 2]
        return self._to_out(a)

    def inverse_points(self, pts) -> np.ndarray:
        """Output pixel coordinates [..., 2] -> original pixel coordinates."""
        a = self._to_aligned(np.asarray(pts, dtype=np.float64))
        return a @ self.inv[:2, :2].T + self.inv[:2, 2]

    def _sample(self, x: torch.Tensor, src: np.ndarray, mode: str) -> torch.Tensor:
        """x [C,H,W]; src [h,w,2] source pixel coordinates per output pixel -> [C,h,w]."""
        C, H, W = x.shape
        grid = torch.from_numpy(src).to(torch.float32)
        grid = torch.stack([grid[..., 0] * 2 / max(W - 1, 1) - 1, grid[..., 1] * 2 / max(H - 1, 1) - 1], -1)
        src_dtype = x.dtype
        y = F.grid_sample(x[None].float(), grid[None], mode=mode, padding_mode="zeros", align_corners=True)[0]
        if src_dtype == torch.uint8:
            return y.round().clamp(0, 255).to(torch.uint8)
        return y.to(src_dtype) if not src_dtype.is_floating_point else y

    def _out_grid(self) -> np.ndarray:
        r = np.arange(self.S, dtype=np.float64)
        return np.stack(np.meshgrid(r, r, indexing="xy"), -1)                # [S, S, 2] (x, y)

    def apply_image(self, img: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """[C,H,W] original -> [C,S,S] warped (bilinear for images, 'nearest' for label maps)."""
        return self._sample(img, self.inverse_points(self._out_grid()), mode)

    def apply_mask(self, mask: torch.Tensor) -> torch.Tensor:
        return self._sample(mask[None], self.inverse_points(self._out_grid()), "nearest")[0].to(mask.dtype)

    def inverse_image(self, x: torch.Tensor, orig_size, mode: str = "bilinear") -> torch.Tensor:
        """Warped-space predictions [C,S,S] -> original image [C,H,W] (orig_size = (H, W))."""
        H, W = int(orig_size[0]), int(orig_size[1])
        r_x, r_y = np.arange(W, dtype=np.float64), np.arange(H, dtype=np.float64)
        orig = np.stack(np.meshgrid(r_x, r_y, indexing="xy"), -1)            # [H, W, 2]
        return self._sample(x, self.points(orig), mode)

    def state(self) -> dict:
        return {"warp_matrix": torch.from_numpy(self.matrix.copy()), "warp_factor": self.w}

    @classmethod
    def from_item(cls, item: dict, index: int = None) -> "Warp":
        """Rebuild from an item (or a collated batch with `index`) that carries warp_matrix / warp_factor."""
        m, w, img = item["warp_matrix"], item["warp_factor"], item["image"]
        if index is not None:
            m, w = m[index], w[index]
        return cls(m.double().numpy(), img.shape[-1], float(w))


def similarity(center, size: float, out_size: int, scale: float = 1.0, rotation: float = 0.0,
               shift=(0.0, 0.0)) -> np.ndarray:
    """3x3: the square of side `size` around `center` -> `scale` of the S x S output, rotated, shifted (x S)."""
    S = out_size
    k = S * scale / max(size, 1e-6)
    c, s = math.cos(rotation), math.sin(rotation)
    R = np.array([[c, -s], [s, c]]) * k
    t = np.array([(S - 1) / 2 + shift[0] * S, (S - 1) / 2 + shift[1] * S]) - R @ np.asarray(center, np.float64)
    return np.array([[R[0, 0], R[0, 1], t[0]], [R[1, 0], R[1, 1], t[1]], [0, 0, 1.0]])


def fit_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (Umeyama, no reflection) mapping src [N,2] onto dst [N,2]; 3x3."""
    ms, md = src.mean(0), dst.mean(0)
    s0, d0 = src - ms, dst - md
    cov = d0.T @ s0 / len(src)
    U, D, Vt = np.linalg.svd(cov)
    E = np.diag([1.0, np.sign(np.linalg.det(U @ Vt)) or 1.0])
    R = U @ E @ Vt
    k = np.trace(np.diag(D) @ E) / max((s0 ** 2).sum() / len(src), 1e-12)
    A = k * R
    t = md - A @ ms
    return np.array([[A[0, 0], A[0, 1], t[0]], [A[1, 0], A[1, 1], t[1]], [0, 0, 1.0]])


ARCFACE_5 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                      [70.7299, 92.2041]])


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(3 * sigma)))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).view(1, 1, 1, -1).repeat(x.shape[0], 1, 1, 1)
    y = F.conv2d(F.pad(x[None], (r, r, 0, 0), mode="replicate"), k, groups=x.shape[0])
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.transpose(2, 3), groups=x.shape[0])
    return y[0]


class DenseTransform:
    """FaRL-style warp to S x S + degradations; updates image, landmarks, mask, box; adds the warp state.

    task: 'landmarks' or 'parsing' (sets the random ranges); align: 'box' (item['box']), 'image' (whole image)
    or 'points5' (LaPa landmarks 104, 105, 54, 84, 90); warp_factor > 0 turns on Tanh-warping.
    """

    def __init__(self, out_size: int = 512, task: str = "landmarks", train: bool = True, align: str = "box",
                 warp_factor: float = 0.0, scale_mu: float = None, occlusion: bool = None):
        if task not in ("landmarks", "parsing"):
            raise ValueError(f"DenseTransform task must be 'landmarks' or 'parsing', got {task!r}")
        if align not in ("box", "image", "points5"):
            raise ValueError(f"DenseTransform align must be 'box', 'image' or 'points5', got {align!r}")
        self.S, self.task, self.train, self.align, self.w = out_size, task, train, align, warp_factor
        self.scale_mu = scale_mu if scale_mu is not None else (0.8 if task == "landmarks" else 1.0)
        self.occlusion = occlusion if occlusion is not None else task == "landmarks"

    def random_pose(self, g):
        if not self.train:
            return self.scale_mu, 0.0, (0.0, 0.0)
        if self.task == "landmarks":
            rot = math.radians(10.0) * (2 * _rand(g) - 1)
            scale = self.scale_mu + 0.1 * (2 * _rand(g) - 1)
            shift = (0.05 * (2 * _rand(g) - 1), 0.05 * (2 * _rand(g) - 1))
        else:
            rot, scale = 0.314 * _normal(g), self.scale_mu + 0.1 * _normal(g)
            shift = (0.01 * (2 * _rand(g) - 1), 0.01 * (2 * _rand(g) - 1))
        return max(scale, 0.05), rot, shift

    def matrix(self, item: dict, g) -> np.ndarray:
        scale, rot, shift = self.random_pose(g)
        H, W = item["image"].shape[1:]
        if self.align == "points5":
            pts = item["landmarks"].double().numpy()[list(LAPA_ALIGN_POINTS)]
            dst = (ARCFACE_5 / 112.0 - 0.5) * 0.5 * self.S + (self.S - 1) / 2
            base = fit_similarity(pts, dst)
            jitter = similarity(((self.S - 1) / 2, (self.S - 1) / 2), self.S, self.S, scale, rot, shift)
            return jitter @ base
        if self.align == "box":
            x1, y1, x2, y2 = item["box"].double().tolist()
            center, size = ((x1 + x2) / 2, (y1 + y2) / 2), max(x2 - x1, y2 - y1)
        else:
            center, size = ((W - 1) / 2, (H - 1) / 2), max(H, W)
        return similarity(center, size, self.S, scale, rot, shift)

    def __call__(self, item: dict, g: torch.Generator) -> dict:
        out = dict(item)
        img = item["image"]
        warp = Warp(self.matrix(item, g), self.S, self.w)
        out["image"] = warp.apply_image(img)
        if "landmarks" in item:
            out["landmarks"] = torch.from_numpy(warp.points(item["landmarks"].double().numpy())).float()
        if "mask" in item:
            out["mask"] = warp.apply_mask(item["mask"])
        if "box" in item:
            x1, y1, x2, y2 = item["box"].double().tolist()
            c = warp.points(np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]]))
            out["box"] = torch.tensor([c[:, 0].min(), c[:, 1].min(), c[:, 0].max(), c[:, 1].max()],
                                      dtype=torch.float32)
        out.update(warp.state())
        out["orig_size"] = torch.tensor(img.shape[1:], dtype=torch.int64)
        if self.train:
            out["image"] = self.degrade(out["image"], g)
        return out

    def degrade(self, img: torch.Tensor, g) -> torch.Tensor:
        x = img.float()
        C, H, W = x.shape
        if self.occlusion and _rand(g) < 0.3:
            h, w = int(H * (0.1 + 0.3 * _rand(g))), int(W * (0.1 + 0.3 * _rand(g)))
            y0, x0 = int((H - h) * _rand(g)), int((W - w) * _rand(g))
            if _rand(g) < 0.5:
                fill = torch.rand((3, 1, 1), generator=g) * 255
            else:
                fill = torch.rand((3, h, w), generator=g) * 255
            x[:, y0:y0 + h, x0:x0 + w] = fill
        if _rand(g) < 0.25:
            a = 0.3 * _rand(g)
            x = (1 - a) * x + a * torch.rand(x.shape, generator=g) * 255
        if _rand(g) < 0.2:
            x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).expand(3, H, W).clone()
        if _rand(g) < 0.2:
            x = 255.0 * (x / 255.0).clamp(0, 1) ** (0.5 + _rand(g))
        if _rand(g) < 0.3:
            x = _gaussian_blur(x, (0.5 + 1.5 * _rand(g)) * W / 512)
        return x.round().clamp(0, 255).to(torch.uint8)


# ============================================================================================ 112-px
def flip_item(item: dict, mask_flip=CELEBAMASK_FLIP) -> dict:
    """Horizontal flip: image, landmarks (x -> W-1-x, then the set's permutation of LANDMARK_FLIP) and their
    `visible` flags (the same permutation), box, mask
    (left/right class swap `mask_flip`: CELEBAMASK_FLIP by default, conventions.LAPA_FLIP for LaPa).
    Attributes, age, expression and identity do not change under a flip."""
    out = dict(item)
    W = item["image"].shape[-1]
    out["image"] = item["image"].flip(-1)
    if "landmarks" in item:
        lm = item["landmarks"].clone()
        lm[:, 0] = W - 1 - lm[:, 0]
        perm = LANDMARK_FLIP.get(len(lm))
        if perm is None:
            raise ValueError(f"no flip permutation for {len(lm)} landmarks; known: {sorted(LANDMARK_FLIP)}")
        out["landmarks"] = lm[list(perm)]
        if "visible" in item:                                   # per-point flags follow their points
            out["visible"] = item["visible"][list(perm)]
    if "box" in item:
        x1, y1, x2, y2 = item["box"].unbind(-1)
        out["box"] = torch.stack([W - 1 - x2, y1, W - 1 - x1, y2], -1)
    if "mask" in item:
        out["mask"] = torch.tensor(mask_flip, dtype=torch.int64)[item["mask"].flip(-1)]
    return out


def _pil(img: torch.Tensor) -> Image.Image:
    return Image.fromarray(img.permute(1, 2, 0).numpy())


def _tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).contiguous()


_FILL = (128, 128, 128)


def _affine(im, coeffs):
    return im.transform(im.size, Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=_FILL)


# RandAugment operations (timm's 'rand' set); level in [0, 10], sign flips chosen by the caller's generator.
RAND_OPS = {
    "AutoContrast": lambda im, m, s: ImageOps.autocontrast(im),
    "Equalize": lambda im, m, s: ImageOps.equalize(im),
    "Invert": lambda im, m, s: ImageOps.invert(im),
    "Rotate": lambda im, m, s: im.rotate(s * m / 10 * 30, resample=Image.BILINEAR, fillcolor=_FILL),
    "Posterize": lambda im, m, s: ImageOps.posterize(im, max(1, 8 - int(m / 10 * 4))),
    "Solarize": lambda im, m, s: ImageOps.solarize(im, int(256 - m / 10 * 256)),
    "SolarizeAdd": lambda im, m, s: Image.eval(im, lambda v, a=int(m / 10 * 110): min(255, v + a) if v < 128 else v),
    "Color": lambda im, m, s: ImageEnhance.Color(im).enhance(1 + s * m / 10 * 0.9),
    "Contrast": lambda im, m, s: ImageEnhance.Contrast(im).enhance(1 + s * m / 10 * 0.9),
    "Brightness": lambda im, m, s: ImageEnhance.Brightness(im).enhance(1 + s * m / 10 * 0.9),
    "Sharpness": lambda im, m, s: ImageEnhance.Sharpness(im).enhance(1 + s * m / 10 * 0.9),
    "ShearX": lambda im, m, s: _affine(im, (1, s * m / 10 * 0.3, 0, 0, 1, 0)),
    "ShearY": lambda im, m, s: _affine(im, (1, 0, 0, s * m / 10 * 0.3, 1, 0)),
    "TranslateXRel": lambda im, m, s: _affine(im, (1, 0, s * m / 10 * 0.45 * im.size[0], 0, 1, 0)),
    "TranslateYRel": lambda im, m, s: _affine(im, (1, 0, 0, 0, 1, s * m / 10 * 0.45 * im.size[1])),
}


def rand_augment(img: torch.Tensor, g, n_ops: int = 2, magnitude: float = 9.0, std: float = 0.5,
                 prob: float = 0.5) -> torch.Tensor:
    """RandAugment (Cubuk et al.) as timm's 'rand-m9-mstd0.5': n_ops ops, each applied with prob 0.5,
    magnitude ~ N(9, 0.5) clipped to [0, 10]."""
    names = list(RAND_OPS)
    im = _pil(img)
    for _ in range(n_ops):
        name = names[int(torch.randint(len(names), (), generator=g))]
        if _rand(g) >= prob:
            continue
        m = min(10.0, max(0.0, magnitude + std * _normal(g)))
        s = 1.0 if _rand(g) < 0.5 else -1.0
        im = RAND_OPS[name](im, m, s)
    return _tensor(im)


def random_erasing(img: torch.Tensor, g, p: float = 0.25, area=(0.02, 1 / 3), ratio=(0.3, 3.3)) -> torch.Tensor:
    """Random Erasing (Zhong et al.): one box of random area and aspect, filled with random pixels."""
    if _rand(g) >= p:
        return img
    C, H, W = img.shape
    for _ in range(10):
        a = H * W * (area[0] + (area[1] - area[0]) * _rand(g))
        r = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * _rand(g))
        h, w = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
        if 0 < h < H and 0 < w < W:
            y0, x0 = int(torch.randint(H - h + 1, (), generator=g)), int(torch.randint(W - w + 1, (), generator=g))
            out = img.clone()
            fill = torch.randint(0, 256, (C, h, w), generator=g, dtype=torch.int64)
            out[:, y0:y0 + h, x0:x0 + w] = fill.to(img.dtype)
            return out
    return img


def resize_image(img: torch.Tensor, size: int) -> torch.Tensor:
    if tuple(img.shape[1:]) == (size, size):
        return img
    return _tensor(_pil(img).resize((size, size), Image.BILINEAR))


class GlobalTransform:
    """112-px pipeline: resize (bilinear) -> [train] flip p 0.5 -> RandAugment -> Random Erasing.

    kind 'attributes' (also age and expression, the paper's "attribute prediction"): all three; 'recognition':
    flip only. Landmarks and boxes are scaled with the resize and flipped with the set's permutation.
    """

    def __init__(self, size: int = 112, train: bool = True, kind: str = "attributes", erasing: float = 0.25):
        self.size, self.train, self.kind, self.erasing = size, train, kind, erasing

    def __call__(self, item: dict, g: torch.Generator) -> dict:
        out = dict(item)
        H, W = item["image"].shape[1:]
        out["image"] = resize_image(item["image"], self.size)
        sx, sy = self.size / W, self.size / H
        if "landmarks" in item:       # pixel centres at integers: x' = (x + 0.5) * s - 0.5
            out["landmarks"] = (item["landmarks"] + 0.5) * torch.tensor([sx, sy]) - 0.5
        if "box" in item:
            out["box"] = (item["box"] + 0.5) * torch.tensor([sx, sy, sx, sy]) - 0.5
        if not self.train:
            return out
        if _rand(g) < 0.5:
            out = flip_item(out)
        if self.kind != "recognition":
            out["image"] = rand_augment(out["image"], g)
            out["image"] = random_erasing(out["image"], g, self.erasing)
        return out
