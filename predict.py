"""Single-image inference with every task head of a Faceptor checkpoint, in one `model.predict` call.

    python predict.py out/demo/stage1_step0000600.pt face.png
    python predict.py CHECKPOINT photo.jpg --box 120 80 360 330 --out-dir out/predict

The face is the whole image, or the square region centred on --box (side = the box's longer side times
--margin), resized to the model's two input sizes (size_512 for dense heads, size_112 for the others;
normalised). Prints JSON: landmarks in the input image's pixel coordinates (0-based, pixel centres at integers),
parsing class areas (fractions of the face region), age, expression with probabilities (AffectNet order),
attributes with probability above 0.5 (CelebA names), and the path of the identity embedding (.npy). Writes a PNG
of the input with the parsing overlay, the landmarks and the labels drawn.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from PIL import Image, ImageDraw

import checkpoint
from data.composer import normalize_images
from data.conventions import CELEBA_ATTRIBUTES, CELEBAMASK_CLASSES, EXPRESSIONS, LAPA_CLASSES
from model import TASKS

CLASS_NAMES = {"celebamask_hq": CELEBAMASK_CLASSES, "lapa": LAPA_CLASSES}
ATTRIBUTE_NAMES = {"celeba": CELEBA_ATTRIBUTES}


def face_region(width: int, height: int, box=None, margin: float = 1.0):
    """(x0, y0, w, h) of the face region in pixel-edge coordinates: the whole image, or a square on the box."""
    if box is None:
        return 0.0, 0.0, float(width), float(height)
    x1, y1, x2, y2 = map(float, box)
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"--box: expected x1 y1 x2 y2 with x2 > x1 and y2 > y1, got {box}")
    side = max(x2 - x1, y2 - y1) * margin
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return cx - side / 2, cy - side / 2, side, side


def crop_resize(image: Image.Image, region, size: int) -> torch.Tensor:
    """The region (edges; parts outside the image are black) resized to size x size -> uint8 [3, size, size]."""
    x0, y0, w, h = region
    out = image.transform((size, size), Image.Transform.EXTENT, (x0, y0, x0 + w, y0 + h),
                          resample=Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(out, dtype=np.uint8).transpose(2, 0, 1).copy())


def palette(n: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    colours = rng.integers(40, 256, size=(n, 3))
    colours[0] = 0
    return colours.astype(np.uint8)


@torch.no_grad()
def predict_image(model, image: Image.Image, box=None, margin: float = 1.0, device="cpu") -> tuple[dict, dict]:
    """(JSON-ready results, raw arrays for drawing) for one image."""
    cfg = model.cfg
    region = face_region(image.width, image.height, box, margin)
    tasks = list(cfg.tasks)
    need = {TASKS[t].size for t in tasks}
    x512 = normalize_images(crop_resize(image, region, cfg.size_512)[None], "dense").to(device) if 512 in need else None
    x112 = normalize_images(crop_resize(image, region, cfg.size_112)[None], "global").to(device) if 112 in need else None
    out = model.predict(images_512=x512, images_112=x112, tasks=tasks)                 # every head, one call
    x0, y0, w, h = region
    res = {"face_region": [x0, y0, x0 + w, y0 + h]}
    raw = {"region": region, "landmarks": {}, "parsing": {}}
    for t in tasks:
        kind, o = TASKS[t].type, out[t]
        if kind == "landmarks":
            c = o["coords"][0].float().cpu().numpy()                                   # normalised (x, y) in the face
            pts = np.stack([x0 + c[:, 0] * w - 0.5, y0 + c[:, 1] * h - 0.5], 1).astype(np.float64)      # input image pixels
            res.setdefault("landmarks", {})[t] = np.round(pts, 2).tolist()
            raw["landmarks"][t] = pts
        elif kind == "parsing":
            labels = o["logits"][0].argmax(0).cpu().numpy()
            names = CLASS_NAMES.get(t, [str(i) for i in range(TASKS[t].queries)])
            counts = np.bincount(labels.reshape(-1), minlength=len(names)) / labels.size
            res.setdefault("parsing_areas", {})[t] = {names[i]: round(float(a), 4) for i, a in enumerate(counts) if a > 0}
            raw["parsing"][t] = labels
        elif kind == "age":
            res.setdefault("age", {})[t] = round(float(o["age"][0]), 2)
        elif kind == "expression":
            p = torch.softmax(o["logits"][0].float(), 0).cpu().numpy()
            res.setdefault("expression", {})[t] = {"label": EXPRESSIONS[int(p.argmax())],
                                                  "probabilities": {n: round(float(v), 4) for n, v in zip(EXPRESSIONS, p)}}
        elif kind == "attributes":
            p = torch.sigmoid(o["logits"][0].float()).cpu().numpy()
            names = ATTRIBUTE_NAMES.get(t, [f"attribute_{i}" for i in range(len(p))])
            res.setdefault("attributes", {})[t] = {names[i]: round(float(p[i]), 4) for i in np.argsort(-p) if p[i] > 0.5}
        elif kind == "recognition":
            raw.setdefault("embedding", {})[t] = o["embedding"][0].float().cpu().numpy()
    return res, raw


def draw(image: Image.Image, res: dict, raw: dict) -> Image.Image:
    """The input with the parsing overlay (first parsing head), landmarks and text labels."""
    canvas = image.convert("RGB")
    x0, y0, w, h = raw["region"]
    if raw["parsing"]:
        t, labels = next(iter(raw["parsing"].items()))
        colours = palette(TASKS[t].queries)[labels]                                    # [S, S, 3]
        overlay = Image.fromarray(colours).resize((max(1, round(w)), max(1, round(h))), Image.Resampling.NEAREST)
        alpha = Image.fromarray(((labels > 0) * 110).astype(np.uint8)).resize(overlay.size, Image.Resampling.NEAREST)
        layer = Image.new("RGB", canvas.size)
        mask = Image.new("L", canvas.size, 0)
        layer.paste(overlay, (round(x0), round(y0)))
        mask.paste(alpha, (round(x0), round(y0)))
        canvas = Image.composite(layer, canvas, mask)
    d = ImageDraw.Draw(canvas)
    if raw["region"] != (0.0, 0.0, float(image.width), float(image.height)):
        d.rectangle([x0, y0, x0 + w, y0 + h], outline=(255, 255, 0))
    r = max(1.0, min(canvas.size) / 150)
    for pts in raw["landmarks"].values():
        for x, y in pts:
            d.ellipse([x - r, y - r, x + r, y + r], fill=(0, 255, 0))
    lines = [f"age {v:.1f}" for v in res.get("age", {}).values()]
    lines += [f"{e['label']} {max(e['probabilities'].values()):.2f}" for e in res.get("expression", {}).values()]
    for attrs in res.get("attributes", {}).values():
        lines += [", ".join(list(attrs)[i:i + 3]) for i in range(0, min(len(attrs), 9), 3)]
    if lines:
        d.rectangle([0, 0, 8 + 7 * max(len(s) for s in lines), 4 + 12 * len(lines)], fill=(0, 0, 0))
        for i, s in enumerate(lines):
            d.text((4, 2 + 12 * i), s, fill=(255, 255, 255))
    return canvas


def main(argv=None):

    p = argparse.ArgumentParser(description="Run every task head of a checkpoint on one face image.")
    p.add_argument("checkpoint", help="a checkpoint written by train.py")
    p.add_argument("image", help="an image file (a face crop, or a photo with --box)")
    p.add_argument("--box", nargs=4, type=float, metavar=("X1", "Y1", "X2", "Y2"), default=None,
                   help="face box in image pixels; the face region is the square on it (default: the whole image)")
    p.add_argument("--margin", type=float, default=1.0, help="face region side = box's longer side times this")
    p.add_argument("--out-dir", default="out/predict", help="where the PNG and the embedding .npy go")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args(argv)
    try:
        model = checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(checkpoint.resolve_checkpoint(args.checkpoint))).to(args.device)
    except checkpoint.CheckpointError as e:
        raise SystemExit(f"predict.py: {e}")
    try:
        image = Image.open(args.image).convert("RGB")
    except (OSError, ValueError) as e:
        raise SystemExit(f"predict.py: cannot read image {args.image!r}: {e}")
    res, raw = predict_image(model, image, args.box, args.margin, args.device)
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(args.image))[0]
    for t, e in raw.get("embedding", {}).items():
        path = os.path.join(args.out_dir, f"{stem}_{t}_embedding.npy")
        np.save(path, e)
        res.setdefault("embedding", {})[t] = {"path": path, "dim": int(e.shape[0]), "norm": round(float(np.linalg.norm(e)), 4)}
    png = os.path.join(args.out_dir, f"{stem}_prediction.png")
    draw(image, res, raw).save(png)
    res = {"image": args.image, "checkpoint": args.checkpoint, **res, "drawing": png}
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
