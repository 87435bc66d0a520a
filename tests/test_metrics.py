"""metrics.py against hand-computed cases, and on its own: importable and usable without torch."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import evaluate
import metrics as E


def _close(actual, expected, tol=1e-9):
    assert abs(float(actual) - expected) <= tol * max(1.0, abs(expected)), f"got {actual}, expected {expected}"


# ------------------------------------------------------------------------------------------------ NME

def test_nme_300w_inter_ocular_by_hand():
    gt = np.zeros((2, 68, 2))
    gt[0, 36], gt[0, 45] = (10, 20), (40, 60)            # unit 50
    gt[1, 36], gt[1, 45] = (0, 0), (20, 0)               # unit 20
    pred = gt.copy()
    pred[0] += (3, 4)                                    # every point 5 px off -> 5 / 50
    pred[1, 45] += (34, 0)                               # one point 34 px off -> 34 / 68 / 20 (unit taken from gt)
    per = E.nme_per_sample(pred, gt, "300w")
    np.testing.assert_allclose(per, [0.1, 0.025], rtol=1e-12)
    _close(E.nme(pred, gt, "300w"), 0.0625)
    _close(E.nme(torch.tensor(pred), torch.tensor(gt), "300w"), 0.0625)


@pytest.mark.parametrize("dataset,k,left,right", [("wflw", 98, 60, 72), ("cofw", 29, 8, 9)])
def test_nme_point_units(dataset, k, left, right):
    gt = np.zeros((1, k, 2))
    gt[0, left], gt[0, right] = (0, 0), (0, 8)           # unit 8
    pred = gt + (0, 2)
    _close(E.nme(pred, gt, dataset), 2 / 8)


def test_nme_300w_inter_pupil_unit():
    gt = np.zeros((1, 68, 2))
    gt[0, 36:42] = [(0, 0), (2, 0), (0, 2), (2, 2), (1, 1), (1, 1)]          # mean (1, 1)
    gt[0, 42:48] = [(7, 1), (7, 1), (7, 1), (7, 1), (7, 1), (7, 1)]          # mean (7, 1): distance 6
    _close(E.nme(gt + (0, 3), gt, "300w", unit="inter_pupil"), 3 / 6)


def test_nme_aflw19_box_diagonal():
    gt = np.zeros((2, 19, 2))
    pred = gt + (1, 0)
    boxes = np.array([[10, 20, 13, 24], [0, 0, 6, 8]])   # w, h = (3, 4) and (6, 8): diagonals 5 and 10
    _close(E.nme(pred, gt, "aflw19", boxes=boxes), (1 / 5 + 1 / 10) / 2)
    _close(E.nme(pred, gt, "aflw19", boxes=boxes, unit="box"), (1 / math.sqrt(12) + 1 / math.sqrt(48)) / 2)


def test_nme_errors():
    with pytest.raises(ValueError, match="boxes"):
        E.nme(np.zeros((1, 19, 2)), np.zeros((1, 19, 2)), "aflw19")
    with pytest.raises(ValueError, match="unknown dataset"):
        E.nme(np.zeros((1, 68, 2)), np.zeros((1, 68, 2)), "helen")
    with pytest.raises(ValueError, match="68"):
        E.nme(np.zeros((1, 98, 2)), np.zeros((1, 98, 2)), "300w")


@given(scale=st.floats(0.1, 10), shift=st.floats(-50, 50), seed=st.integers(0, 1000))
def test_nme_invariant_to_similarity(scale, shift, seed):
    rng = np.random.default_rng(seed)
    gt = rng.random((2, 98, 2)) * 100
    pred = gt + rng.normal(size=gt.shape)
    base = E.nme(pred, gt, "wflw")
    _close(E.nme(pred * scale + shift, gt * scale + shift, "wflw"), base, 1e-9)


# ------------------------------------------------------------------------------------------------ AUC / FR

def test_auc_fr_by_hand_odd_grid():
    # grid 0,1,2,3,4; CED = 0, 1/4, 2/4, 3/4, 3/4; Simpson: (1/3)(0 + 4/4 + 2*2/4 + 4*3/4 + 3/4) = 5.75/3
    auc, fr = E.auc_fr([0.5, 1.5, 2.5, 10.0], threshold=4.0, step=1.0)
    _close(auc, 5.75 / 3 / 4)
    _close(fr, 0.25)


def test_auc_fr_by_hand_even_grid():
    # grid 0,1,2,3 (4 points); CED = 0, 1/2, 1/2, 1. Simpson on [0, 2] plus the last-interval correction
    # (5 y3 + 8 y2 - y1) / 12.
    auc, fr = E.auc_fr([0.5, 2.5], threshold=3.0, step=1.0)
    _close(auc, ((0 + 4 * 0.5 + 0.5) / 3 + (5 * 1 + 8 * 0.5 - 0.5) / 12) / 3)
    _close(fr, 0.0)


def test_auc_fr_counts_errors_equal_to_grid_point():
    auc, fr = E.auc_fr([1.0], threshold=2.0, step=1.0)   # CED = 0, 1, 1 (<=, not <)
    _close(auc, (0 + 4 + 1) / 3 / 2)
    _close(fr, 0.0)


def test_auc_fr_extremes():
    _close(E.auc_fr(np.zeros(7), 0.1)[0], 1.0, 1e-12)
    assert E.auc_fr(np.zeros(7), 0.1)[1] == 0.0
    assert E.auc_fr(np.full(5, 0.5), 0.1) == (0.0, 1.0)
    auc, fr = E.auc_fr([0.0, 0.0, 1.0, 1.0], 0.1)
    _close(auc, 0.5, 1e-12)
    _close(fr, 0.5)


def test_auc_fr_grid_is_the_authors_arange():
    # np.arange(0, 0.07 + 1e-4, 1e-4) ends at 0.0701, so an error of 0.07005 is not a failure there.
    assert E.auc_fr([0.07005], 0.07)[1] == 0.0
    assert E.auc_fr([0.0702], 0.07)[1] == 1.0


def test_auc_fr_against_scipy_simpson():
    scipy_integrate = pytest.importorskip("scipy.integrate")
    rng = np.random.default_rng(0)
    for t in (0.1, 0.07, 0.05, 0.08):
        errors = rng.random(200) * 0.12
        xs = np.arange(0.0, t + 1e-4, 1e-4)
        ced = np.array([np.count_nonzero(errors <= x) for x in xs]) / errors.size
        auc, fr = E.auc_fr(errors, t)
        _close(auc, scipy_integrate.simpson(ced, x=xs) / t, 1e-12)
        _close(fr, 1 - ced[-1])


@given(xs=st.lists(st.floats(0.01, 1.0), min_size=1, max_size=12), a=st.floats(-2, 2), b=st.floats(-2, 2))
def test_simpson_exact_on_quadratics(xs, a, b):
    x = np.concatenate([[0.0], np.cumsum(xs)])           # irregular grid, 2..13 points
    y = a * x ** 2 + b * x + 1.0
    exact = a * x[-1] ** 3 / 3 + b * x[-1] ** 2 / 2 + x[-1]
    if len(x) == 2:                                      # one interval: trapezoid, exact only for lines
        exact = 0.5 * x[-1] * (y[0] + y[-1])
    _close(E._simpson(y, x), exact, 1e-9)


# ------------------------------------------------------------------------------------------------ parsing

def test_parsing_f1_by_hand_with_empty_classes():
    cm = np.array([[5, 1, 0, 0],
                   [2, 3, 0, 0],
                   [0, 0, 0, 0],      # class 2: in neither truth nor prediction -> 0/0 -> NaN, left out
                   [0, 1, 0, 0]])     # class 3: in truth, never predicted -> F1 0, counted
    per, fg = E.parsing_f1(cm)
    _close(per[0], 10 / 13)
    _close(per[1], 6 / 10)
    assert np.isnan(per[2])
    assert per[3] == 0.0
    _close(fg, (6 / 10 + 0) / 2)
    as_json = E.f1_list(per)                                    # NaN -> None, numbers as plain floats
    assert as_json[2] is None and as_json[3] == 0.0 and type(as_json[1]) is float
    _close(as_json[0], 10 / 13)


def test_parsing_f1_background_excluded_and_all_empty():
    per, fg = E.parsing_f1(np.array([[4, 0], [0, 0]]))
    assert per[0] == 1.0 and np.isnan(per[1]) and np.isnan(fg)
    per, fg = E.parsing_f1(np.array([[0, 2], [2, 6]]))    # background F1 0 does not pull the mean down
    _close(fg, 12 / 16)


def test_parsing_f1_one_matrix_over_the_set_not_per_image():
    a = E.parsing_confusion(np.array([[1, 1], [1, 1]]), np.array([[1, 1], [1, 1]]), 2)      # class 1 perfect
    b = E.parsing_confusion(np.array([[0, 0], [0, 0]]), np.array([[1, 0], [0, 0]]), 2)      # class 1 missed once
    _, fg = E.parsing_f1(a + b)
    _close(fg, 2 * 4 / (5 + 4))                           # not the mean of per-image F1s (1 and 0)


@given(c=st.integers(1, 5), h=st.integers(1, 6), w=st.integers(1, 6), seed=st.integers(0, 1000))
def test_parsing_confusion_matches_loop(c, h, w, seed):
    rng = np.random.default_rng(seed)
    pred, target = rng.integers(0, c, (h, w)), rng.integers(0, c, (h, w))
    expected = np.zeros((c, c), np.int64)
    for i in range(h):
        for j in range(w):
            expected[target[i, j], pred[i, j]] += 1
    np.testing.assert_array_equal(E.parsing_confusion(pred, target, c), expected)
    np.testing.assert_array_equal(E.parsing_confusion(torch.from_numpy(pred), torch.from_numpy(target), c), expected)


def test_parsing_confusion_rejects_out_of_range():
    with pytest.raises(ValueError, match="outside"):
        E.parsing_confusion(np.array([0, 3]), np.array([0, 1]), 3)


# ------------------------------------------------------------------------------------------------ MAE, accuracy

def test_mae_by_hand():
    _close(E.mae([1.0, 2.0, 3.0], torch.tensor([2.0, 2.0, 5.0])), 1.0)


def test_accuracy_ties_go_to_first_max():
    logits = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [3.0, 0.0, 1.0]])
    _close(E.accuracy(logits, torch.tensor([0, 2, 0])), 2 / 3)    # row 1 predicts class 1, not 2
    _close(E.accuracy(logits, torch.tensor([1, 1, 0])), 2 / 3)    # row 0 predicts class 0, not 1


def test_mean_attribute_accuracy_by_hand():
    logits = np.array([[0.5, -1.0, 0.0, 1.0],
                       [-0.2, 2.0, 3.0, 1.0],
                       [1.0, 1.0, -1.0, 1.0]])
    labels = np.array([[1, 0, 1, -1],
                       [0, -1, 1, -1],
                       [0, 1, -1, -1]])            # last attribute has no known label: left out
    # attr 0: 2/3; attr 1: 2/2; attr 2: logit 0 is negative -> 1/2
    _close(E.mean_attribute_accuracy(logits, labels), (2 / 3 + 1 + 1 / 2) / 3)


@given(n=st.integers(1, 8), a=st.integers(1, 5), seed=st.integers(0, 1000))
def test_mean_attribute_accuracy_matches_loop(n, a, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, a))
    labels = rng.integers(0, 2, (n, a))
    per = [np.mean([(logits[i, j] > 0) == (labels[i, j] == 1) for i in range(n)]) for j in range(a)]
    _close(E.mean_attribute_accuracy(torch.tensor(logits), torch.tensor(labels)), float(np.mean(per)))


# ------------------------------------------------------------------------------------------------ verification

def _pairs(n, same_mask, special):
    """Pairs in 2-D: same pairs identical (d = 0), different pairs orthogonal (d = 2); `special` maps
    index -> second embedding (first is (1, 0))."""
    a = np.tile([1.0, 0.0], (n, 1))
    b = np.where(np.asarray(same_mask)[:, None], [1.0, 0.0], [0.0, 1.0])
    for i, v in special.items():
        b[i] = v
    return a, b


def test_verification_perfectly_separable():
    same = np.arange(20) % 2 == 0
    a, b = _pairs(20, same, {})
    assert E.verification_accuracy(a, b, same) == (1.0, 0.0)
    assert E.verification_accuracy(5 * a, 0.1 * b, same) == (1.0, 0.0)        # L2-normalised inside


def test_verification_threshold_chosen_on_other_folds_first_max():
    # Pair 0 (fold 0) is a same pair at distance 1. Fold 0's training folds are separable by any t in (0, 2], the
    # first maximum is t = 0.01, which calls pair 0 "different": fold 0 scores 1/2, the other nine folds 1.
    same = np.arange(20) % 2 == 0
    a, b = _pairs(20, same, {0: [0.5, math.sqrt(3) / 2]})
    mean, std = E.verification_accuracy(a, b, same)
    _close(mean, 0.95)
    _close(std, 0.15)                                  # population std: sqrt(0.925 - 0.95^2); sample std is 0.158


def test_verification_folds_are_contiguous():
    # Pairs 0 and 1 are same pairs at distance 3 (unreachable): contiguous folds of 2 put both in fold 0
    # (accuracies 0, 1, ..., 1: mean 0.9, std 0.3); interleaved folds would give std 0.2.
    same = np.arange(20) % 2 == 0
    same[1] = True
    bad = [-0.5, math.sqrt(3) / 2]
    a, b = _pairs(20, same, {0: bad, 1: bad})
    mean, std = E.verification_accuracy(a, b, same)
    _close(mean, 0.9)
    _close(std, 0.3)


def test_contiguous_fold_sizes_like_kfold():
    folds = E._contiguous_folds(23, 10)
    assert [len(f) for f in folds] == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    np.testing.assert_array_equal(np.concatenate(folds), np.arange(23))


def test_verification_rejects_too_few_pairs():
    with pytest.raises(ValueError, match="folds"):
        E.verification_accuracy(np.ones((5, 2)), np.ones((5, 2)), [True] * 5)


@given(seed=st.integers(0, 1000), n=st.integers(10, 40))
def test_verification_matches_direct_protocol(seed, n):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n, 4)), rng.normal(size=(n, 4))
    same = rng.random(n) < 0.5
    a_n = a / np.linalg.norm(a, axis=1, keepdims=True)
    b_n = b / np.linalg.norm(b, axis=1, keepdims=True)
    d = ((a_n - b_n) ** 2).sum(1)
    sizes = [n // 10 + (1 if k < n % 10 else 0) for k in range(10)]
    starts = np.cumsum([0] + sizes)
    accs = []
    for k in range(10):
        test = list(range(starts[k], starts[k + 1]))
        train = [i for i in range(n) if i not in test]
        best_t, best_acc = None, -1.0
        for step in range(400):
            t = step * 0.01
            acc = np.mean([(d[i] < t) == same[i] for i in train])
            if acc > best_acc:
                best_t, best_acc = t, acc
        accs.append(np.mean([(d[i] < best_t) == same[i] for i in test]))
    mean, std = E.verification_accuracy(a, b, same)
    _close(mean, float(np.mean(accs)))
    _close(std, float(np.sqrt(np.mean((np.array(accs) - np.mean(accs)) ** 2))))


# ------------------------------------------------------------------------------------------------ tables

def test_metrics_work_without_torch(tmp_path):
    """metrics.py copied alone into a folder and run where `import torch` fails: numpy inputs, same numbers."""
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "metrics.py")
    (tmp_path / "metrics.py").write_text(open(src).read())
    (tmp_path / "torch.py").write_text("raise ImportError('torch is not installed here')\n")
    code = ("import numpy as np, metrics as M\n"
            "gt = np.zeros((1, 29, 2)); gt[0, 9] = (0, 8)\n"
            "print(M.nme(gt + (0, 2), gt, 'cofw'), M.accuracy([[0.0, 1.0], [2.0, 1.0]], [1, 1]),\n"
            "      M.mae([1.0, 4.0], [2.0, 2.0]), M.auc_fr([0.0, 1.0], 0.1)[1], M.parsing_f1([[1, 0], [1, 2]])[1],\n"
            "      M.mean_attribute_accuracy([[1.0, -1.0]], [[1, 1]]))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0.25", "0.5", "1.5", "0.5", "0.8", "0.5"]


def test_format_table_prints_percent_and_counts():
    table = evaluate.format_table([{"dataset": "300W", "NME": 0.02814, "AUC": float("nan")}, {"dataset": "WFLW"}],
                           ["dataset", "NME", "AUC"])
    assert table.splitlines() == ["| dataset | NME | AUC |", "|---|---|---|",
                                  "| 300W | 2.81 | - |", "| WFLW | - | - |"]
    assert evaluate.format_percent(0.5, digits=1) == "50.0"
    assert evaluate.format_table([{"n": 3, "acc": 1.0}], ["n", "acc"]).splitlines()[-1] == "| 3 | 100.00 |"
