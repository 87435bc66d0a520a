"""Infinite samplers and the multi-task batch composer: determinism, sharding, exact resume, worker pools
(paper Sec. 4.1)."""
import multiprocessing

import pytest
import torch
from hypothesis import given, settings, strategies as st

import data
from data.transforms import GlobalTransform


class IndexDataset(torch.utils.data.Dataset):
    """Items that reveal their index and the seed they were fetched with."""

    task_type = "attributes"

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def get(self, index, seed):
        g = torch.Generator().manual_seed(seed)
        return {"image": torch.zeros(3, 2, 2, dtype=torch.uint8), "index": index,
                "noise": torch.rand(2, generator=g)}


@settings(max_examples=25, deadline=None)
@given(length=st.integers(1, 40), bs=st.integers(1, 9), world=st.integers(1, 4), seed=st.integers(0, 99))
def test_sampler_epochs_are_disjoint_rank_slices(length, bs, world, seed):
    if length < world:
        with pytest.raises(ValueError):
            data.InfiniteSampler(length, bs, seed, 0, world)
        return
    per_rank = length // world
    seen = []
    for r in range(world):
        s = data.InfiniteSampler(length, bs, seed, r, world)
        keys = []
        while len(keys) < per_rank:
            keys += s.next_keys()
        seen.append([k[0] for k in keys[:per_rank]])
        assert all(k[1] == 0 for k in keys[:per_rank])               # first epoch
    flat = [i for rank in seen for i in rank]
    assert len(set(flat)) == len(flat) == per_rank * world           # disjoint, no repeats
    assert set(flat) <= set(range(length))


def test_sampler_state_resume_and_seed():
    a = data.InfiniteSampler(13, 5, seed=7)
    for _ in range(4):
        next(a)
    state = a.state_dict()
    more = [next(a) for _ in range(6)]
    b = data.InfiniteSampler(13, 5, seed=7)
    b.load_state_dict(state)
    assert [next(b) for _ in range(6)] == more
    first = [next(data.InfiniteSampler(13, 13, seed=s)) for s in (7, 8)]
    assert sorted(first[0]) == list(range(13)) and first[0] != first[1]
    assert next(data.InfiniteSampler(5, 5, seed=7, shuffle=False)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="batch_size"):
        data.InfiniteSampler(13, 4, seed=7).load_state_dict(state)


def _entries():
    return [("a", IndexDataset(11), 3), ("b", IndexDataset(7), 4),
            ("syn", data.SyntheticFaces("train", size=32, length=50, task="expression",
                                        transform=GlobalTransform(32, train=True)), 2)]


def _same(x, y):
    assert x.keys() == y.keys()
    for head in x:
        for k in x[head]:
            assert torch.equal(x[head][k], y[head][k]), (head, k)


@pytest.mark.parametrize("workers", [0, 2])
def test_composer_resume_sees_identical_batches(workers):
    c = data.MultiTaskComposer(_entries(), seed=3, num_workers=workers)
    for _ in range(3):
        c.next_batch()
    state = c.state_dict()
    want = [c.next_batch() for _ in range(4)]
    fresh = data.MultiTaskComposer(_entries(), seed=3, num_workers=workers)
    fresh.load_state_dict(state)
    got = [fresh.next_batch() for _ in range(4)]
    for w, g in zip(want, got):
        _same(w, g)
    assert fresh.state_dict() == c.state_dict()
    ref = data.MultiTaskComposer(_entries(), seed=3, num_workers=0)   # workers change nothing
    for _ in range(3):
        ref.next_batch()
    _same(ref.next_batch(), want[0])


@pytest.mark.parametrize("pool, resume_pool", [("shared", "shared"), ("per_head", "per_head"),
                                              ("shared", "per_head")])
def test_worker_pools_give_the_in_process_batches_across_a_resume(pool, resume_pool):
    ref = data.MultiTaskComposer(_entries(), seed=3)
    want = [ref.next_batch() for _ in range(7)]                     # every head crosses an epoch boundary
    c = data.MultiTaskComposer(_entries(), seed=3, num_workers=2, pool=pool)
    got = [c.next_batch() for _ in range(3)]
    state = c.state_dict()                                           # the workers have prefetched beyond step 3
    c.close()
    fresh = data.MultiTaskComposer(_entries(), seed=3, num_workers=2, pool=resume_pool)
    fresh.load_state_dict(state)
    got += [fresh.next_batch() for _ in range(4)]
    for step, (w, g) in enumerate(zip(want, got)):
        for head in w:
            for k in w[head]:
                assert torch.equal(w[head][k], g[head][k]), (step, head, k, (w[head][k] - g[head][k]).abs().max())
    assert fresh.state_dict() == ref.state_dict()


@pytest.mark.parametrize("pool, loaders", [("shared", 1), ("per_head", 3)])
def test_worker_processes_per_rank(pool, loaders):
    before = set(multiprocessing.active_children())
    c = data.MultiTaskComposer(_entries(), seed=0, num_workers=2, pool=pool)      # 3 heads
    c.next_batch()
    started = set(multiprocessing.active_children()) - before
    assert len(started) == 2 * loaders
    c.close()
    assert not set(multiprocessing.active_children()) & started                    # stopped by close()


def test_composer_batches_and_item_seeds():
    c = data.MultiTaskComposer(_entries(), seed=0)
    b = c.next_batch()
    assert b["a"]["index"].shape == (3,) and b["b"]["index"].shape == (4,)
    assert b["syn"]["image"].dtype == torch.float32 and b["syn"]["image"].shape == (2, 3, 32, 32)
    assert b["syn"]["image"].min() >= -1 and b["syn"]["image"].max() <= 1     # 0.5/0.5 group
    # the same index seen in two epochs gets different augmentation seeds
    noise = {}
    for _ in range(8):
        out = c.next_batch()["b"]
        for i, n in zip(out["index"].tolist(), out["noise"]):
            noise.setdefault(i, []).append(n)
    assert any(len(v) > 1 and not torch.equal(v[0], v[1]) for v in noise.values())
    assert c.state_dict()["steps"] == 9


def test_two_ranks_see_disjoint_samples():
    seen = []
    for rank in range(2):
        c = data.MultiTaskComposer([("a", IndexDataset(20), 5)], seed=1, rank=rank, world_size=2)
        seen.append(torch.cat([c.next_batch()["a"]["index"] for _ in range(2)]).tolist())
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0] + seen[1])) == 20


@settings(max_examples=25, deadline=None)
@given(length=st.integers(2, 40), bs=st.integers(1, 9), world=st.integers(1, 4), part=st.integers(0, 99))
def test_fixed_partition_keeps_each_ranks_items_across_epochs_and_heads(length, bs, world, part):
    if length < world:
        return
    per_rank = length // world
    ranks = []
    for r in range(world):
        sets = []
        for seed in (5, 6):                          # two heads: their own orders, the same partition
            s = data.InfiniteSampler(length, bs, seed, r, world, partition_seed=part)
            keys = []
            while len(keys) < 3 * per_rank:
                keys += s.next_keys()
            epochs = [[k[0] for k in keys if k[1] == e] for e in range(3)]
            assert all(sorted(e) == sorted(epochs[0]) and len(e) == per_rank for e in epochs)   # same items
            sets.append(set(epochs[0]))
        assert sets[0] == sets[1]
        ranks.append(sets[0])
    flat = [i for rank in ranks for i in rank]
    assert len(set(flat)) == len(flat) == per_rank * world and set(flat) <= set(range(length))


def test_fixed_partition_reorders_epochs_and_resumes():
    s = data.InfiniteSampler(30, 15, seed=2, rank=1, world_size=2, partition_seed=9)
    first, second = next(s), next(s)
    assert sorted(first) == sorted(second) and first != second          # re-ordered, not repeated
    state = s.state_dict()
    more = [next(s) for _ in range(3)]
    fresh = data.InfiniteSampler(30, 15, seed=2, rank=1, world_size=2, partition_seed=9)
    fresh.load_state_dict(state)
    assert [next(fresh) for _ in range(3)] == more
    with pytest.raises(ValueError, match="partition_seed"):
        data.InfiniteSampler(30, 15, seed=2, rank=1, world_size=2).load_state_dict(state)


def test_composer_fixed_partition_halves_each_ranks_items():
    seen = []
    for rank in range(2):
        c = data.MultiTaskComposer([("a", IndexDataset(20), 5), ("b", IndexDataset(20), 4)], seed=1, rank=rank,
                                   world_size=2, fixed_partition=True)
        batches = [c.next_batch() for _ in range(10)]
        a, b = ({int(i) for x in batches for i in x[h]["index"]} for h in "ab")
        assert a == b and len(a) == 10                                    # both heads: this rank's 10 items
        seen.append(a)
    assert not seen[0] & seen[1]


def test_composer_groups_and_errors():
    dense = data.SyntheticFaces("train", size=32, length=10, task="landmarks")
    c = data.MultiTaskComposer([("lm", dense, 2)], seed=0)
    assert c.groups == ["dense"]
    x = c.next_batch()["lm"]["image"]
    assert x.max() > 1.5                                               # CLIP statistics, not 0.5/0.5
    with pytest.raises(ValueError, match="pool must be one of"):
        data.MultiTaskComposer([("a", IndexDataset(4), 2)], seed=0, num_workers=2, pool="per_task")
    with pytest.raises(ValueError, match="appears twice"):
        data.MultiTaskComposer([("a", IndexDataset(4), 2), ("a", IndexDataset(4), 2)], seed=0)
    c = data.MultiTaskComposer([("a", IndexDataset(4), 2)], seed=0)
    with pytest.raises(ValueError, match="no sampler for heads"):
        c.load_state_dict({"steps": 0, "seed": 0, "samplers": {}})
