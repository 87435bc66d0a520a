"""train_run.py by hand: the ETA (with and without cached synthetic items), the slow-machine note, and the CosFace
field of checkpoints written before classifiers were named by head."""
import os
import sys
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_run  # noqa: E402


def fake_run(step=0, total=20, heads=None, world=1):
    logged = []
    run = SimpleNamespace(step=step, total=total, cfg=SimpleNamespace(heads=heads or {"a": [2, 1.0], "b": [4, 1.0]}),
                          env=SimpleNamespace(world=world), log=logged.append)
    return run, logged


def test_eta_by_hand():
    run, _ = fake_run()
    plain = train_run.Progress(run)
    plain.data_s = 4.0
    assert plain.eta(step=4, elapsed=10.0) == pytest.approx(10.0 / 4 * 16)          # time per step x steps left
    cached = train_run.Progress(run, epoch_steps={"a": 10, "b": 5})
    cached.data_s = 4.0
    # compute (10 - 4) s / 4 steps x 16 steps left; data: 4 s for 2*4 + 4*4 = 24 items drawn, 2*6 + 4*1 = 16 to draw
    assert cached.eta(step=4, elapsed=10.0) == pytest.approx(6.0 / 4 * 16 + 4.0 / 24 * 16)
    # past every head's first epoch only compute is left
    assert cached.eta(step=12, elapsed=20.0) == pytest.approx(16.0 / 12 * 8)


def test_eta_leaves_the_first_steps_one_time_costs_out(monkeypatch):
    run, _ = fake_run()
    p = train_run.Progress(run)
    clock = {"now": p.t0}
    monkeypatch.setattr(train_run.time, "time", lambda: clock["now"])
    clock["now"] += 5.0                       # step 1: 1 s of work + 4 s of one-time costs
    p.step_done(1)
    clock["now"] += 3.0                       # steps 2-4: 1 s each
    for step in (2, 3, 4):
        p.step_done(step)
    assert p.eta(step=4, elapsed=8.0) == pytest.approx(1.0 * 16)    # not 8 s / 4 steps x 16
    p.data_s = 2.0                            # data time is charged per step (no cache), compute without it
    assert p.eta(step=4, elapsed=8.0) == pytest.approx((6.0 - 5.0) / 3 * 16 + 2.0 / 4 * 16)


def test_epoch_steps_end_when_the_fastest_head_of_an_input_size_has_drawn_its_share():
    import train_config
    from types import SimpleNamespace
    cfg = train_config.TrainConfig(heads={"300w": [16, 1.0], "celebamask_hq": [8, 1.0], "morph2": [16, 1.0],
                                          "ms1mv3": [48, 1.0]}, synthetic_train_length=1200)
    run = SimpleNamespace(env=SimpleNamespace(world=2))
    # 600 faces per rank and size: the 512-px pool is full after 600 / 16 steps, the 112-px one after 600 / 48
    assert train_config.epoch_steps(cfg, run) == {"300w": 38, "celebamask_hq": 38, "morph2": 13, "ms1mv3": 13}
    assert train_config.epoch_steps(train_config.TrainConfig(heads=cfg.heads, synthetic_cache=False), run) is None


def test_eta_after_resume_counts_the_epoch_from_the_restart():
    run, _ = fake_run(step=100, total=120)
    p = train_run.Progress(run, epoch_steps={"a": 10, "b": 10})
    p.data_s = 3.0
    # resumed at 100: the cache is empty again and fills by step 110; 5 steps in, 5 left of that epoch
    assert p.eta(step=105, elapsed=8.0) == pytest.approx(5.0 / 5 * 15 + 3.0 / 30 * 30)


def test_slow_machine_note_once_and_only_when_slow():
    run, logged = fake_run()
    p = train_run.Progress(run, reference_ips=400.0)
    p.slow_warning(ips=150.0, eta=1200.0)
    p.slow_warning(ips=10.0, eta=1200.0)
    assert len(logged) == 1 and "2.7x slower" in logged[0] and "about 20 min" in logged[0]
    run, logged = fake_run()
    p = train_run.Progress(run, reference_ips=400.0)
    p.slow_warning(ips=250.0, eta=60.0)
    assert logged == []
    run, logged = fake_run()
    train_run.Progress(run, reference_ips=None).slow_warning(ips=1.0, eta=1e6)
    assert logged == []


def test_cosface_weights_old_and_named_layouts():
    w = torch.randn(5, 3)
    assert train_run.cosface_weights({"weight": w}, ["300w", "ms1mv3"])["ms1mv3"] is w
    assert train_run.cosface_weights({"ms1mv3": {"weight": w}}, ["ms1mv3"]) == {"ms1mv3": w}
    assert train_run.cosface_weights(None, ["ms1mv3"]) == {}
    assert train_run.cosface_weights({"weight": w}, ["300w"]) == {}


def test_resolve_checkpoint_takes_a_file_or_the_newest_of_a_run_folder(tmp_path):
    import checkpoint
    for name in ("stage1_step0000200.pt", "stage1_step0001000.pt", "stage2_step0000050.pt", "stage2_step0000300.pt"):
        (tmp_path / name).write_bytes(b"")
    folder = str(tmp_path)
    assert checkpoint.resolve_checkpoint(folder) == str(tmp_path / "stage2_step0000300.pt")   # highest stage, newest
    assert checkpoint.resolve_checkpoint(folder, stage=1) == str(tmp_path / "stage1_step0001000.pt")  # by step number
    one = str(tmp_path / "stage1_step0000200.pt")
    assert checkpoint.resolve_checkpoint(one) == one
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="no stage"):
        checkpoint.resolve_checkpoint(str(tmp_path / "empty"))
    with pytest.raises(checkpoint.CheckpointError, match="no such file or folder"):
        checkpoint.resolve_checkpoint(str(tmp_path / "missing"))
