"""Where train.py's weights come from: `--init official` (strict, every CosFace classifier, `--allow-new-heads`),
`--init farl`, and transfer (`--tune prompt|decoder`) with its frozen parts in eval mode.

The authors'-format checkpoints here are synthesised from the demo model's own layout: `to_official` writes each
of our tensors under the authors' name (the inverse of checkpoint.convert_official_state_dict), so no key table is
needed. Runs use `--max-steps 0`, which writes the starting weights as a step-0 checkpoint.
"""
import contextlib
import io
import os
import re
import sys
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoint  # noqa: E402
import train  # noqa: E402
import train_config  # noqa: E402
from model import TASKS, build_model  # noqa: E402

IDS = 40                                              # synthetic identities: the CosFace classifier's rows
QUICK = ["--batch-scale", "0.125", "--synthetic-length", "200", "--synthetic-identities", str(IDS), "--no-eval",
         "--log-every", "1"]
OFFICIAL = {v: k for k, v in checkpoint.OFFICIAL_TASK_NAMES.items()}
_DEC = [(r"projection\.convs\.0\.(.+)", "input_proj.0.{0}"),
        (r"decoder\.layers\.(\d+)\.cross_attn\.norm\.(.+)", "transformer_cross_attention_layers.{0}.norm.{1}"),
        (r"decoder\.layers\.(\d+)\.cross_attn\.(.+)", "transformer_cross_attention_layers.{0}.multihead_attn.{1}"),
        (r"decoder\.layers\.(\d+)\.self_attn\.norm\.(.+)", "transformer_self_attention_layers.{0}.norm.{1}"),
        (r"decoder\.layers\.(\d+)\.self_attn\.(.+)", "transformer_self_attention_layers.{0}.self_attn.{1}"),
        (r"decoder\.layers\.(\d+)\.ffn\.(.+)", "transformer_ffn_layers.{0}.{1}"),
        (r"anchor_pos\.mlp\.(.+)", "adapt_pos2d.{0}")]
_ITP = [("identity_head.", "feature_v2."), ("value_head.fc.", "value.fc."), ("pixel_decoder.", "map_v2.mask_map."),
        ("dense_head.layers.", "map_v2.mask_embed.layers.")]


def to_official(sd: dict, cosface: dict) -> dict:
    """A stage-1 Faceptor state dict of ours -> the authors' key layout (with DDP's `module.` prefix)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("encoder."):
            out["backbone_module.visual." + k[len("encoder."):].replace("blocks.", "transformer.resblocks.")] = v
        elif k.startswith("queries."):
            _, task, part = k.split(".")
            if part == "level":
                out.setdefault("heads_module.decoder.level_embed.weight", v[:1])   # shared (first head's), 1 row
            else:
                out[f"heads_module.decoder.query_{'feat' if part == 'content' else 'embed'}.{OFFICIAL[task]}.weight"] = v
        elif any(k.startswith(a) for a, _ in _ITP):
            ours, theirs = next((a, b) for a, b in _ITP if k.startswith(a))
            out["heads_module.interpreters." + theirs + k[len(ours):]] = v
        else:
            pat, tmpl = next((p, t) for p, t in _DEC if re.fullmatch(p, k))
            out["heads_module.decoder." + tmpl.format(*re.fullmatch(pat, k).groups())] = v
    for task, w in cosface.items():
        out[f"losses_module.losses.{OFFICIAL[task]}.classifier"] = w
    return {"module." + k: v for k, v in out.items()}


def demo_model(seed: int):
    torch.manual_seed(seed)
    return build_model("faceptor", train_config.model_config(train.PRESETS["demo"], 1))


def run_train(args):
    """train.main(args) in this process (no interpreter start-up): (returncode, stdout, the SystemExit message)."""
    out, code, err = io.StringIO(), 0, ""
    with contextlib.redirect_stdout(out):
        try:
            train.main(args)
        except SystemExit as e:
            code, err = (e.code, "") if isinstance(e.code, int) else (1, str(e.code))
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err)


def step0(out_dir):
    return checkpoint.load_checkpoint(checkpoint.checkpoints(out_dir, 1)[-1])


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(path of a full authors'-format checkpoint, path of one without the affectnet head, source weights)."""
    root = tmp_path_factory.mktemp("official")
    src = demo_model(seed=123).state_dict()
    classifier = torch.randn(IDS, train_config.model_config(train.PRESETS["demo"], 1).embed_dim)
    full = to_official(src, {"ms1mv3": classifier})
    torch.save({"state_dict": full}, root / "full.pth")
    cut = {k: v for k, v in full.items() if ".affect_affectnet." not in k}
    torch.save({"state_dict": cut}, root / "no_affectnet.pth")
    return str(root / "full.pth"), str(root / "no_affectnet.pth"), src, classifier


def test_init_official_loads_every_tensor_and_the_classifier(official, tmp_path):
    full, _, src, classifier = official
    proc = run_train(["--init", "official", full, "--max-steps", "0", "--out-dir", str(tmp_path)] + QUICK)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = step0(str(tmp_path))
    for k, v in src.items():
        if k.endswith(".level"):                     # their level table is shared: row 0 theirs, rows 1-5 zero
            want = torch.cat([src["queries.300w.level"][:1], torch.zeros_like(v[1:])])
        else:
            want = v
        assert torch.equal(got["model"][k], want), k
    assert torch.equal(got["cosface"]["ms1mv3"]["weight"], classifier)
    assert "CosFace of ['ms1mv3']" in proc.stdout


def test_init_official_missing_head_is_an_error_unless_allowed(official, tmp_path):
    _, cut, src, classifier = official
    proc = run_train(["--init", "official", cut, "--max-steps", "0", "--out-dir", str(tmp_path / "a")] + QUICK)
    assert proc.returncode != 0
    assert "no head ['affectnet']" in proc.stderr and "--allow-new-heads" in proc.stderr, proc.stderr[-2000:]
    assert not checkpoint.checkpoints(str(tmp_path / "a"), 1)
    proc = run_train(["--init", "official", cut, "--allow-new-heads", "--max-steps", "0", "--out-dir",
                      str(tmp_path / "b")] + QUICK)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = step0(str(tmp_path / "b"))["model"]
    fresh = demo_model(seed=train.PRESETS["demo"].seed).state_dict()    # what the run builds before loading
    assert torch.equal(got["queries.affectnet.content"], fresh["queries.affectnet.content"])
    assert not torch.equal(got["queries.affectnet.content"], src["queries.affectnet.content"])
    assert torch.equal(got["queries.celeba.content"], src["queries.celeba.content"])
    assert "new heads ['affectnet']" in proc.stdout


def test_load_official_names_shape_mismatch_and_wrong_kind(official):
    full, _, _, _ = official
    sd = torch.load(full, weights_only=True)["state_dict"]
    sd["module.heads_module.decoder.query_feat.align_300w.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"queries\.300w\.content: checkpoint \(3, 3\)"):
        checkpoint.load_official(demo_model(0), {"state_dict": sd})
    naive = build_model("naive", train_config.model_config(train.PRESETS["demo"], 1))
    with pytest.raises(ValueError, match="a faceptor checkpoint, but the model is naive"):
        checkpoint.load_official(naive, full)


def test_init_farl_loads_the_encoder(tmp_path):
    enc = demo_model(seed=5).encoder.state_dict()
    pe = enc["positional_embedding"]                                    # [1 + 8*8, C]
    small = checkpoint.resize_position_table(pe, 4)                    # a 4x4 table, resized back to 8x8 on load
    farl = {"visual." + k.replace("blocks.", "transformer.resblocks."): (small if k == "positional_embedding" else v)
            for k, v in enc.items()}
    torch.save({"state_dict": {**farl, "logit_scale": torch.ones(())}}, tmp_path / "farl.pth")
    proc = run_train(["--init", "farl", str(tmp_path / "farl.pth"), "--max-steps", "0", "--out-dir",
                      str(tmp_path / "out")] + QUICK)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = step0(str(tmp_path / "out"))["model"]
    for k, v in enc.items():
        if k != "positional_embedding":
            assert torch.equal(got["encoder." + k], v), k
    assert torch.allclose(got["encoder.positional_embedding"], checkpoint.resize_position_table(small, 8))
    assert torch.equal(got["encoder.positional_embedding"][0], pe[0])


# ---------------------------------------------------------------------------------------------------------------
# Transfer

def test_frozen_parts_run_in_eval_mode():
    for tune, stage in (("decoder", 1), ("prompt", 1), (None, 2)):
        cfg = train.PRESETS["demo"]
        model = build_model("faceptor", train_config.model_config(cfg, stage))
        train.trainable_parameters(model, cfg, stage, tune, "300w")
        train.set_train_mode(model)
        drop_paths = [m for m in model.encoder.modules() if type(m).__name__ == "DropPath"]
        assert drop_paths and not any(m.training for m in drop_paths), (tune, stage)
        assert not model.encoder.training, (tune, stage)
        assert model.decoder.training == model.identity_head.training == (tune == "decoder"), (tune, stage)
        bn = [m for m in model.identity_head.modules() if isinstance(m, torch.nn.BatchNorm1d)]
        assert bn and all(m.training == (tune == "decoder") for m in bn), (tune, stage)
        assert model.queries["300w"].training
    model = build_model("faceptor", train_config.model_config(cfg, 1))               # stage 1: everything trains
    train.trainable_parameters(model, cfg, 1, None, None)
    train.set_train_mode(model)
    assert all(m.training for m in model.encoder.modules() if type(m).__name__ == "DropPath")


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    proc = run_train(["--max-steps", "1", "--out-dir", str(root / "s1")] + QUICK)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from fixtures import write_aflw
    os.makedirs(root / "data" / "aflw19")
    write_aflw(str(root / "data" / "aflw19"))
    return root


@pytest.mark.parametrize("tune", ["prompt", "decoder"])
def test_tune_end_to_end_trains_only_its_part(stage1, tune):
    out = stage1 / tune
    proc = run_train(["--tune", tune, "--dataset", "aflw19", "--from", str(stage1 / "s1"), "--data-root",
                      str(stage1 / "data"), "--max-steps", "2", "--warmup", "0", "--out-dir", str(out)] + QUICK)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    before, after = step0(str(stage1 / "s1"))["model"], step0(str(out))
    assert after["step"] == 2 and after["tune"] == tune and after["model_config"]["tasks"][-1] == "aflw19"
    changed = {k for k in after["model"] if k in before and not torch.equal(before[k], after["model"][k])}
    assert all(k.startswith("queries.aflw19.") for k in set(after["model"]) - set(before))
    if tune == "prompt":
        assert changed == set(), sorted(changed)[:5]                  # only the new head's queries train
        start = out.parent / "prompt0"
        assert run_train(["--tune", tune, "--dataset", "aflw19", "--from", str(stage1 / "s1"), "--data-root",
                          str(stage1 / "data"), "--max-steps", "0", "--out-dir", str(start)] + QUICK).returncode == 0
        q0 = step0(str(start))["model"]["queries.aflw19.content"]
        assert not torch.equal(q0, after["model"]["queries.aflw19.content"])
    else:
        assert changed and not any(k.startswith("encoder.") for k in changed), sorted(changed)[:5]
        assert not any(k.startswith("identity_head.") and "running" in k for k in changed)   # BN frozen
    assert TASKS["aflw19"].type == "landmarks"


def test_tune_on_synthetic_preset_uses_the_synthetic_transfer_sets(stage1):
    """Without --data-root, a demo checkpoint transfers to the synthetic faces' 19-point scheme (prompt tuning:
    only the new queries change); a dataset the synthetic faces cannot label is refused, naming --data-root."""
    out = stage1 / "synthetic-prompt"
    proc = run_train(["--tune", "prompt", "--dataset", "aflw19", "--from", str(stage1 / "s1"), "--max-steps", "2",
                      "--warmup", "0", "--out-dir", str(out)] + QUICK)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    before, after = step0(str(stage1 / "s1"))["model"], step0(str(out))
    assert after["config"]["data"] == "synthetic" and after["model_config"]["tasks"][-1] == "aflw19"
    assert not any(k in before and not torch.equal(before[k], after["model"][k]) for k in after["model"])
    assert after["model"]["queries.aflw19.content"].shape[0] == TASKS["aflw19"].queries == 19
    proc = run_train(["--tune", "prompt", "--dataset", "lfw73", "--from", str(stage1 / "s1"), "--max-steps", "1",
                      "--out-dir", str(stage1 / "x")] + QUICK)
    assert proc.returncode != 0 and "--data-root" in proc.stderr and "lfw73" in proc.stderr


def test_transfer_to_a_visibility_head_adds_its_point_read_out():
    """--tune onto a visibility dataset: the stage-1 model has neither its queries nor PointOutput; both may be
    missing from the checkpoint, nothing else may."""
    import train_start
    from model import FaceptorConfig
    torch.manual_seed(0)
    old = build_model("faceptor", FaceptorConfig.tiny(tasks=("300w", "morph2"))).state_dict()
    model = build_model("faceptor", FaceptorConfig.tiny(tasks=("300w", "morph2", "cofw_visibility")))
    train_start.load_start(model, {"model": old}, 1, "cofw_visibility", "stage1.pt")
    assert torch.equal(model.encoder.conv1.weight, old["encoder.conv1.weight"])
    assert model.point_head.fc.weight.abs().sum() == 0
    del old["value_head.fc.bias"]
    with pytest.raises(SystemExit, match="value_head.fc.bias"):
        train_start.load_start(model, {"model": old}, 1, "cofw_visibility", "stage1.pt")
