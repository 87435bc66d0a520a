"""The synthetic test split's pipeline with stub models: an oracle (answers the labels of the face it is shown) must
score perfectly, and a stub answering the baselines must score exactly the baselines, which are checked by hand."""
import functools
import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F

import data
import evaluate
from model import TASKS, FaceptorConfig

SETTINGS = {"synthetic_seed": 3, "synthetic_identities": 30, "synthetic_train_length": 120}
S512, S112, N_TEST = 32, 16, 20


def _key(x: torch.Tensor) -> str:
    return hashlib.md5(x.contiguous().numpy().tobytes()).hexdigest()


@functools.lru_cache(maxsize=None)
def splits():
    """The two renderings of the test faces, built as evaluate_synthetic builds them (two images per identity)."""
    n_ids = N_TEST // 2
    t512 = data.SyntheticFaces("test", size=S512, length=2 * n_ids, seed=3, n_identities=n_ids)
    t112 = data.SyntheticFaces("test", size=S112, length=2 * n_ids, seed=3, n_identities=n_ids, framing="loose")
    return [t512[i] for i in range(len(t512))], [t112[i] for i in range(len(t112))]


class LookupModel(torch.nn.Module):
    """model.predict's interface: each face is recognised by its pixels and gets the outputs answer(i) of its test
    index i (flipped faces too, for the flip-summed embeddings)."""

    def __init__(self, answer):
        super().__init__()
        self.cfg = FaceptorConfig.tiny(size_512=S512, size_112=S112)          # the base tasks, embed_dim 32
        t512, t112 = splits()
        self.index, self.answer = {}, answer
        for i in range(len(t112)):
            for group, ds in (("dense", t512), ("global", t112)):
                x = data.normalize_images(ds[i]["image"][None], group)[0]
                self.index[_key(x)] = self.index[_key(x.flip(-1))] = i

    def predict(self, images_512=None, images_112=None, tasks=None):
        out = {}
        for t in tasks:
            x = images_512 if TASKS[t].size == 512 else images_112
            rows = [self.answer(TASKS[t].type, self.index[_key(img)]) for img in x]
            out[t] = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        return out


def oracle(task_type, i):
    face512, face112 = (ds[i] for ds in splits())
    if task_type == "landmarks":
        return {"coords": (face512["landmarks"].double() + 0.5) / S512}
    if task_type == "parsing":
        return {"logits": F.one_hot(face512["mask"], 19).permute(2, 0, 1).float()}
    if task_type == "age":
        return {"age": torch.tensor(face112["age"], dtype=torch.float64)}
    if task_type == "expression":
        return {"logits": F.one_hot(torch.tensor(face112["expression"]), 7).float()}
    if task_type == "attributes":
        return {"logits": face112["attributes"].double() * 2 - 1}
    return {"embedding": F.one_hot(torch.tensor(face112["identity"]), 32).float()}


def test_oracle_scores_perfectly():
    res = evaluate.evaluate_synthetic(LookupModel(oracle), SETTINGS, n_test=N_TEST, batch_size=6, n_baseline=12)
    assert res["n_test"] == N_TEST and res["n_pairs"] == N_TEST
    assert res["nme"] < 1e-9 and res["age_mae"] == 0.0
    assert res["parsing_f1"] == 1.0 and all(v in (1.0, None) for v in res["parsing_f1_per_class"])
    assert res["expression_acc"] == 1.0 and res["attribute_macc"] == 1.0
    assert res["verification_acc"] == 1.0 and res["verification_std"] == 0.0
    assert res["nme_baseline"] > 0.01 and res["parsing_f1_baseline"] < 1.0              # baselines are not perfect


def test_baseline_stub_scores_the_baselines_computed_by_hand():
    settings = evaluate._synthetic_settings(SETTINGS)
    base = evaluate.synthetic_baselines(S512, settings, 12)
    res = evaluate.evaluate_synthetic(LookupModel(lambda kind, i: {k: v[0] for k, v in evaluate.baseline_outputs(
        base, kind, 1).items()} if kind != "recognition" else oracle(kind, i)), SETTINGS, n_test=N_TEST,
        batch_size=6, n_baseline=12)
    for key in ("nme", "parsing_f1", "age_mae", "expression_acc", "attribute_macc"):
        assert res[key] == res[f"{key}_baseline"], key
    t512, t112 = splits()
    mean_shape = base["landmarks"].astype(np.float64) * S512 - 0.5
    nmes, ages, expr, attr = [], [], [], []
    for i in range(N_TEST):
        gt = t512[i]["landmarks"].double().numpy()
        unit = math.dist(gt[36], gt[45])
        nmes.append(np.mean([math.dist(p, g) for p, g in zip(mean_shape, gt)]) / unit)
        ages.append(abs(t112[i]["age"] - base["age"]))
        expr.append(t112[i]["expression"] == base["expression"])
        attr.append(t112[i]["attributes"].numpy() == base["attributes"])
    assert abs(res["nme_baseline"] - np.mean(nmes)) < 1e-6, (res["nme_baseline"], np.mean(nmes))
    assert abs(res["age_mae_baseline"] - np.mean(ages)) < 1e-9
    assert res["expression_acc_baseline"] == np.mean(expr)
    assert abs(res["attribute_macc_baseline"] - np.mean(attr)) < 1e-12
