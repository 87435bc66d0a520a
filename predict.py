"""Photos in, answers out: face detection, per-head framing, every task head, results in the photo's coordinates.

    python predict.py out/demo photo.jpg                                   # our checkpoint (file or run folder)
    python predict.py checkpoint_rank0_iter_50000.pth.tar photos/ --recursive --out-dir out/predict --save-mask
    python predict.py CHECKPOINT photo.jpg --points5 210 180 290 182 250 230 220 280 282 281   # one face, no detector
    python predict.py CHECKPOINT crop.png --no-detect                      # the image is one face crop

Pipeline per batch of faces: decode (EXIF orientation, grayscale, RGBA, 16-bit; photo_io.py) -> MTCNN (detect.py;
or --box / --points5 / --no-detect) -> per-head framing from the five points (framing.py: each head's crop is
made the way its training data were framed) -> the model, once per framing for all faces of the batch (heads that
share a framing share one encoder pass) -> back to the photo: landmarks through the inverse warp, parsing logits
warped back and merged into one label map of the whole photo.
Writes OUT_DIR/predictions.jsonl (one JSON object per face; keys in README "Outputs"), one drawn PNG per image,
an .npy per recognition embedding and, with --save-mask, a label PNG per parsing head and image.
Bad inputs are named on stderr and counted; the exit status is 1 when any input failed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import checkpoint
import detect
import framing
import photo_io
from data.composer import normalize_images
from data.transforms import Warp
from model import TASKS


# ------------------------------------------------------------------------------------------------------ model
def load_model(path: str, device: str = "cpu"):
    """(model, {task: framing name}, kind) from our checkpoint (file or run folder) or the authors' file."""
    try:
        ckpt = checkpoint.load_checkpoint(checkpoint.resolve_checkpoint(path))
    except checkpoint.CheckpointError as ours:
        if not os.path.isfile(path) or "field 'format'" not in str(ours):
            raise
        try:
            model, extras = checkpoint.model_from_official(path)
        except checkpoint.CheckpointError as theirs:
            raise checkpoint.CheckpointError(
                f"checkpoint {path!r}: unknown format; expected a checkpoint written by train.py (field 'format' = "
                f"{checkpoint.CHECKPOINT_FORMAT!r}) or one of the authors' Faceptor Base / Full / Naive checkpoints "
                f"(stage 1 or 2, 'state_dict' of backbone_module / heads_module tensors). {theirs}") from None
        return model.to(device), framing.head_framings(model.cfg.tasks, None), f"authors' {extras['kind']}"
    model = checkpoint.model_from_checkpoint(ckpt).to(device)
    return model, framing.head_framings(model.cfg.tasks, ckpt["config"]), "ours"


def run_heads(model, images: torch.Tensor, tasks: List[str]) -> Dict[str, dict]:
    """Normalised images [B, 3, S, S] of one framing through `tasks` (one encoder pass for Faceptor)."""
    size = TASKS[tasks[0]].size
    if hasattr(model, "predict"):
        return model.predict(**{f"images_{size}": images}, tasks=tasks)
    return {t: model(images, t) for t in tasks}                                     # Naive Faceptor


# ------------------------------------------------------------------------------------------------------ faces
class Photo:
    """One decoded input image, its faces and a pyramid for antialiased cropping."""

    def __init__(self, path: str, rgb: np.ndarray):
        self.path, self.rgb = path, rgb
        self.H, self.W = rgb.shape[:2]
        self.levels = [torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float()]    # [3, H, W], halved per level
        self.faces: List[dict] = []

    def crop(self, warp: Warp) -> torch.Tensor:
        """uint8 [3, S, S]: the warp's input, sampled from the pyramid level that keeps >= 1 source px per output
        px (bilinear interpolation alone would alias when a large face is shrunk)."""
        k = abs(np.linalg.det(warp.matrix[:2, :2])) ** 0.5                         # output px per photo px
        level = max(0, int(np.floor(np.log2(1.0 / max(k, 1e-9)))))
        while len(self.levels) <= level and min(self.levels[-1].shape[1:]) >= 4:
            self.levels.append(F.avg_pool2d(self.levels[-1][None], 2, ceil_mode=True)[0])
        level = min(level, len(self.levels) - 1)
        f = 2.0 ** level
        down = np.array([[f, 0, 0.5 * f - 0.5], [0, f, 0.5 * f - 0.5], [0, 0, 1.0]])  # level px -> photo px
        out = Warp(warp.matrix @ down, warp.S, warp.w).apply_image(self.levels[level])
        return out.round().clamp(0, 255).to(torch.uint8)


def find_faces(photo: Photo, args, detector) -> List[framing.FaceGeometry]:
    """Faces of one photo, best first: --points5, --box, --no-detect, or the detector."""
    if args.points5 is not None:
        p5 = np.asarray(args.points5, np.float64).reshape(5, 2)
        _check_inside(photo, p5.min(0).tolist() + p5.max(0).tolist(), "--points5")
        return [framing.FaceGeometry(p5, None)]
    if args.box is not None:
        _check_inside(photo, args.box, "--box")
        return [framing.FaceGeometry(framing.points_from_box(args.box), np.asarray(args.box, np.float64))]
    if args.no_detect:
        return [framing.FaceGeometry(None, np.array([-0.5, -0.5, photo.W - 0.5, photo.H - 0.5]))]
    found = [f for f in detector.detect(photo.rgb) if min(f.box[2] - f.box[0], f.box[3] - f.box[1]) >= args.min_face]
    return [framing.FaceGeometry(f.points5, f.box, f.score) for f in found[:args.max_faces]]


def _check_inside(photo: Photo, box, flag: str):
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (x2 > x1 and y2 > y1) and flag == "--box":
        raise photo_io.InputError(f"{photo.path}: {flag} {box} must have x2 > x1 and y2 > y1")
    if x2 < 0 or y2 < 0 or x1 > photo.W - 1 or y1 > photo.H - 1:
        raise photo_io.InputError(f"{photo.path}: {flag} {[round(float(v), 1) for v in box]} lies outside the "
                                  f"{photo.W}x{photo.H} image (x in 0..{photo.W - 1}, y in 0..{photo.H - 1})")


def face_warp(name: str, face: framing.FaceGeometry, photo: Photo, S: int) -> Warp:
    if face.points5 is None:                                                       # --no-detect: the whole image
        return Warp(data_similarity(photo, S), S)
    return framing.build_warp(name, face, S)


def data_similarity(photo: Photo, S: int) -> np.ndarray:
    from data.transforms import similarity
    return similarity(((photo.W - 1) / 2, (photo.H - 1) / 2), max(photo.H, photo.W), S)


# ------------------------------------------------------------------------------------------------------ heads
def decode_points(out: dict, i: int, warp: Warp, S: int) -> dict:
    c = out["coords"][i].float().cpu().numpy().astype(np.float64) * S - 0.5        # [K, 2] input pixels
    return {"points": np.round(warp.inverse_points(c), 2).tolist()}


def decode(task: str, out: dict, i: int, warp: Warp, S: int) -> dict:
    """One face's output of one head, in the photo's coordinates and readable names."""
    kind = TASKS[task].type
    if kind == "landmarks":
        return decode_points(out, i, warp, S)
    if kind == "parsing":
        labels = out["logits"][i].argmax(0).cpu().numpy()
        names = photo_io.class_names(task)
        area = np.bincount(labels.reshape(-1), minlength=len(names)) / labels.size
        return {"areas": {n: round(float(a), 4) for n, a in zip(names, area)}}
    if kind == "age":
        return {"age": round(float(out["age"][i]), 2)}
    if kind in ("expression", "gender", "race"):
        p = torch.softmax(out["logits"][i].float(), 0).cpu().numpy()
        names = photo_io.class_names(task)
        return {"label": names[int(p.argmax())], "probs": {n: round(float(v), 4) for n, v in zip(names, p)}}
    if kind == "attributes":
        p = torch.sigmoid(out["logits"][i].float()).cpu().numpy()
        return {"probs": {n: round(float(v), 4) for n, v in zip(photo_io.class_names(task), p)}}
    if kind == "pose":                               # degrees; convention in data/conventions.py (README "Outputs")
        return {n: round(float(v), 2) for n, v in zip(("yaw", "pitch", "roll"), out["pose"][i].tolist())}
    if kind == "visibility":                         # per point of the head's scheme: probability it is occluded
        res = {"occluded": [round(float(v), 4) for v in out["occluded"][i].tolist()]}
        if "coords" in out:                          # Faceptor's visibility tokens also locate their points
            res.update(decode_points(out, i, warp, S))
        return res
    return {}                                                                      # recognition: see run_batch


@torch.no_grad()
def run_batch(model, framings: Dict[str, str], tasks: List[str], batch: list, device: str, timer: dict):
    """batch: [(photo, face record, FaceGeometry)]; fills every record with every head's answer."""
    groups: Dict[str, List[str]] = {}
    for t in tasks:
        groups.setdefault(framings[t], []).append(t)
    for name, group in groups.items():
        S = model.cfg.input_size(group[0])
        t0 = time.perf_counter()
        warps = [face_warp(name, g, photo, S) for photo, _, g in batch]
        x = torch.stack([photo.crop(w) for (photo, _, _), w in zip(batch, warps)])     # [B, 3, S, S] uint8
        x = normalize_images(x, "dense" if TASKS[group[0]].size == 512 else "global").to(device)
        t1 = time.perf_counter()
        out = run_heads(model, x, group)
        t2 = time.perf_counter()
        for i, ((photo, rec, _), w) in enumerate(zip(batch, warps)):
            for t in group:
                rec[t] = decode(t, out[t], i, w, S)
                if TASKS[t].type == "parsing":
                    rec["_parsing"][t] = (out[t]["logits"][i].float().cpu(), w)
                elif TASKS[t].type == "recognition":
                    rec["_embedding"][t] = F.normalize(out[t]["embedding"][i].float(), dim=0).cpu().numpy()
        timer["framing"] += t1 - t0
        timer["model"] += t2 - t1
        timer["mapping"] += time.perf_counter() - t2


def merge_parsing(photo: Photo, faces: List[dict], task: str) -> np.ndarray:
    """uint8 [H, W] label map of the whole photo: each pixel takes the label of the face whose crop covers it
    with the most confident foreground; pixels outside every crop are background (0)."""
    labels = np.zeros((photo.H, photo.W), np.uint8)
    best = np.full((photo.H, photo.W), -0.5, np.float32)
    for f in faces:
        logits, w = f["_parsing"][task]
        S = w.S
        corners = w.inverse_points(np.array([[-0.5, -0.5], [S - 0.5, -0.5], [S - 0.5, S - 0.5], [-0.5, S - 0.5]]))
        x0, y0 = (max(0, int(np.floor(v))) for v in corners.min(0))
        x1, y1 = (min(n - 1, int(np.ceil(v))) for n, v in zip((photo.W, photo.H), corners.max(0)))
        if x1 < x0 or y1 < y0:
            continue
        shift = np.array([[1, 0, x0], [0, 1, y0], [0, 0, 1.0]])                  # region px -> photo px
        sub = Warp(w.matrix @ shift, S, w.w)
        size = (y1 - y0 + 1, x1 - x0 + 1)
        probs = torch.softmax(sub.inverse_image(logits, size), 0)                  # [C, h, w]
        covered = sub.inverse_image(torch.ones(1, S, S), size)[0] > 0.5
        conf = torch.where(covered, 1.0 - probs[0], torch.tensor(-1.0)).numpy()
        win = conf > best[y0:y1 + 1, x0:x1 + 1]
        best[y0:y1 + 1, x0:x1 + 1][win] = conf[win]
        labels[y0:y1 + 1, x0:x1 + 1][win] = probs.argmax(0).numpy().astype(np.uint8)[win]
    return labels


# ------------------------------------------------------------------------------------------------------ output
def finish_photo(photo: Photo, tasks: List[str], args, stem: str, out) -> None:
    """Write one photo's masks, embeddings, drawing and JSON lines."""
    maps = {t: merge_parsing(photo, photo.faces, t) for t in tasks
            if TASKS[t].type == "parsing" and photo.faces and (args.save_mask or not args.no_draw)}
    for t, m in maps.items():
        if args.save_mask:
            path = os.path.join(args.out_dir, "masks", f"{stem}_{t}.png")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(m).save(path)
            for f in photo.faces:
                f[t]["mask"] = path
    for f in photo.faces:
        for t, e in f.pop("_embedding").items():
            path = os.path.join(args.out_dir, "embeddings", f"{stem}_face{f['face']}_{t}.npy")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            np.save(path, e.astype(np.float32))
            f[t] = {"embedding": path, "dim": int(e.shape[0])}
        f.pop("_parsing")
        out.write(json.dumps(f) + "\n")
    if not args.no_draw:
        first = next(iter(maps), None)
        img = photo_io.draw_photo(photo.rgb, photo.faces, maps.get(first), TASKS[first].queries if first else 0)
        img.save(os.path.join(args.out_dir, f"{stem}_prediction.png"))
    photo.levels = None                                                            # free the pyramid


def face_record(photo: Photo, index: int, g: framing.FaceGeometry) -> dict:
    box = g.box if g.box is not None else _box_of_points(g.points5)
    return {"image": photo.path, "face": index, "box": [round(float(v), 2) for v in box],
            "points5": None if g.points5 is None else np.round(g.points5, 2).tolist(),
            "score": None if g.score is None else round(float(g.score), 4), "_parsing": {}, "_embedding": {}}


def _box_of_points(p5: np.ndarray) -> np.ndarray:
    U, box = framing.template_box(p5, framing.DETECTOR_BOX_112)
    x1, y1, x2, y2 = box
    c = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]]) @ U[:2, :2]           # back from the upright frame
    return np.concatenate([c.min(0), c.max(0)])


def stems(paths: List[str]) -> List[str]:
    """Output file stems: the file name without extension, numbered when two inputs share one."""
    seen, out = {}, []
    for p in paths:
        s = os.path.splitext(os.path.basename(p))[0]
        seen[s] = seen.get(s, 0) + 1
        out.append(s if seen[s] == 1 else f"{s}_{seen[s]}")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Faces in photos -> every task head's answer, in the photo's coordinates.")
    p.add_argument("checkpoint", help="a checkpoint written by train.py (or its run folder), or one of the authors' "
                                      "checkpoint_rank0_iter_*.pth.tar files")
    p.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--recursive", action="store_true", help="descend into sub-folders of folder inputs (and ** globs)")
    p.add_argument("--out-dir", default="out/predict", help="predictions.jsonl, drawings, masks and embeddings go here")
    p.add_argument("--tasks", nargs="+", default=None, help="a subset of the checkpoint's heads (default: all)")
    p.add_argument("--box", nargs=4, type=float, metavar=("X1", "Y1", "X2", "Y2"), default=None,
                   help="one face with this box (image pixels), no detector")
    p.add_argument("--points5", nargs="+", type=float, default=None, metavar="XY",
                   help="one face with these five points (x1 y1 ... x5 y5: image-left eye centre, image-right eye "
                        "centre, nose tip, image-left mouth corner, image-right mouth corner), no detector")
    p.add_argument("--no-detect", action="store_true", help="each image is one face crop, given whole to every head")
    p.add_argument("--max-faces", type=int, default=20, help="at most this many faces per image (best scores first)")
    p.add_argument("--min-face", type=float, default=20.0, help="smallest face (box side, pixels) to detect")
    p.add_argument("--detector-weights", default=None,
                   help="folder with MTCNN pnet.pt, rnet.pt, onet.pt (default: the installed facenet-pytorch wheel)")
    p.add_argument("--batch-size", type=int, default=8, help="faces per model call (across images)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (slow start, faster batches)")
    p.add_argument("--save-mask", action="store_true", help="write a label PNG of the whole photo per parsing head")
    p.add_argument("--no-draw", action="store_true", help="do not write the drawn PNG per image")
    args = p.parse_args(argv)
    if args.points5 is not None and len(args.points5) != 10:
        p.error(f"--points5: expected 10 numbers (x y of 5 points), got {len(args.points5)}")
    if sum(x is not None and x is not False for x in (args.box, args.points5, args.no_detect or None)) > 1:
        p.error("--box, --points5 and --no-detect exclude one another")
    if args.batch_size < 1 or args.max_faces < 1:
        p.error("--batch-size and --max-faces must be >= 1")
    return args


def predict_photo(model, framings: Dict[str, str], rgb: np.ndarray, faces: List[framing.FaceGeometry],
                  tasks: Optional[List[str]] = None, device: str = "cpu") -> tuple:
    """In-memory pipeline for one photo (uint8 [H, W, 3]) and its faces -> (records, {parsing head: label map}).
    Records are as in predictions.jsonl, with recognition embeddings as arrays under "embedding"."""
    tasks = list(tasks or model.cfg.tasks)
    photo = Photo("<array>", rgb)
    batch = []
    for k, g in enumerate(faces):
        rec = face_record(photo, k, g)
        photo.faces.append(rec)
        batch.append((photo, rec, g))
    timer = dict.fromkeys(("framing", "model", "mapping"), 0.0)
    if batch:
        run_batch(model, framings, tasks, batch, device, timer)
    maps = {t: merge_parsing(photo, photo.faces, t) for t in tasks if TASKS[t].type == "parsing" and batch}
    for f in photo.faces:
        for t, e in f.pop("_embedding").items():
            f[t] = {"embedding": e}
        f.pop("_parsing")
    return photo.faces, maps


def load_detector(args):
    if args.box is not None or args.points5 is not None or args.no_detect:
        return None
    return detect.MTCNN.from_weights(args.detector_weights, min_face=max(12.0, args.min_face))


def compile_model(model):
    """torch.compile the encoder and the decoder (nearly all of the time); heads and glue stay eager."""
    for name in ("encoder", "decoder"):
        if isinstance(getattr(model, name, None), torch.nn.Module):
            setattr(model, name, torch.compile(getattr(model, name)))
    return model


def process(model, framings: Dict[str, str], tasks: List[str], args, detector) -> tuple:
    """Every input of args through the pipeline -> (failed inputs, images, faces, seconds per stage, jsonl path)."""
    paths, missing = photo_io.collect_inputs(args.inputs, args.recursive)
    failed = len(missing)
    for m in missing:
        print(f"predict.py: {m}: no such file, or no image in it", file=sys.stderr)
    os.makedirs(args.out_dir, exist_ok=True)
    jsonl = os.path.join(args.out_dir, "predictions.jsonl")
    timer = dict.fromkeys(("decode", "detect", "framing", "model", "mapping", "write"), 0.0)
    batch, open_photos, n_faces = [], [], 0
    with open(jsonl, "w") as out:
        def flush(final: bool):
            nonlocal batch
            while batch and (final or len(batch) >= args.batch_size):
                run_batch(model, framings, tasks, batch[:args.batch_size], args.device, timer)
                batch = batch[args.batch_size:]
            waiting = {id(p) for p, _, _ in batch}
            t = time.perf_counter()
            for photo, stem in [ps for ps in open_photos if id(ps[0]) not in waiting]:
                finish_photo(photo, tasks, args, stem, out)
                open_photos.remove((photo, stem))
            timer["write"] += time.perf_counter() - t

        for path, stem in zip(paths, stems(paths)):
            t0 = time.perf_counter()
            try:
                photo = Photo(path, photo_io.read_photo(path))
                t1 = time.perf_counter()
                faces = find_faces(photo, args, detector)
            except photo_io.InputError as e:
                print(f"predict.py: {e}", file=sys.stderr)
                failed += 1
                continue
            timer["decode"] += t1 - t0
            timer["detect"] += time.perf_counter() - t1
            print(f"{path}: {len(faces)} face(s)" if faces else f"{path}: no face found")
            for k, g in enumerate(faces):
                rec = face_record(photo, k, g)
                photo.faces.append(rec)
                batch.append((photo, rec, g))
            n_faces += len(faces)
            open_photos.append((photo, stem))
            flush(False)
        flush(True)
    return failed, len(paths), n_faces, timer, jsonl


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        model, framings, kind = load_model(args.checkpoint, args.device)
        detector = load_detector(args)
    except (checkpoint.CheckpointError, detect.DetectorError) as e:
        print(f"predict.py: {e}", file=sys.stderr)
        return 2
    tasks = list(args.tasks or model.cfg.tasks)
    unknown = [t for t in tasks if t not in model.cfg.tasks]
    if unknown:
        print(f"predict.py: --tasks {unknown} are not heads of this checkpoint; it has {list(model.cfg.tasks)}",
              file=sys.stderr)
        return 2
    if args.compile:
        model = compile_model(model)
    failed, n_images, n_faces, timer, jsonl = process(model, framings, tasks, args, detector)
    total = sum(timer.values())
    shares = ", ".join(f"{k} {v / max(total, 1e-9):.0%}" for k, v in timer.items())
    print(f"{n_images} image(s), {n_faces} face(s), {failed} failed; {kind} checkpoint; {total:.2f} s ({shares}); "
          f"predictions: {jsonl}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
