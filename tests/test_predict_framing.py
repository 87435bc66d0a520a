"""Per-head framing (framing.py) and the way back to the photo (predict.py): the synthetic templates are the mean of
SyntheticFaces, every framing moves with the photo (similarity equivariance), and a synthetic face pasted into a
larger picture under a random similarity gives the same answers, in the picture's coordinates, as the face itself."""
import math
import os
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import framing  # noqa: E402
import predict  # noqa: E402
from data.synthetic import SyntheticFaces  # noqa: E402
from data.transforms import Warp  # noqa: E402
from model import FULL_TASKS, TASKS, Faceptor, FaceptorConfig  # noqa: E402


def sim(angle, scale, tx, ty):
    c, s = math.cos(angle) * scale, math.sin(angle) * scale
    return np.array([[c, -s, tx], [s, c, ty], [0, 0, 1.0]])


def apply(M, pts):
    return np.asarray(pts) @ M[:2, :2].T + M[:2, 2]


@pytest.mark.parametrize("name", ["loose", "aligned"])
def test_synthetic_templates_are_the_mean_of_synthetic_faces(name):
    """The stored constants against a fresh estimate from other faces (another seed): sampling error is ~0.005."""
    fresh = framing.synthetic_template(name, n=100, size=96, seed=7)
    err = np.abs(fresh - framing.SYNTHETIC_5[name])
    assert err.max() < 0.015, f"max {err.max():.4f}, mean {err.mean():.4f}\n{fresh}"


def test_synthetic_framing_reproduces_the_training_crops_on_average():
    """Framing faces drawn the 'loose' way from their true five points moves them, on average, nowhere: mean log
    scale, rotation and shift of the framing warp are ~0 (each face is only moved to the mean pose)."""
    S, n = 96, 60
    ds = SyntheticFaces("test", size=S, length=n, framing="loose", occlusion=0.0, clutter=False)
    logk, rot, shift = [], [], []
    for i in range(n):
        p5 = framing.five_points_68(ds[i]["landmarks"].double().numpy())
        M = framing.build_warp("synthetic_loose", framing.FaceGeometry(p5, None), S).matrix
        logk.append(0.5 * math.log(abs(np.linalg.det(M[:2, :2]))))
        rot.append(math.atan2(M[1, 0], M[0, 0]))
        shift.append(apply(M, [[S / 2 - 0.5, S / 2 - 0.5]])[0] - (S / 2 - 0.5))
    assert abs(np.mean(logk)) < 0.04 and abs(np.mean(rot)) < 0.05, (np.mean(logk), np.mean(rot))
    assert np.abs(np.mean(shift, 0)).max() < 0.03 * S, np.mean(shift, 0)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(angle=st.floats(-math.pi, math.pi), scale=st.floats(0.3, 4.0), tx=st.floats(-300, 300),
       ty=st.floats(-300, 300), name=st.sampled_from(sorted(framing.FRAMINGS)))
def test_every_framing_moves_with_the_photo(angle, scale, tx, ty, name):
    """Moving the photo by a similarity T moves each head's crop with it: W(T p) = W(p) T^-1, so the head sees the
    same pixels and its outputs map back to T of the original answers."""
    p5 = framing.points_from_box([100, 80, 180, 190]) + np.random.default_rng(0).normal(0, 2, (5, 2))
    T = sim(angle, scale, tx, ty)
    W = framing.build_warp(name, framing.FaceGeometry(p5, None), 64)
    WT = framing.build_warp(name, framing.FaceGeometry(apply(T, p5), None), 64)
    expect = W.matrix @ np.linalg.inv(T)
    assert np.allclose(WT.matrix, expect, atol=1e-6 * np.abs(expect).max()), (WT.matrix, expect)
    q = np.random.default_rng(1).uniform(0, 63, (10, 2))
    assert np.allclose(WT.inverse_points(q), apply(T, W.inverse_points(q)), atol=1e-6 * max(1.0, scale) * 300)


# ------------------------------------------------------------------------------------------ composite vs direct
FACE = 64


def composite(face: np.ndarray, T: np.ndarray, side: int, seed: int) -> np.ndarray:
    """The face pasted under T onto a black picture of side x side, clutter (random blocks) everywhere farther
    than one face side from the face square (out of reach of every head's crop)."""
    warp = Warp(T, side)
    img = warp.apply_image(torch.from_numpy(face).permute(2, 0, 1)).permute(1, 2, 0).numpy().copy()
    src = warp.inverse_points(warp._out_grid())                                   # [side, side, 2] face coordinates
    far = (np.abs(src - (FACE - 1) / 2).max(-1) > 1.5 * FACE)
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (side // 16 + 1, side // 16 + 1, 3)).repeat(16, 0).repeat(16, 1)[:side, :side]
    img[far] = blocks[far]
    return img.astype(np.uint8)


@pytest.fixture(scope="module")
def tiny_full():
    torch.manual_seed(0)
    return Faceptor(FaceptorConfig.tiny(tasks=FULL_TASKS, size_512=64, size_112=32)).eval()


@pytest.mark.parametrize("source", ["synthetic", "real"])
@pytest.mark.parametrize("seed", [0, 1])
def test_pasted_face_gives_the_direct_answers_in_picture_coordinates(tiny_full, source, seed):
    model = tiny_full
    cfg = {"data": "synthetic", "synthetic_framing_112": "aligned"} if source == "synthetic" else None
    framings = framing.head_framings(model.cfg.tasks, cfg)
    item = SyntheticFaces("test", size=FACE, length=4, framing="loose")[seed]
    face = item["image"].permute(1, 2, 0).numpy().copy()
    p5 = framing.five_points_68(item["landmarks"].double().numpy())
    rng = np.random.default_rng(seed)
    side = 400
    angle, scale = rng.uniform(-0.7, 0.7), rng.uniform(1.1, 1.9)
    T = sim(angle, scale, 0, 0)
    T[:2, 2] = side / 2 + rng.uniform(-20, 20, 2) - apply(T, [[(FACE - 1) / 2] * 2])[0]
    pic = composite(face, T, side, seed)
    direct, dmaps = predict.predict_photo(model, framings, face, [framing.FaceGeometry(p5, None)])
    pasted, pmaps = predict.predict_photo(model, framings, pic, [framing.FaceGeometry(apply(T, p5), None)])
    d, p = direct[0], pasted[0]
    for t in model.cfg.tasks:
        kind = TASKS[t].type
        if kind == "landmarks":
            want, got = apply(T, d[t]["points"]), np.asarray(p[t]["points"])
            err = np.linalg.norm(want - got, axis=1)
            assert err.max() < 0.05 * FACE * scale, f"{t}: max {err.max():.2f} px, mean {err.mean():.2f} px"
            inside = np.linalg.solve(T[:2, :2], (got - T[:2, 2]).T).T             # back in face coordinates
            assert ((inside > -0.5) & (inside < FACE - 0.5)).all(), f"{t}: landmarks off the pasted face"
        elif kind == "parsing":                                                   # checked with GreyLevels below
            assert abs(sum(p[t]["areas"].values()) - 1) < 1e-3
        elif kind == "age":
            assert abs(d[t]["age"] - p[t]["age"]) < 1.0, (t, d[t], p[t])
        elif kind in ("expression", "attributes"):
            a, b = np.array(list(d[t]["probs"].values())), np.array(list(p[t]["probs"].values()))
            assert np.abs(a - b).max() < 0.05, f"{t}: max probability difference {np.abs(a - b).max():.3f}"
        elif kind == "recognition":
            cos = float(np.dot(d[t]["embedding"], p[t]["embedding"]))
            assert cos > 0.98, f"{t}: cosine {cos:.4f}"


class GreyLevels(torch.nn.Module):
    """A stand-in model whose parsing heads label each input pixel by its grey level (4 bands of 64): the label map
    brought back to the photo must then be the photo's own grey bands wherever a crop covers it."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cfg = model, model.cfg

    def predict(self, images_512=None, images_112=None, tasks=None):
        out = self.model.predict(images_512=images_512, images_112=images_112, tasks=tasks)
        if images_512 is not None:
            from data.conventions import CLIP_MEAN, CLIP_STD
            rgb = images_512 * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
            band = (rgb.mean(1) * 255).div(64).floor().clamp(0, 3).long()       # [B, S, S]
            for t in tasks:
                if TASKS[t].type == "parsing":
                    out[t] = {"logits": torch.nn.functional.one_hot(band, TASKS[t].queries).permute(0, 3, 1, 2) * 10.0}
        return out


@pytest.mark.parametrize("source", ["synthetic", "real"])
def test_parsing_map_lands_on_the_pasted_face(tiny_full, source):
    model = GreyLevels(tiny_full)
    cfg = {"data": "synthetic", "synthetic_framing_112": "aligned"} if source == "synthetic" else None
    framings = framing.head_framings(model.cfg.tasks, cfg)
    item = SyntheticFaces("test", size=FACE, length=4, framing="loose")[2]
    face = item["image"].permute(1, 2, 0).numpy().copy()
    p5 = framing.five_points_68(item["landmarks"].double().numpy())
    T = sim(0.5, 1.6, 0, 0)
    T[:2, 2] = [150.0, 120.0]
    pic = composite(face, T, 400, 3)
    pasted, pmaps = predict.predict_photo(model, framings, pic, [framing.FaceGeometry(apply(T, p5), None)],
                                          tasks=["celebamask_hq", "lapa"])
    bands = np.clip(pic.astype(np.float64).mean(-1) // 64, 0, 3)
    grid = np.stack(np.meshgrid(np.arange(8, FACE - 8), np.arange(8, FACE - 8), indexing="xy"), -1).reshape(-1, 2)
    at = np.round(apply(T, grid)).astype(int)                                       # inner face -> picture pixels
    for t, m in pmaps.items():
        agree = (m[at[:, 1], at[:, 0]] == bands[at[:, 1], at[:, 0]]).mean()
        assert agree > 0.9, f"{t}: labels match the photo's grey bands on {agree:.1%} of the pasted face"
        assert (m[:40, -40:] == 0).all() and (m[-40:, -40:] == 0).all(), f"{t}: labels far from every crop"


@pytest.mark.parametrize("name", sorted(framing.FRAMINGS))
@pytest.mark.parametrize("scale", [0.6, 2.5])
def test_a_point_found_in_a_crop_comes_back_to_its_photo_pixel(name, scale):
    """Known geometry, no model: a bright spot at a sub-pixel position of the photo, the head's crop (pyramid level
    included), its centroid in crop pixels read out as a landmark head's normalised coordinates, then
    predict.decode -> the spot's photo position within a fifth of a pixel (pixel centres at integers)."""
    H, W = 400, 500
    spot = np.array([231.3, 187.6])
    yy, xx = np.mgrid[0:H, 0:W]
    sigma = 2.5 * scale
    img = 255 * np.exp(-((xx - spot[0]) ** 2 + (yy - spot[1]) ** 2) / (2 * sigma ** 2))
    photo = predict.Photo("spot", np.repeat(img[..., None], 3, -1).round().astype(np.uint8))
    p5 = apply(sim(0.3, scale, 0, 0), framing.ARCFACE_5 - 56.0) + spot + [3.0, -10.0 * scale]
    S = 64
    warp = framing.build_warp(name, framing.FaceGeometry(p5, None), S)
    crop = photo.crop(warp)[0].double()                                              # [S, S]
    wgt = torch.clamp(crop - 0.3 * crop.max(), min=0)
    v, u = torch.meshgrid(torch.arange(S, dtype=torch.float64), torch.arange(S, dtype=torch.float64), indexing="ij")
    c = torch.stack([(wgt * u).sum() / wgt.sum(), (wgt * v).sum() / wgt.sum()])     # centroid, crop pixels
    coords = ((c + 0.5) / S).view(1, 1, 2).repeat(1, 68, 1)                           # the heads' normalised (x, y)
    got = np.asarray(predict.decode("300w", {"coords": coords}, 0, warp, S)["points"][0])
    err = np.linalg.norm(got - spot)
    assert err < 0.2 * max(1.0, 1 / np.sqrt(abs(np.linalg.det(warp.matrix[:2, :2])))), f"{name}: {got} vs {spot}"
