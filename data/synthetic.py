"""SyntheticFaces: the project's built-in face world with exact labels for every Faceptor task type.

Not in the paper: it lets the whole pipeline (six task types, docs/design.md) train and be evaluated on a CPU with no
downloaded data. Faces are drawn on the fly with PIL (synthetic_draw.py), deterministic by (seed, split, index),
at any size (48 ... 512 px). Each item carries every label in the conventions of the real datasets:
  image uint8 [3,S,S]; landmarks float32 [68,2] (300W layout, 0-based pixels, exactly on the drawn features);
  mask int64 [S,S] (19 CelebAMask-HQ classes, FaRL order, conventions.CELEBAMASK_CLASSES); age float in [0,100];
  expression int in AffectNet order (conventions.EXPRESSIONS); attributes int64 [40] (CelebA order, 1/0);
  identity int; beyond the paper (synthetic_labels.py): pose float32 [3] (yaw, pitch, roll degrees), visible int64
  [68] (1 / 0), gender int (0 male, 1 female), race int (skin-tone band 0..4).
With `head` set to a transfer scheme (synthetic_labels: aflw19, cofw, cofw_visibility, lapa, synth_attr) the
landmarks, visibility, mask or attributes come in that head's scheme instead.
Identities: `n_identities` per split; identity = persistent geometry and appearance (face shape, eye spacing and
size, brows, nose, mouth, lips, skin tone, eye colour, hair style and colour, sex, glasses habit, beard, make-up
habit, base age). Item index i shows identity i % n_identities. The train and test pools are drawn from different
seed streams, so they are disjoint populations; `identity` is the index within its own split's pool.
Per item: expression (balanced, large visible changes in mouth, brows and eyes), age = base age +- 3 years,
pose (in-plane rotation, yaw-like feature shift, scale, translation), lighting (brightness, contrast, colour cast,
gradient), noise, blur, background clutter, hats, earrings, necklace, necktie and occluders (bars, hand-like
blobs; background class in the mask, landmarks unchanged).

Age is visible: child proportions (large eyes, small nose, short jaw) below 15; sagging jaw, forehead lines,
nasolabial folds, crow's feet, eye bags, thinner lips, greying hair and desaturated skin as age rises.

CelebA attributes. Drawn: 5_o_Clock_Shadow, Arched_Eyebrows, Bags_Under_Eyes, Bald, Bangs, Big_Lips, Big_Nose,
Black_Hair, Blond_Hair, Blurry, Brown_Hair, Bushy_Eyebrows, Chubby, Double_Chin, Eyeglasses, Goatee, Gray_Hair,
Heavy_Makeup (eye shadow + lipstick), High_Cheekbones (cheek highlights), Male (beards, short hair, square jaw,
thick brows; no make-up), Mouth_Slightly_Open, Mustache, Narrow_Eyes, Oval_Face, Pale_Skin, Pointy_Nose,
Receding_Hairline, Rosy_Cheeks, Sideburns, Smiling (= happiness), Straight_Hair / Wavy_Hair (hair outline),
Wearing_Earrings, Wearing_Hat, Wearing_Lipstick, Wearing_Necklace, Wearing_Necktie, Young (age < 40).
Derived from drawn ones (no random or constant attributes): No_Beard = no goatee, moustache or stubble;
Attractive = Young and not Chubby and no eye bags and not Blurry.
"""
import math

import numpy as np
import torch

from . import synthetic_labels as labels
from .conventions import ATTR, EXPRESSIONS
from .synthetic_draw import render

SPLITS = {"train": 0, "test": 1}
HAIR_COLOURS = {"black": (28, 24, 22), "brown": (105, 64, 36), "blond": (228, 192, 122), "red": (168, 72, 36)}
IRIS = ((70, 45, 25), (40, 90, 150), (60, 120, 70), (110, 80, 40), (90, 90, 100))
TASK_FIELDS = {"landmarks": ("landmarks",), "parsing": ("mask",), "age": ("age",), "expression": ("expression",),
               "attributes": ("attributes",), "recognition": ("identity",), "pose": ("pose",),
               "visibility": ("visible", "landmarks"), "gender": ("gender",), "race": ("race",)}
# transfer scheme -> the task type whose label it changes
SCHEMES = {"aflw19": "landmarks", "cofw": "landmarks", "cofw_visibility": "visibility", "lapa": "parsing",
           "synth_attr": "attributes"}
# (mouth_open, corner_lift, mouth_width_x, lip_press, asym, brow_raise, brow_inner, brow_pull, eye_open, teeth)
EXPRESSION_SHAPES = {
    "neutral": (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, False),
    "happiness": (0.15, 0.22, 1.3, 1.0, 0.0, 0.04, 0.0, 0.0, 0.5, True),
    "sadness": (0.0, -0.2, 0.9, 1.0, 0.0, 0.0, 0.14, 0.03, 0.65, False),
    "surprise": (0.45, 0.0, 0.6, 1.0, 0.0, 0.16, 0.02, 0.0, 1.8, False),
    "fear": (0.22, -0.07, 1.35, 1.0, 0.0, 0.1, 0.1, 0.07, 1.6, True),
    "disgust": (0.07, 0.03, 0.9, 1.0, 0.15, -0.04, -0.07, 0.05, 0.5, True),
    "anger": (0.0, -0.07, 0.72, 0.4, 0.0, -0.06, -0.17, 0.08, 0.45, False),
}


def _mix(a, b, t):
    return tuple(int(round(x * (1 - t) + y * t)) for x, y in zip(a, b))


def identity_params(seed: int, split: int, identity: int) -> dict:
    """Persistent geometry and appearance of one identity."""
    r = np.random.default_rng([seed, split, 1, identity])
    u = r.random(40)
    male = u[0] < 0.5
    chubby = u[1] < 0.15
    p = {"male": male, "chubby": chubby, "base_age": float(u[2] * 100.0),
         "fw": 1.0 + 0.12 * chubby + 0.12 * (u[3] - 0.5),
         "oval": u[4] < 0.3, "jaw_len": 1.28 + 0.22 * u[5] + 0.05 * male,
         "forehead": 0.95 + 0.15 * u[6], "eye_dx": 0.36 + 0.1 * u[7], "eye_w": 0.13 + 0.05 * u[8],
         "narrow": u[9] < 0.15, "brow_dy": 0.2 + 0.06 * u[10], "bushy": u[11] < (0.35 if male else 0.12),
         "arched": u[12] < (0.12 if male else 0.45), "big_nose": u[13] < 0.22, "pointy": u[14] < 0.22,
         "nose_len": 0.42 + 0.1 * u[15], "nose_w": 0.12 + 0.05 * u[16], "mouth_y": 0.8 + 0.1 * u[17],
         "mouth_w": 0.27 + 0.09 * u[18], "big_lips": u[19] < 0.2, "skin_t": float(u[20]),
         "iris": IRIS[int(u[21] * len(IRIS))], "hair": list(HAIR_COLOURS)[int(u[22] * 4)],
         "gray_onset": 35.0 + 30.0 * u[23], "hair_len": 0.0 if (male and u[24] < 0.85) or u[24] < 0.2
         else 1.2 + 1.6 * u[25], "bangs": u[26] < (0.15 if male else 0.4), "wavy": u[27] < 0.35,
         "bald_age": 30.0 + 50.0 * u[28] if male and u[29] < 0.35 else 999.0, "glasses": u[30] < 0.25,
         "ear": 0.9 + 0.25 * u[31], "hair_vol": 0.12 + 0.15 * u[32], "rosy": u[33] < 0.15,
         "high_cheek": u[34] < 0.3, "double_chin": chubby or u[35] < 0.08}
    b = r.random(8)
    p.update(mustache=male and b[0] < 0.3, goatee=male and b[1] < 0.25, stubble=male and b[2] < 0.25,
             sideburns=male and b[3] < 0.25, makeup=(not male) and b[4] < 0.45,
             lipstick=(not male) and b[5] < 0.55, earrings=(not male) and b[6] < 0.45)
    p["lipstick"] = p["lipstick"] or p["makeup"]
    jit = r.integers(-12, 13, size=6)
    p["hair_base"] = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(HAIR_COLOURS[p["hair"]], jit[:3]))
    p["cloth_pref"] = tuple(int(c) for c in r.integers(20, 236, size=3))
    return p


def _skin(t: float, age: float, pale: bool):
    dark, light = np.array([88, 58, 42]), np.array([236, 198, 170])
    c = dark + (light - dark) * t
    if pale:
        c = np.array([250, 228, 215])
    old = max(0.0, (age - 40.0) / 60.0)
    c = c * (1 - 0.2 * old) + np.array([180, 165, 140]) * 0.2 * old
    return tuple(int(v) for v in c)


def _random_colour(r, lo=0, hi=256):
    return tuple((lo + (hi - lo) * r.random(3)).astype(np.int64).tolist())


# Framing of the face in the picture: "loose" (the dense tasks' FaRL-style crops: the face moves, turns and changes
# size) or "aligned" (the 112-px datasets ship aligned face crops: a larger, centred face). Per framing: face
# half-width / size (low, range), centre jitter (x, y) / size, in-plane rotation std (rad).
FRAMING = {"loose": (0.19, 0.08, 0.14, 0.10, 0.2), "aligned": (0.28, 0.06, 0.05, 0.04, 0.08)}


def item_params(ident: dict, r: np.random.Generator, size: int, occlusion: float, clutter: bool,
                expression: int = None, framing: str = "loose") -> dict:
    """Everything one drawing needs: identity + expression, age, pose, lighting, accessories, clutter.
    `expression` forces the expression and leaves every other draw unchanged."""
    p = dict(ident)
    u = r.random(32)
    e = int(u[0] * 7) if expression is None else int(expression)
    age = float(np.clip(ident["base_age"] + 6.0 * (u[1] - 0.5), 0.0, 100.0))
    child = float(np.clip((15.0 - age) / 15.0, 0.0, 1.0))
    old = float(np.clip((age - 35.0) / 50.0, 0.0, 1.0))
    k = 0.8 + 0.2 * u[2]                                                       # expression intensity
    mo, lift, mwx, press, asym, braise, binner, bpull, eopen, teeth = EXPRESSION_SHAPES[EXPRESSIONS[e]]
    side = 1.0 if u[3] < 0.5 else -1.0
    eh = (0.04 if ident["narrow"] else 0.065) * (1 + 0.3 * child)
    p.update(expression=e, age=age, fw=ident["fw"] * (1 + 0.05 * child),
             jaw_len=ident["jaw_len"] * (1 - 0.15 * child + 0.05 * old), jaw_pow=0.7 if ident["oval"] else 0.45,
             taper=0.28 if ident["oval"] else 0.08, sag=0.1 * old, forehead=ident["forehead"] * (1 + 0.2 * child),
             eye_w=ident["eye_w"] * (1 + 0.2 * child), eye_h=max(0.035, eh * (1 + (eopen - 1) * k)),
             brow_y=-ident["brow_dy"], brow_arch=0.09 if ident["arched"] else 0.03,
             brow_t=(0.07 if ident["bushy"] else 0.045) * (1 - 0.3 * old) + 0.01 * ident["male"],
             brow_raise=braise * k, brow_inner=binner * k, brow_pull=bpull * k,
             nose_len=(ident["nose_len"] + 0.07 * ident["big_nose"]) * (1 - 0.25 * child),
             nose_w=(ident["nose_w"] + 0.07 * ident["big_nose"]) * (1 - 0.2 * child) * (0.8 if ident["pointy"] else 1),
             nose_point=0.06 if ident["pointy"] else 0.0,
             mouth_w=ident["mouth_w"] * (1 + (mwx - 1) * k), mouth_open=mo * k, lift=lift * k, asym=asym * k * side,
             lip_t=(0.07 if ident["big_lips"] else 0.042) * press * (1 - 0.3 * old), teeth=teeth and mo > 0,
             nose_wrinkle=EXPRESSIONS[e] == "disgust")
    adult = age >= 17.0
    for k in ("mustache", "goatee", "stubble", "sideburns", "makeup", "lipstick"):
        p[k] = ident[k] and adult
    p["bald"] = age >= ident["bald_age"]
    p["recede"] = 0.6 if ident["male"] and age > ident["bald_age"] - 12 else 0.0
    gray = float(np.clip((age - ident["gray_onset"]) / 25.0, 0.0, 1.0))
    p["gray"] = gray
    p["hair_col"] = _mix(ident["hair_base"], (190, 190, 195), gray)
    p["brow_col"] = _mix(tuple(int(c * 0.8) for c in ident["hair_base"]), (150, 150, 150), gray * 0.7)
    p["beard_col"] = p["hair_col"]
    pale = ident["skin_t"] > 0.9
    p["skin"] = _skin(ident["skin_t"], age, pale)
    p["ear_col"] = tuple(int(c * 0.93) for c in p["skin"])
    p["neck_col"] = tuple(int(c * 0.88) for c in p["skin"])
    p["nose_col"] = tuple(int(min(255, c * 1.06)) for c in p["skin"])
    p["wrinkle_col"] = tuple(int(c * 0.62) for c in p["skin"])
    p["lip_col"] = (190, 20, 45) if p["lipstick"] else _mix(p["skin"], (170, 80, 80), 0.55)
    p["iris_col"] = ident["iris"]
    p["rosy_col"] = _mix(p["skin"], (230, 90, 100), 0.55)
    p["blush"] = p["makeup"]
    p["eyeshadow"] = p["makeup"]
    p["shadow_col"] = _random_colour(r, 60, 200) if u[4] < 0.5 else (110, 60, 140)
    p["n_forehead_lines"] = int(round(4 * old))
    p["nasolabial"] = age > 32
    p["crow_feet"] = age > 45
    p["bags"] = age > 55
    p["glasses"] = (u[5] < 0.92) if ident["glasses"] else (u[5] < 0.03)
    p["sunglasses"] = p["glasses"] and u[6] < 0.25
    p["frame_col"] = (20, 20, 20) if u[7] < 0.6 else _random_colour(r, 0, 200)
    p["hat"] = u[8] < 0.13
    p["hat_col"] = _random_colour(r)
    p["earrings"] = ident["earrings"] or u[9] < 0.03
    p["earring_col"] = (230, 200, 60) if u[10] < 0.5 else (200, 200, 210)
    p["necklace"] = u[11] < 0.2
    p["necklace_col"] = (235, 205, 80) if u[12] < 0.5 else (220, 220, 230)
    p["necktie"] = ident["male"] and u[13] < 0.3
    p["tie_col"] = _random_colour(r, 0, 180)
    p["cloth_col"] = ident["cloth_pref"] if u[14] < 0.3 else _random_colour(r)
    p["hair_len"] = ident["hair_len"]
    p["hair_vol"] = ident["hair_vol"]
    p["wavy"] = float(ident["wavy"])
    p["blur"] = 0.6 + 0.6 * u[15] if u[16] < 0.07 else 0.0
    # pose: in-plane rotation, yaw-like feature shift, scale, translation (face half-width in pixels)
    s0, ds, jx, jy, rs = FRAMING[framing]
    rot = float(np.clip(r.normal(0.0, rs), -2.5 * rs, 2.5 * rs))
    p.update(cos=math.cos(rot), sin=math.sin(rot), yaw=0.3 * (2 * u[17] - 1), scale=size * (s0 + ds * u[18]),
             cx=size * (0.5 + jx * (u[19] - 0.5)), cy=size * (0.47 + jy * (u[20] - 0.5)))
    # lighting
    a = 2 * math.pi * u[21]
    p.update(contrast=0.7 + 0.5 * u[22], brightness=50.0 * (u[23] - 0.5), light_grad=0.35 * u[24],
             light_dir=(math.cos(a), math.sin(a)),
             cast=np.array(1.0 + 0.2 * (r.random(3) - 0.5), dtype=np.float32),
             noise=6.0 * u[25] if u[26] < 0.3 else 0.0)
    p["bg"] = _random_colour(r)
    items = []
    if clutter:
        for _ in range(int(r.integers(2, 8))):
            c = r.random(2)
            if r.random() < 0.7:
                ang = np.sort(r.random(int(r.integers(3, 7)))) * 2 * math.pi
                rad = 0.05 + 0.2 * r.random(len(ang))
                items.append((0, _random_colour(r), c + np.stack([np.cos(ang), np.sin(ang)], 1) * rad[:, None]))
            else:
                items.append((1, _random_colour(r), np.stack([c, r.random(2)])))
    p["clutter"] = items
    occ = []
    if r.random() < occlusion:
        c = np.array([p["cx"], p["cy"]]) / size + (r.random(2) - 0.5) * 0.3
        col = _random_colour(r) if r.random() < 0.5 else _mix(p["skin"], _random_colour(r), 0.3)
        if r.random() < 0.5:                                                  # bar
            t = 2 * math.pi * r.random()
            d, n = np.array([math.cos(t), math.sin(t)]), np.array([-math.sin(t), math.cos(t)])
            w = 0.03 + 0.04 * r.random()
            occ.append((np.stack([c - d * 0.6 - n * w, c + d * 0.6 - n * w, c + d * 0.6 + n * w,
                                  c - d * 0.6 + n * w]), col))
        else:                                                                 # hand-like blob: palm + fingers
            pr = 0.06 + 0.04 * r.random()
            t = np.linspace(0, 2 * math.pi, 12, endpoint=False)
            occ.append((c + np.stack([np.cos(t), np.sin(t)], 1) * pr, col))
            base = 2 * math.pi * r.random()
            for f in range(4):
                a = base + (f - 1.5) * 0.35
                d, n = np.array([math.cos(a), math.sin(a)]), np.array([-math.sin(a), math.cos(a)])
                s0, s1, w = c + d * pr * 0.7, c + d * pr * 2.1, pr * 0.22
                occ.append((np.stack([s0 - n * w, s1 - n * w, s1 + n * w, s0 + n * w]), col))
    p["occluders"] = occ
    return p


def attributes_of(p: dict) -> np.ndarray:
    """The 40 CelebA attributes (1/0) of a drawn face, from the same parameters that drew it."""
    a = np.zeros(40, dtype=np.int64)
    hair_visible = not p["bald"]
    gray = p["gray"] > 0.5
    young = p["age"] < 40.0
    set_ = {"5_o_Clock_Shadow": p["stubble"], "Arched_Eyebrows": p["arched"], "Bags_Under_Eyes": p["bags"],
            "Bald": p["bald"], "Bangs": p["bangs"] and hair_visible, "Big_Lips": p["big_lips"],
            "Big_Nose": p["big_nose"], "Black_Hair": hair_visible and not gray and p["hair"] == "black",
            "Blond_Hair": hair_visible and not gray and p["hair"] == "blond", "Blurry": p["blur"] > 0,
            "Brown_Hair": hair_visible and not gray and p["hair"] == "brown", "Bushy_Eyebrows": p["bushy"],
            "Chubby": p["chubby"], "Double_Chin": p["double_chin"], "Eyeglasses": p["glasses"],
            "Goatee": p["goatee"], "Gray_Hair": hair_visible and gray, "Heavy_Makeup": p["makeup"],
            "High_Cheekbones": p["high_cheek"], "Male": p["male"], "Mouth_Slightly_Open": p["mouth_open"] > 0.015,
            "Mustache": p["mustache"], "Narrow_Eyes": p["narrow"],
            "No_Beard": not (p["goatee"] or p["mustache"] or p["stubble"]), "Oval_Face": p["oval"],
            "Pale_Skin": p["skin_t"] > 0.9, "Pointy_Nose": p["pointy"], "Receding_Hairline": p["recede"] > 0,
            "Rosy_Cheeks": p["rosy"], "Sideburns": p["sideburns"] and hair_visible,
            "Smiling": EXPRESSIONS[p["expression"]] == "happiness",
            "Straight_Hair": hair_visible and p["wavy"] == 0, "Wavy_Hair": hair_visible and p["wavy"] > 0,
            "Wearing_Earrings": p["earrings"], "Wearing_Hat": p["hat"], "Wearing_Lipstick": p["lipstick"],
            "Wearing_Necklace": p["necklace"], "Wearing_Necktie": p["necktie"], "Young": young}
    set_["Attractive"] = young and not p["chubby"] and not p["bags"] and p["blur"] == 0
    for name, v in set_.items():
        a[ATTR[name]] = int(bool(v))
    return a


# Rendered items of every SyntheticFaces(cache=True) in this process, shared by the per-task views of one split and
# size (a face drawn for the landmark head is reused by the parsing head): key = (seed, split, size, identities,
# occlusion, clutter, index). Epochs after the first cost no drawing. Masks are kept as uint8.
_CACHE = {}


class SyntheticFaces(torch.utils.data.Dataset):
    """Procedurally drawn faces with all labels; see the module docstring.

    task: None (all labels) or one task type of TASK_FIELDS (image + that type's label only).
    head: None (the drawn schemes: 68 points, 19 classes, CelebA's 40 attributes) or a transfer scheme of SCHEMES
        (a task head name), whose labels replace the drawn ones of its task type.
    transform: optional callable(item, generator) -> item, used by `get(index, seed)` (the composer's path).
    cache: keep rendered items in memory (process-wide, shared by views of the same split and size).
    framing: "loose" (default; pose, position and size vary widely) or "aligned" (a larger, centred face, like the
        aligned crops of the 112-px datasets); see FRAMING.
    """

    def __init__(self, split: str = "train", size: int = 112, length: int = None, seed: int = 0,
                 n_identities: int = 1000, task: str = None, transform=None, occlusion: float = 0.25,
                 clutter: bool = True, cache: bool = False, framing: str = "loose", head: str = None):
        if split not in SPLITS:
            raise ValueError(f"SyntheticFaces split must be one of {tuple(SPLITS)}, got {split!r}")
        if task is not None and task not in TASK_FIELDS:
            raise ValueError(f"SyntheticFaces task must be None or one of {tuple(TASK_FIELDS)}, got {task!r}")
        if head is not None and (head not in SCHEMES or task not in (None, SCHEMES[head])):
            raise ValueError(f"SyntheticFaces head must be None or a transfer scheme of {SCHEMES} (head: task type), "
                             f"got head {head!r} with task {task!r}")
        if size < 16:
            raise ValueError(f"SyntheticFaces size must be >= 16 pixels, got {size}")
        self.split, self.size, self.seed, self.task = split, int(size), int(seed), task
        self.n_identities = int(n_identities)
        self.length = int(length if length is not None else (20 if split == "train" else 2) * self.n_identities)
        self.transform, self.occlusion, self.clutter = transform, float(occlusion), bool(clutter)
        self.cache = bool(cache)
        if framing not in FRAMING:
            raise ValueError(f"SyntheticFaces framing must be one of {tuple(FRAMING)}, got {framing!r}")
        self.framing, self.head = framing, head
        self.task_type = task or "attributes"
        self._ids = {}

    def __len__(self):
        return self.length

    def identity_of(self, index: int) -> int:
        return index % self.n_identities

    def _identity(self, identity: int) -> dict:
        p = self._ids.get(identity)
        if p is None:
            p = self._ids[identity] = identity_params(self.seed, SPLITS[self.split], identity)
        return p

    def params(self, index: int) -> dict:
        r = np.random.default_rng([self.seed, SPLITS[self.split], 0, index])
        return item_params(self._identity(self.identity_of(index)), r, self.size, self.occlusion, self.clutter,
                           framing=self.framing), r

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for SyntheticFaces of length {self.length}")
        key = (self.seed, self.split, self.size, self.n_identities, self.occlusion, self.clutter, self.framing, index)
        item = _CACHE.get(key) if self.cache else None
        if item is None:
            p, r = self.params(index)
            image, mask, lm = render(p, self.size, r)
            item = {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                    "landmarks": torch.from_numpy(lm.astype(np.float32)),
                    "mask": torch.from_numpy(mask.astype(np.uint8)),
                    "age": float(p["age"]), "expression": int(p["expression"]),
                    "attributes": torch.from_numpy(attributes_of(p)), "identity": self.identity_of(index),
                    "pose": torch.from_numpy(labels.pose_of(p).astype(np.float32)),
                    "gender": labels.gender_of(p), "race": labels.race_of(p)}
            if self.cache:
                _CACHE[key] = item
        item = dict(item, image=item["image"].clone(), landmarks=item["landmarks"].clone(),
                    mask=item["mask"].long(), attributes=item["attributes"].clone(), pose=item["pose"].clone())
        if self.task in (None, "visibility"):         # only when asked for: the occluding shapes cost a re-trace
            item["visible"] = torch.from_numpy(labels.visibility(item["landmarks"].double().numpy(),
                                                                 self.occluding_polygons(index)))
        if self.head is not None:
            item = self.relabel(item, index, self.head)
        if self.task is not None:
            item = {k: item[k] for k in ("image",) + TASK_FIELDS[self.task]}
        return item

    def occluding_polygons(self, index: int) -> list:
        """Pixel polygons of the shapes drawn over the features of face `index` (synthetic_labels)."""
        return labels.occluding_polygons(self.params(index)[0], self.size)

    def relabel(self, item: dict, index: int, head: str) -> dict:
        """`item` (face `index` of this dataset, drawn labels) with the labels of transfer scheme `head`."""
        out = dict(item)
        if head in labels.POINT_MAPS:
            pts = labels.map_points(item["landmarks"].double().numpy(), labels.POINT_MAPS[head])
            out["landmarks"] = torch.from_numpy(pts.astype(np.float32))
            if "visible" in item:                       # the 68 points' flags were asked for: give the K points'
                out["visible"] = torch.from_numpy(labels.visibility(pts, self.occluding_polygons(index)))
        elif head == "lapa":
            out["mask"] = torch.from_numpy(labels.map_classes(item["mask"].numpy()))
        elif head == "synth_attr":
            out["attributes"] = torch.from_numpy(labels.synth_attributes_of(self.params(index)[0]))
        else:
            raise ValueError(f"relabel: unknown transfer scheme {head!r}; expected one of {tuple(SCHEMES)}")
        return out

    def get(self, index: int, seed: int) -> dict:
        item = self[index]
        if self.transform is not None:
            item = self.transform(item, torch.Generator().manual_seed(seed))
        return item

    def verification_pairs(self, n_pairs: int, seed: int = 0) -> list:
        """[(index_a, index_b, issame)] on this split's identities: n_pairs // 2 positives, in shuffled order.

        Positives are two different images of one identity, negatives images of two different identities.
        """
        per_id = self.length // self.n_identities
        if per_id < 2:
            raise ValueError(f"verification pairs need >= 2 images per identity: length {self.length} with "
                             f"{self.n_identities} identities; raise length to >= {2 * self.n_identities}")
        r = np.random.default_rng([seed, SPLITS[self.split], 2])
        pairs = []
        n_pos = n_pairs // 2
        for k in range(n_pairs):
            same = k < n_pos
            i = int(r.integers(self.n_identities))
            j = i if same else int((i + r.integers(1, self.n_identities)) % self.n_identities)
            a, b = r.choice(per_id, size=2, replace=not same) if same else r.integers(per_id, size=2)
            pairs.append((i + int(a) * self.n_identities, j + int(b) * self.n_identities, same))
        order = r.permutation(n_pairs)
        return [pairs[o] for o in order]
