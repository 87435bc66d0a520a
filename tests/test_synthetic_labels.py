"""The synthetic faces' labels beyond the paper (pose, visibility, gender, race) and their transfer schemes (19 and
29 points, LaPa's 11 classes, synth_attr), each checked against the drawing: rendered pixels, the mask, the
landmarks, or the project's pose convention (data.nose_direction)."""
import functools
import math

import numpy as np
import pytest

import data
from data import synthetic_labels as sl
from data.conventions import CELEBAMASK_FLIP, FLIP_19, FLIP_29, FLIP_68, LAPA_FLIP
from data.synthetic_draw import BG, EYE_L, EYE_R, BROW_L, BROW_R, GLASS, HAIR, HAT, NOSE

FEATURE_CLASSES = {BG, HAIR, HAT}          # classes of the shapes drawn over features (occluders are background)


@functools.lru_cache(maxsize=None)
def faces(split="train", size=128, n=120, occlusion=0.25, clutter=True, framing="loose"):
    ds = data.SyntheticFaces(split, size=size, length=n, n_identities=n, occlusion=occlusion, clutter=clutter,
                             framing=framing)
    return ds, [ds[i] for i in range(n)]


# ------------------------------------------------------------------------------------------------ pose

def test_pose_signs_follow_the_stated_convention_on_rendered_faces():
    ds, items = faces()
    checked = 0
    for it in items:
        yaw, pitch, roll = it["pose"].double().numpy()
        lm = it["landmarks"].double().numpy()
        left, right = lm[36:42].mean(0), lm[42:48].mean(0)                     # image-left, image-right eye
        axis = (right - left) / np.linalg.norm(right - left)
        # roll > 0 is clockwise in the image (y down): the eye line's angle is the roll
        assert abs(math.degrees(math.atan2(axis[1], axis[0])) - roll) < 1e-3, (roll, axis)
        assert pitch == 0.0
        if abs(yaw) > 3.0:
            offset = float((lm[30] - (left + right) / 2) @ axis)                 # nose tip along the eye line
            convention = data.nose_direction((yaw, pitch, 0.0))[0]               # image x of the nose axis
            assert np.sign(offset) == np.sign(convention) == -np.sign(yaw), (yaw, offset)
            checked += 1
    assert checked > 60


def test_pose_is_the_inverse_of_the_drawn_shift():
    ds, _ = faces()
    for i in range(20):
        p = ds.params(i)[0]
        yaw, _, roll = sl.pose_of(p)
        assert math.isclose(-math.sin(math.radians(yaw)), p["yaw"], abs_tol=1e-12)
        assert math.isclose(math.cos(math.radians(roll)), p["cos"], abs_tol=1e-12)
        assert math.isclose(math.sin(math.radians(roll)), p["sin"], abs_tol=1e-12)


# ------------------------------------------------------------------------------------------------ visibility

def _edge_distance(point, polygon):
    a, b = polygon, np.roll(polygon, -1, 0)
    ab = b - a
    t = np.clip(((point - a) * ab).sum(1) / np.maximum((ab * ab).sum(1), 1e-12), 0, 1)
    return float(np.linalg.norm(a + t[:, None] * ab - point, axis=1).min())


def test_inside_on_hand_made_polygons():
    square = np.array([[0, 0], [4, 0], [4, 4], [0, 4]], float)
    pts = np.array([[2, 2], [5, 2], [-1, -1], [3.9, 0.1]], float)
    assert sl.inside(pts, square).tolist() == [True, False, False, True]
    ring = np.array([[0, 0], [6, 0], [6, 6], [0, 6], [0, 0], [2, 2], [2, 4], [4, 4], [4, 2], [2, 2]], float)
    assert sl.inside(np.array([[1, 1], [3, 3]], float), ring).tolist() == [True, False]   # even-odd: the hole


def test_visibility_matches_the_drawn_mask_away_from_edges():
    ds, items = faces(occlusion=1.0, n=80)
    occluded = visible = 0
    for i, it in enumerate(items):
        p = ds.params(i)[0]
        if p["mustache"] or p["goatee"]:            # facial hair is drawn over the face but not into the mask
            continue
        polys = ds.occluding_polygons(i)
        mask, lm, vis = it["mask"].numpy(), it["landmarks"].double().numpy(), it["visible"].numpy()
        for k in range(17, 68):                       # inner points: on drawn features, not on the outline
            if min((_edge_distance(lm[k], q) for q in polys), default=9.0) < 2.0:
                continue
            cls = mask[int(round(lm[k, 1])), int(round(lm[k, 0]))]
            if vis[k]:
                assert cls not in FEATURE_CLASSES, (i, k, cls)
                visible += 1
            else:
                assert cls in FEATURE_CLASSES | {GLASS}, (i, k, cls)
                occluded += 1
    assert occluded > 50 and visible > 500, (occluded, visible)


# ------------------------------------------------------------------------------------------------ gender, race

def test_race_bands_are_visible_in_the_skin_colour():
    """A one-number classifier (summed mean skin colour, nearest class centroid) fitted on training faces
    recognises the band of unseen faces far above the majority class."""
    def skin(split, n):
        _, items = faces(split, size=64, n=n, occlusion=0.0, clutter=False, framing="aligned")
        x = np.array([it["image"].numpy()[:, it["mask"].numpy() == 2].mean(1).sum() for it in items])
        return x, np.array([it["race"] for it in items])
    x, y = skin("train", 200)
    xt, yt = skin("test", 120)
    centroids = np.array([x[y == k].mean() for k in range(sl.RACE_BANDS)])
    acc = (np.abs(xt[:, None] - centroids).argmin(1) == yt).mean()
    assert acc > np.bincount(yt).max() / len(yt) + 0.2, acc


def test_gender_is_visible_in_the_hair():
    """Hair below the lower lip (long hair) calls a face female: far above the majority class."""
    _, items = faces("test", size=64, n=120, occlusion=0.0, clutter=False, framing="aligned")
    rows = np.arange(64)[:, None]
    pred = np.array([int(((it["mask"].numpy() == HAIR) & (rows > it["landmarks"][57, 1].item())).any())
                     for it in items])
    y = np.array([it["gender"] for it in items])
    assert (pred == y).mean() > np.bincount(y).max() / len(y) + 0.15
    assert all(it["gender"] == 1 - it["attributes"][20].item() for it in items)          # CelebA "Male"


# ------------------------------------------------------------------------------------------------ transfer schemes

@pytest.mark.parametrize("point_map, flip", [(sl.AFLW19_FROM_68, FLIP_19), (sl.COFW29_FROM_68, FLIP_29)])
def test_point_maps_commute_with_the_flip(point_map, flip):
    for i, idx in enumerate(point_map):
        assert sorted(FLIP_68[j] for j in idx) == sorted(point_map[flip[i]]), i


def test_lapa_class_map_commutes_with_the_flip():
    for k, c in enumerate(sl.LAPA_FROM_CELEBAMASK):
        assert sl.LAPA_FROM_CELEBAMASK[CELEBAMASK_FLIP[k]] == LAPA_FLIP[c], k


def test_19_points_lie_on_the_drawn_parts_with_the_right_sides():
    ds = data.SyntheticFaces("train", size=128, length=60, n_identities=60, occlusion=0.0, head="aflw19")
    want = {1: BROW_L, 4: BROW_R, 7: EYE_L, 10: EYE_R, 13: NOSE}          # brow centres, eye centres, nose tip
    checked = 0
    for i in range(60):
        p = ds.params(i)[0]
        it = ds[i]
        if p["glasses"] or p["hat"] or p["bangs"] or not it["visible"].all():
            continue
        for k, cls in want.items():
            x, y = it["landmarks"][k].round().long().tolist()
            assert it["mask"][y, x] == cls, (i, k, int(it["mask"][y, x]))
        checked += 1
    assert checked > 15


def test_lapa_masks_and_cofw_visibility_views():
    native = data.SyntheticFaces("test", size=64, length=10, n_identities=10, occlusion=1.0)
    lapa = data.SyntheticFaces("test", size=64, length=10, n_identities=10, occlusion=1.0, head="lapa")
    cofw = data.SyntheticFaces("test", size=64, length=10, n_identities=10, occlusion=1.0, head="cofw_visibility",
                               task="visibility")
    for i in range(10):
        m19, m11 = native[i]["mask"], lapa[i]["mask"]
        assert int(m11.max()) <= 10 and (m11[m19 == HAIR] == 10).all()
        assert (m11[m19 == EYE_L] == 4).all() and (m11[m19 == BROW_L] == 2).all()     # image-left = LaPa's left
        assert set(cofw[i]) == {"image", "visible", "landmarks"} and cofw[i]["visible"].shape == (29,)
        assert cofw[i]["landmarks"].shape == (29, 2)
    with pytest.raises(ValueError, match="transfer scheme"):
        data.SyntheticFaces("test", size=64, head="wflw")


def test_synth_attributes_match_the_drawing():
    ds = data.SyntheticFaces("train", size=64, length=150, n_identities=150, occlusion=0.0, clutter=False,
                             framing="aligned", head="synth_attr")
    names = {n: i for i, n in enumerate(sl.SYNTH_ATTRIBUTES)}
    rows = np.arange(64)[:, None]
    seen = np.zeros(len(names))
    for i in range(150):
        it = ds[i]
        a, mask = it["attributes"].numpy(), ds.relabel(it, i, "aflw19")["mask"].numpy()
        seen += a
        eyes = np.isin(mask, (EYE_L, EYE_R)).sum()
        if a[names["Sunglasses"]]:
            assert eyes == 0, i                                                    # lenses cover both eyes
        elif not ds.params(i)[0]["hat"]:
            assert eyes > 0, i
        below_lip = ((mask == HAIR) & (rows > it["landmarks"][57, 1].item() + 1)).any()
        if a[names["Long_Hair"]]:
            assert below_lip, i
        assert a[names["Occluded_Face"]] == 0                                      # occlusion=0.0
    assert (seen[[names[n] for n in ("Child", "Senior", "Sunglasses", "Long_Hair", "Harsh_Lighting")]] > 0).all()
