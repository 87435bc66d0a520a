"""Dense warps and their inverse, flips, RandAugment, Random Erasing, normalisation (docs/design.md sections 2, 8)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import data
from data.conventions import CELEBAMASK_FLIP, FLIP_19, FLIP_29, FLIP_68, FLIP_98, LAPA_FLIP
from data.transforms import (RAND_OPS, DenseTransform, GlobalTransform, Warp, fit_similarity, flip_item, rand_augment,
                        random_erasing, similarity)


@settings(max_examples=25, deadline=None)
@given(cx=st.floats(0, 300), cy=st.floats(0, 300), size=st.floats(20, 400), scale=st.floats(0.5, 1.5),
       rot=st.floats(-1.0, 1.0), sx=st.floats(-0.1, 0.1), sy=st.floats(-0.1, 0.1), w=st.sampled_from([0.0, 0.8]),
       out=st.sampled_from([1, 7, 64, 512]), seed=st.integers(0, 1000))
def test_warp_round_trip_within_1e3_px(cx, cy, size, scale, rot, sx, sy, w, out, seed):
    warp = Warp(similarity((cx, cy), size, out, scale, rot, (sx, sy)), out, w)
    pts = np.random.default_rng(seed).uniform([cx - size, cy - size], [cx + size, cy + size], size=(68, 2))
    back = warp.inverse_points(warp.points(pts))
    err = np.abs(back - pts)
    assert err.max() < 1e-3, f"max {err.max():.3g} mean {err.mean():.3g}"


def test_tanh_warp_compresses_the_border():
    S = 64
    warp = Warp(np.eye(3), S, 0.8)
    centre, edge = warp.points(np.array([[31.5, 31.5], [63.5, 31.5]]))
    assert abs(centre[0] - 31.5) < 1e-9                             # centre fixed
    assert edge[0] < 63.5 and abs(edge[0] - ((math.tanh(0.8) / 0.8 + 1) / 2 * S - 0.5)) < 1e-9
    q = warp.points(np.array([[31.5, 31.5], [32.5, 31.5], [60.5, 31.5], [61.5, 31.5]]))
    assert q[1, 0] - q[0, 0] > q[3, 0] - q[2, 0]                   # steps shrink towards the border


def test_fit_similarity_recovers_transform():
    A = similarity((10, 20), 50, 100, 0.9, 0.3, (0.02, -0.01))
    src = np.random.default_rng(0).uniform(0, 60, (5, 2))
    dst = src @ A[:2, :2].T + A[:2, 2]
    assert np.abs(fit_similarity(src, dst) - A).max() < 1e-9


def _block_item(H=48, W=40):
    """Image + mask made of 8x8 blocks with distinct classes; landmarks at block centres."""
    mask = torch.zeros(H, W, dtype=torch.int64)
    pts = []
    for by in range(H // 8):
        for bx in range(W // 8):
            mask[by * 8:(by + 1) * 8, bx * 8:(bx + 1) * 8] = (by * 5 + bx) % 19
            pts.append((bx * 8 + 3.5, by * 8 + 3.5))
    img = (mask * 13 % 256).to(torch.uint8)[None].repeat(3, 1, 1)
    lm = torch.tensor(pts, dtype=torch.float32)
    return {"image": img, "mask": mask, "landmarks": lm, "box": torch.tensor([0.0, 0.0, W - 1.0, H - 1.0])}


@pytest.mark.parametrize("task,align,w", [("landmarks", "box", 0.0), ("parsing", "image", 0.0),
                                          ("parsing", "image", 0.8)])
def test_dense_transform_moves_labels_with_pixels(task, align, w):
    item = _block_item()
    t = DenseTransform(96, task, train=True, align=align, warp_factor=w, occlusion=False)
    out = t(item, torch.Generator().manual_seed(3))
    assert out["image"].shape == (3, 96, 96) and out["mask"].shape == (96, 96) and out["mask"].dtype == torch.int64
    assert set(out["mask"].unique().tolist()) <= set(item["mask"].unique().tolist())   # nearest: no new classes
    warp = Warp.from_item(out)
    q = out["landmarks"].double().numpy()
    inside = (q >= 0).all(1) & (q <= 95).all(1)
    assert inside.sum() > 5
    r = np.round(q[inside]).astype(int)
    want = item["mask"][item["landmarks"][inside, 1].long(), item["landmarks"][inside, 0].long()]
    assert torch.equal(out["mask"][r[:, 1], r[:, 0]], want)           # label under each landmark is unchanged
    back = warp.inverse_points(q)
    assert np.abs(back - item["landmarks"].double().numpy()).max() < 1e-3


def test_inverse_image_returns_predictions_to_original_frame():
    item = _block_item()
    for w in (0.0, 0.8):
        t = DenseTransform(128, "parsing", train=False, align="image", warp_factor=w)
        out = t(item, torch.Generator().manual_seed(0))
        back = Warp.from_item(out).inverse_image(out["mask"][None], out["orig_size"], mode="nearest")[0]
        agree = (back == item["mask"]).float().mean()
        assert agree > 0.97, f"warp_factor {w}: only {agree:.3f} of pixels agree"


def test_dense_transform_deterministic_per_generator_and_eval_is_fixed():
    item = _block_item()
    t = DenseTransform(64, "landmarks", train=True)
    a = t(item, torch.Generator().manual_seed(5))
    b = t(item, torch.Generator().manual_seed(5))
    c = t(item, torch.Generator().manual_seed(6))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["landmarks"], b["landmarks"])
    assert not torch.equal(a["landmarks"], c["landmarks"])
    e = DenseTransform(64, "landmarks", train=False)(item, torch.Generator().manual_seed(1))
    box_side = 0.8 * 64                                                # eval: box fills scale_mu of the output
    lm = e["landmarks"]
    assert abs((lm[:, 0].max() - lm[:, 0].min()) / (item["landmarks"][:, 0].max() - item["landmarks"][:, 0].min())
               - box_side / 47.0) < 1e-3


def test_flip_permutations_are_documented_involutions():
    for perm, n, pairs in ((FLIP_68, 68, [(36, 45), (0, 16), (48, 54), (30, 30)]),
                           (FLIP_98, 98, [(60, 72), (96, 97), (0, 32), (54, 54)]),
                           (FLIP_29, 29, [(8, 9), (0, 1), (20, 20)]), (FLIP_19, 19, [(6, 11), (7, 10), (18, 18)])):
        assert sorted(perm) == list(range(n))
        assert all(perm[perm[i]] == i for i in range(n))
        assert all(perm[a] == b for a, b in pairs)
    assert CELEBAMASK_FLIP[4] == 5 and CELEBAMASK_FLIP[6] == 7 and CELEBAMASK_FLIP[8] == 9 and CELEBAMASK_FLIP[14] == 14
    assert LAPA_FLIP[2] == 3 and LAPA_FLIP[4] == 5 and LAPA_FLIP[10] == 10


def test_flip_item_on_synthetic_face_keeps_labels_on_features():
    ds = data.SyntheticFaces("train", size=96, length=200, occlusion=0.0)
    checked = 0
    for i in range(12):
        item = ds[i]
        if item["attributes"][15] or item["attributes"][5]:           # glasses or bangs may cover eyes/brows
            continue
        f = flip_item(item)
        for a, b in ((36, 42), (42, 36)):
            c = f["landmarks"][a:a + 6].mean(0).round().long()
            assert int(f["mask"][c[1], c[0]]) == (8 if a == 36 else 9), (i, a)   # image-left eye is class 8
        assert torch.allclose(flip_item(f)["landmarks"], item["landmarks"], atol=1e-4)
        assert torch.equal(flip_item(f)["mask"], item["mask"])
        checked += 1
    assert checked >= 4


def test_rand_augment_ops_and_determinism():
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    from PIL import Image
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    for name, op in RAND_OPS.items():
        out = np.asarray(op(pil, 9.0, 1.0))
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8, name
    assert np.array_equal(np.asarray(RAND_OPS["Invert"](pil, 9, 1)), 255 - img.permute(1, 2, 0).numpy())
    a = rand_augment(img, torch.Generator().manual_seed(4))
    b = rand_augment(img, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    changed = sum(not torch.equal(rand_augment(img, torch.Generator().manual_seed(s)), img) for s in range(20))
    assert 8 <= changed <= 19                                          # each of 2 ops applied with p 0.5


def test_random_erasing():
    img = torch.full((3, 40, 40), 7, dtype=torch.uint8)
    assert torch.equal(random_erasing(img, torch.Generator().manual_seed(0), p=0.0), img)
    out = random_erasing(img, torch.Generator().manual_seed(0), p=1.0)
    frac = (out != 7).any(0).float().mean()
    assert 0.01 < frac < 0.4
    hits = sum(not torch.equal(random_erasing(img, torch.Generator().manual_seed(s)), img) for s in range(200))
    assert 30 <= hits <= 70                                            # p = 0.25


def test_global_transform_resize_flip_and_eval():
    item = {"image": torch.randint(0, 256, (3, 50, 40), dtype=torch.uint8), "age": 30.0,
            "attributes": torch.arange(40)}
    ev = GlobalTransform(112, train=False)(item, torch.Generator().manual_seed(0))
    assert ev["image"].shape == (3, 112, 112) and ev["attributes"] is item["attributes"]
    rec = GlobalTransform(112, train=True, kind="recognition")
    flips = 0
    for s in range(20):
        out = rec(item, torch.Generator().manual_seed(s))
        flips += torch.equal(out["image"], ev["image"].flip(-1))
        assert torch.equal(out["image"], ev["image"]) or torch.equal(out["image"], ev["image"].flip(-1))
    assert 4 <= flips <= 16
    lm_item = {"image": torch.zeros(3, 20, 10, dtype=torch.uint8), "landmarks": torch.tensor([[0.0, 0.0], [9.0, 19.0]])}
    out = GlobalTransform(40, train=False)(lm_item, None)
    assert torch.allclose(out["landmarks"], torch.tensor([[1.5, 0.5], [37.5, 38.5]]))   # (x + .5) * s - .5


def test_normalisation_per_input_group():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    dense = data.normalize_images(x, "dense")
    assert torch.allclose(dense[0, :, 0, 0], torch.tensor([(1 - 0.48145466) / 0.26862954,
                                                           (1 - 0.4578275) / 0.26130258,
                                                           (1 - 0.40821073) / 0.27577711]))
    assert torch.allclose(data.normalize_images(x, "global"), torch.ones(1, 3, 2, 2))
    assert data.input_group("parsing") == "dense" and data.input_group("age") == "global"


@pytest.mark.parametrize("perm", [FLIP_29, FLIP_68])
def test_flip_item_moves_visibility_flags_with_their_points(perm):
    n = len(perm)
    g = torch.Generator().manual_seed(n)
    item = {"image": torch.zeros(3, 8, 8, dtype=torch.uint8), "landmarks": torch.rand(n, 2, generator=g) * 7,
            "visible": torch.randint(0, 2, (n,), generator=g)}
    out = flip_item(item)
    for j in range(n):             # flipped point j is source point perm[j]: it keeps that point's flag
        assert out["visible"][j] == item["visible"][perm[j]]
        assert out["landmarks"][j, 0] == pytest.approx(7 - item["landmarks"][perm[j], 0].item(), abs=1e-6)
