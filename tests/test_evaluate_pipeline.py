"""End to end: a shortened default run (torchrun, 2 processes, stage 1 then stage 2) -> evaluate.py --json ->
predict.py; plus the synthetic evaluation's baselines recomputed by hand."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import evaluate  # noqa: E402
import checkpoint  # noqa: E402
import train  # noqa: E402
import train_config  # noqa: E402

SYNTHETIC_KEYS = ("nme", "nme_baseline", "parsing_f1", "parsing_f1_baseline", "age_mae", "age_mae_baseline",
                  "expression_acc", "expression_acc_baseline", "attribute_macc", "attribute_macc_baseline",
                  "verification_acc")


def _run(cmd, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`torchrun --standalone --nproc_per_node=2 train.py --stage 1` shortened to 20 steps with smaller batches."""
    out = str(tmp_path_factory.mktemp("demo"))
    common = ["--out-dir", out, "--batch-scale", "0.25", "--synthetic-length", "2000", "--eval-samples", "40",
              "--log-every", "10"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    s1 = _run(launch + ["--stage", "1", "--max-steps", "20", "--warmup", "5"] + common)
    s2 = _run(launch + ["--stage", "2", "--max-steps", "4", "--warmup", "1"] + common)
    return out, s1, s2


def test_default_run_prints_progress_and_checkpoint(default_run):
    out, s1, s2 = default_run
    assert "preset demo | stage 1" in s1.stdout and "step 10/20" in s1.stdout and "img/s" in s1.stdout
    assert "eta" in s1.stdout and "eval @ 20" in s1.stdout
    path = checkpoint.checkpoints(out, 1)[-1]
    assert f"checkpoint: {path}" in s1.stdout
    assert f"starting from {path}" in s2.stdout and "stage 2" in s2.stdout
    ckpt = torch.load(checkpoint.checkpoints(out, 2)[-1], map_location="cpu", weights_only=True)
    assert ckpt["stage"] == 2 and ckpt["step"] == 4 and ckpt["format"] == checkpoint.CHECKPOINT_FORMAT


@pytest.mark.parametrize("stage", [1, 2])
def test_evaluate_cli_writes_synthetic_json(default_run, tmp_path, stage):
    out, _, _ = default_run
    path = checkpoint.checkpoints(out, stage)[-1]
    js = str(tmp_path / "eval.json")
    proc = _run([sys.executable, "evaluate.py", path, "--json", js, "--n-test", "60"])
    with open(js) as f:
        res = json.load(f)
    assert res["stage"] == stage
    syn = res["synthetic"]
    for k in SYNTHETIC_KEYS:
        assert k in syn and np.isfinite(syn[k]), k
    for k in SYNTHETIC_KEYS:
        if k != "age_mae" and k != "age_mae_baseline" and k != "nme" and k != "nme_baseline":
            assert 0.0 <= syn[k] <= 1.0, (k, syn[k])
    assert syn["age_mae"] > 0 and syn["nme"] > 0
    assert syn["n_test"] == 60 and syn["n_pairs"] == 60                # --n-test reaches the split
    assert len(syn["parsing_f1_per_class"]) == 19
    rows = {ln.split(" | ")[0][2:]: ln for ln in proc.stdout.splitlines() if ln.startswith("| ")}
    for name, key, bkey in evaluate.SYNTHETIC_ROWS[1:2] + evaluate.SYNTHETIC_ROWS[3:5]:      # percent rows
        assert rows[name].startswith(f"| {name} | {evaluate.format_percent(syn[key])} | "
                                     f"{evaluate.format_percent(syn[bkey])} |"), rows[name]
    assert "verification" in proc.stdout


def test_predict_cli(default_run, tmp_path):
    """predict.py on a trained checkpoint: a synthetic face pasted into a larger picture, its five points given."""
    from PIL import Image
    from data.synthetic import SyntheticFaces
    import framing
    out, _, _ = default_run
    face = SyntheticFaces("test", size=96)[0]
    pic = np.full((160, 200, 3), 90, np.uint8)
    pic[30:126, 60:156] = face["image"].permute(1, 2, 0).numpy()
    img = tmp_path / "face.png"
    Image.fromarray(pic).save(img)
    p5 = framing.five_points_68(face["landmarks"].double().numpy()) + [60, 30]
    proc = _run([sys.executable, "predict.py", checkpoint.checkpoints(out, 1)[-1], str(img), "--points5",
                 *map(str, p5.reshape(-1)), "--out-dir", str(tmp_path / "pred"), "--save-mask"])
    assert f"{img}: 1 face(s)" in proc.stdout
    with open(tmp_path / "pred" / "predictions.jsonl") as f:
        res = [json.loads(line) for line in f]
    assert len(res) == 1 and res[0]["face"] == 0 and res[0]["score"] is None
    r = res[0]
    pts = np.asarray(r["300w"]["points"])
    assert pts.shape == (68, 2) and (pts[:, 0] > 60 - 10).all() and (pts[:, 0] < 156 + 10).all()
    areas = r["celebamask_hq"]["areas"]
    assert abs(sum(areas.values()) - 1.0) < 1e-3 and len(areas) == 19
    assert Image.open(r["celebamask_hq"]["mask"]).size == (200, 160)
    assert set(r["affectnet"]["probs"]) == {"neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger"}
    assert len(r["celeba"]["probs"]) == 40
    emb = np.load(r["ms1mv3"]["embedding"])
    assert emb.shape == (train_config.model_config(train.PRESETS["demo"], 1).embed_dim,)   # the demo model's embedding
    assert abs(np.linalg.norm(emb) - 1) < 1e-4
    assert Image.open(tmp_path / "pred" / "face_prediction.png").size == (200, 160)


def evaluate_classes():
    from data.conventions import CELEBAMASK_CLASSES
    return CELEBAMASK_CLASSES


def test_synthetic_baselines_are_training_statistics():
    """Mean normalised shape, per-pixel majority map, mean age, majority expression and attributes of the 40
    training faces taken at stride 200 // 40, recomputed here one face and one pixel at a time."""
    from data.synthetic import SyntheticFaces
    base = evaluate.synthetic_baselines(32, {"seed": 0, "identities": 50, "length": 200}, n=40)
    ds = SyntheticFaces("train", size=32, length=200, seed=0, n_identities=50)
    items = [ds[i] for i in range(0, 200, 5)]
    shape = sum((it["landmarks"].double().numpy() + 0.5) / 32 for it in items) / len(items)
    np.testing.assert_allclose(base["landmarks"], shape, atol=1e-6)
    masks = np.stack([it["mask"].numpy() for it in items])
    for y in range(32):
        for x in range(32):
            assert base["mask"][y, x] == np.bincount(masks[:, y, x], minlength=19).argmax(), (y, x)
    assert base["mask"][0, 0] == 0                                         # corners are background
    assert base["age"] == pytest.approx(np.mean([it["age"] for it in items]))
    votes = [sum(it["expression"] == e for it in items) for e in range(7)]
    assert base["expression"] == votes.index(max(votes))
    positives = sum(it["attributes"].numpy() for it in items)
    np.testing.assert_array_equal(base["attributes"], (positives > len(items) / 2).astype(np.int64))


def test_benchmark_protocols_on_fixture_datasets(tmp_path):
    """Every protocol found under a data root (tiny native-format copies from tests/fixtures.py) runs and reports."""
    import fixtures
    from model import Faceptor, FaceptorConfig
    root = tmp_path / "data"
    writers = {"300w": fixtures.write_300w, "celebamask_hq": fixtures.write_celebamask, "lapa": fixtures.write_lapa,
               "morph2": fixtures.write_morph, "rafdb": fixtures.write_rafdb, "celeba": fixtures.write_celeba}
    for name, write in writers.items():
        (root / name).mkdir(parents=True)
        write(str(root / name))
    (root / "ms1mv3").mkdir()
    fixtures.write_verification_bin(str(root / "ms1mv3" / "lfw.bin"))
    torch.manual_seed(0)
    model = Faceptor(FaceptorConfig.tiny(tasks=tuple(writers) + ("ms1mv3",), size_512=32, size_112=16)).eval()
    res = evaluate.evaluate_benchmarks(model, str(root), batch_size=4)
    assert {"300w/common", "300w/full", "celebamask_hq/test", "lapa/test", "morph2/test", "rafdb/test",
            "celeba/test", "verification/lfw"} <= set(res)
    assert res["300w/full"]["nme"] > 0 and 0 <= res["lapa/test"]["f1_mean"] <= 1
    assert res["verification/lfw"]["pairs"] == 20 and 0 <= res["verification/lfw"]["accuracy"] <= 1
    table = evaluate.benchmark_tables(res)
    assert "| 300w/common |" in table and "| verification/lfw |" in table


def test_predict_photo_reports_every_attribute_by_name():
    """Every attribute is reported by its CelebA name (lower case) with its probability."""
    import framing
    import predict
    from data.synthetic import SyntheticFaces
    torch.manual_seed(0)
    from model import Faceptor, FaceptorConfig
    model = Faceptor(FaceptorConfig.tiny()).eval()
    with torch.no_grad():
        model.value_head.fc.weight.zero_()
        model.value_head.fc.bias.fill_(2.0)                   # every attribute logit = 2 -> p = 0.881
    item = SyntheticFaces("test", size=64)[0]
    p5 = framing.five_points_68(item["landmarks"].double().numpy())
    recs, _ = predict.predict_photo(model, framing.head_framings(model.cfg.tasks, {"data": "synthetic"}),
                                    item["image"].permute(1, 2, 0).numpy(), [framing.FaceGeometry(p5, None)])
    attrs = recs[0]["celeba"]["probs"]
    assert len(attrs) == 40 and all(abs(v - 0.8808) < 1e-3 for v in attrs.values())
    assert list(attrs)[0] == "5_o_clock_shadow" and list(attrs)[-1] == "young"
