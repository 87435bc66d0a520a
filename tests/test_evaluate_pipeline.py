"""End to end: a shortened default run (torchrun, 2 processes, stage 1 then stage 2) -> evaluate.py --json ->
predict.py; plus the synthetic evaluation's baselines on known cases."""
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
    per_class = syn["parsing_f1_per_class"]                       # 19 classes; null = absent from truth and prediction
    assert len(per_class) == 19
    fg = [v for v in per_class[1:] if v is not None]
    assert fg and abs(np.mean(fg) - syn["parsing_f1"]) < 1e-9
    assert "| synthetic test |" in proc.stdout and "verification" in proc.stdout


def test_predict_cli(default_run, tmp_path):
    from PIL import Image
    from data.synthetic import SyntheticFaces
    out, _, _ = default_run
    face = SyntheticFaces("test", size=96)[0]
    img = tmp_path / "face.png"
    Image.fromarray(face["image"].permute(1, 2, 0).numpy()).save(img)
    proc = _run([sys.executable, "predict.py", checkpoint.checkpoints(out, 1)[-1], str(img), "--box", "10", "10", "80",
                 "90", "--out-dir", str(tmp_path / "pred")])
    res = json.loads(proc.stdout)
    pts = np.asarray(res["landmarks"]["300w"])
    assert pts.shape == (68, 2)
    x0, y0, x1, y1 = res["face_region"]                      # square of side 80 on the box centre (45, 50)
    assert (x0, y0, x1, y1) == (5.0, 10.0, 85.0, 90.0)
    assert (pts[:, 0] >= x0 - 0.5).all() and (pts[:, 0] <= x1).all()
    areas = res["parsing_areas"]["celebamask_hq"]
    assert abs(sum(areas.values()) - 1.0) < 1e-3 and set(areas) <= set(evaluate_classes())
    assert set(res["expression"]["affectnet"]["probabilities"]) == {"neutral", "happiness", "sadness", "surprise",
                                                                     "fear", "disgust", "anger"}
    assert all(v > 0.5 for v in res["attributes"]["celeba"].values())
    emb = np.load(res["embedding"]["ms1mv3"]["path"])
    assert emb.shape == (train.model_config(train.PRESETS["demo"], 1).embed_dim,)   # the demo model's embedding
    assert os.path.isfile(res["drawing"]) and Image.open(res["drawing"]).size == (96, 96)


def evaluate_classes():
    from data.conventions import CELEBAMASK_CLASSES
    return CELEBAMASK_CLASSES


def test_synthetic_baselines_are_training_statistics():
    """Mean shape inside the image, background corners in the majority map, valid age / class / attribute stats."""
    base = evaluate.synthetic_baselines(32, {"seed": 0, "identities": 50, "length": 200}, n=40)
    assert base["landmarks"].shape == (68, 2) and (0 < base["landmarks"]).all() and (base["landmarks"] < 1).all()
    assert base["mask"].shape == (32, 32) and base["mask"][0, 0] == 0              # corners are background
    assert 0 <= base["age"] <= 100 and 0 <= base["expression"] < 7 and base["attributes"].shape == (40,)


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


def test_predict_image_lists_attributes_above_half():
    """Attributes with probability above 0.5 are reported by name with their probability."""
    from PIL import Image
    import predict
    from data.synthetic import SyntheticFaces
    torch.manual_seed(0)
    from model import Faceptor, FaceptorConfig
    model = Faceptor(FaceptorConfig.tiny()).eval()
    with torch.no_grad():
        model.value_head.fc.weight.zero_()
        model.value_head.fc.bias.fill_(2.0)                   # every attribute logit = 2 -> p = 0.881
    face = SyntheticFaces("test", size=64)[0]["image"].permute(1, 2, 0).numpy()
    res, _ = predict.predict_image(model, Image.fromarray(face))
    attrs = res["attributes"]["celeba"]
    assert len(attrs) == 40 and all(abs(v - 0.8808) < 1e-3 for v in attrs.values())
