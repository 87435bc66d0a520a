"""SyntheticFaces: exact, consistent labels for every task type; identities; visible expressions and age."""
import numpy as np
import pytest
import torch

from data.conventions import ATTR, CELEBAMASK_CLASSES, EXPRESSIONS
from data.synthetic import SyntheticFaces, attributes_of, identity_params, item_params
from data.synthetic_draw import render

CLS = {name: i for i, name in enumerate(CELEBAMASK_CLASSES)}


@pytest.fixture(scope="module")
def clean():
    """Items without occluders, at 96 px."""
    ds = SyntheticFaces("train", size=96, length=400, occlusion=0.0)
    return [ds[i] for i in range(40)]


@pytest.mark.parametrize("size", [48, 64, 112])
def test_item_fields_and_determinism(size):
    ds = SyntheticFaces("train", size=size, length=100, seed=5)
    a, b = ds[7], SyntheticFaces("train", size=size, length=100, seed=5)[7]
    assert a["image"].shape == (3, size, size) and a["image"].dtype == torch.uint8
    assert a["landmarks"].shape == (68, 2) and a["landmarks"].dtype == torch.float32
    assert a["mask"].shape == (size, size) and a["mask"].dtype == torch.int64
    assert a["attributes"].shape == (40,) and set(a["attributes"].tolist()) <= {0, 1}
    assert 0 <= a["age"] <= 100 and 0 <= a["expression"] < 7 and a["identity"] == 7 % ds.n_identities
    for k in a:
        assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k
    c = SyntheticFaces("train", size=size, length=100, seed=6)[7]
    assert not torch.equal(a["image"], c["image"])
    assert int(a["mask"].max()) < 19 and (a["mask"] == CLS["face"]).any()


def test_512_px_render():
    item = SyntheticFaces("test", size=512, length=4)[1]
    assert item["image"].shape == (3, 512, 512) and item["mask"].shape == (512, 512)


def test_landmarks_lie_on_their_drawn_features(clean):
    """Eye centres on the eye classes (8 image-left, 9 image-right), nose on the nose, brows on the brows."""
    hits, total = 0, 0
    for it in clean:
        a, m, lm = it["attributes"], it["mask"], it["landmarks"]
        if a[ATTR["Eyeglasses"]] or a[ATTR["Bangs"]] or a[ATTR["Wearing_Hat"]]:
            continue
        probes = [(lm[36:42].mean(0), CLS["re"]), (lm[42:48].mean(0), CLS["le"]),
                  (lm[28], CLS["nose"]), (lm[29], CLS["nose"]), (lm[19], CLS["rb"]), (lm[24], CLS["lb"])]
        for p, cls in probes:
            x, y = p.round().long().tolist()
            total += 1
            hits += int(m[y, x]) == cls
    assert total >= 40 and hits / total >= 0.95, f"{hits}/{total}"


def test_mouth_labels_follow_expression(clean):
    for it in clean:
        imouth = int((it["mask"] == CLS["imouth"]).sum())
        name = EXPRESSIONS[it["expression"]]
        if name in ("neutral", "sadness", "anger"):
            assert imouth == 0 and it["attributes"][ATTR["Mouth_Slightly_Open"]] == 0, name
        if name == "surprise":
            assert imouth >= 4 and it["attributes"][ATTR["Mouth_Slightly_Open"]] == 1
        assert it["attributes"][ATTR["Smiling"]] == (name == "happiness")


def test_drawn_attributes_match_the_mask(clean):
    seen = {"Eyeglasses": set(), "Wearing_Hat": set(), "Bald": set()}
    for it in clean:
        a, m = it["attributes"], it["mask"]
        assert bool(a[ATTR["Eyeglasses"]]) == bool((m == CLS["glass"]).any())
        assert bool(a[ATTR["Wearing_Hat"]]) == bool((m == CLS["hat"]).any())
        if a[ATTR["Bald"]]:
            assert not (m == CLS["hair"]).any()
        assert a[ATTR["No_Beard"]] == 1 - max(a[ATTR["Goatee"]], a[ATTR["Mustache"]], a[ATTR["5_o_Clock_Shadow"]])
        assert a[ATTR["Young"]] == (it["age"] < 40)
        hair = [a[ATTR[k]] for k in ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair")]
        assert sum(hair) <= 1
        for k in seen:
            seen[k].add(int(a[ATTR[k]]))
    assert seen["Eyeglasses"] == {0, 1} and seen["Wearing_Hat"] == {0, 1}


def test_identities_persist_and_pools_are_disjoint():
    ds = SyntheticFaces("train", size=64, length=3000, n_identities=1000)
    a, b = ds.params(5)[0], ds.params(1005)[0]                         # same identity, other item
    for k in ("eye_dx", "mouth_y", "skin_t", "hair", "male", "iris", "hair_base", "brow_dy"):
        assert a[k] == b[k], k
    assert (a["cos"], a["expression"], a["cx"]) != (b["cos"], b["expression"], b["cx"])
    train = [identity_params(0, 0, i)["skin_t"] for i in range(1000)]
    test = [identity_params(0, 1, i)["skin_t"] for i in range(1000)]
    assert len(set(train)) == 1000 and not set(train) & set(test)


def test_expression_changes_the_drawing_of_one_face():
    ident = dict(identity_params(0, 0, 3), glasses=False)
    renders = {}
    for e in range(7):           # same identity, pose and lighting; only the expression differs
        p = item_params(ident, np.random.default_rng(0), 64, 0.0, False, expression=e)
        img, _, lm = render(p, 64, np.random.default_rng(1))
        renders[e] = (img.astype(np.float32), lm)
    for e in range(1, 7):
        diff = np.abs(renders[e][0] - renders[0][0]).mean()
        mouth = np.abs(renders[e][1][48:68] - renders[0][1][48:68]).max()
        brows_eyes = np.abs(renders[e][1][17:27] - renders[0][1][17:27]).max() + \
            np.abs(renders[e][1][36:48] - renders[0][1][36:48]).max()
        assert diff > 0.3 and mouth > 0.8 and brows_eyes > 0.6, (EXPRESSIONS[e], diff, mouth, brows_eyes)
    for a in range(1, 7):        # every pair of expressions differs in mouth or brow/eye geometry by > 0.5 px
        for b in range(a + 1, 7):
            assert np.abs(renders[a][1][17:68] - renders[b][1][17:68]).max() > 0.5, (a, b)


def test_age_is_visible():
    ident = dict(identity_params(0, 0, 11), base_age=10.0, gray_onset=40.0, bald_age=999.0)
    young = item_params(ident, np.random.default_rng(2), 96, 0.0, False)
    old = item_params(dict(ident, base_age=90.0), np.random.default_rng(2), 96, 0.0, False)
    assert young["age"] < 15 and old["age"] > 85
    assert attributes_of(young)[ATTR["Young"]] == 1 and attributes_of(old)[ATTR["Gray_Hair"]] == 1
    assert old["n_forehead_lines"] >= 3 and young["n_forehead_lines"] == 0
    iy, _, _ = render(young, 96, np.random.default_rng(0))
    io, _, _ = render(old, 96, np.random.default_rng(0))
    assert np.abs(iy.astype(float) - io.astype(float)).mean() > 2.0


def test_verification_pairs():
    ds = SyntheticFaces("test", size=64, length=3000, n_identities=1000)
    pairs = ds.verification_pairs(200, seed=1)
    assert len(pairs) == 200 and sum(s for _, _, s in pairs) == 100
    for a, b, same in pairs:
        assert 0 <= a < len(ds) and 0 <= b < len(ds)
        assert (ds.identity_of(a) == ds.identity_of(b)) == same
        if same:
            assert a != b
    assert pairs == ds.verification_pairs(200, seed=1) and pairs != ds.verification_pairs(200, seed=2)
    with pytest.raises(ValueError, match="2 images per identity"):
        SyntheticFaces("test", length=500, n_identities=1000).verification_pairs(10)


def test_task_views():
    for task, field in (("landmarks", "landmarks"), ("parsing", "mask"), ("age", "age"),
                        ("expression", "expression"), ("attributes", "attributes"), ("recognition", "identity"),
                        ("pose", "pose"), ("visibility", ("visible", "landmarks")), ("gender", "gender"),
                        ("race", "race")):
        ds = SyntheticFaces("train", size=48, length=10, task=task)
        fields = {field} if isinstance(field, str) else set(field)     # visibility: its points' positions too
        assert set(ds[0]) == {"image"} | fields and ds.task_type == task
    with pytest.raises(ValueError, match="task"):
        SyntheticFaces(task="head_pose")


def test_cache_gives_the_same_items_and_is_shared_by_views():
    from data.synthetic import _CACHE
    plain = SyntheticFaces("train", size=48, seed=7, n_identities=50)
    lm = SyntheticFaces("train", size=48, seed=7, n_identities=50, task="landmarks", cache=True)
    ps = SyntheticFaces("train", size=48, seed=7, n_identities=50, task="parsing", cache=True)
    before = len(_CACHE)
    a, b = lm[3], ps[3]
    assert len(_CACHE) == before + 1                       # the parsing view reused the landmark view's drawing
    ref = plain[3]
    assert torch.equal(a["image"], ref["image"]) and torch.equal(a["landmarks"], ref["landmarks"])
    assert torch.equal(b["mask"], ref["mask"]) and b["mask"].dtype == torch.int64
    a["image"].zero_()                                     # a caller changing its item leaves the cache intact
    assert torch.equal(lm[3]["image"], ref["image"])


def test_aligned_framing_gives_larger_centred_faces():
    loose = SyntheticFaces("train", size=64, seed=3, n_identities=40)
    aligned = SyntheticFaces("train", size=64, seed=3, n_identities=40, framing="aligned")
    def stats(ds):
        lm = torch.stack([ds[i]["landmarks"] for i in range(40)])                  # [40, 68, 2]
        width = (lm[:, 16] - lm[:, 0]).norm(dim=-1)                                 # jaw-end to jaw-end
        centre = lm.mean(1)
        return width.mean().item(), centre.std(0).mean().item()                      # size, position spread
    (wl, cl), (wa, ca) = stats(loose), stats(aligned)
    assert wa > 1.2 * wl, f"aligned faces should be larger: {wa:.1f} vs {wl:.1f} px"
    assert ca < cl, f"aligned faces should move less: spread {ca:.2f} vs {cl:.2f} px"
    with pytest.raises(ValueError, match="framing"):
        SyntheticFaces("train", size=64, framing="tight")
