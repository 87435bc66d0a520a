"""Evaluation of the task types beyond the paper and of the synthetic transfer schemes, against values computed by
hand: benchmark protocols on native-format fixtures with stub models (AFLW2000-3D through the 300wlp head, COFW
occlusion flags, FairFace gender / race), and the synthetic split with an oracle and a baseline stub."""
import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

import data
import evaluate
from data import synthetic_labels as sl
from model import TASKS, FaceptorConfig
from tests.fixtures_extra import write_aflw2000, write_cofw_flags, write_fairface
from tests.test_evaluate_protocols import StubModel, one_hot_logits


# ------------------------------------------------------------------------------------------------ benchmarks

def test_aflw2000_pose_mae_through_the_300wlp_head(tmp_path):
    written = write_aflw2000(str(tmp_path / "aflw2000"))
    kept = [pose for pose, _ in written.values() if max(abs(a) for a in pose) <= 99]             # 2 of 3 faces
    pred = torch.tensor([[5.0, 0.0, 0.0]]).expand(len(kept), 3)
    res = evaluate.evaluate_benchmarks(StubModel({"300wlp": {"pose": pred}}), str(tmp_path))["aflw2000/test"]
    want = [np.mean([abs(p[a] - (5.0 if a == 0 else 0.0)) for p in kept]) for a in range(3)]
    assert res["n"] == 2 and res["table"] == "pose"
    assert math.isclose(res["yaw"], want[0]) and math.isclose(res["pitch"], want[1])
    assert math.isclose(res["roll"], want[2]) and math.isclose(res["mean"], sum(want) / 3)
    assert (res["yaw"], res["pitch"], res["roll"]) == (27.5, 10.25, 19.0)           # (|10-5| + |-45-5|) / 2, ...
    assert "| aflw2000/test | 2 | 18.917 | 27.500 | 10.250 | 19.000 |" in evaluate.benchmark_tables(
        {"aflw2000/test": res})


def test_cofw_occlusion_recall_at_80_percent_precision(tmp_path):
    flags = write_cofw_flags(str(tmp_path / "cofw_visibility"), "test", n=3)                     # [3, 29] 1 occluded
    perfect = {"occluded": torch.from_numpy(flags).double()}
    res = evaluate.evaluate_benchmarks(StubModel({"cofw_visibility": perfect}), str(tmp_path))
    assert res["cofw_visibility/test"]["recall@p80"] == 1.0
    # occluded points scored 0.9 except the first, scored 0.1 with every visible point: the threshold 0.9 calls
    # P - 1 occluded points and nothing else (precision 1, recall (P - 1) / P); the threshold 0.1 has precision P / N
    scores = np.where(flags == 1, 0.9, 0.1)
    first = np.argwhere(flags == 1)[0]
    scores[tuple(first)] = 0.1
    res = evaluate.evaluate_benchmarks(StubModel({"cofw_visibility": {"occluded": torch.from_numpy(scores)}}),
                                       str(tmp_path))
    positives = int(flags.sum())
    assert positives / flags.size < 0.8
    assert math.isclose(res["cofw_visibility/test"]["recall@p80"], (positives - 1) / positives)


def test_fairface_gender_and_race_accuracy(tmp_path):
    write_fairface(str(tmp_path / "fairface_gender"))
    write_fairface(str(tmp_path / "fairface_race"))
    # test = val: ("3-9", Male, Middle Eastern), ("20-29", Female, Black); both answered Male / Black
    model = StubModel({"fairface_gender": {"logits": one_hot_logits([0, 0], 2)},
                       "fairface_race": {"logits": one_hot_logits([1, 1], 7)}})
    res = evaluate.evaluate_benchmarks(model, str(tmp_path))
    assert res["fairface_gender/test"]["accuracy"] == 0.5 and res["fairface_race/test"]["accuracy"] == 0.5
    assert res["fairface_gender/test"]["n"] == 2


# ------------------------------------------------------------------------------------------------ synthetic split

SETTINGS = {"synthetic_seed": 3, "synthetic_identities": 30, "synthetic_train_length": 120}
S512, S112, N_TEST = 32, 16, 20
HEADS = ("300wlp", "cofw_visibility", "utkface_gender", "utkface_race", "aflw19", "lapa", "synth_attr")
SCHEME = {"visibility": "cofw_visibility", "landmarks": "aflw19", "parsing": "lapa", "attributes": "synth_attr"}


@functools.lru_cache(maxsize=None)
def rendered_faces():
    """The test faces as evaluate_synthetic renders them, each relabelled in the scheme of its head type."""
    n_ids = N_TEST // 2
    t512 = data.SyntheticFaces("test", size=S512, length=2 * n_ids, seed=3, n_identities=n_ids)
    t112 = data.SyntheticFaces("test", size=S112, length=2 * n_ids, seed=3, n_identities=n_ids, framing="loose")
    out = {}
    for kind in ("pose", "gender", "race", "visibility", "landmarks", "parsing", "attributes"):
        ds = t512 if kind in ("visibility", "landmarks", "parsing") else t112
        out[kind] = [ds.relabel(ds[i], i, SCHEME[kind]) if kind in SCHEME else ds[i] for i in range(N_TEST)]
    images = {512: [t512[i]["image"] for i in range(N_TEST)], 112: [t112[i]["image"] for i in range(N_TEST)]}
    return out, images


class Lookup(torch.nn.Module):
    """model.predict's interface with the new heads: each face is recognised by its pixels and gets answer(kind, i)."""

    def __init__(self, answer):
        super().__init__()
        self.cfg = FaceptorConfig.tiny(size_512=S512, size_112=S112, tasks=HEADS)
        self.answer, self.index = answer, {}
        _, images = rendered_faces()
        for size, group in ((512, "dense"), (112, "global")):
            for i, img in enumerate(images[size]):
                self.index[size, data.normalize_images(img[None], group)[0].numpy().tobytes()] = i

    def predict(self, images_512=None, images_112=None, tasks=None):
        out = {}
        for t in tasks:
            x = images_512 if TASKS[t].size == 512 else images_112
            rows = [self.answer(TASKS[t].type, self.index[TASKS[t].size, img.numpy().tobytes()]) for img in x]
            out[t] = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        return out


def oracle(kind, i):
    it = rendered_faces()[0][kind][i]
    if kind == "pose":
        return {"pose": it["pose"].double()}
    if kind == "visibility":
        return {"occluded": 1.0 - it["visible"].double()}
    if kind in ("gender", "race"):
        return {"logits": F.one_hot(torch.tensor(it[kind]), TASKS[f"utkface_{kind}"].queries).float()}
    if kind == "landmarks":
        return {"coords": (it["landmarks"].double() + 0.5) / S512}
    if kind == "parsing":
        return {"logits": F.one_hot(it["mask"], 11).permute(2, 0, 1).float()}
    return {"logits": it["attributes"].double() * 2 - 1}


def test_oracle_scores_the_new_heads_perfectly():
    res = evaluate.evaluate_synthetic(Lookup(oracle), SETTINGS, n_test=N_TEST, batch_size=6, n_baseline=12)
    assert res["pose_mae"] == 0.0 and res["gender_acc"] == 1.0 and res["race_acc"] == 1.0
    assert res["aflw19_nme"] < 1e-9 and res["lapa_f1"] == 1.0 and res["synth_attr_macc"] == 1.0
    occluded = sum(int((1 - it["visible"]).sum()) for it in rendered_faces()[0]["visibility"])
    assert occluded > 0 and res["visibility_recall"] == 1.0
    table = evaluate.synthetic_table(res)
    assert "| head pose MAE (degrees, mean of yaw / pitch / roll) ↓ | 0.00 |" in table


def test_baseline_stub_scores_the_baselines_computed_by_hand():
    settings = evaluate._synthetic_settings(SETTINGS)
    base = evaluate.synthetic_baselines(S512, settings, 12)

    def constant(kind, i):
        b = {**base, **base["schemes"].get(SCHEME.get(kind), {})}
        return {k: v[0] for k, v in evaluate.baseline_outputs(b, kind, 1).items()}
    res = evaluate.evaluate_synthetic(Lookup(constant), SETTINGS, n_test=N_TEST, batch_size=6, n_baseline=12)
    for key in ("pose_mae", "visibility_recall", "gender_acc", "race_acc", "aflw19_nme", "lapa_f1",
                "synth_attr_macc"):
        assert res[key] == res[f"{key}_baseline"], key
    faces = rendered_faces()[0]
    pose = np.stack([it["pose"].double().numpy() for it in faces["pose"]])
    assert math.isclose(res["pose_mae"], np.abs(pose - base["pose"]).mean(), rel_tol=1e-12)
    assert res["gender_acc"] == np.mean([it["gender"] == base["gender"] for it in faces["gender"]])
    assert res["race_acc"] == np.mean([it["race"] == base["race"] for it in faces["race"]])
    shape = base["schemes"]["aflw19"]["landmarks"] * S512 - 0.5
    nme = [np.mean(np.linalg.norm(shape - it["landmarks"].double().numpy(), axis=1))
           / np.linalg.norm(it["landmarks"][6].double().numpy() - it["landmarks"][11].double().numpy())
           for it in faces["landmarks"]]
    assert math.isclose(res["aflw19_nme"], np.mean(nme), rel_tol=1e-9)
    attrs = np.stack([it["attributes"].numpy() for it in faces["attributes"]])
    assert math.isclose(res["synth_attr_macc"], (attrs == base["schemes"]["synth_attr"]["attributes"]).mean())
    # every point is visible in most training faces: the constant scores call all or nothing occluded
    vis = np.stack([it["visible"].numpy() for it in faces["visibility"]])
    assert base["schemes"]["cofw_visibility"]["visible"].all()
    assert res["visibility_recall"] == (1.0 if (1 - vis).mean() >= 0.8 else 0.0) == 0.0
    assert sl.RACE_BANDS == TASKS["utkface_race"].queries
