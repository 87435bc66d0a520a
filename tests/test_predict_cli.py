"""predict.py end to end: the authors' checkpoint format (synthesised at small dimensions from a model of ours, so
its answers are known), a folder of real-photo variants (corrupt, RGBA, grayscale, 16-bit, EXIF-rotated, no face),
and the errors of point 7 (unknown checkpoint, wrong --points5, box outside the image)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoint  # noqa: E402
import framing  # noqa: E402
import predict  # noqa: E402
from checkpoint import NAIVE_HEADS, NAIVE_UNNAMED_CLASSIFIER, OFFICIAL_TASK_NAMES  # noqa: E402
from model import BASE_TASKS, TASKS, Faceptor, FaceptorConfig, NaiveFaceptor  # noqa: E402
from test_detect import ASTRONAUT_POINTS5, DATA  # noqa: E402

THEIRS = {ours: theirs for theirs, ours in OFFICIAL_TASK_NAMES.items()}


def official_state_dict(model) -> dict:
    """Our model's tensors under the authors' names (DDP prefix, 'state_dict' entry, CosFace classifier)."""
    sd, out = model.state_dict(), {}
    naive = isinstance(model, NaiveFaceptor)
    head_name = {kind: name for name, kind in NAIVE_HEADS.items()}
    for k, v in sd.items():
        if k.startswith("encoder."):
            out["backbone_module.visual." + k[len("encoder."):].replace("blocks.", "transformer.resblocks.")] = v
        elif naive:
            _, kind, rest = k.split(".", 2)
            h = f"heads_module.heads.{head_name[kind]}."
            if rest.startswith("fcs."):
                _, t, w = rest.split(".")
                out[h + f"fcs.{THEIRS[t]}.{w}"] = v
            elif rest.startswith("head.conv_seg."):
                out[h + "head.conv_seg." + rest.rsplit(".", 1)[1]] = v
            else:
                out[h + rest] = v
        else:
            out.update(_faceptor_key(k, v, model))
    if "ms1mv3" in model.cfg.tasks and not (not naive and model.cfg.stage == 2):
        out["losses_module.losses.recog_ms1mv3.classifier"] = torch.randn(10, model.cfg.embed_dim)
    return {"state_dict": {"module." + k: v for k, v in out.items()}, "step": 50000}


def _faceptor_key(k, v, model):
    dec, itp = "heads_module.decoder.", "heads_module.interpreters."
    p = k.split(".")
    if p[0] == "projection":
        i = int(p[2])
        return {dec + (f"input_proj.0.{p[3]}" if i == 0 else f"new_input_proj.{i - 1}.{p[3]}"): v}
    if p[0] == "anchor_pos":
        return {dec + "adapt_pos2d." + ".".join(p[2:]): v}
    if p[0] == "queries":
        t, what = p[1], p[2]
        if what == "level":                                     # one table shared by all heads
            new = {dec + "level_embed.weight": v[:1]}
            if model.cfg.stage == 2:
                new[dec + "new_level_embed.weight"] = v[1:]
            return new
        return {dec + f"query_{'feat' if what == 'content' else 'embed'}.{THEIRS[t]}.weight": v}
    if p[0] == "decoder":
        i, block, rest = p[2], p[3], ".".join(p[4:])
        layer = {"cross_attn": "transformer_cross_attention_layers", "self_attn": "transformer_self_attention_layers",
                 "ffn": "transformer_ffn_layers"}[block]
        if block == "ffn" or rest.startswith("norm."):
            return {dec + f"{layer}.{i}.{rest}": v}
        return {dec + f"{layer}.{i}.{'multihead_attn' if block == 'cross_attn' else 'self_attn'}.{rest}": v}
    if p[0] == "identity_head":
        return {itp + "feature_v2." + ".".join(p[1:]): v}
    if p[0] == "value_head":
        return {itp + "value." + ".".join(p[1:]): v}
    if p[0] == "pixel_decoder":
        new = {itp + "map_v2.mask_map." + ".".join(p[1:]): v}
        if p[1] == "1":
            new[itp + "map_v2.mask_map.1.ln." + p[2]] = v
        return new
    if p[0] == "dense_head":
        return {itp + "map_v2.mask_embed." + ".".join(p[1:]): v}
    raise KeyError(k)


def tiny(kind="faceptor", stage=1):
    torch.manual_seed(0)
    # heads as in the authors' configurations (encoder: 64 channels per head; decoder: 8 heads), which the
    # conversion assumes because head counts leave no trace in the tensors
    cfg = FaceptorConfig.tiny(tasks=BASE_TASKS, stage=stage, vit_width=64, vit_heads=1, dec_heads=8, size_512=64,
                              size_112=112)
    model = (Faceptor if kind == "faceptor" else NaiveFaceptor)(cfg).eval()
    if kind == "faceptor":
        with torch.no_grad():                                   # theirs: one level table for all heads
            table = model.queries["300w"].level.clone()
            if stage == 1:
                table[1:] = 0
            for q in model.queries.values():
                q.level.copy_(table)
    return model


@pytest.mark.parametrize("kind,stage", [("faceptor", 1), ("faceptor", 2), ("naive", 1)])
def test_authors_checkpoint_converts_with_dimensions_from_its_tensors(tmp_path, kind, stage):
    model = tiny(kind, stage)
    path = tmp_path / "checkpoint_rank0_iter_50000.pth.tar"
    torch.save(official_state_dict(model), path)
    theirs, extras = checkpoint.model_from_official(str(path))
    assert extras["kind"] == kind and extras["stage"] == stage and theirs.cfg.tasks == BASE_TASKS
    fields = ["vit_width", "vit_layers", "vit_heads", "patch_size", "pos_grid", "embed_dim", "size_512", "clip_dim"]
    if kind == "faceptor":
        fields += ["dec_dim", "dec_layers", "dec_ffn", "dec_heads", "la_layers"]
    for f in fields:
        assert getattr(theirs.cfg, f) == getattr(model.cfg, f), f
    framings = framing.head_framings(BASE_TASKS, None)
    img = np.asarray(Image.open(os.path.join(DATA, "astronaut_256.png")).convert("RGB"))
    face = [framing.FaceGeometry(ASTRONAUT_POINTS5, None)]
    a, _ = predict.predict_photo(model, framings, img, face)
    b, _ = predict.predict_photo(theirs, framings, img, face)
    assert json.dumps(a[0], default=lambda e: np.round(e, 4).tolist()) == \
        json.dumps(b[0], default=lambda e: np.round(e, 4).tolist())


def _write_inputs(folder):
    """Real-photo variants of the astronaut, a corrupt file and a picture without a face."""
    img = Image.open(os.path.join(DATA, "astronaut_256.png")).convert("RGB")
    os.makedirs(folder)
    img.save(os.path.join(folder, "a_plain.png"))
    rgba = img.convert("RGBA")
    rgba.putalpha(_alpha(img.size))
    rgba.save(os.path.join(folder, "b_rgba.png"))
    img.convert("L").save(os.path.join(folder, "c_gray.png"))
    g16 = (np.asarray(img.convert("L"), np.uint16) * 257)
    Image.fromarray(g16).save(os.path.join(folder, "d_gray16.png"))
    exif = Image.Exif()
    exif[0x0112] = 6                                             # stored turned; shown after a 90-degree turn
    img.transpose(Image.Transpose.ROTATE_90).save(os.path.join(folder, "e_exif.jpg"), quality=95, exif=exif)
    with open(os.path.join(folder, "f_broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    Image.new("RGB", (120, 90), (40, 120, 200)).save(os.path.join(folder, "g_sky.png"))


def _alpha(size):
    a = np.full(size[::-1], 255, np.uint8)
    a[:40, :40] = 0                                              # a transparent corner far from the face
    return Image.fromarray(a)


def mtcnn_weights():
    import detect
    try:
        return detect.find_weights()
    except detect.DetectorError as e:
        if os.environ.get("CI"):
            pytest.fail(f"MTCNN weights missing under CI: {e}")
        pytest.skip(f"MTCNN weights not installed on this machine: {e}")


def _cli(args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "predict.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_folder_of_photos_through_the_authors_format(tmp_path):
    """One run: corrupt file named and counted (exit 1), the others processed; the face found in every variant at
    the hand-marked points (EXIF orientation applied); the picture without a face says so."""
    mtcnn_weights()
    ckpt = tmp_path / "checkpoint_rank0_iter_50000.pth.tar"
    torch.save(official_state_dict(tiny()), ckpt)
    folder = str(tmp_path / "photos")
    _write_inputs(folder)
    out = tmp_path / "out"
    proc = _cli([str(ckpt), folder, "--out-dir", str(out), "--save-mask"])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "f_broken.jpg" in proc.stderr and "1 failed" in proc.stdout
    assert f"{os.path.join(folder, 'g_sky.png')}: no face found" in proc.stdout
    with open(out / "predictions.jsonl") as f:
        rows = [json.loads(line) for line in f]
    by_image = {os.path.basename(r["image"]): r for r in rows}
    assert sorted(by_image) == ["a_plain.png", "b_rgba.png", "c_gray.png", "d_gray16.png", "e_exif.jpg"]
    for name, r in by_image.items():
        assert r["face"] == 0 and 0.9 < r["score"] <= 1
        err = np.linalg.norm(np.asarray(r["points5"]) - ASTRONAUT_POINTS5, axis=1).max()
        assert err < 3.5, f"{name}: five points {err:.1f} px from the marks"
        assert set(TASKS) & set(r) == set(BASE_TASKS)
        assert len(r["300w"]["points"]) == 68 and Image.open(r["celebamask_hq"]["mask"]).size == (256, 256)
        assert abs(np.linalg.norm(np.load(r["ms1mv3"]["embedding"])) - 1) < 1e-4
        assert os.path.isfile(out / (os.path.splitext(name)[0] + "_prediction.png"))


def test_bad_inputs_get_one_clear_error(tmp_path, capsys):
    model = tiny()
    ours = tmp_path / "ours.pt"
    import dataclasses
    torch.save({"format": checkpoint.CHECKPOINT_FORMAT, "model": model.state_dict(), "kind": "faceptor",
                "model_config": dataclasses.asdict(model.cfg), "config": {"data": "synthetic"}, "stage": 1,
                "step": 1}, ours)
    img = os.path.join(DATA, "astronaut_256.png")
    out = str(tmp_path / "o")
    unknown = tmp_path / "weights.pt"
    torch.save({"something": torch.zeros(2)}, unknown)
    assert predict.main([str(unknown), img, "--out-dir", out, "--points5", *["100"] * 10]) == 2
    err = capsys.readouterr().err
    assert "unknown format" in err and "written by train.py" in err and "authors'" in err
    with pytest.raises(SystemExit) as e:
        predict.main([str(ours), img, "--points5", "1", "2", "3", "4", "5", "6", "7", "8"])
    assert e.value.code == 2 and "--points5: expected 10 numbers (x y of 5 points), got 8" in capsys.readouterr().err
    assert predict.main([str(ours), img, "--out-dir", out, "--box", "300", "10", "400", "90"]) == 1
    err = capsys.readouterr().err
    assert "astronaut_256.png: --box [300.0, 10.0, 400.0, 90.0] lies outside the 256x256 image" in err
    assert predict.main([str(ours), img, "--out-dir", out, "--tasks", "wflw"]) == 2
    assert "not heads of this checkpoint" in capsys.readouterr().err
    assert predict.main([str(ours), str(tmp_path / "missing.png"), "--out-dir", out, "--box", "1", "1", "9", "9"]) == 1
    assert "missing.png: no such file" in capsys.readouterr().err


def test_no_detect_gives_the_whole_image_to_every_head(tmp_path):
    """--no-detect: one face per image, its box the whole image, no points or score; the dense heads' input is the
    image itself (a 64-px photo at size_512 = 64 comes back unchanged through the identity framing)."""
    model = tiny()
    img = np.array(Image.open(os.path.join(DATA, "astronaut_256.png")).convert("RGB").resize((64, 64)))
    args = predict.parse_args(["-", "x.png", "--no-detect"])
    photo = predict.Photo("x.png", img)
    (face,) = predict.find_faces(photo, args, None)
    assert face.points5 is None and np.allclose(face.box, [-0.5, -0.5, 63.5, 63.5])
    warp = predict.face_warp("landmark_box", face, photo, 64)
    assert np.allclose(warp.matrix, np.eye(3))
    assert torch.equal(photo.crop(warp), torch.from_numpy(img).permute(2, 0, 1))
    path = tmp_path / "crop.png"
    Image.fromarray(img).save(path)
    import dataclasses
    ckpt = tmp_path / "ours.pt"
    torch.save({"format": checkpoint.CHECKPOINT_FORMAT, "model": model.state_dict(), "kind": "faceptor",
                "model_config": dataclasses.asdict(model.cfg), "config": {"data": "real"}, "stage": 1, "step": 1}, ckpt)
    assert predict.main([str(ckpt), str(path), "--no-detect", "--out-dir", str(tmp_path / "o")]) == 0
    with open(tmp_path / "o" / "predictions.jsonl") as f:
        (row,) = [json.loads(line) for line in f]
    assert row["points5"] is None and row["score"] is None and row["box"] == [-0.5, -0.5, 63.5, 63.5]


def test_heads_beyond_the_paper_are_reported_by_name():
    """Pose in degrees (yaw, pitch, roll), per-point occlusion probabilities, gender and race with their datasets'
    class names, synthetic attributes by name: from a model that has those heads, through predict.decode."""
    tasks = ("300wlp", "cofw_visibility", "utkface_gender", "fairface_race", "synth_attr")
    torch.manual_seed(0)
    model = Faceptor(FaceptorConfig.tiny(tasks=tasks)).eval()
    with torch.no_grad():
        out = model.predict(images_512=torch.randn(2, 3, model.cfg.size_512, model.cfg.size_512),
                            images_112=torch.randn(2, 3, model.cfg.size_112, model.cfg.size_112))
    warp = framing.Warp(np.eye(3), 112)
    pose = predict.decode("300wlp", out["300wlp"], 1, warp, 112)
    assert list(pose) == ["yaw", "pitch", "roll"]
    assert np.allclose([pose[k] for k in pose], out["300wlp"]["pose"][1].numpy(), atol=0.005)
    vis_out = predict.decode("cofw_visibility", out["cofw_visibility"], 0, warp, 512)
    vis = vis_out["occluded"]
    assert len(vis) == 29 and np.allclose(vis, torch.sigmoid(out["cofw_visibility"]["logits"][0]).numpy(), atol=1e-4)
    # the visibility tokens' points, mapped like a landmark head's (identity warp: input pixels)
    want = out["cofw_visibility"]["coords"][0].numpy() * 512 - 0.5
    assert np.allclose(vis_out["points"], want, atol=0.006)
    gender = predict.decode("utkface_gender", out["utkface_gender"], 0, warp, 112)
    assert list(gender["probs"]) == ["male", "female"] and abs(sum(gender["probs"].values()) - 1) < 1e-3
    assert gender["label"] == ["male", "female"][int(out["utkface_gender"]["logits"][0].argmax())]
    race = predict.decode("fairface_race", out["fairface_race"], 0, warp, 112)
    assert list(race["probs"]) == ["white", "black", "latino_hispanic", "east_asian", "southeast_asian", "indian",
                                   "middle_eastern"]
    attrs = predict.decode("synth_attr", out["synth_attr"], 0, warp, 112)["probs"]
    assert len(attrs) == 11 and "sunglasses" in attrs
