"""Photos in and answers out for predict.py: finding and decoding input images (EXIF orientation, grayscale, RGBA,
16-bit), readable output names of every head's classes, and the drawing of all faces of a photo.

Conventions (README "Outputs"): image pixels with their centres at integer coordinates, origin at the top-left of
the image as displayed (after EXIF orientation); boxes [x1, y1, x2, y2] in the same coordinates.
"""
from __future__ import annotations

import glob
import os
from typing import List, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from data.conventions import CELEBA_ATTRIBUTES, EXPRESSIONS, FAIRFACE_RACES, GENDERS, UTKFACE_RACES
from data.synthetic_labels import SYNTH_ATTRIBUTES
from model import TASKS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")

# Readable class names, in the heads' class order. "left" / "right" are the subject's own sides (the subject's
# right eye is on the image's left), as CelebAMask-HQ's FaRL names use them (README "Outputs").
CELEBAMASK_NAMES = ("background", "neck", "skin", "cloth", "right_ear", "left_ear", "right_eyebrow", "left_eyebrow",
                    "right_eye", "left_eye", "nose", "inner_mouth", "lower_lip", "upper_lip", "hair", "eyeglasses",
                    "hat", "earring", "necklace")
LAPA_NAMES = ("background", "skin", "left_eyebrow", "right_eyebrow", "left_eye", "right_eye", "nose", "upper_lip",
              "inner_mouth", "lower_lip", "hair")
CLASS_NAMES = {"celebamask_hq": CELEBAMASK_NAMES, "lapa": LAPA_NAMES}
ATTRIBUTE_NAMES = {"celeba": tuple(a.lower() for a in CELEBA_ATTRIBUTES),
                   "synth_attr": tuple(a.lower() for a in SYNTH_ATTRIBUTES)}
# Classification heads beyond the paper: gender and race, in their datasets' label order.
LABEL_NAMES = {"utkface_gender": GENDERS, "fairface_gender": GENDERS,
               "utkface_race": tuple(r.lower() for r in UTKFACE_RACES),
               "fairface_race": tuple(r.lower().replace(" ", "_") for r in FAIRFACE_RACES)}


def class_names(task: str) -> Tuple[str, ...]:
    """Output names of a head's classes (parsing classes, expressions, genders, races or attributes)."""
    kind = TASKS[task].type
    if kind == "parsing":
        return CLASS_NAMES[task]
    if kind == "expression":
        return EXPRESSIONS
    if kind in ("gender", "race"):
        return LABEL_NAMES[task]
    if kind == "attributes":
        return ATTRIBUTE_NAMES.get(task, tuple(f"attribute_{i}" for i in range(TASKS[task].queries)))
    raise ValueError(f"head {task!r} ({kind}) has no class names")


class InputError(ValueError):
    pass


def collect_inputs(specs: List[str], recursive: bool = False) -> Tuple[List[str], List[str]]:
    """Files, folders (images inside; `recursive` descends) and globs -> (image paths, specs that matched
    nothing). Folders list image extensions only; named files are taken whatever their extension."""
    paths, missing = [], []
    for spec in specs:
        if os.path.isdir(spec):
            pattern = os.path.join(spec, "**", "*") if recursive else os.path.join(spec, "*")
            found = sorted(p for p in glob.glob(pattern, recursive=recursive)
                           if os.path.isfile(p) and p.lower().endswith(IMAGE_EXTENSIONS))
        elif os.path.isfile(spec):
            found = [spec]
        else:
            found = sorted(p for p in glob.glob(spec, recursive=recursive) if os.path.isfile(p))
        if not found:
            missing.append(spec)
        paths += [p for p in found if p not in paths]
    return paths, missing


def read_photo(path: str) -> np.ndarray:
    """uint8 RGB [H, W, 3] as displayed: EXIF orientation applied, grayscale expanded, alpha composited on white,
    16-bit and float images scaled to 8 bits. Raises InputError naming the file."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
    except Exception as e:
        raise InputError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise InputError(f"{path}: image is {arr.shape[1]}x{arr.shape[0]} pixels, expected at least 2x2")
    return arr


def palette(n: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    colours = rng.integers(40, 256, size=(n, 3))
    colours[0] = 0
    return colours.astype(np.uint8)


def draw_photo(photo: np.ndarray, faces: List[dict], labels: np.ndarray | None, n_classes: int) -> Image.Image:
    """The photo with the parsing map (first parsing head) blended in, and per face its box, five points,
    every landmark head's points and a short caption (index, age, expression)."""
    canvas = Image.fromarray(photo)
    if labels is not None:
        colours = Image.fromarray(palette(n_classes)[labels])
        alpha = Image.fromarray(((labels > 0) * 110).astype(np.uint8))
        canvas = Image.composite(colours, canvas, alpha)
    d = ImageDraw.Draw(canvas)
    r = max(1.0, min(canvas.size) / 200)
    for f in faces:
        x1, y1, x2, y2 = f["box"]
        d.rectangle([x1, y1, x2, y2], outline=(255, 255, 0))
        for x, y in f["points5"] or []:
            d.ellipse([x - 2 * r, y - 2 * r, x + 2 * r, y + 2 * r], outline=(255, 0, 0))
        caption = [f"#{f['face']}"]
        for t, v in f.items():
            if t in TASKS and TASKS[t].type == "landmarks":
                for x, y in v["points"]:
                    d.ellipse([x - r, y - r, x + r, y + r], fill=(0, 255, 0))
            elif t in TASKS and TASKS[t].type == "age":
                caption.append(f"age {v['age']:.0f}")
            elif t in TASKS and TASKS[t].type == "expression":
                caption.append(v["label"])
        text = " ".join(dict.fromkeys(caption))
        d.rectangle([x1, y2 + 1, x1 + 6 * len(text) + 4, y2 + 13], fill=(0, 0, 0))
        d.text((x1 + 2, y2 + 1), text, fill=(255, 255, 255))
    return canvas
