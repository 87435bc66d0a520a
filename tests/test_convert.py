"""Checkpoint loading: the authors' checkpoints (synthesised from the key/shape tables in tests/data/, one row per
tensor of their stage-1 Base/Full, stage-2 and Naive checkpoints) and FaRL files convert and load strictly, every
source tensor is used, and bad files give clear errors."""
import os

import pytest
import torch

from checkpoint import convert_official_state_dict, load_farl
from model import BASE_TASKS, FULL_TASKS, Faceptor, FaceptorConfig, NaiveFaceptor

REF = os.path.join(os.path.dirname(__file__), "data")      # official_keys_*.tsv: names, shapes, dtypes of their tensors


def synthesise(name, prefix=""):
    """A state dict with every tensor of the table, each filled with its own row number (so placement is checkable)."""
    sd, rows = {}, []
    with open(os.path.join(REF, name)) as f:
        for line in f:
            if line.startswith("#") or line.startswith("key\t"):
                continue
            key, shape, _, dtype, note = line.rstrip("\n").split("\t")
            rows.append((key, shape, dtype, note))
    for i, (key, shape, dtype, note) in enumerate(rows):
        if "shared_with=" in note:
            sd[prefix + key] = sd[prefix + note.split("shared_with=")[1]]
            continue
        dims = [int(s) for s in shape.split("x")] if shape else []
        sd[prefix + key] = torch.full(dims, float(i), dtype=getattr(torch, dtype))
    return sd


def _build(cls, cfg):
    torch.manual_seed(0)
    return cls(cfg)


@pytest.mark.parametrize("table,cfg,prefix", [
    ("official_keys_base_stage1.tsv", FaceptorConfig.base(drop_path=0), "module."),
    ("official_keys_full_stage1.tsv", FaceptorConfig.full(drop_path=0), ""),
    ("official_keys_stage2.tsv", FaceptorConfig.full(stage=2, drop_path=0), "module."),
])
def test_official_faceptor_checkpoints_convert_and_load_strictly(table, cfg, prefix):
    src = synthesise(table, prefix)
    sd, extras = convert_official_state_dict({"state_dict": src})
    assert extras["kind"] == "faceptor" and extras["stage"] == cfg.stage
    assert extras["tasks"] == cfg.tasks
    model = _build(Faceptor, cfg)
    model.load_state_dict(sd, strict=True)
    # placements: a few tensors by name
    s = lambda k: src[prefix + k]  # noqa: E731
    assert torch.equal(model.encoder.blocks[3].mlp.c_fc.weight,
                       s("backbone_module.visual.transformer.resblocks.3.mlp.c_fc.weight"))
    assert torch.equal(model.queries["300w"].content, s("heads_module.decoder.query_feat.align_300w.weight"))
    assert torch.equal(model.queries["300w"].pos, s("heads_module.decoder.query_embed.align_300w.weight"))
    assert torch.equal(model.decoder.layers[8].cross_attn.in_proj_weight,
                       s("heads_module.decoder.transformer_cross_attention_layers.8.multihead_attn.in_proj_weight"))
    assert torch.equal(model.pixel_decoder[1].weight, s("heads_module.interpreters.map_v2.mask_map.1.weight"))
    assert torch.equal(model.value_head.fc.weight, s("heads_module.interpreters.value.fc.weight"))
    level = model.queries["celeba"].level
    assert torch.equal(level[0], s("heads_module.decoder.level_embed.weight")[0])
    if cfg.stage == 2:
        assert torch.equal(level[1:], s("heads_module.decoder.new_level_embed.weight"))
        assert torch.equal(model.projection.convs[3].weight, s("heads_module.decoder.new_input_proj.2.weight"))
        assert "cosface" not in extras or not extras["cosface"]
    else:
        assert torch.count_nonzero(level[1:]) == 0
        assert extras["cosface"]["ms1mv3"].shape == (93431, 512)
    # every head shares the authors' level table
    assert all(torch.equal(q.level, level) for q in model.queries.values())


def test_official_naive_checkpoint_converts_and_loads_strictly():
    src = synthesise("official_keys_naive.tsv", "module.")
    sd, extras = convert_official_state_dict(src)
    assert extras["kind"] == "naive" and extras["tasks"] == BASE_TASKS
    model = _build(NaiveFaceptor, FaceptorConfig.base(drop_path=0))
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.heads["landmarks"].head.conv_seg["300w"].weight,
                       src["module.heads_module.heads.align.head.conv_seg.weight"])
    assert torch.equal(model.heads["expression"].fcs["rafdb"].bias,
                       src["module.heads_module.heads.affect.fcs.affect_rafdb.bias"])


def test_unused_source_tensor_is_reported():
    src = synthesise("official_keys_base_stage1.tsv")
    src["heads_module.decoder.mystery.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="mystery"):
        convert_official_state_dict(src)


def test_wrong_shape_and_missing_key_name_the_key():
    src = synthesise("official_keys_base_stage1.tsv")
    sd, _ = convert_official_state_dict(src)
    model = _build(Faceptor, FaceptorConfig.base(drop_path=0))
    bad = dict(sd)
    bad["decoder.layers.0.ffn.linear1.weight"] = torch.zeros(5, 5)
    with pytest.raises(RuntimeError, match="decoder.layers.0.ffn.linear1.weight"):
        model.load_state_dict(bad, strict=True)
    del src["heads_module.decoder.transformer_ffn_layers.2.norm.bias"]
    sd, _ = convert_official_state_dict(src)
    with pytest.raises(RuntimeError, match="decoder.layers.2.ffn.norm.bias"):
        model.load_state_dict(sd, strict=True)


def _farl_state(width=64, layers=6, grid=14, clip_dim=32):
    """A FaRL-format file: a whole CLIP model under 'state_dict' (text tower included), visual grid 14x14."""
    enc = Faceptor(FaceptorConfig.tiny(pos_grid=grid)).encoder
    sd = {"visual." + k.replace("blocks.", "transformer.resblocks."): torch.randn_like(v)
          for k, v in enc.state_dict().items()}
    sd["token_embedding.weight"] = torch.zeros(10, clip_dim)
    sd["transformer.resblocks.0.ln_1.weight"] = torch.zeros(clip_dim)
    sd["logit_scale"] = torch.zeros(())
    return {"state_dict": sd}


def test_load_farl_strict_and_resizes_position_table(tmp_path):
    torch.manual_seed(0)
    farl = _farl_state()
    path = tmp_path / "farl.pth"
    torch.save(farl, path)
    model = Faceptor(FaceptorConfig.tiny())                  # pos_grid 8
    load_farl(model, str(path))
    sd = farl["state_dict"]
    assert torch.equal(model.encoder.blocks[5].attn.in_proj_weight,
                       sd["visual.transformer.resblocks.5.attn.in_proj_weight"])
    pe = model.encoder.positional_embedding
    assert pe.shape == (65, 64) and torch.equal(pe[0], sd["visual.positional_embedding"][0])
    src = sd["visual.positional_embedding"][1:].reshape(1, 14, 14, 64).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(src, size=(8, 8), mode="bicubic", align_corners=False)
    assert torch.allclose(pe[1:], ref.permute(0, 2, 3, 1).reshape(64, 64), atol=1e-6)


def test_load_farl_errors_name_the_key():
    model = Faceptor(FaceptorConfig.tiny())
    farl = _farl_state()
    del farl["state_dict"]["visual.ln_pre.bias"]
    with pytest.raises(ValueError, match="ln_pre.bias"):
        load_farl(model, farl)
    farl = _farl_state()
    farl["state_dict"]["visual.conv1.weight"] = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match="conv1.weight"):
        load_farl(model, farl)
    with pytest.raises(ValueError, match="visual"):
        load_farl(model, {"state_dict": {"foo": torch.zeros(1)}})


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": Evil()}}, path)
    with pytest.raises(ValueError, match="weights-only"):
        convert_official_state_dict(str(path))
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="weights-only"):
        load_farl(Faceptor(FaceptorConfig.tiny()), str(path))
