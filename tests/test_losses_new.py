"""Losses of the task types beyond the paper against values computed by hand, and their task_loss dispatch."""
import math

import pytest
import torch

import losses


def test_pose_loss_is_mean_absolute_degrees_over_90():
    pose = torch.tensor([[10.0, 0.0, -20.0], [30.0, 5.0, 5.0]])
    target = torch.tensor([[0.0, 0.0, 0.0], [0.0, -5.0, 5.0]])
    # |errors| = 10, 0, 20, 30, 10, 0 -> mean 70 / 6 degrees, in units of 90 degrees
    assert losses.pose_loss(pose, target).item() == pytest.approx(70 / 6 / 90, rel=1e-6)
    assert losses.pose_loss(pose, target, scale=1.0).item() == pytest.approx(70 / 6, rel=1e-6)


def test_pose_loss_gradient_is_sign_over_count():
    pose = torch.tensor([[10.0, -3.0, 0.5]], requires_grad=True)
    losses.pose_loss(pose, torch.zeros(1, 3)).backward()
    assert pose.grad[0].tolist() == pytest.approx([1 / 270, -1 / 270, 1 / 270])


def test_visibility_loss_by_hand():
    logits = torch.tensor([[0.0, 2.0, -1.0], [3.0, -2.0, 0.5]])
    visible = torch.tensor([[1, 0, -1], [0, 1, -1]])
    # occluded targets 0, 1, (unknown), 1, 0, (unknown); BCE(x, 1) = log(1 + e^-x), BCE(x, 0) = log(1 + e^x)
    terms = [math.log(2.0),                         # logit 0, target 0
             math.log(1 + math.exp(-2.0)),          # logit 2, target 1
             math.log(1 + math.exp(-3.0)),          # logit 3, target 1
             math.log(1 + math.exp(-2.0))]          # logit -2, target 0: log(1 + e^{-2})
    assert losses.visibility_loss(logits, visible).item() == pytest.approx(sum(terms) / 4, rel=1e-6)


def test_visibility_loss_all_unknown_is_zero_and_ignores_their_logits():
    logits = torch.tensor([[5.0, -7.0]], requires_grad=True)
    loss = losses.visibility_loss(logits, torch.tensor([[-1, -1]]))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad.abs().sum().item() == 0.0


def test_classification_loss_by_hand():
    logits = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    label = torch.tensor([0, 1])
    expected = (math.log(1 + math.exp(-1.0)) + math.log(2.0)) / 2
    assert losses.classification_loss(logits, label).item() == pytest.approx(expected, rel=1e-6)
    race = torch.tensor([[2.0, 0.0, -1.0, 0.0, 0.0]])
    z = math.exp(2) + 1 + math.exp(-1) + 1 + 1
    assert losses.classification_loss(race, torch.tensor([2])).item() == pytest.approx(math.log(z) + 1, rel=1e-6)


def test_task_loss_dispatch_reads_each_type_label_field():
    logits2 = torch.tensor([[1.0, 0.0]])
    assert losses.task_loss("gender", {"logits": logits2}, {"gender": torch.tensor([1])}).item() == \
        pytest.approx(math.log(1 + math.e), rel=1e-6)
    assert losses.task_loss("race", {"logits": logits2}, {"race": torch.tensor([0])}).item() == \
        pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    out = {"pose": torch.tensor([[9.0, 0.0, 0.0]]), "logits": torch.tensor([[0.1, 0.0, 0.0]])}
    assert losses.task_loss("pose", out, {"pose": torch.zeros(1, 3)}).item() == pytest.approx(3 / 90, rel=1e-6)
    vis = {"logits": torch.tensor([[0.0]]), "occluded": torch.tensor([[0.5]])}
    assert losses.task_loss("visibility", vis, {"visible": torch.tensor([[1]])}).item() == \
        pytest.approx(math.log(2), rel=1e-6)
    # with the points' positions, the landmark loss of the same tokens is added, unweighted
    g = torch.Generator().manual_seed(0)
    out = {"logits": torch.randn(2, 29, generator=g), "heatmap": torch.randn(2, 29, 8, 8, generator=g)}
    batch = {"visible": torch.randint(0, 2, (2, 29), generator=g), "image": torch.zeros(2, 3, 32, 32),
             "landmarks": torch.rand(2, 29, 2, generator=g) * 32}
    occlusion_only = losses.visibility_loss(out["logits"], batch["visible"]).item()
    assert losses.task_loss("visibility", out, {"visible": batch["visible"]}).item() == occlusion_only
    assert losses.task_loss("visibility", out, batch).item() == pytest.approx(
        occlusion_only + losses.task_loss("landmarks", out, batch).item(), rel=1e-6)


@pytest.mark.parametrize("kind,outputs,batch,match", [
    ("gender", {"logits": torch.zeros(1, 2)}, {"race": torch.tensor([0])}, "batch has no 'gender'"),
    ("race", {"logits": torch.zeros(1, 5)}, {"gender": torch.tensor([0])}, "batch has no 'race'"),
    ("pose", {"logits": torch.zeros(1, 3)}, {"pose": torch.zeros(1, 3)}, "outputs has no 'pose'"),
    ("visibility", {"logits": torch.zeros(1, 29)}, {"landmarks": torch.zeros(1, 29, 2)}, "batch has no 'visible'"),
])
def test_task_loss_missing_fields(kind, outputs, batch, match):
    with pytest.raises(KeyError, match=match):
        losses.task_loss(kind, outputs, batch)


@pytest.mark.parametrize("fn,args,match", [
    (losses.pose_loss, (torch.zeros(2, 2), torch.zeros(2, 2)), r"\[B, 3\]"),
    (losses.pose_loss, (torch.zeros(2, 3), torch.zeros(3, 3)), r"\[B, 3\]"),
    (losses.visibility_loss, (torch.zeros(2, 29), torch.zeros(2, 28)), r"\[B, N_points\]"),
    (losses.classification_loss, (torch.zeros(2, 7), torch.zeros(3)), r"logits \[B, C\] and label \[B\]"),
])
def test_shape_errors(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(*args)
