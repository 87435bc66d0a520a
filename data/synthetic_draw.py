"""Rendering of one synthetic face (used by synthetic.py's SyntheticFaces).

All geometry is built in a face frame (x to the image right, y down, origin between the eyes, face half-width
about 1), pushed through a yaw-like horizontal shift and a similarity (in-plane rotation, scale, translation)
into pixels, and drawn with PIL's ImageDraw straight at the target size. Landmarks are the vertices of the drawn
polygons (eyes 36-47, lips 48-67), the centre lines of the drawn brows (17-26), the nose bridge and nostril
points of the drawn nose (27-35) and the vertices of the face outline (jaw 0-16), so they lie exactly on the
features. Pixel centres are at integer coordinates (PIL's convention), so landmarks are 0-based pixel coordinates.

The parsing mask is drawn with the same polygons, painter's order, in the CelebAMask-HQ class values of
conventions.CELEBAMASK_CLASSES (FaRL order). "Image-left" features take the CelebAMask-HQ `l_*` classes
(l_eye = class 8 "re", l_brow = 6 "rb", l_ear = 4 "rr"), matching the 68-point layout's first eye 36-41.
Labelling choices: beards, moustaches, stubble, wrinkles and make-up are skin (class 2); sideburns are hair;
clear glasses label only their frames as class 15 (the eyes stay visible), sunglasses label the lenses too;
occluders (bars, hand-like blobs) are background (class 0) while landmarks keep their true positions.
"""
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# mask values (conventions.CELEBAMASK_CLASSES)
BG, NECK, FACE, CLOTH, EAR_L, EAR_R, BROW_L, BROW_R, EYE_L, EYE_R, NOSE, IMOUTH, LLIP, ULIP, HAIR, GLASS, HAT, \
    EARR, NECKL = range(19)

_T16 = np.linspace(0.0, 2.0 * math.pi, 16, endpoint=False)
_CIRCLE16 = np.stack([np.cos(_T16), np.sin(_T16)], 1)                     # [16, 2]
_JAW_T = np.linspace(math.pi, 0.0, 17)                                    # jaw 0 (image-left) .. 16 (image-right)
_HEAD_T = np.linspace(0.15, math.pi - 0.15, 9)                            # forehead arc, right to left
_S6 = np.array([-2 / 3, -1 / 3, 0.0, 1 / 3, 2 / 3])
_GRID_CACHE = {}


def ellipse(cx, cy, rx, ry):
    return _CIRCLE16 * (rx, ry) + (cx, cy)


def _grid(size):
    if size not in _GRID_CACHE:
        t = np.linspace(-1.0, 1.0, size, dtype=np.float32)
        _GRID_CACHE[size] = (t[None, :].repeat(size, 0), t[:, None].repeat(size, 1))
    return _GRID_CACHE[size]


def face_geometry(p: dict) -> dict:
    """Named point arrays in the face frame from the per-item parameter dict `p` (see synthetic.py)."""
    g = {}
    fw, jl, fh = p["fw"], p["jaw_len"], p["forehead"]
    s = np.sin(_JAW_T)
    jx = fw * np.cos(_JAW_T) * (1.0 - p["taper"] * s ** 2) * (1.0 + p["sag"] * s ** 3)
    jy = 0.15 + (jl - 0.15) * s ** p["jaw_pow"]
    g["jaw"] = np.stack([jx, jy], 1)                                          # landmarks 0-16
    hx = fw * np.cos(_HEAD_T)
    hy = -fh * np.sin(_HEAD_T) ** 0.8
    g["forehead"] = np.stack([hx, hy], 1)
    # brows: 5 centre-line points, outer -> inner for the image-left brow (17-21); mirrored for 22-26
    ex, ew, eh, by = p["eye_dx"], p["eye_w"], p["eye_h"], p["brow_y"]
    t = np.linspace(0.0, 1.0, 5)
    bx = -ex - 1.15 * ew + t * (2.1 * ew - p["brow_pull"])
    byy = by - p["brow_arch"] * np.sin(math.pi * t) - p["brow_raise"] - p["brow_inner"] * t
    left = np.stack([bx, byy], 1)
    right = left[::-1] * (-1, 1)
    g["brow_l"], g["brow_r"] = left, right
    # eyes: 6-point polygons (36-41 image-left: outer, upper x2, inner, lower x2; 42-47 mirrored)
    ox = np.array([-1.0, -1 / 3, 1 / 3, 1.0, 1 / 3, -1 / 3]) * ew
    oy = np.array([0.0, -1.0, -1.0, 0.0, 0.85, 0.85]) * eh
    g["eye_l"] = np.stack([ox - ex, oy], 1)
    g["eye_r"] = np.stack([(-ox)[[3, 2, 1, 0, 5, 4]] + ex, oy[[3, 2, 1, 0, 5, 4]]], 1)
    # nose: bridge 27-30 from between the eyes to the tip, nostrils 31-35
    nl, nw = p["nose_len"], p["nose_w"]
    g["bridge"] = np.stack([np.zeros(4), np.linspace(0.02, nl, 4)], 1)
    g["nostrils"] = np.stack([np.array([-1.0, -0.5, 0.0, 0.5, 1.0]) * nw,
                              nl + np.array([0.0, 0.035, 0.05 + p["nose_point"], 0.035, 0.0])], 1)
    # mouth (48-67): centre line y_c(s) = my - lift*s^2 + asym*s, s in [-1, 1]
    my, mw, o, lt = p["mouth_y"], p["mouth_w"], p["mouth_open"], p["lip_t"]

    def centre(s):
        return my - p["lift"] * s ** 2 + p["asym"] * s

    so = np.array([-1.0, *_S6, 1.0])                                       # 48..54 outer upper, left to right
    upper_in = lambda s: centre(s) - 0.3 * o * (1 - s ** 2)               # noqa: E731  (the jaw drops:
    lower_in = lambda s: centre(s) + 0.7 * o * (1 - s ** 2)               # noqa: E731   opens mostly down)
    bow = np.where(np.abs(so) < 0.1, 0.8, 1.0)                              # cupid's bow dip at 51
    ou = np.stack([so * mw, upper_in(so) - lt * (1 - 0.5 * so ** 2) * bow], 1)
    sl = _S6[::-1]                                                          # 55..59 outer lower, right to left
    ol = np.stack([sl * mw, lower_in(sl) + 1.2 * lt * (1 - 0.5 * sl ** 2)], 1)
    si = np.array([-0.85, -0.5, 0.0, 0.5, 0.85])                            # 60..64 inner upper
    iu = np.stack([si * mw, upper_in(si)], 1)
    sil = np.array([0.5, 0.0, -0.5])                                        # 65..67 inner lower
    il = np.stack([sil * mw, lower_in(sil)], 1)
    g["mouth"] = np.concatenate([ou, ol, iu, il])                           # [20, 2]
    g["ear_l"] = ellipse(-fw - 0.04, 0.2, 0.13 * p["ear"], 0.24 * p["ear"])
    g["ear_r"] = ellipse(fw + 0.04, 0.2, 0.13 * p["ear"], 0.24 * p["ear"])
    return g


def landmarks68(g: dict) -> np.ndarray:
    return np.concatenate([g["jaw"], g["brow_l"], g["brow_r"], g["bridge"], g["nostrils"], g["eye_l"], g["eye_r"],
                           g["mouth"]])


def _thick(line: np.ndarray, half: float) -> np.ndarray:
    """Polygon around a polyline with half-thickness `half` (face units), tapered at the ends."""
    d = np.gradient(line, axis=0)
    n = np.stack([-d[:, 1], d[:, 0]], 1) / (np.linalg.norm(d, axis=1, keepdims=True) + 1e-9)
    w = half * np.array([0.55] + [1.0] * (len(line) - 2) + [0.75])[:, None]
    return np.concatenate([line + n * w, (line - n * w)[::-1]])


def extra_shapes(p: dict, g: dict) -> dict:
    """Non-landmark shapes in the face frame: neck, cloth, hair, accessories, facial hair, wrinkles."""
    sh = {}
    fw, jl, fh = p["fw"], p["jaw_len"], p["forehead"]
    sh["neck"] = np.array([[-0.45, 0.6], [0.45, 0.6], [0.5, jl + 0.75], [-0.5, jl + 0.75]])
    yb = jl + 0.6
    sh["cloth"] = np.array([[-0.55, yb], [0.55, yb], [2.8, yb + 0.8], [3.2, yb + 4.0], [-3.2, yb + 4.0],
                            [-2.8, yb + 0.8]])
    if p["necktie"]:
        sh["tie"] = np.array([[-0.08, yb + 0.05], [0.08, yb + 0.05], [0.14, yb + 1.1], [0.0, yb + 1.3],
                              [-0.14, yb + 1.1]])
    if p["necklace"]:
        t = np.linspace(0.2, math.pi - 0.2, 9)
        sh["necklace"] = np.stack([0.55 * np.cos(t), jl + 0.35 + 0.25 * np.sin(t)], 1)
    top = -fh - p["hair_vol"]
    if not p["bald"]:
        wav = p["wavy"] * 0.07 * np.sin(np.linspace(0, 9 * math.pi, 21))
        t = np.linspace(0.0, math.pi, 21)
        r = 1.0 + wav
        outer = np.stack([-(fw + 0.14) * np.cos(t) * r, top * np.sin(t) ** 0.9 * r + 0.1 * (1 - np.sin(t))], 1)
        if p["hair_len"] > 0:                                                 # long hair behind the head
            back = np.concatenate([outer, [[fw + 0.2 + p["wavy"] * 0.06, p["hair_len"]],
                                           [-(fw + 0.2), p["hair_len"]]]])
            sh["hair_back"] = back
        recede = p["recede"]
        hl = np.stack([fw * 1.02 * np.cos(t[::-1]), -fh * (0.55 + recede * (1 - np.sin(t[::-1]) ** 2))
                       * np.sin(t[::-1]) ** 0.6 + 0.05], 1)
        if p["bangs"]:
            bang_y = p["brow_y"] - 0.12
            tb = np.linspace(0.0, 1.0, 7)
            hl = np.concatenate([hl[:4], np.stack([0.85 * fw * (2 * tb - 1),
                                                   bang_y + 0.04 * np.sin(tb * 7 * math.pi)], 1), hl[-4:]])
        sh["hair_top"] = np.concatenate([outer[::-1], hl])
        if p["sideburns"]:
            for side, sg in (("l", -1), ("r", 1)):
                sh["sideburn_" + side] = np.array([[sg * fw * 0.98, -0.1], [sg * fw * 0.8, -0.1],
                                                   [sg * fw * 0.82, 0.55], [sg * fw * 0.97, 0.5]])
    if p["hat"]:
        hb = -fh * 0.55
        sh["hat"] = np.array([[-fw * 1.5, hb + 0.12], [fw * 1.5, hb + 0.12], [fw * 1.5, hb - 0.05],
                              [fw * 1.0, hb - 0.08], [fw * 0.95, top - 0.35], [-fw * 0.95, top - 0.35],
                              [-fw * 1.0, hb - 0.08], [-fw * 1.5, hb - 0.05]])
    m = g["mouth"]
    if p["mustache"]:
        up = m[1:6]
        sh["mustache"] = np.concatenate([up + (0, -0.015), (up + (0, -0.11))[::-1]])
        sh["mustache"][[0, 4, 5, 9], 0] *= 1.25
    if p["goatee"]:
        lo = m[7:12]
        sh["goatee"] = np.array([lo[0] + (0.02, 0.03), lo[-1] + (-0.02, 0.03), [lo[-1, 0] * 0.7, jl + 0.02],
                                 [0, jl + 0.08], [lo[0, 0] * 0.7, jl + 0.02]])
    jaw = g["jaw"]
    if p["stubble"]:
        sh["stubble"] = np.concatenate([jaw[3:14], [[jaw[13, 0] * 0.6, p["mouth_y"] - 0.1],
                                                    [jaw[3, 0] * 0.6, p["mouth_y"] - 0.1]]])
    if p["double_chin"]:
        sh["double_chin"] = jaw[5:12] * (0.9, 1.0) + (0, -0.09)
    lines = []
    for k in range(p["n_forehead_lines"]):
        y = -p["forehead"] * (0.25 + 0.12 * k) + 0.0
        lines.append(np.array([[-0.45, y], [-0.15, y - 0.03], [0.15, y - 0.03], [0.45, y]]))
    if p["nasolabial"]:
        for sg in (-1, 1):
            lines.append(np.array([[sg * g["nostrils"][0, 0] * 1.4, g["nostrils"][0, 1] - 0.05],
                                   [sg * m[0, 0] * 1.05, m[0, 1] - 0.05], [sg * m[0, 0] * 1.1, m[0, 1] + 0.12]]))
    if p["crow_feet"]:
        for sg in (-1, 1):
            cx = sg * (p["eye_dx"] + p["eye_w"] + 0.05)
            for dy in (-0.05, 0.02, 0.08):
                lines.append(np.array([[cx, dy * 0.5], [cx + sg * 0.1, dy]]))
    if p["bags"]:
        for e in (g["eye_l"], g["eye_r"]):
            lines.append(e[[3, 4, 5, 0]][::1] + (0, 0.06))
    if p["nose_wrinkle"]:
        for dx in (-0.06, 0.06):
            lines.append(np.array([[dx, 0.1], [dx * 1.5, 0.2]]))
    sh["lines"] = lines
    ch = p["mouth_y"] - 0.25
    sh["cheek_l"] = ellipse(-p["eye_dx"] - 0.05, ch, 0.16, 0.1)
    sh["cheek_r"] = ellipse(p["eye_dx"] + 0.05, ch, 0.16, 0.1)
    return sh


def to_pixels(arr: np.ndarray, p: dict, depth=1.0) -> np.ndarray:
    """Face frame -> pixels: yaw-like shift (features move more than the outline; `depth` scalar or per point),
    then the similarity (rotation, scale, translation)."""
    x, y = arr[..., 0], arr[..., 1]
    t = 1.0 - x * x * (1.0 / 1.3225)                                     # 1 - (x / 1.15)^2
    np.maximum(t, 0.0, out=t)
    u = x + (p["yaw"] * depth) * np.sqrt(t)
    a, b = p["scale"] * p["cos"], p["scale"] * p["sin"]
    out = np.empty(arr.shape)
    out[..., 0] = p["cx"] + a * u - b * y
    out[..., 1] = p["cy"] + b * u + a * y
    return out


class DisplayList:
    """Drawing operations collected first, so all face-frame points go through `to_pixels` in one call.

    kind: 'fill' (image polygon), 'both' (image + mask polygon), 'line' (image), 'both_line' (image + mask).
    """

    def __init__(self):
        self.ops, self.arrays, self.depths = [], [], []

    def add(self, kind, arr, depth=1.0, col=None, cls=None, width=1, closed=False, pixels=False):
        self.ops.append((kind, len(arr), col, cls, width, closed, pixels))
        self.arrays.append(arr)
        self.depths.append(np.full(len(arr), np.nan if pixels else depth))

    def draw(self, p, di, dm):
        pts = np.concatenate(self.arrays)
        depth = np.concatenate(self.depths)
        px = np.where(np.isnan(depth)[:, None], pts, to_pixels(pts, p, np.nan_to_num(depth)))
        flat = px.ravel().tolist()
        at = 0
        for kind, n, col, cls, width, closed, _ in self.ops:
            xy = flat[at:at + 2 * n]
            at += 2 * n
            if closed:
                xy = xy + xy[:2]
            if kind in ("fill", "both"):
                di.polygon(xy, fill=col)
                if kind == "both":
                    dm.polygon(xy, fill=cls)
            else:
                di.line(xy, fill=col, width=width)
                if kind == "both_line":
                    dm.line(xy, fill=cls, width=width)


def render(p: dict, size: int, rng: np.random.Generator):
    """Draw one face. Returns (image uint8 [S,S,3], mask uint8 [S,S], landmarks float64 [68,2])."""
    img = Image.new("RGB", (size, size), p["bg"])
    msk = Image.new("L", (size, size), BG)
    di, dm = ImageDraw.Draw(img), ImageDraw.Draw(msk)
    g = face_geometry(p)
    sh = extra_shapes(p, g)
    dl = DisplayList()
    add = dl.add
    lw = max(1, int(round(p["scale"] * 0.035)))
    for kind, col, pts in p["clutter"]:                                       # background clutter (class 0)
        add("fill" if kind == 0 else "line", pts * size, col=col, width=max(1, size // 40), pixels=True)
    add("both", sh["cloth"], 0.0, p["cloth_col"], CLOTH)
    if "tie" in sh:
        add("both", sh["tie"], 0.0, p["tie_col"], CLOTH)
    add("both", sh["neck"], 0.3, p["neck_col"], NECK)
    if "necklace" in sh:
        add("both_line", sh["necklace"], 0.3, p["necklace_col"], NECKL, lw + 1)
    if "hair_back" in sh:
        add("both", sh["hair_back"], 0.2, p["hair_col"], HAIR)
    for name, cls in (("ear_l", EAR_L), ("ear_r", EAR_R)):
        add("both", g[name], 0.0, p["ear_col"], cls)
        if p["earrings"]:
            e = g[name]
            add("both", ellipse(e[:, 0].mean(), e[:, 1].max() + 0.06, 0.05, 0.05), 0.0, p["earring_col"], EARR)
    add("both", np.concatenate([g["jaw"], g["forehead"]]), 1.0, p["skin"], FACE)
    skin = np.array(p["skin"], dtype=np.float64)
    dark = tuple(int(c) for c in skin * 0.72)
    if p["rosy"] or p["blush"]:
        for k in ("cheek_l", "cheek_r"):
            add("fill", sh[k], col=p["rosy_col"])
    if p["high_cheek"]:
        light = tuple(int(min(255, c * 1.15 + 12)) for c in skin)
        for k in ("cheek_l", "cheek_r"):
            add("fill", sh[k] * (1.0, 0.5) + (0, -0.06), col=light)
    if "stubble" in sh:
        add("fill", sh["stubble"], col=tuple(int(c) for c in skin * 0.62 + 18))
    if "double_chin" in sh:
        add("line", sh["double_chin"], col=dark, width=lw)
    for line in sh["lines"]:
        add("line", line, col=p["wrinkle_col"], width=lw)
    if p["eyeshadow"]:
        lift = np.array([[0.0], [1.0], [1.0], [0.0]]) * (0.0, -1.4 * p["eye_h"])
        for e in (g["eye_l"], g["eye_r"]):
            add("fill", e[[0, 1, 2, 3]] * (1.15, 1.0) + lift, col=p["shadow_col"])
    for name, cls in (("brow_l", BROW_L), ("brow_r", BROW_R)):
        add("both", _thick(g[name], p["brow_t"]), 1.0, p["brow_col"], cls)
    r = min(p["eye_w"] * 0.45, p["eye_h"] * 0.95)
    for name, cls in (("eye_l", EYE_L), ("eye_r", EYE_R)):
        e = g[name]
        c = e.mean(0)
        add("both", e, 1.0, (245, 245, 240), cls)
        add("fill", ellipse(c[0], c[1], r, min(r, p["eye_h"] * 0.9)), col=p["iris_col"])
        add("fill", ellipse(c[0], c[1], r * 0.45, r * 0.45), col=(15, 15, 15))
        add("line", e[[0, 1, 2, 3]], col=(40, 30, 30), width=lw)
    b, n = g["bridge"], g["nostrils"]
    add("both", np.concatenate([b[:1] + (-0.05, 0.0), n, b[:1] + (0.05, 0.0)]), 1.5, p["nose_col"], NOSE)
    for k in (1, 3):
        add("fill", ellipse(n[k, 0], n[k, 1] - 0.005, 0.03, 0.016), 1.5, dark)
    add("line", b[1:] + (0.04, 0.0), 1.5, dark, width=lw)
    m = g["mouth"]
    add("both", m[[0, 1, 2, 3, 4, 5, 6, 16, 15, 14, 13, 12]], 1.0, p["lip_col"], ULIP)
    add("both", m[[6, 7, 8, 9, 10, 11, 0, 12, 19, 18, 17, 16]], 1.0, p["lip_col"], LLIP)
    if p["mouth_open"] > 0.015:
        add("both", m[12:20], 1.0, (60, 15, 20), IMOUTH)
        if p["teeth"]:
            tt = m[[12, 13, 14, 15, 16]]
            add("fill", np.concatenate([tt, (tt + (0, 0.45 * p["mouth_open"]))[::-1]]), col=(240, 240, 230))
    else:
        add("line", m[[0, 12, 13, 14, 15, 16, 6]], col=(90, 30, 35), width=lw)
    for k in ("mustache", "goatee"):
        if k in sh:
            add("fill", sh[k], col=p["beard_col"])
    if "hair_top" in sh:
        add("both", sh["hair_top"], 0.4, p["hair_col"], HAIR)
        for side in ("l", "r"):
            if "sideburn_" + side in sh:
                add("both", sh["sideburn_" + side], 0.3, p["hair_col"], HAIR)
    if p["glasses"]:
        for e in (g["eye_l"], g["eye_r"]):
            c = e.mean(0)
            rim = ellipse(c[0], c[1] - 0.01, p["eye_w"] * 1.45, 0.15)
            if p["sunglasses"]:
                add("both", rim, 1.0, (25, 25, 30), GLASS)
            add("both_line", rim, 1.0, p["frame_col"], GLASS, lw + 1, closed=True)
        x0 = p["eye_dx"] - p["eye_w"] * 1.4
        add("both_line", np.array([[-x0, -0.03], [x0, -0.03]]), 1.0, p["frame_col"], GLASS, lw + 1)
    if "hat" in sh:
        add("both", sh["hat"], 0.2, p["hat_col"], HAT)
    for pts, col in p["occluders"]:                                           # occluders (class 0)
        add("both", pts * size, col=col, cls=BG, pixels=True)
    dl.draw(p, di, dm)
    if p["blur"] > 0:
        img = img.filter(ImageFilter.GaussianBlur(float(p["blur"]) * size / 64.0))
    arr = np.asarray(img, dtype=np.float32)
    xx, yy = _grid(size)
    gain = 1.0 + p["light_grad"] * (xx * p["light_dir"][0] + yy * p["light_dir"][1])   # [S, S]
    arr = ((arr - 128.0) * p["contrast"] + 128.0 + p["brightness"]) * gain[..., None] * p["cast"]
    if p["noise"] > 0:
        arr += rng.normal(0.0, p["noise"], size=arr.shape).astype(np.float32)
    image = np.clip(arr, 0, 255).astype(np.uint8)
    # nose points use the nose's larger yaw depth so they stay on the drawn nose
    depth = np.ones(68)
    depth[27:36] = 1.5
    lm = to_pixels(landmarks68(g), p, depth)
    return image, np.asarray(msk), lm
