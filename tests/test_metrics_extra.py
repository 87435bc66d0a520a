"""Metrics of the task types beyond the paper on hand-computed cases; recall at precision against a brute-force
count over every threshold (hypothesis, bounded examples)."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import metrics


def test_pose_mae_per_angle_and_mean():
    pred = [[10.0, -5.0, 2.0], [-20.0, 0.0, 0.0]]
    gt = [[12.0, -5.0, -2.0], [-10.0, 3.0, 0.0]]
    # |errors|: yaw 2, 10 -> 6; pitch 0, 3 -> 1.5; roll 4, 0 -> 2; mean (6 + 1.5 + 2) / 3
    assert metrics.pose_mae(pred, gt) == pytest.approx({"yaw": 6.0, "pitch": 1.5, "roll": 2.0, "mean": 9.5 / 3})


def test_pose_mae_shape_error():
    with pytest.raises(ValueError, match=r"\[N, 3\] \(yaw, pitch, roll\)"):
        metrics.pose_mae(np.zeros((4, 2)), np.zeros((4, 2)))


@pytest.mark.parametrize("scores,labels,precision,expected", [
    # thresholds 0.9 (1/1 correct, recall 1/2), 0.8 (2 of 3 with the tie, recall 1) and 0.1 (2/4)
    ([0.9, 0.8, 0.8, 0.1], [1, 0, 1, 0], 0.8, 0.5),
    ([0.9, 0.8, 0.8, 0.1], [1, 0, 1, 0], 0.6, 1.0),
    # the tie cannot be split: calling only the positive of the 0.8 pair would reach precision 1
    ([0.8, 0.8], [1, 0], 0.8, 0.0),
    # precision exactly at the target counts: 4 of 5 called are occluded
    ([5, 4, 3, 2, 1, 0], [1, 1, 1, 0, 1, 0], 0.8, 1.0),
    # the largest qualifying recall, not the recall of the last threshold that qualifies going down
    ([6, 5, 4, 3, 2, 1], [1, 0, 0, 1, 1, 1], 0.8, 0.25),
    ([6, 5, 4, 3, 2, 1], [1, 0, 0, 1, 1, 1], 0.65, 1.0),
    # unknown labels (-1) are left out whatever their scores
    ([9, 8, 7], [-1, 1, 0], 0.8, 1.0),
])
def test_recall_at_precision_by_hand(scores, labels, precision, expected):
    assert metrics.recall_at_precision(scores, labels, precision) == pytest.approx(expected)


def test_recall_at_precision_no_positive_is_nan_and_bad_input():
    assert math.isnan(metrics.recall_at_precision([0.3, 0.2], [0, -1]))
    with pytest.raises(ValueError, match="differ in size"):
        metrics.recall_at_precision([0.1, 0.2], [1])
    with pytest.raises(ValueError, match=r"precision must lie in \(0, 1\]"):
        metrics.recall_at_precision([0.1], [1], 0.0)


def test_visibility_recall_takes_visible_labels():
    # [N=2 images, 3 points]; occluded = 1 - visible; pooled over images
    occ_scores = np.array([[0.9, 0.2, 0.7], [0.1, 0.8, 0.3]])
    visible = np.array([[0, 1, 0], [1, -1, 1]])
    # pooled known (score, occluded): (0.9,1) (0.2,0) (0.7,1) (0.1,0) (0.3,0) -> threshold 0.7 takes both at P = 1
    assert metrics.visibility_recall(occ_scores, visible) == 1.0
    assert metrics.visibility_recall(-occ_scores, visible) == 0.0      # reversed ranking: never 80 % precise


def _brute_force(scores, labels, precision):
    s, y = np.asarray(scores, float), np.asarray(labels)
    keep = y != -1
    s, y = s[keep], y[keep] == 1
    if y.sum() == 0:
        return float("nan")
    best = 0.0
    for t in np.unique(s):
        called = s >= t
        tp = (called & y).sum()
        if tp / called.sum() >= precision:
            best = max(best, tp / y.sum())
    return best


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(0, 6), st.sampled_from([-1, 0, 1])), min_size=1, max_size=40),
       st.sampled_from([0.5, 0.8, 0.9, 1.0]))
def test_recall_at_precision_matches_brute_force(pairs, precision):
    scores = [p[0] / 6 for p in pairs]                                   # few distinct values: many ties
    labels = [p[1] for p in pairs]
    got, want = metrics.recall_at_precision(scores, labels, precision), _brute_force(scores, labels, precision)
    assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want), (scores, labels, got, want)
    if not math.isnan(want):                                             # scores -> logits: same ranking, same result
        logits = [math.log((x + 0.01) / (1.01 - x)) for x in scores]
        assert metrics.recall_at_precision(logits, labels, precision) == pytest.approx(want)


def test_accuracy_serves_gender_and_race():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 1.0]])              # argmax 0, 1, 0 (first on ties)
    assert metrics.accuracy(logits, [0, 0, 1]) == pytest.approx(1 / 3)


def test_visibility_auc_by_hand():
    # occluded (visible 0) scores 0.9, 0.4, 0.4; visible scores 0.5, 0.4, 0.1; one unknown (-1) left out.
    # pairs (occluded, visible): 0.9 beats all 3; each 0.4 beats 0.1, ties 0.4 (1/2), loses to 0.5 -> 1.5 each.
    scores = np.array([0.9, 0.4, 0.4, 0.5, 0.4, 0.1, 0.99])
    visible = np.array([0, 0, 0, 1, 1, 1, -1])
    assert metrics.visibility_auc(scores, visible) == pytest.approx((3 + 1.5 + 1.5) / 9)
    assert metrics.visibility_auc(-scores, visible) == pytest.approx(1 - 6 / 9)           # reversed ranking
    assert metrics.visibility_auc(np.zeros(6), visible[:6]) == 0.5                       # constant: chance
    assert np.isnan(metrics.visibility_auc(scores[:3], visible[:3]))                     # no visible instance
    with pytest.raises(ValueError, match="differ in size"):
        metrics.visibility_auc(scores, visible[:3])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(-1, 1)), min_size=2, max_size=40))
def test_visibility_auc_equals_the_pairwise_count(rows):
    scores, visible = np.array([r[0] for r in rows], float), np.array([r[1] for r in rows])
    occ, vis = scores[visible == 0], scores[visible == 1]
    if occ.size == 0 or vis.size == 0:
        assert np.isnan(metrics.visibility_auc(scores, visible))
        return
    pairs = (occ[:, None] > vis[None, :]) + 0.5 * (occ[:, None] == vis[None, :])
    assert metrics.visibility_auc(scores, visible) == pytest.approx(pairs.mean())
