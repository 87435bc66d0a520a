"""Benchmark protocols end to end on the fixture datasets (tests/fixtures.py) with a model stub whose outputs are
chosen, so every expected NME, AUC, FR, MAE and accuracy is computed by hand from the labels the fixture wrote."""
import math

import numpy as np
import pytest
import torch

import data
import evaluate
import fixtures
from model import TASKS, FaceptorConfig

S512, S112 = 32, 16


class StubModel(torch.nn.Module):
    """model.predict's interface; answers[task] holds output tensors [N, ...] handed out in order, B rows per call."""

    def __init__(self, answers):
        super().__init__()
        self.cfg = FaceptorConfig.tiny(tasks=tuple(answers), size_512=S512, size_112=S112)
        self.answers, self.cursor = answers, {t: 0 for t in answers}

    def predict(self, images_512=None, images_112=None, tasks=None):
        out = {}
        for t in tasks:
            x = images_512 if TASKS[t].size == 512 else images_112
            i, self.cursor[t] = self.cursor[t], self.cursor[t] + x.shape[0]
            out[t] = {k: v[i:self.cursor[t]] for k, v in self.answers[t].items()}
        return out


def one_hot_logits(classes, n):
    return torch.nn.functional.one_hot(torch.tensor(classes), n).float()


# ------------------------------------------------------------------------------------------------ landmarks
#
# The stub scales the aligned ground truth by s about the crop centre, which the evaluation warp maps to the box
# centre c: in the original image every point moves to c + s (gt - c), so an image's NME is
# |s - 1| * mean_k ||gt_k - c|| / unit. Each s is picked from the target NME e by hand: s = 1 + e / r, r = that mean
# over the unit.

def scaled_coords(name, root, split, targets, radii, **loader_options):
    """coords [N, K, 2] for the stub: the aligned labels of the evaluation transform, scaled by 1 + e / r."""
    ds = data.build_dataset(name, root, split, transform=data.default_transform(name, False, S512),
                            **loader_options)
    centre = (S512 - 1) / 2
    coords = []
    for i, (e, r) in enumerate(zip(targets, radii)):
        aligned = ds[i]["landmarks"].double()                                          # [K, 2] aligned pixels
        coords.append((centre + (1 + e / r) * (aligned - centre) + 0.5) / S512)
    return torch.stack(coords).float()


def mean_radius(gt, centre):
    return float(np.mean([math.hypot(x - centre[0], y - centre[1]) for x, y in gt]))


def auc_by_hand(errors, threshold):
    """Area under the step CED over [0, threshold], divided by it: each image contributes (threshold - e) / n."""
    return sum(max(0.0, threshold - e) for e in errors) / (len(errors) * threshold)


def test_wflw_nme_auc_fr(tmp_path):
    written = fixtures.write_wflw(str(tmp_path / "wflw"))["test"]
    targets = [0.02005, 0.05005, 0.15]
    radii = []
    for _, lm, rect, _ in written:
        centre = ((rect[0] + rect[2]) / 2, (rect[1] + rect[3]) / 2)                     # the annotated face box
        radii.append(mean_radius(lm, centre) / math.dist(lm[60], lm[72]))             # outer eye corners
    model = StubModel({"wflw": {"coords": scaled_coords("wflw", str(tmp_path / "wflw"), "test", targets, radii)}})
    res = evaluate.evaluate_benchmarks(model, str(tmp_path))["wflw/test"]
    assert res["n"] == 3
    assert abs(res["nme"] - np.mean(targets)) < 1e-5, res
    assert res["fr@0.1"] == pytest.approx(1 / 3)
    assert abs(res["auc@0.1"] - auc_by_hand(targets, 0.1)) < 1e-3, (res["auc@0.1"], auc_by_hand(targets, 0.1))


def test_cofw_nme_auc_fr(tmp_path):
    pytest.importorskip("h5py")
    _, phis = fixtures.write_cofw_v73(str(tmp_path / "cofw"), "test")
    targets = [0.0, 0.08, 0.3]
    radii = []
    for phi in phis:
        lm = np.stack([phi[:29], phi[29:58]], 1)
        x0, x1 = math.floor(lm[:, 0].min()), math.ceil(lm[:, 0].max())              # COFW box: landmark extent
        y0, y1 = math.floor(lm[:, 1].min()), math.ceil(lm[:, 1].max())
        radii.append(mean_radius(lm, ((x0 + x1) / 2, (y0 + y1) / 2)) / math.dist(lm[8], lm[9]))
    model = StubModel({"cofw": {"coords": scaled_coords("cofw", str(tmp_path / "cofw"), "test", targets, radii)}})
    res = evaluate.evaluate_benchmarks(model, str(tmp_path))["cofw/test"]
    assert res["n"] == 3
    assert abs(res["nme"] - np.mean(targets)) < 1e-5, res
    assert res["fr@0.1"] == pytest.approx(1 / 3)
    assert abs(res["auc@0.1"] - (0.1 + 0.02) / 0.3) < 1e-3, res


def test_aflw19_nme_box_diagonal(tmp_path):
    pytest.importorskip("scipy")
    root = str(tmp_path / "aflw19")
    names, lms, bbox, mask, ra = fixtures.write_aflw(root)
    order = ra - 1
    test = list(order[3:])                                          # n_train=3: the last three of the permutation
    frontal = [i for i in test if mask[i].all()]
    targets = {"test": [0.01, 0.04, 0.2], "frontal": [0.03, 0.06, 0.09][:len(frontal)]}
    coords = []
    for split, idx in (("test", test), ("frontal", frontal)):
        radii = []
        for i in idx:
            left, right, top, bottom = bbox[i]
            gt = lms[i].reshape(2, 19).T
            radii.append(mean_radius(gt, ((left + right) / 2, (top + bottom) / 2)) /
                         math.hypot(right - left, bottom - top))                        # unit: the box diagonal
        coords.append(scaled_coords("aflw19", root, split, targets[split], radii, n_train=3))
    model = StubModel({"aflw19": {"coords": torch.cat(coords)}})
    res = evaluate.evaluate_benchmarks(model, str(tmp_path), loader_options={"aflw19": {"n_train": 3}})
    assert res["aflw19/test"]["n"] == 3 and res["aflw19/frontal"]["n"] == len(frontal) == 2
    assert abs(res["aflw19/test"]["nme"] - np.mean(targets["test"])) < 1e-5, res
    assert abs(res["aflw19/frontal"]["nme"] - np.mean(targets["frontal"])) < 1e-5, res
    assert "auc@0.1" not in res["aflw19/test"]                     # AFLW-19 reports NME only


# ------------------------------------------------------------------------------------------------ 112-px protocols

def test_utkface_affectnet_ferplus_lfw73(tmp_path):
    pytest.importorskip("scipy")
    fixtures.write_utk(str(tmp_path / "utkface"))                      # test split: one face aged 59
    fixtures.write_affectnet(str(tmp_path / "affectnet"))              # test labels 3, (10 dropped), 5
    fixtures.write_ferplus(str(tmp_path / "ferplus"))                  # PrivateTest: FER+ anger, fear
    _, labels, _, test = fixtures.write_lfw73(str(tmp_path / "lfw73"))
    signs = np.where(np.arange(73) % 3 == 0, 1.0, -1.0)                # attribute k predicted positive iff k % 3 == 0
    model = StubModel({
        "utkface": {"age": torch.tensor([50.5])},
        "affectnet": {"logits": one_hot_logits([3, 0], 7)},             # right, wrong
        # FER+ anger -> AffectNet 6, fear -> AffectNet 4 (AffectNet order: neutral, happy, sad, surprise, fear,
        # disgust, anger): predicting anger twice is right once.
        "ferplus": {"logits": one_hot_logits([6, 6], 7)},
        "lfw73": {"logits": torch.tensor(np.stack([signs, signs]))},
    })
    res = evaluate.evaluate_benchmarks(model, str(tmp_path))
    assert res["utkface/test"]["n"] == 1 and res["utkface/test"]["mae"] == pytest.approx(8.5)
    assert res["affectnet/test"]["n"] == 2 and res["affectnet/test"]["accuracy"] == 0.5
    assert res["ferplus/test"]["n"] == 2 and res["ferplus/test"]["accuracy"] == 0.5
    per_attr = [np.mean([(signs[k] > 0) == (labels[i, k] == 1) for i in test]) for k in range(73)]
    assert res["lfw73/test"]["n"] == 2
    assert res["lfw73/test"]["mean_accuracy"] == pytest.approx(np.mean(per_attr), abs=1e-12)
    table = evaluate.benchmark_tables(res)
    assert "| utkface/test | 1 | 8.500 |" in table and "| ferplus/test | 2 | 50.00 |" in table


# ------------------------------------------------------------------------------------------------ missing and corrupt

RAF_TEST = ["test_0001.jpg", "test_0002.jpg", "test_0003.jpg"]         # labels 4, 2, 3 -> AffectNet 1, 4, 5


def raf_with_corrupt_image(root):
    fixtures.write_rafdb(str(root / "rafdb"))
    bad = root / "rafdb" / "Image" / "aligned" / "test_0002_aligned.jpg"
    bad.write_bytes(bad.read_bytes()[:40])                            # truncated JPEG
    return str(bad)


def test_corrupt_image_is_an_error_naming_the_file(tmp_path):
    bad = raf_with_corrupt_image(tmp_path)
    model = StubModel({"rafdb": {"logits": one_hot_logits([1, 4, 5], 7)}})
    with pytest.raises(data.DatasetError, match="test_0002_aligned.jpg") as err:
        evaluate.evaluate_benchmarks(model, str(tmp_path), batch_size=2)
    assert bad in str(err.value) and "--skip-corrupt" in str(err.value)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_image_skipped_and_counted(tmp_path, num_workers):
    bad = raf_with_corrupt_image(tmp_path)
    model = StubModel({"rafdb": {"logits": one_hot_logits([1, 0], 7)}})    # rows for the two readable faces
    res = evaluate.evaluate_benchmarks(model, str(tmp_path), batch_size=2, num_workers=num_workers,
                                       skip_corrupt=True)["rafdb/test"]
    assert res["n"] == 2 and res["skipped"] == 1 and bad in res["skipped_errors"][0]
    assert res["accuracy"] == 0.5                                       # faces 1 and 3 (labels 1, 5): one right
    table = evaluate.benchmark_tables({"rafdb/test": res})
    assert "| rafdb/test | 2 | 50.00 | 1 corrupt image skipped |" in table


def test_malformed_label_line_is_an_error_even_when_skipping(tmp_path):
    fixtures.write_rafdb(str(tmp_path / "rafdb"))
    lst = tmp_path / "rafdb" / "EmoLabel" / "list_patition_label.txt"
    lines = lst.read_text().splitlines()
    lines[4] = "test_0002.jpg nine"
    lst.write_text("\n".join(lines) + "\n")
    model = StubModel({"rafdb": {"logits": one_hot_logits([1, 4, 5], 7)}})
    with pytest.raises(data.DatasetError, match=r"list_patition_label.txt:5"):
        evaluate.evaluate_benchmarks(model, str(tmp_path), skip_corrupt=True)


def test_absent_split_listed_not_dropped(tmp_path):
    import shutil
    written = fixtures.write_300w(str(tmp_path / "300w"))
    shutil.rmtree(tmp_path / "300w" / "ibug")                          # challenge (and full) not downloaded
    common = [k for k in written if k.startswith(("helen/testset", "lfpw/testset"))]
    model = StubModel({"300w": {"coords": torch.full((len(common), 68, 2), 0.5)}})
    res = evaluate.evaluate_benchmarks(model, str(tmp_path))
    assert res["300w/common"]["n"] == 2 and np.isfinite(res["300w/common"]["nme"])
    for split in ("challenge", "full"):
        assert res[f"300w/{split}"]["status"] == "absent"
        assert str(tmp_path / "300w" / "ibug") in res[f"300w/{split}"]["reason"]
    table = evaluate.benchmark_tables(res)
    assert f"| 300w/challenge | - | - | - | - | absent: missing 300W folder: {tmp_path / '300w' / 'ibug'} |" in table


def test_progress_lines_count_batches_and_images(tmp_path, capsys):
    fixtures.write_rafdb(str(tmp_path / "rafdb"))
    model = StubModel({"rafdb": {"logits": one_hot_logits([1, 4, 5], 7)}})
    res = evaluate.evaluate_benchmarks(model, str(tmp_path), batch_size=2, log_every=1)
    assert res["rafdb/test"]["accuracy"] == 1.0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("rafdb/test")]
    assert [ln.split(" img/s")[0].rsplit(",", 1)[0] for ln in lines] == [
        "rafdb/test: batch 1/2 (2/3 images", "rafdb/test: batch 2/2 (3/3 images"]
    assert all(" eta " in ln for ln in lines) and lines[-1].endswith("eta 0m00s)")


def test_missing_annotation_of_a_present_image_is_corrupt_not_absent(tmp_path):
    fixtures.write_lapa(str(tmp_path / "lapa"))
    label = tmp_path / "lapa" / "test" / "labels" / "test_0.png"
    label.unlink()
    model = StubModel({"lapa": {"logits": torch.zeros(1, 11, S512, S512)}})
    with pytest.raises(data.DatasetError, match="test_0.png") as err:
        evaluate.evaluate_benchmarks(model, str(tmp_path), skip_corrupt=True)
    assert not isinstance(err.value, data.DatasetMissing)
