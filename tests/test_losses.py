"""Losses (paper eqs. (8)-(14); docs/design.md) against values computed by hand or by explicit scalar formulas."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import losses


def _close(actual, expected, tol=1e-5):
    actual = float(actual.detach()) if isinstance(actual, torch.Tensor) else float(actual)
    assert abs(actual - expected) <= tol * max(1.0, abs(expected)), f"got {actual}, expected {expected}"


def _sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


# ------------------------------------------------------------------------------------------------ landmark target

def test_landmark_target_values_by_hand():
    size = 16
    # landmark exactly on the centre of pixel (row 7, column 5)
    coords = torch.tensor([[[(5 + 0.5) / size, (7 + 0.5) / size]]])
    t = losses.landmark_target(coords, size)
    assert t.shape == (1, 1, size, size)
    _close(t[0, 0, 7, 5], 1.0)
    _close(t[0, 0, 7, 8], math.exp(-8 * 9 / 25))       # r = 3 along x
    _close(t[0, 0, 4, 5], math.exp(-8 * 9 / 25))       # r = 3 along y (rows index y)
    _close(t[0, 0, 7, 10], math.exp(-8.0))             # r = R = 5: still inside
    _close(t[0, 0, 11, 8], math.exp(-8.0))             # (dx, dy) = (3, 4): r = 5
    assert t[0, 0, 7, 11] == 0                         # r = 6 > R
    assert t[0, 0, 11, 9] == 0                         # r = sqrt(32) > R
    assert (t > 0).sum() == sum(1 for i in range(size) for j in range(size) if (i - 7) ** 2 + (j - 5) ** 2 <= 25)


def test_landmark_target_radius_argument():
    coords = torch.tensor([[[(3 + 0.5) / 8, (3 + 0.5) / 8]]])
    t = losses.landmark_target(coords, 8, radius=2.0)
    _close(t[0, 0, 3, 4], math.exp(-8 * 1 / 4))
    _close(t[0, 0, 3, 5], math.exp(-8.0))
    assert t[0, 0, 3, 6] == 0 and t[0, 0, 5, 4] == 0


@given(size=st.integers(1, 20), n=st.integers(1, 3),
       xy=st.lists(st.tuples(st.floats(-0.2, 1.2), st.floats(-0.2, 1.2)), min_size=3, max_size=3))
def test_landmark_target_matches_explicit_formula(size, n, xy):
    coords = torch.tensor([xy[:n]], dtype=torch.float64)
    t = losses.landmark_target(coords, size).numpy()
    assert t.shape == (1, n, size, size)
    for k in range(n):
        x_px, y_px = xy[k][0] * size - 0.5, xy[k][1] * size - 0.5
        for i in range(size):
            for j in range(size):
                r = math.hypot(j - x_px, i - y_px)
                expected = math.exp(-8 * r * r / 25) if r <= 5 else 0.0
                assert abs(t[0, k, i, j] - expected) < 1e-9


def test_landmark_target_rejects_bad_shape():
    with pytest.raises(ValueError, match="coords"):
        losses.landmark_target(torch.zeros(2, 3), 8)


# ------------------------------------------------------------------------------------------------ landmark loss

def _landmark_loss_explicit(logits: np.ndarray, coords: np.ndarray) -> float:
    B, N, h, w = logits.shape
    bce_sum, dist_sum = 0.0, 0.0
    for b in range(B):
        for k in range(N):
            x_px, y_px = coords[b, k, 0] * w - 0.5, coords[b, k, 1] * h - 0.5
            S = su = sv = 0.0
            for i in range(h):
                for j in range(w):
                    z = logits[b, k, i, j]
                    s = _sigmoid(z)
                    r2 = (j - x_px) ** 2 + (i - y_px) ** 2
                    p = math.exp(-8 * r2 / 25) if r2 <= 25 else 0.0
                    bce_sum += -(p * math.log(s) + (1 - p) * math.log(1 - s))
                    S += s
                    su += s * j
                    sv += s * i
            S = max(S, 1e-6)
            px, py = (su / S + 0.5) / w, (sv / S + 0.5) / h
            dist_sum += math.hypot(px - coords[b, k, 0], py - coords[b, k, 1])
    return bce_sum / (B * N * h * w) + dist_sum / (B * N)


def test_landmark_loss_bce_plus_euclidean_coordinate_error():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 7, generator=g, dtype=torch.float64) * 2
    coords = torch.rand(2, 3, 2, generator=g, dtype=torch.float64)
    expected = _landmark_loss_explicit(logits.numpy(), coords.numpy())
    _close(losses.landmark_loss(logits, coords), expected, 1e-5)


def test_landmark_loss_coordinate_term_is_l2_not_l1():
    # Huge negative logits everywhere except one pixel: the soft-argmax lands on that pixel's centre and the BCE
    # part is tiny. Place the truth 3 px right and 4 px down: L2 distance 5 px (L1 would be 7 px).
    h = w = 32
    logits = torch.full((1, 1, h, w), -30.0, dtype=torch.float64)
    logits[0, 0, 10, 12] = 30.0
    truth = torch.tensor([[[(15 + 0.5) / w, (14 + 0.5) / h]]], dtype=torch.float64)
    loss = losses.landmark_loss(logits, truth)
    target = losses.landmark_target(truth, h)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    _close(loss - bce, 5.0 / 32, 1e-6)


def test_landmark_loss_uses_given_pred_coords():
    logits = torch.zeros(1, 2, 8, 8)
    truth = torch.tensor([[[0.5, 0.5], [0.25, 0.75]]])
    base = losses.landmark_loss(logits, truth, pred_coords=truth)        # coordinate term 0
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, losses.landmark_target(truth, 8))
    _close(base, float(bce), 1e-6)
    shifted = truth + torch.tensor([0.3, 0.4])                            # distance 0.5 for both landmarks
    _close(losses.landmark_loss(logits, truth, pred_coords=shifted), float(bce) + 0.5, 1e-6)


def test_landmark_loss_rejects_mismatched_coords():
    with pytest.raises(ValueError, match="coords"):
        losses.landmark_loss(torch.zeros(1, 2, 8, 8), torch.zeros(1, 3, 2))


# ------------------------------------------------------------------------------------------------ parsing, expression

def test_parsing_loss_is_mean_pixel_cross_entropy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)
    mask = torch.randint(0, 4, (2, 3, 5), generator=g)
    z, m = logits.numpy(), mask.numpy()
    total = 0.0
    for b in range(2):
        for i in range(3):
            for j in range(5):
                col = z[b, :, i, j]
                total += -(col[m[b, i, j]] - math.log(sum(math.exp(v) for v in col)))
    _close(losses.parsing_loss(logits, mask), total / 30, 1e-6)


def test_expression_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    label = torch.tensor([0, 2])
    l0 = -math.log(math.exp(2) / (math.exp(2) + 2))
    l1 = math.log(3)
    _close(losses.expression_loss(logits, label), (l0 + l1) / 2)


# ------------------------------------------------------------------------------------------------ attributes

def test_attribute_loss_ignores_minus_one_and_divides_by_batch():
    logits = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]], requires_grad=True)
    labels = torch.tensor([[1, 0, -1], [-1, 1, 0]])
    terms = [-math.log(_sigmoid(1.0)), -math.log(1 - _sigmoid(-2.0)),       # sample 0, attribute 2 ignored
             -math.log(_sigmoid(3.0)), -math.log(1 - _sigmoid(-1.0))]       # sample 1, attribute 0 ignored
    loss = losses.attribute_loss(logits, labels)
    _close(loss, sum(terms) / 2)
    loss.backward()
    assert logits.grad[0, 2] == 0 and logits.grad[1, 0] == 0
    assert logits.grad[0, 0] != 0
    moved = logits.detach().clone()
    moved[0, 2], moved[1, 0] = 50.0, -50.0                                   # ignored entries do not matter
    _close(losses.attribute_loss(moved, labels), sum(terms) / 2)


# ------------------------------------------------------------------------------------------------ age (DLDL-v2)

def _age_loss_explicit(logits: np.ndarray, ages) -> float:
    total = 0.0
    for z, a in zip(logits, ages):
        s = [_sigmoid(v) for v in z]
        p_hat = [v / sum(s) for v in s]
        g = [math.exp(-(k - a) ** 2 / 8) for k in range(101)]
        p = [v / sum(g) for v in g]
        kl = sum(pk * (math.log(pk) - math.log(qk)) for pk, qk in zip(p, p_hat) if pk > 0)
        a_hat = sum(k * qk for k, qk in enumerate(p_hat))
        total += kl + abs(a_hat - a)
    return total / len(ages)


def test_age_loss_uniform_prediction_by_hand():
    # logits 0 -> p_hat = 1/101 everywhere, expected age 50; so the loss is KL(p || U) + |50 - age|
    ages = [50, 20]
    expected = 0.0
    for a in ages:
        g = np.exp(-(np.arange(101) - a) ** 2 / 8.0)
        p = g / g.sum()
        p = p[p > 0]                                                         # 0 log 0 = 0
        expected += float(np.sum(p * np.log(p)) + math.log(101)) + abs(50 - a)
    _close(losses.age_loss(torch.zeros(2, 101), torch.tensor(ages)), expected / 2, 1e-5)


def test_age_loss_matches_explicit_formula():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 101, generator=g, dtype=torch.float64) * 3
    ages = [0, 37, 100]
    _close(losses.age_loss(logits, torch.tensor(ages)), _age_loss_explicit(logits.numpy(), ages), 1e-5)


def test_age_loss_from_probs_agrees_with_logits():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 101, generator=g)
    probs = torch.sigmoid(logits) / torch.sigmoid(logits).sum(-1, keepdim=True)
    ages = torch.tensor([25.0, 61.5])
    _close(losses.age_loss_from_probs(probs, ages), float(losses.age_loss(logits, ages)), 1e-5)


def test_age_loss_finite_with_underflowing_target_and_prediction():
    # Target bins far from the age underflow to exactly 0 in float32 (0 log 0 = 0), and sigmoid(-200) underflows.
    logits = torch.full((1, 101), -200.0)
    logits[0, 90:] = 5.0
    logits.requires_grad_(True)
    loss = losses.age_loss(logits, torch.tensor([3]))
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert (losses.age_distribution(torch.tensor([3]))[0, 60:] == 0).all()   # the case is really exercised


def test_age_distribution_is_normalised_gaussian():
    p = losses.age_distribution(torch.tensor([30.0]))[0].double()
    _close(p.sum(), 1.0, 1e-6)
    _close(p[32] / p[30], math.exp(-4 / 8), 1e-5)                            # sigma = 2
    assert int(p.argmax()) == 30


# ------------------------------------------------------------------------------------------------ CosFace

def test_cosface_margin_by_hand():
    cf = losses.CosFace(2, 3, s=64.0, m=0.4)
    with torch.no_grad():
        cf.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 0.5], [-2.0, 0.0]]))   # row norms do not matter
    emb = torch.tensor([[2.0, 0.0], [0.0, 7.0]])                             # cos rows: [1, 0, -1] and [0, 1, 0]
    label = torch.tensor([0, 2])
    z0 = [64 * (1 - 0.4), 0.0, -64.0]
    z1 = [0.0, 64.0, 64 * (0 - 0.4)]

    def ce(z, y):
        m = max(z)
        return -(z[y] - m - math.log(sum(math.exp(v - m) for v in z)))

    _close(cf(emb, label), (ce(z0, 0) + ce(z1, 2)) / 2, 1e-5)
    assert cf.weight.shape == (3, 2)


def test_cosface_margin_raises_loss_and_zero_margin_is_softmax():
    g = torch.Generator().manual_seed(4)
    emb, label = torch.randn(4, 8, generator=g), torch.tensor([0, 1, 2, 4])
    plain = losses.CosFace(8, 5, s=10.0, m=0.0)
    marg = losses.CosFace(8, 5, s=10.0, m=0.4)
    marg.load_state_dict(plain.state_dict())
    cos = torch.nn.functional.normalize(emb, dim=1) @ torch.nn.functional.normalize(plain.weight.detach(), dim=1).t()
    _close(plain(emb, label), float(torch.nn.functional.cross_entropy(10 * cos, label)), 1e-5)
    assert marg(emb, label) > plain(emb, label)


# ------------------------------------------------------------------------------------------------ objective, eq. (8)

def test_multitask_loss_weighting():
    out = losses.multitask_loss({"a": torch.tensor(1.0), "b": torch.tensor(3.0)}, {"a": 2.0, "b": 1.0, "c": 5.0})
    _close(out, (2 * 1 + 1 * 3) / 3)                                         # c is absent: not in the denominator


def test_multitask_loss_missing_weight_is_a_clear_error():
    with pytest.raises(KeyError, match="b"):
        losses.multitask_loss({"a": torch.tensor(1.0), "b": torch.tensor(2.0)}, {"a": 1.0})


@given(vals=st.lists(st.tuples(st.floats(0, 100), st.floats(0.01, 10)), min_size=1, max_size=6))
def test_multitask_loss_is_weighted_mean(vals):
    ls = {f"t{i}": torch.tensor(v, dtype=torch.float64) for i, (v, _) in enumerate(vals)}
    ws = {f"t{i}": w for i, (_, w) in enumerate(vals)}
    expected = sum(v * w for v, w in vals) / sum(w for _, w in vals)
    _close(losses.multitask_loss(ls, ws), expected, 1e-9)


# ------------------------------------------------------------------------------------------------ dispatcher

def test_task_loss_landmarks_normalises_pixels_by_image_size():
    g = torch.Generator().manual_seed(5)
    heat = torch.randn(2, 3, 8, 8, generator=g)
    pix = torch.rand(2, 3, 2, generator=g) * 64
    batch = {"image": torch.zeros(2, 3, 64, 64), "landmarks": pix}
    got = losses.task_loss("landmarks", {"heatmap": heat}, batch)
    _close(got, float(losses.landmark_loss(heat, (pix + 0.5) / 64)), 1e-6)   # pixel centres at integers


def test_task_loss_dispatch_other_heads():
    g = torch.Generator().manual_seed(6)
    age_logits = torch.randn(2, 101, generator=g)
    batch = {"age": torch.tensor([20, 40]), "expression": torch.tensor([1, 3]),
             "attributes": torch.tensor([[1, -1], [0, 1]]), "mask": torch.randint(0, 3, (2, 4, 4), generator=g),
             "identity": torch.tensor([0, 1])}
    _close(losses.task_loss("age", {"logits": age_logits, "probs": torch.full((2, 101), 1 / 101)}, batch),
           float(losses.age_loss(age_logits, batch["age"])))                  # logits preferred over probs
    expr = torch.randn(2, 7, generator=g)
    _close(losses.task_loss("expression", {"logits": expr}, batch), float(losses.expression_loss(expr, batch["expression"])))
    attr = torch.randn(2, 2, generator=g)
    _close(losses.task_loss("attributes", {"logits": attr}, batch), float(losses.attribute_loss(attr, batch["attributes"])))
    par = torch.randn(2, 3, 4, 4, generator=g)
    _close(losses.task_loss("parsing", {"logits": par}, batch), float(losses.parsing_loss(par, batch["mask"])))
    cf = losses.CosFace(4, 2)
    emb = torch.randn(2, 4, generator=g)
    _close(losses.task_loss("recognition", {"embedding": emb}, batch, cosface=cf), float(cf(emb, batch["identity"]).detach()))
    with pytest.raises(ValueError, match="CosFace"):
        losses.task_loss("recognition", {"embedding": emb}, batch)
    with pytest.raises(ValueError, match="unknown task type"):
        losses.task_loss("gaze", {}, batch)
    with pytest.raises(KeyError, match="expression"):
        losses.task_loss("expression", {"logits": expr}, {})
