"""Multi-task batch composer (paper Sec. 4.1: every step draws one batch from every dataset of the preset).

- `InfiniteSampler`: per-dataset endless index batches, a pure function of (seed, epoch): each epoch is one
  permutation of the dataset, split into `world_size` disjoint contiguous slices (rank r takes slice r; the
  remainder of `length / world_size` is left out of that epoch). Batches run across epoch boundaries, so every
  batch is full. `state_dict()` holds the exact position. With a `partition_seed`, rank r's items are fixed
  instead: slice r of one permutation drawn from that seed, re-ordered every epoch. Samplers given the same
  partition seed split a dataset the same way, so the heads of one rank share its items (with the synthetic faces'
  cache, each rank then draws only its share of the faces instead of nearly all of them).
- `MultiTaskComposer`: one batch per (head, dataset, n_t) entry per step, collated into normalised float images
  and stacked labels. Augmentation randomness never comes from global RNG state: item i of a batch is fetched
  with the seed `item_seed(seed, entry, epoch, position)` (position in that epoch's permutation), and datasets
  that accept it (`dataset.get(index, seed)`) seed their transform from it. A resumed run therefore sees exactly
  the batches, augmentations included, that it would have seen. With workers, the state counts consumed
  batches, not prefetched ones.
- Worker pools (num_workers > 0). `pool="shared"` (default): one DataLoader per rank whose `num_workers` processes
  each build whole steps (every head's batch of a step in one worker). `pool="per_head"`: one DataLoader per head,
  each with `num_workers` processes (num_workers x heads processes). Both give the batches of num_workers = 0 bit
  for bit, since the items and their seeds come from the same samplers. The shared pool also balances the heads'
  unequal costs: with one process per head, a step waits for the slowest head's worker.
Normalisation per input group (docs/design.md section 2): the group comes from the dataset's `task_type` attribute
(landmarks/parsing -> CLIP statistics, others -> mean = std = 0.5) or from an optional 4th entry field.
"""
import copy
import numbers

import torch
from torch.utils.data import DataLoader

from .conventions import NORMALIZATION, input_group

_MASK64 = (1 << 64) - 1


def item_seed(*keys: int) -> int:
    """Mix integers into one 63-bit seed (splitmix64 steps); equal keys give equal seeds in every process."""
    h = 0x9E3779B97F4A7C15
    for k in keys:
        h = (h ^ (int(k) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


class InfiniteSampler:
    """Endless batches of dataset indices for one rank; deterministic from (seed, rank)."""

    def __init__(self, length: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, partition_seed: int | None = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size); got rank={rank}, world_size={world_size}")
        if length < world_size:
            raise ValueError(f"dataset length {length} is smaller than world_size {world_size}: "
                             "every rank needs at least one sample per epoch")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.length, self.batch_size, self.seed = int(length), int(batch_size), int(seed)
        self.rank, self.world_size, self.shuffle = int(rank), int(world_size), bool(shuffle)
        self.partition_seed = None if partition_seed is None else int(partition_seed)
        self.per_rank = self.length // self.world_size
        self._part = None
        if self.partition_seed is not None:                 # this rank's fixed items
            g = torch.Generator().manual_seed(self.partition_seed)
            start = self.rank * self.per_rank
            self._part = torch.randperm(self.length, generator=g)[start:start + self.per_rank]
        self.epoch, self.offset = 0, 0
        self._order_epoch, self._order = -1, None

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if epoch != self._order_epoch:
            g = torch.Generator().manual_seed(item_seed(self.seed, epoch))
            if self._part is not None:
                order = self._part[torch.randperm(self.per_rank, generator=g)] if self.shuffle else self._part
            else:
                perm = torch.randperm(self.length, generator=g) if self.shuffle else torch.arange(self.length)
                start = self.rank * self.per_rank
                order = perm[start:start + self.per_rank]
            self._order, self._order_epoch = order, epoch
        return self._order

    def next_keys(self) -> list:
        """The next batch as (index, epoch, position-in-epoch-permutation) triples; advances the position."""
        keys = []
        while len(keys) < self.batch_size:
            order = self._epoch_order(self.epoch)
            take = min(self.batch_size - len(keys), self.per_rank - self.offset)
            base = self.rank * self.per_rank
            for j in range(self.offset, self.offset + take):
                keys.append((int(order[j]), self.epoch, base + j))
            self.offset += take
            if self.offset == self.per_rank:
                self.epoch, self.offset = self.epoch + 1, 0
        return keys

    def __iter__(self):
        return self

    def __next__(self) -> list:
        return [k[0] for k in self.next_keys()]

    def _config(self) -> dict:
        config = {"length": self.length, "batch_size": self.batch_size, "seed": self.seed, "rank": self.rank,
                  "world_size": self.world_size, "shuffle": self.shuffle}
        if self.partition_seed is not None:        # absent when unset: older checkpoints' states still match
            config["partition_seed"] = self.partition_seed
        return config

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, **self._config()}

    def load_state_dict(self, state: dict) -> None:
        config = self._config()
        for key in sorted(set(config) | set(state) - {"epoch", "offset"}):
            value = config.get(key)
            if state.get(key) != value:
                raise ValueError(f"sampler state field {key!r} is {state.get(key)!r} but this sampler has {value!r}; "
                                 "resume with the same datasets, batch sizes, seed and world size")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


def fetch_item(dataset, index: int, seed: int) -> dict:
    """dataset.get(index, seed) when the dataset takes a seed for its random transform, else dataset[index]."""
    get = getattr(dataset, "get", None)
    return get(index, seed) if callable(get) else dataset[index]


def normalize_images(images: torch.Tensor, group: str) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float32, (x/255 - mean)/std with the statistics of the input group."""
    mean, std = NORMALIZATION[group]
    mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def collate(items: list, group: str, head: str = "?") -> dict:
    """Stack a list of item dicts; `image` becomes normalised float, numbers become tensors, strings lists."""
    out = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(f"head {head!r}: field {key!r} has different shapes in one batch {sorted(shapes)}; "
                                 "give this dataset a transform that produces a fixed size")
            out[key] = torch.stack(values)
        elif isinstance(values[0], numbers.Number):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    if "image" in out:
        out["image"] = normalize_images(out["image"], group)
    return out


POOLS = ("shared", "per_head")


class _StepItems(torch.utils.data.Dataset):
    """Map-style view whose keys are whole steps (one list of (index, seed) pairs per entry) and whose items are
    {head_name: collated batch}; used in-process and by the shared worker pool."""

    def __init__(self, entries, groups):
        self.entries, self.groups = entries, groups

    def __getitem__(self, step_keys):
        return {name: collate([fetch_item(dataset, i, s) for i, s in keys], group, name)
                for (name, dataset, _), group, keys in zip(self.entries, self.groups, step_keys)}


def _seeded(seed: int, entry: int, keys: list) -> list:
    """Sampler keys (index, epoch, position) -> (index, item seed) pairs of entry `entry`."""
    return [(i, item_seed(seed, entry, e, p)) for i, e, p in keys]


class _SeededSteps:
    """Sampler for the shared pool's DataLoader: every step's keys, from copies of the composer's samplers."""

    def __init__(self, samplers: list, seed: int):
        self.samplers, self.seed = samplers, seed

    def __iter__(self):
        while True:
            yield [_seeded(self.seed, i, s.next_keys()) for i, s in enumerate(self.samplers)]


def _whole_step(step: dict) -> dict:
    return step                                       # the worker built and collated the step already


class _SeededDataset(torch.utils.data.Dataset):
    """Map-style view whose keys are (index, seed) pairs, for DataLoader workers."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        return fetch_item(self.dataset, key[0], key[1])


class _SeededBatches:
    """Batch sampler for a DataLoader: the composer's sampler continued from a copy of its state."""

    def __init__(self, sampler: InfiniteSampler, seed: int, entry: int):
        self.sampler, self.seed, self.entry = sampler, seed, entry

    def __iter__(self):
        while True:
            yield _seeded(self.seed, self.entry, self.sampler.next_keys())


class _Collate:
    def __init__(self, group: str, head: str):
        self.group, self.head = group, head

    def __call__(self, items):
        return collate(items, self.group, self.head)


class MultiTaskComposer:
    """One collated batch per (head_name, dataset, batch_size[, input_group]) entry per step.

    num_workers: worker processes per DataLoader (0: items are built in this process).
    pool: "shared" (one DataLoader per rank; num_workers processes build whole steps) or "per_head" (one DataLoader
        per head, num_workers processes each); the batches are the same either way.
    fixed_partition: every rank keeps the same items of each dataset in every epoch, and all entries split a dataset
        length the same way (see InfiniteSampler's partition_seed); for cached synthetic faces."""

    def __init__(self, entries, seed: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 fixed_partition: bool = False, pool: str = "shared"):
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.entries, self.groups, self.samplers = [], [], []
        names = set()
        for i, entry in enumerate(entries):
            if len(entry) not in (3, 4):
                raise ValueError(f"entry {i} must be (head_name, dataset, batch_size[, input_group]), got {entry!r}")
            name, dataset, batch_size = entry[:3]
            if name in names:
                raise ValueError(f"head name {name!r} appears twice in the composer entries")
            names.add(name)
            group = entry[3] if len(entry) == 4 else input_group(getattr(dataset, "task_type", "attributes"))
            if group not in NORMALIZATION:
                raise ValueError(f"entry {name!r}: input group {group!r} not in {sorted(NORMALIZATION)}")
            self.entries.append((name, dataset, int(batch_size)))
            self.groups.append(group)
            part = item_seed(seed, len(dataset), 0x5041525449) if fixed_partition else None
            self.samplers.append(InfiniteSampler(len(dataset), batch_size, item_seed(seed, i), rank, world_size,
                                                 partition_seed=part))
        self.seed, self.num_workers, self.pool = int(seed), int(num_workers), pool
        self._steps_view = _StepItems(self.entries, self.groups)
        self.steps = 0
        self._iters = None

    def _start_workers(self):
        """Worker DataLoaders that continue from copies of the samplers' present state."""
        if self.pool == "shared":
            samplers = [copy.deepcopy(s) for s in self.samplers]
            loader = DataLoader(self._steps_view, batch_size=None, sampler=_SeededSteps(samplers, self.seed),
                                num_workers=self.num_workers, collate_fn=_whole_step, persistent_workers=False)
            self._iters = [iter(loader)]
            return
        self._iters = []
        for i, (name, dataset, _) in enumerate(self.entries):
            loader = DataLoader(_SeededDataset(dataset), batch_sampler=_SeededBatches(
                copy.deepcopy(self.samplers[i]), self.seed, i), num_workers=self.num_workers,
                collate_fn=_Collate(self.groups[i], name), persistent_workers=False)
            self._iters.append(iter(loader))

    def next_batch(self) -> dict:
        """{head_name: {field: Tensor}} for one training step; advances every sampler by one batch."""
        if self.num_workers > 0 and self._iters is None:
            self._start_workers()
        keys = [s.next_keys() for s in self.samplers]   # the consumed position, also with workers
        if self.num_workers == 0:
            out = self._steps_view[[_seeded(self.seed, i, k) for i, k in enumerate(keys)]]
        elif self.pool == "shared":
            out = next(self._iters[0])
        else:
            out = {name: next(it) for (name, _, _), it in zip(self.entries, self._iters)}
        self.steps += 1
        return out

    def close(self) -> None:
        """Stops the worker processes; the next call of next_batch starts new ones at the present position."""
        self._iters = None

    def state_dict(self) -> dict:
        return {"steps": self.steps, "seed": self.seed,
                "samplers": {name: s.state_dict() for (name, _, _), s in zip(self.entries, self.samplers)}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed:
            raise ValueError(f"composer state has seed {state.get('seed')!r}, this composer {self.seed!r}")
        missing = [name for name, _, _ in self.entries if name not in state["samplers"]]
        if missing:
            raise ValueError(f"composer state has no sampler for heads {missing}; "
                             f"it holds {sorted(state['samplers'])}")
        for (name, _, _), sampler in zip(self.entries, self.samplers):
            sampler.load_state_dict(state["samplers"][name])
        self.steps = int(state["steps"])
        self._iters = None                                # workers restart from the restored position
