"""Task heads beyond the paper (pose, visibility, gender, race): one TASKS entry each, working in forward,
forward_tasks, predict and Naive Faceptor, trainable through task_loss, and leaving the paper's heads unchanged."""
import pytest
import torch

import losses
from heads import POSE_SCALE_DEG, PointOutput, value_readout
from model import BASE_TASKS, FULL_TASKS, TASKS, Faceptor, FaceptorConfig, NaiveFaceptor

NEW = ("300wlp", "cofw_visibility", "utkface_gender", "utkface_race", "fairface_gender", "fairface_race")
OLD = ("300w", "celebamask_hq", "morph2", "rafdb", "celeba", "ms1mv3")
EXPECTED_KEYS = {"pose": {"pose", "logits"}, "visibility": {"occluded", "logits", "heatmap", "coords"},
                 "gender": {"logits"},
                 "race": {"logits"}}


def _inputs(cfg, B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 3, cfg.size_512, cfg.size_512, generator=g),
            torch.randn(B, 3, cfg.size_112, cfg.size_112, generator=g))


def _close(a, b, tol, what):
    d = (a - b).abs()
    assert d.max().item() <= tol, f"{what}: max diff {d.max().item():.3g}, mean {d.mean().item():.3g}"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Faceptor(FaceptorConfig.tiny(tasks=OLD + NEW)).eval()


def test_new_entries_are_outside_the_paper_presets():
    assert not set(NEW) & (set(BASE_TASKS) | set(FULL_TASKS))
    assert {TASKS[t].type for t in NEW} == {"pose", "visibility", "gender", "race"}


def test_shapes_and_readouts(model):
    x512, x112 = _inputs(model.cfg)
    for t in NEW:
        spec = TASKS[t]
        out = model(x512 if spec.size == 512 else x112, t)
        assert set(out) == EXPECTED_KEYS[spec.type], t
        assert out["logits"].shape == (2, spec.queries)
        assert torch.isfinite(out["logits"]).all()
    assert model(x112, "300wlp")["pose"].shape == (2, 3)
    vis = model(x512, "cofw_visibility")
    occ = vis["occluded"]
    assert occ.shape == (2, 29) and ((occ > 0) & (occ < 1)).all()
    side = model.cfg.size_512 // model.cfg.patch_size * 4                                # the pixel decoder's map
    assert vis["heatmap"].shape == (2, 29, side, side) and vis["coords"].shape == (2, 29, 2)


def test_visibility_tokens_learn_where_their_points_are():
    # The landmark term of the visibility loss reaches the visibility queries through the heatmap; the occlusion
    # term alone reaches them through the value head only. Both change the query gradient.
    torch.manual_seed(0)
    model = Faceptor(FaceptorConfig.tiny(tasks=("300w", "cofw_visibility"))).train()
    x512 = torch.randn(2, 3, model.cfg.size_512, model.cfg.size_512)
    batch = {"image": x512, "visible": torch.randint(0, 2, (2, 29)),
             "landmarks": torch.rand(2, 29, 2) * model.cfg.size_512}
    grads = []
    for b in (batch, {k: v for k, v in batch.items() if k != "landmarks"}):
        model.zero_grad()
        out = model(x512, "cofw_visibility")
        losses.task_loss("visibility", out, b).backward()
        grads.append((model.queries["cofw_visibility"].content.grad.clone(), model.dense_head.layers[0].weight.grad))
    assert grads[0][1] is not None and grads[0][1].abs().sum() > 0          # the heatmap is trained
    assert grads[1][1] is None or grads[1][1].abs().sum() == 0             # ... only by the landmark term
    assert not torch.allclose(grads[0][0], grads[1][0])


def test_point_output_reads_the_encoder_map_where_the_points_are():
    """A point at a pixel centre reads exactly that pixel of F^12 (through LayerNorm and the Linear); one halfway
    between two pixels reads their mean. The coordinates get no gradient (detached), the map only where it is read."""
    torch.manual_seed(0)
    head = PointOutput(4)
    assert head(torch.randn(1, 4, 3, 3), torch.rand(1, 2, 2)).abs().max() == 0           # zero-initialised
    for p in (head.fc.weight, head.fc.bias, head.norm.weight, head.norm.bias):
        torch.nn.init.normal_(p)
    H, W = 5, 6
    feat = torch.randn(2, 4, H, W, requires_grad=True)
    pixels = [[(0, 0), (4, 5)], [(2, 3), (1, 1)]]                                     # (y, x) per image and point
    coords = torch.tensor([[[(x + 0.5) / W, (y + 0.5) / H] for y, x in pts] for pts in pixels])
    coords = torch.cat([coords, torch.tensor([[[1.0 / W, 0.5 / H]]] * 2)], 1)         # point 2: between x 0 and 1
    coords.requires_grad_(True)
    out = head(feat, coords)
    ln = torch.nn.functional.layer_norm
    read = lambda f: head.fc(ln(f, (4,), head.norm.weight, head.norm.bias))[0]      # noqa: E731
    for b, pts in enumerate(pixels):
        for n, (y, x) in enumerate(pts):
            assert torch.allclose(out[b, n], read(feat[b, :, y, x]), atol=1e-5)
        assert torch.allclose(out[b, 2], read(feat[b, :, 0, :2].mean(-1)), atol=1e-5)
    out[:, :2].sum().backward()
    assert coords.grad is None
    touched = torch.zeros(2, H, W, dtype=torch.bool)
    for b, pts in enumerate(pixels):
        for y, x in pts:
            touched[b, y, x] = True
    g = feat.grad.abs().sum(1)                                                        # [2, H, W]
    assert (g[touched] > 0.1).all() and g[~touched].max() < 1e-5                      # rounding of the centres
    with pytest.raises(ValueError, match=r"\[B, N, 2\]"):
        head(torch.zeros(1, 4, 5, 5), torch.zeros(1, 3))


def test_value_readout_by_hand():
    z = torch.tensor([[0.5, -1.0, 0.0]])
    assert value_readout("pose", z)["pose"].tolist() == [[45.0, -90.0, 0.0]]
    assert POSE_SCALE_DEG == 90.0
    assert value_readout("visibility", torch.tensor([[0.0]]))["occluded"].item() == 0.5


@pytest.mark.parametrize("stage", [1, 2])
def test_predict_equals_forward_tasks(stage):
    torch.manual_seed(0)
    m = Faceptor(FaceptorConfig.tiny(tasks=OLD + NEW, stage=stage)).eval()
    x512, x112 = _inputs(m.cfg)
    joint = m.predict(images_512=x512, images_112=x112)
    with torch.no_grad():
        single = m.forward_tasks({t: (x512 if TASKS[t].size == 512 else x112) for t in NEW})
    for t in NEW:
        for k in joint[t]:
            tol = 1e-5 * (POSE_SCALE_DEG if k == "pose" else 1.0)                 # degrees = 90 x logits
            _close(joint[t][k], single[t][k], tol, f"{t}.{k}")


def test_old_heads_unchanged_by_new_heads():
    """A model with the new heads, given the weights of a Base-set model, predicts the old heads exactly as it does:
    the new heads add only their own queries (and visibility's point read-out), and the one-pass decoder keeps each
    head's self-attention to itself."""
    torch.manual_seed(0)
    base = Faceptor(FaceptorConfig.tiny(tasks=OLD)).eval()
    extended = Faceptor(FaceptorConfig.tiny(tasks=OLD + NEW)).eval()
    missing, unexpected = extended.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected
    assert {k for k in missing if not k.startswith("queries.")} == {f"point_head.{m}.{p}" for m in ("norm", "fc")
                                                                    for p in ("weight", "bias")}
    assert {k.split(".")[1] for k in missing if k.startswith("queries.")} == set(NEW)
    x512, x112 = _inputs(base.cfg)
    a = base.predict(images_512=x512, images_112=x112)
    b = extended.predict(images_512=x512, images_112=x112)
    for t in OLD:
        for k in a[t]:
            _close(a[t][k], b[t][k], 1e-5, f"{t}.{k}")


def test_new_heads_add_only_their_queries():
    count = lambda m: sum(p.numel() for p in m.parameters())                    # noqa: E731
    cfg = FaceptorConfig.tiny(tasks=OLD)
    grown = FaceptorConfig.tiny(tasks=OLD + NEW)
    n_queries = sum(TASKS[t].queries for t in NEW)
    added = n_queries * 2 * cfg.dec_dim + len(NEW) * cfg.levels * cfg.dec_dim     # content + position; L_t per head
    added += 3 * cfg.vit_width + 1                                                # visibility's PointOutput, once
    assert count(Faceptor(grown)) - count(Faceptor(cfg)) == added
    no_visibility = FaceptorConfig.tiny(tasks=OLD + tuple(t for t in NEW if TASKS[t].type != "visibility"))
    assert not hasattr(Faceptor(no_visibility), "point_head")


def test_new_heads_train_through_task_loss(model):
    x512, x112 = _inputs(model.cfg, B=3)
    batches = {"300wlp": x112, "cofw_visibility": x512, "utkface_race": x112, "fairface_gender": x112}
    labels = {"300wlp": {"pose": torch.tensor([[10.0, -5.0, 0.0]] * 3)},
              "cofw_visibility": {"visible": torch.randint(0, 2, (3, 29))},
              "utkface_race": {"race": torch.tensor([0, 4, 2])},
              "fairface_gender": {"gender": torch.tensor([1, 0, 1])}}
    model.zero_grad()
    out = model.forward_tasks(batches)
    total = sum(losses.task_loss(TASKS[t].type, out[t], labels[t]) for t in batches)
    assert torch.isfinite(total)
    total.backward()
    for t in batches:
        assert model.queries[t].content.grad.abs().sum() > 0, t
    assert model.value_head.fc.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_naive_faceptor_runs_new_heads():
    torch.manual_seed(0)
    cfg = FaceptorConfig.tiny(tasks=("300w",) + NEW)
    m = NaiveFaceptor(cfg).eval()
    x512, x112 = _inputs(cfg)
    out = m.forward_tasks({t: (x512 if TASKS[t].size == 512 else x112) for t in NEW})
    for t in NEW:                           # Naive Faceptor reads visibility from its MLCA head: no heatmap
        assert set(out[t]) == EXPECTED_KEYS[TASKS[t].type] - {"heatmap", "coords"}
        assert out[t]["logits"].shape == (2, TASKS[t].queries)
    assert {"pose", "visibility", "gender", "race"} <= set(m.heads)


def test_visibility_checkpoints_from_before_the_point_read_out_still_load():
    """A checkpoint without point_head.* loads with the module's zero initialisation, i.e. exactly its own
    token-only read-out; any other missing key is still refused."""
    import checkpoint
    torch.manual_seed(0)
    cfg = FaceptorConfig.tiny(tasks=("300w", "cofw_visibility"))
    model = Faceptor(cfg).eval()
    torch.nn.init.normal_(model.point_head.fc.weight)
    old = {k: v for k, v in model.state_dict().items() if not k.startswith("point_head.")}
    ckpt = {"model": old, "model_config": cfg.to_dict(), "stage": 1, "kind": "faceptor"}
    loaded = checkpoint.model_from_checkpoint(ckpt)
    x512, _ = _inputs(cfg)
    with torch.no_grad():
        out = loaded(x512, "cofw_visibility")
        model.point_head.fc.weight.zero_()
        expected = model(x512, "cofw_visibility")
    _close(out["logits"], expected["logits"], 1e-6, "token-only logits")
    del old["value_head.fc.bias"]
    with pytest.raises(checkpoint.CheckpointError, match="value_head.fc.bias"):
        checkpoint.model_from_checkpoint({**ckpt, "model": old})
