"""bench_data (`python bench.py loaders`): its native-format writers produce sets that the loaders read back with the
labels written (300W points, CelebAMask-HQ part masks, MS1MV3 identities), at the paper's training sizes after the
default transforms; the data-cost arithmetic on a hand-computed case; the section runs end to end."""
import argparse

import numpy as np
import pytest
import torch

import bench_data
import data
from train_config import BASE_HEADS


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    return bench_data.write_base_sets(str(tmp_path_factory.mktemp("base")), files=3)


def _expected_faces(n):
    return [{k: v.clone() for k, v in item.items() if torch.is_tensor(v)} for item in bench_data.Faces(n).items]


def test_every_base_set_reads_back_at_the_paper_sizes(sets):
    assert set(sets) == set(BASE_HEADS)
    for name, (folder, nbytes) in sets.items():
        ds = bench_data.training_set(name, folder)
        assert len(ds) == (3 * bench_data.RECORDS_PER_FILE if name == "ms1mv3" else 3), name
        size = 512 if data.DATASETS[name][2] in ("landmarks", "parsing") else 112
        assert ds.get(0, 1)["image"].shape == (3, size, size), name
        assert nbytes > 0


def test_300w_points_and_celebamask_parts_read_back_as_written(sets):
    faces = _expected_faces(3)
    w300 = data.build_dataset("300w", sets["300w"][0], "train")
    for k in range(len(w300)):
        item = w300.raw(k)
        h, w = item["image"].shape[1:]
        want = (faces[k]["landmarks"].double() + 0.5) * torch.tensor([w / 512, h / 512]) - 0.5
        diff = (item["landmarks"].double() - want).abs()
        assert diff.max() < 1e-3, (k, float(diff.max()), float(diff.mean()))
    hq = data.build_dataset("celebamask_hq", sets["celebamask_hq"][0], "train")
    for k in range(len(hq)):
        item = hq.raw(k)
        assert item["image"].shape == (3, 512, 512)
        mismatch = (item["mask"] != faces[k]["mask"].long()).float().mean()
        assert mismatch == 0, (k, float(mismatch))


def test_ms1mv3_records_carry_their_identities(sets):
    ds = data.build_dataset("ms1mv3", sets["ms1mv3"][0], "train")
    ids = [ds.raw(k)["identity"] for k in range(len(ds))]
    assert ids == [k // 4 for k in range(len(ds))]                    # 4 images per identity
    assert ds.num_classes == len(ds) // 4


def test_data_cost_arithmetic():
    heads = {"a": [4, 1000.0], "b": [64, 2.0]}
    images, cpu_s, cores = bench_data.data_cost(heads, {"a": 8.0, "b": 128.0}, step_ms=250.0)
    assert images == 68
    assert np.isclose(cpu_s, 4 / 8 + 64 / 128) and np.isclose(cores, 1.0 / 0.25)


def test_loaders_section_runs(capsys):
    ap = argparse.ArgumentParser()
    bench_data.add_parser(ap.add_subparsers(dest="section"))
    args = ap.parse_args(["loaders", "--files", "2", "--seconds", "0", "--check-steps", "1", "--shared-workers", "1",
                          "--per-head-workers", "--pool-steps", "1", "--pool-warmup", "0", "--pool-rounds", "1",
                          "--pool-batch-scale", "0.02"])
    bench_data.section_loaders(args)
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0] in BASE_HEADS]
    assert rows == list(BASE_HEADS)
    assert "472 images per step" in out and "cores" in out and "shared" in out
