"""Model assembly: parameter counts, shapes, batching, predict, stages, Layer-Attention switch, bad input."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn as nn

from decoder import CrossAttentionLayer, QueryGroup, SelfAttentionLayer, sine_code
from encoder import QuickGELU
from model import (BASE_TASKS, FULL_TASKS, TASKS, Faceptor, FaceptorConfig, NaiveFaceptor, init_stage2,
                   stage2_parameters)


def _count(module, skip_level=True):
    return sum(p.numel() for k, p in module.named_parameters() if not (skip_level and k.endswith(".level")))


def _assert_close(a, b, tol, what=""):
    diff = (a - b).abs()
    assert diff.max().item() <= tol, f"{what}: max diff {diff.max().item():.3g}, mean {diff.mean().item():.3g}"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Faceptor(FaceptorConfig.tiny(tasks=FULL_TASKS + ("lfw73",))).eval()


def _inputs(cfg, B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 3, cfg.size_512, cfg.size_512, generator=g),
            torch.randn(B, 3, cfg.size_112, cfg.size_112, generator=g))


# -- sizes ---------------------------------------------------------------------------------------------------------

def test_parameter_counts_full_size_meta():
    with torch.device("meta"):
        base = Faceptor(FaceptorConfig.base())
        full = Faceptor(FaceptorConfig.full())
        naive = NaiveFaceptor(FaceptorConfig.base())
    assert _count(base) == 103_199_745
    assert _count(base, skip_level=False) - _count(base) == 6 * 6 * 256          # per-head L_t of 6 query heads
    assert _count(base.encoder) == 86_828_544
    decoder = sum(_count(m) for m in (full.queries, full.projection, full.decoder, full.anchor_pos))
    assert decoder == 14_796_800
    assert _count(naive) == 178_911_058


def test_stage2_adds_five_projections_meta():
    with torch.device("meta"):
        s1 = Faceptor(FaceptorConfig.full())
        s2 = Faceptor(FaceptorConfig.full(stage=2))
    assert _count(s2) - _count(s1) == 5 * (768 * 256 + 256)


@pytest.mark.parametrize("task", list(TASKS))
def test_full_size_shapes_meta(task):
    cfg = FaceptorConfig.full(tasks=(task,))
    with torch.device("meta"):
        m = Faceptor(cfg)
        s = TASKS[task].size
        out = m(torch.empty(2, 3, s, s), task)
    n, kind = TASKS[task].queries, TASKS[task].type
    expect = {"landmarks": {"heatmap": (2, n, s // 4, s // 4), "coords": (2, n, 2)},
              "parsing": {"logits": (2, n, s, s)},
              "age": {"probs": (2, 101), "age": (2,), "logits": (2, 101)},
              "expression": {"logits": (2, n)}, "attributes": {"logits": (2, n)},
              "recognition": {"embedding": (2, 512)},
              "pose": {"pose": (2, 3), "logits": (2, 3)},
              "visibility": {"occluded": (2, n), "logits": (2, n), "heatmap": (2, n, s // 4, s // 4),
                             "coords": (2, n, 2)},
              "gender": {"logits": (2, n)}, "race": {"logits": (2, n)}}[kind]
    assert {k: tuple(v.shape) for k, v in out.items()} == expect


def test_full_size_other_input_size_meta():
    """Any input size divisible by the patch: a landmark head at 112 px and an attribute head at 512 px."""
    with torch.device("meta"):
        m = Faceptor(FaceptorConfig.base())
        assert m(torch.empty(1, 3, 112, 112), "300w")["heatmap"].shape == (1, 68, 28, 28)
        assert m(torch.empty(1, 3, 512, 512), "celeba")["logits"].shape == (1, 40)


def test_tiny_shapes_and_values(tiny):
    x512, x112 = _inputs(tiny.cfg)
    for task in tiny.cfg.tasks:
        x = x512 if TASKS[task].size == 512 else x112
        out = tiny(x, task)
        kind = TASKS[task].type
        for v in out.values():
            assert torch.isfinite(v).all()
        if kind == "landmarks":
            assert out["heatmap"].shape == (2, TASKS[task].queries, 32, 32)      # 4x the token grid
            assert ((out["coords"] > 0) & (out["coords"] < 1)).all()
        if kind == "age":
            _assert_close(out["probs"].sum(-1), torch.ones(2), 1e-5, "age probs sum")
            _assert_close(out["age"], (out["probs"] * torch.arange(101.)).sum(-1), 1e-4, "expected age")
            assert ((out["age"] >= 0) & (out["age"] <= 100)).all()
        if kind == "recognition":
            assert out["embedding"].shape == (2, tiny.cfg.embed_dim)


def test_naive_tiny_shapes():
    torch.manual_seed(0)
    cfg = FaceptorConfig.tiny(tasks=FULL_TASKS)
    m = NaiveFaceptor(cfg).eval()
    x512, x112 = _inputs(cfg)
    for task in ("300w", "wflw", "lapa", "morph2", "ferplus", "celeba", "ms1mv3"):
        x = x512 if TASKS[task].size == 512 else x112
        out = m(x, task)
        n = TASKS[task].queries
        if TASKS[task].type == "landmarks":
            assert out["heatmap"].shape == (2, n, 32, 32) and out["coords"].shape == (2, n, 2)
        elif TASKS[task].type == "parsing":
            assert out["logits"].shape == (2, n, 64, 64)
        elif TASKS[task].type == "recognition":
            assert out["embedding"].shape == (2, cfg.embed_dim)
        else:
            assert out["logits"].shape == (2, n)


# -- batching and one-pass prediction ------------------------------------------------------------------------------

def test_face_alone_equals_face_in_batch(tiny):
    x512, x112 = _inputs(tiny.cfg, B=3)
    for task in tiny.cfg.tasks:
        x = x512 if TASKS[task].size == 512 else x112
        batch = tiny(x, task)
        alone = tiny(x[1:2], task)
        for k in batch:
            _assert_close(batch[k][1:2], alone[k], 1e-5, f"{task}.{k}")


@pytest.mark.parametrize("stage", [1, 2])
def test_predict_equals_per_task_forward(stage):
    torch.manual_seed(0)
    m = Faceptor(FaceptorConfig.tiny(stage=stage, tasks=FULL_TASKS)).eval()
    if stage == 2:
        m.set_layer_attention("celeba", False)                  # a mix of heads with and without Layer-Attention
        m.set_layer_attention("lapa", False)
    x512, x112 = _inputs(m.cfg)
    pred = m.predict(images_512=x512, images_112=x112)
    assert list(pred) == list(m.cfg.tasks)
    for task in m.cfg.tasks:
        x = x512 if TASKS[task].size == 512 else x112
        ref = m(x, task)
        for k in ref:
            _assert_close(pred[task][k], ref[k], 1e-5, f"{task}.{k}")


def test_predict_subset_and_errors(tiny):
    x512, x112 = _inputs(tiny.cfg)
    out = tiny.predict(images_112=x112, tasks=["celeba", "ms1mv3"])
    assert set(out) == {"celeba", "ms1mv3"}
    with pytest.raises(ValueError, match="images_512"):
        tiny.predict(images_112=x112, tasks=["300w"])
    with pytest.raises(ValueError, match="batch sizes"):
        tiny.predict(images_512=x512, images_112=x112[:1])


def test_fused_path_equals_grouped_reference():
    """Decoder cross-attention through ops.layer_attention (all heads of a memory in one call, L_t as a bias,
    -inf for heads without Layer-Attention) equals the grouped reference path."""
    torch.manual_seed(0)
    m = Faceptor(FaceptorConfig.tiny(stage=2, tasks=FULL_TASKS)).eval()
    m.set_layer_attention("morph2", False)
    x512, x112 = _inputs(m.cfg)
    ref = m.predict(x512, x112)
    m.attention_impl = "fused"
    fused = m.predict(x512, x112)
    for task in ref:
        for k in ref[task]:
            _assert_close(fused[task][k], ref[task][k], 1e-4, f"{task}.{k}")


# -- stages and Layer-Attention -----------------------------------------------------------------------------------

def test_stage2_loads_stage1_and_switch_off_reproduces_stage1():
    torch.manual_seed(0)
    s1 = Faceptor(FaceptorConfig.tiny()).eval()
    s2 = Faceptor(FaceptorConfig.tiny(stage=2)).eval()
    missing, unexpected = s2.load_state_dict(s1.state_dict(), strict=False)
    assert unexpected == []
    assert sorted(missing) == sorted(f"projection.convs.{i}.{w}" for i in range(1, 6) for w in ("weight", "bias"))
    x512, x112 = _inputs(s1.cfg)
    for task in ("300w", "celeba"):
        x = x512 if TASKS[task].size == 512 else x112
        on = s2(x, task)
        s2.set_layer_attention(task, False)
        off = s2(x, task)
        ref = s1(x, task)
        for k in ref:
            assert torch.equal(off[k], ref[k]), f"{task}.{k}: Layer-Attention off differs from stage 1"
        assert not torch.allclose(on[next(iter(on))], ref[next(iter(ref))]), "Layer-Attention on had no effect"


def test_init_stage2_reproduces_stage1_when_layers_agree():
    """init_stage2: copies of the layer-12 projection and equal L_t rows. Were every encoder layer's map the same,
    the stage-2 model would equal the stage-1 model exactly; with the default random start it does not."""
    torch.manual_seed(0)
    s1 = Faceptor(FaceptorConfig.tiny()).eval()
    x512, x112 = _inputs(s1.cfg)
    for init in (False, True):
        torch.manual_seed(1)
        s2 = Faceptor(FaceptorConfig.tiny(stage=2)).eval()
        s2.load_state_dict(s1.state_dict(), strict=False)
        if init:
            init_stage2(s2)
            assert all(torch.equal(c.weight, s2.projection.convs[0].weight) for c in s2.projection.convs)
            assert all(torch.equal(q.level, q.level[:1].expand_as(q.level)) for q in s2.queries.values())
        encode = s2.encoder.forward
        s2.encoder.forward = lambda x: [encode(x)[-1]] * s2.cfg.vit_layers        # every layer = layer 12
        for task in ("300w", "celebamask_hq", "celeba", "affectnet"):
            x = x512 if TASKS[task].size == 512 else x112
            got, ref = s2(x, task), s1(x, task)
            close = all(torch.allclose(got[k], ref[k], atol=1e-5, rtol=1e-5) for k in ref)
            assert close == init, (task, init)
    with pytest.raises(ValueError):
        init_stage2(s1)


def test_stage2_parameters():
    m = Faceptor(FaceptorConfig.tiny(stage=2))
    params = stage2_parameters(m, ["300w", "celeba"])
    ids = {id(p) for p in params}
    assert id(m.queries["300w"].level) in ids and id(m.queries["celeba"].level) in ids
    assert id(m.queries["morph2"].level) not in ids
    assert id(m.projection.convs[0].weight) not in ids
    assert all(id(p) in ids for c in list(m.projection.convs)[1:] for p in c.parameters())
    assert len(params) == 2 + 2 * 5
    with pytest.raises(ValueError):
        stage2_parameters(Faceptor(FaceptorConfig.tiny()))


def test_stage2_encoder_stays_in_eval_mode():
    m = Faceptor(FaceptorConfig.tiny(stage=2, drop_path=0.2)).train()
    assert not m.encoder.training and m.decoder.training


# -- the math against nn.MultiheadAttention (the authors' modules) -----------------------------------------------

def test_cross_attention_matches_multihead_attention_per_task():
    """Our cross-attention (keys by linearity, several heads per pass) against nn.MultiheadAttention run once per
    task head on K = F^ + L_t + P, V = F^ (eq. 7), with the same weights."""
    torch.manual_seed(0)
    d, nh, B, L, HW = 32, 4, 2, 6, 12
    ours = CrossAttentionLayer(d, nh).double()
    nn.init.normal_(ours.in_proj_weight, std=0.2)
    nn.init.normal_(ours.in_proj_bias, std=0.2)
    mha = nn.MultiheadAttention(d, nh).double()
    mha.in_proj_weight.data.copy_(ours.in_proj_weight.data)
    mha.in_proj_bias.data.copy_(ours.in_proj_bias.data)
    mha.out_proj.load_state_dict(ours.out_proj.state_dict())
    mem = torch.randn(B, L, HW, d, dtype=torch.float64)
    pos = torch.randn(HW, d, dtype=torch.float64)
    levels = [torch.randn(L, d, dtype=torch.float64) for _ in range(2)]
    tgt = torch.randn(B, 9, d, dtype=torch.float64)
    qpos = torch.randn(B, 9, d, dtype=torch.float64)
    groups = [QueryGroup(0, 4, 0, levels[0]), QueryGroup(4, 7, 0, levels[1]), QueryGroup(7, 9, 0, None)]
    out = ours(tgt, qpos, [mem], [pos], groups)
    for g in groups:
        lvl = g.level if g.level is not None else torch.zeros(1, d, dtype=torch.float64)
        m = mem if g.level is not None else mem[:, :1]
        key = (m + lvl[:, None] + pos).flatten(1, 2)                                    # Eq. (7) [B, L*HW, d]
        value = m.flatten(1, 2)
        q = (tgt + qpos)[:, g.start:g.stop]
        o, _ = mha(q.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1))      # seq-first, weights kept
        ref = ours.norm(tgt[:, g.start:g.stop] + o.transpose(0, 1))
        _assert_close(out[:, g.start:g.stop], ref, 1e-10, "cross-attention")


def test_self_attention_block_diagonal_matches_multihead_attention():
    torch.manual_seed(0)
    d, nh = 32, 4
    ours = SelfAttentionLayer(d, nh).double()
    nn.init.normal_(ours.in_proj_weight, std=0.2)
    mha = nn.MultiheadAttention(d, nh, batch_first=True).double()
    mha.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("norm")})
    x, p = torch.randn(2, 7, d, dtype=torch.float64), torch.randn(2, 7, d, dtype=torch.float64)
    out = ours(x, p, [QueryGroup(0, 3), QueryGroup(3, 7)])
    for s in (slice(0, 3), slice(3, 7)):
        o, _ = mha(x[:, s] + p[:, s], x[:, s] + p[:, s], x[:, s])
        _assert_close(out[:, s], ours.norm(x[:, s] + o), 1e-10, "self-attention")


def test_encoder_attention_matches_multihead_attention():
    torch.manual_seed(0)
    m = Faceptor(FaceptorConfig.tiny()).double()
    attn = m.encoder.blocks[0].attn
    mha = nn.MultiheadAttention(64, 4, batch_first=True).double()
    mha.load_state_dict(attn.state_dict())
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    _assert_close(attn(x), mha(x, x, x)[0], 1e-10, "encoder attention")


def test_sine_code_formula():
    code = sine_code(2, 3, 8)                                                           # n = 4 values per axis
    i, j = 1, 2
    y, x = (i + 0.5) / 2, (j + 0.5) / 3
    import math
    expect = []
    for c in (y, x):
        for k in range(4):
            a = 2 * math.pi * c / 10000 ** (2 * (k // 2) / 4)
            expect.append(math.sin(a) if k % 2 == 0 else math.cos(a))
    _assert_close(code[i * 3 + j], torch.tensor(expect), 1e-6, "sine code")


def test_position_table_resized_to_grid():
    m = Faceptor(FaceptorConfig.tiny())
    enc = m.encoder
    assert enc.position_table(8, 8) is enc.positional_embedding
    t = enc.position_table(4, 4)
    assert t.shape == (17, 64) and torch.equal(t[0], enc.positional_embedding[0])
    # a constant table stays constant under bicubic resizing
    with torch.no_grad():
        enc.positional_embedding[1:] = 0.5
    _assert_close(enc.position_table(4, 4)[1:], torch.full((16, 64), 0.5), 1e-6, "resize")


# -- bad input -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,match", [((3, 64, 64), r"\[B, 3, H, W\]"), ((1, 1, 64, 64), "3 channels"),
                                         ((1, 3, 60, 64), "divisible by the patch size")])
def test_bad_images(tiny, shape, match):
    with pytest.raises(ValueError, match=match):
        tiny(torch.zeros(shape), "300w")


def test_bad_task_and_config(tiny):
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        tiny(torch.zeros(1, 3, 64, 64), "nope")
    with pytest.raises(ValueError, match="unknown task"):
        FaceptorConfig.tiny(tasks=("300w", "bogus"))
    with pytest.raises(ValueError, match="stage"):
        FaceptorConfig.tiny(stage=3)
    with pytest.raises(ValueError, match="dtype"):
        tiny(torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "300w")


def test_base_task_set():
    assert FaceptorConfig.base().tasks == BASE_TASKS and len(FaceptorConfig.full().tasks) == 13


def test_forward_tasks_equals_per_task_forward():
    """The training forward (encoder once per input size over all heads' samples) equals per-task calls."""
    torch.manual_seed(0)
    m = Faceptor(FaceptorConfig.tiny(stage=2)).eval()
    g = torch.Generator().manual_seed(3)
    batches = {t: torch.randn(1 + i % 3, 3, m.cfg.input_size(t), m.cfg.input_size(t), generator=g)
               for i, t in enumerate(m.cfg.tasks)}
    out = m.forward_tasks(batches)
    assert list(out) == list(batches)
    for t, x in batches.items():
        ref = m(x, t)
        for k in ref:
            _assert_close(out[t][k], ref[k], 1e-5, f"{t}.{k}")


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.1, 30.0))
def test_quick_gelu_equals_clip_form_with_gradients(seed, scale):
    # The fused silu form against CLIP's written form x * sigmoid(1.702 x), values and gradients, incl. large |x|.
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(257, 33, generator=g, dtype=torch.float64) * scale).requires_grad_()
    w = torch.randn(257, 33, generator=g, dtype=torch.float64)
    y = QuickGELU()(x)
    ref = x * torch.sigmoid(1.702 * x)
    (gx,) = torch.autograd.grad((y * w).sum(), x)
    (gref,) = torch.autograd.grad((ref * w).sum(), x)
    _assert_close(y, ref, 1e-12 * max(1.0, scale), "QuickGELU value")
    _assert_close(gx, gref, 1e-12, "QuickGELU gradient")
