"""`python bench.py loaders`: the training data path at the paper's scale, per CPU core, and the cores one GPU needs.

1. Files. Into a folder (temporary unless `--keep`), native-format copies of the Base preset's seven training sets
   (train_config.BASE_HEADS) are written at the sizes of the real releases (SOURCES; sizes typical of each release, not
   read from it). The pixels are SyntheticFaces faces (512 px, with their 68 landmarks and 19-class mask) resized to
   those sizes, with a mild luminance grain so that JPEG files are about as large as real photos' (the table prints
   the mean file size; decoding time grows with it).
2. Rates. For every set, `data.build_dataset(name, folder, "train", transform=data.default_transform(name,
   train=True))` is timed item by item through `dataset.get(i, seed)` (the composer's path), as items per
   CPU-second of this process (`time.process_time`, one torch thread): decoding alone (`dataset.raw`) and decoding
   plus the paper's training augmentation at the paper's size (512-px dense warps, 112-px RandAugment). The files
   sit in the page cache, so disk reads are not part of the figures.
3. One GPU. Images per step of the Base preset (n_t per GPU), the CPU-seconds one step's data costs (the sum over
   heads of n_t / rate_t) and hence the cores that keep up with one step every `--step-ms` milliseconds (a target
   step time, not a measured GPU step). Cross-check: whole Base steps composed in-process (`MultiTaskComposer`,
   num_workers=0: items, collation and normalisation), timed the same way.
4. Worker pools. Steps/s of `MultiTaskComposer` over these files with pool="shared" (one DataLoader per rank) and
   pool="per_head" (one per head), at several worker counts; every configuration starts its workers, takes
   `--pool-warmup` steps, then `--pool-steps` timed steps (wall clock), and stops them; the configurations run in
   alternating rounds, so a busy machine slows them alike (median of the rounds reported). W workers that share
   the cores finish their steps at about the same time, so both step counts are multiples of every W compared
   (otherwise a window that starts or ends inside a burst of W steps misstates the rate). Beside steps/s, the
   CPU-seconds per step of this process and its workers over the timed steps (Linux /proc; nan elsewhere).
`--only rates` / `--only pools` runs parts 2-3 or part 4 alone.
"""
import io
import multiprocessing
import os
import statistics
import tempfile
import time
import warnings

import numpy as np
import torch
from PIL import Image

import data
from data.composer import MultiTaskComposer
from data.conventions import CELEBA_ATTRIBUTES, CELEBAMASK_PARTS
from data.loaders_global import AFFECTNET_HEADER
from data.recordio import pack_irheader, write_recordio
from data.synthetic import SyntheticFaces

GRAIN = 3.0                                  # std of the luminance grain added to the resized faces (grey levels)
JPEG_QUALITY = 90
# dataset -> what is written (image size, format, layout), as printed in the table
SOURCES = {
    "300w": "600-900 px photos: afw, helen JPEG; lfpw PNG (337 : 2000 : 811); 1-based .pts",
    "celebamask_hq": "1024 px JPEG + one 512 px PNG per part present; mapping + partition lists",
    "morph2": "400 x 480 JPEG, label/RANDOM_80_20/train.txt + data/",
    "affectnet": "350-700 px JPEG, Manually_Annotated_file_lists/training.csv (box, 68 points)",
    "rafdb": "100 x 100 aligned JPEG, EmoLabel/list_patition_label.txt",
    "celeba": "178 x 218 aligned JPEG, Anno/ + Eval/ lists",
    "ms1mv3": "112 x 112 JPEG in train.rec/.idx (insightface header and identity records)",
}
RECORDS_PER_FILE = 8                          # MS1MV3 records written per `files` (its batch is the largest)


class Faces:
    """SyntheticFaces 512-px faces resized to a photo size with grain; landmarks scaled along."""

    def __init__(self, count: int, seed: int = 0):
        ds = SyntheticFaces("train", size=512, length=max(count, 1), seed=seed)
        self.items = [ds[i] for i in range(len(ds))]
        self.rng = np.random.default_rng(seed)

    def photo(self, index: int, w: int, h: int):
        """(uint8 [h, w, 3], 0-based landmarks [68, 2] in that image, 19-class mask [512, 512]) of face `index`."""
        item = self.items[index % len(self.items)]
        im = Image.fromarray(item["image"].permute(1, 2, 0).numpy()).resize((w, h), Image.BICUBIC)
        arr = np.asarray(im, np.float32) + self.rng.normal(0.0, GRAIN, (h, w, 1)).astype(np.float32)
        lm = (item["landmarks"].double().numpy() + 0.5) * np.array([w / 512, h / 512]) - 0.5
        return arr.round().clip(0, 255).astype(np.uint8), lm, item["mask"].numpy()


def _save(path: str, arr: np.ndarray, fmt: str = "JPEG") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt, **({"quality": JPEG_QUALITY} if fmt == "JPEG" else {}))


def _text(path: str, lines) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))


def _sizes(rng, n: int, lo: int, hi: int):
    return [(int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))) for _ in range(n)]


def write_300w(root: str, n: int, faces: Faces, rng) -> None:
    share = np.array([337, 2000, 811]) / 3148 * n                      # the release's train images per folder
    counts = np.floor(share).astype(int)
    counts[np.argsort(counts - share)[:n - counts.sum()]] += 1          # largest remainders: n images in all
    k = 0
    for (folder, fmt), count in zip((("afw", "JPEG"), ("helen/trainset", "JPEG"), ("lfpw/trainset", "PNG")), counts):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        for w, h in _sizes(rng, int(count), 600, 900):
            arr, lm, _ = faces.photo(k, w, h)
            stem = os.path.join(root, folder, f"image_{k:04d}")
            _save(stem + (".jpg" if fmt == "JPEG" else ".png"), arr, fmt)
            _text(stem + ".pts", ["version: 1", "n_points:  68", "{"] +
                  [f"{x + 1:.3f} {y + 1:.3f}" for x, y in lm] + ["}"])          # .pts are 1-based
            k += 1


def write_celebamask_hq(root: str, n: int, faces: Faces, rng) -> None:
    parts = {v: p for p, v in CELEBAMASK_PARTS.items()}                   # class value -> part file name
    mapping, partition = ["idx         orig_idx    orig_file"], []
    for i in range(n):
        arr, _, mask = faces.photo(i, 1024, 1024)
        _save(os.path.join(root, "CelebA-HQ-img", f"{i}.jpg"), arr)
        for value in np.unique(mask):
            if value in parts:
                _save(os.path.join(root, "CelebAMask-HQ-mask-anno", str(i // 2000), f"{i:05d}_{parts[value]}.png"),
                      ((mask == value) * 255).astype(np.uint8), "PNG")
        mapping.append(f"{i}           {i}    {i + 1:06d}.jpg")
        partition.append(f"{i + 1:06d}.jpg 0")
    _text(os.path.join(root, "CelebA-HQ-to-CelebA-mapping.txt"), mapping)
    _text(os.path.join(root, "list_eval_partition.txt"), partition)


def write_morph2(root: str, n: int, faces: Faces, rng) -> None:
    lines = []
    for i in range(n):
        age = int(rng.integers(16, 78))
        name = f"{100000 + i:06d}_{i % 10}{'MF'[i % 2]}{age:02d}.JPG"
        _save(os.path.join(root, "data", name), faces.photo(i, 400, 480)[0])
        lines.append(f"{name} {age}")
    _text(os.path.join(root, "label", "RANDOM_80_20", "train.txt"), lines)


def write_affectnet(root: str, n: int, faces: Faces, rng) -> None:
    rows = [",".join(AFFECTNET_HEADER + ("valence", "arousal"))]
    for i, (w, h) in enumerate(_sizes(rng, n, 350, 700)):
        arr, lm, _ = faces.photo(i, w, h)
        path = f"{100 + i % 7}/{i:08x}.jpg"
        _save(os.path.join(root, "Manually_Annotated_Images", path), arr)
        x0, y0 = lm.min(0)
        x1, y1 = lm.max(0)
        points = ";".join(f"{v:.2f}" for v in lm.ravel())
        rows.append(f"{path},{x0:.0f},{y0:.0f},{x1 - x0:.0f},{y1 - y0:.0f},{points},{i % 7},0.1,-0.1")
    _text(os.path.join(root, "Manually_Annotated_file_lists", "training.csv"), rows)


def write_rafdb(root: str, n: int, faces: Faces, rng) -> None:
    for i in range(n):
        _save(os.path.join(root, "Image", "aligned", f"train_{i + 1:05d}_aligned.jpg"), faces.photo(i, 100, 100)[0])
    _text(os.path.join(root, "EmoLabel", "list_patition_label.txt"), [f"train_{i + 1:05d}.jpg {i % 7 + 1}"
                                                                     for i in range(n)])


def write_celeba(root: str, n: int, faces: Faces, rng) -> None:
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    for i, name in enumerate(names):
        _save(os.path.join(root, "Img", "img_align_celeba", name), faces.photo(i, 178, 218)[0])
    attrs = rng.choice([-1, 1], size=(n, 40))
    _text(os.path.join(root, "Anno", "list_attr_celeba.txt"), [str(n), " ".join(CELEBA_ATTRIBUTES)] +
          [f"{name} " + " ".join(f"{v:2d}" for v in a) for name, a in zip(names, attrs)])
    _text(os.path.join(root, "Eval", "list_eval_partition.txt"), [f"{name} 0" for name in names])


def write_ms1mv3(root: str, n: int, faces: Faces, rng) -> None:
    per_id, records = 4, []
    for key in range(1, n + 1):
        buf = io.BytesIO()
        Image.fromarray(faces.photo(key, 112, 112)[0]).save(buf, format="JPEG", quality=JPEG_QUALITY)
        records.append((key, pack_irheader(float((key - 1) // per_id), buf.getvalue(), key)))
    ids = (n + per_id - 1) // per_id
    first = n + 1                                  # identity records follow the images
    head = [(0, pack_irheader([float(first), float(first + ids)], b""))]
    tail = [(first + j, pack_irheader([1.0 + j * per_id, 1.0 + min((j + 1) * per_id, n)], b"")) for j in range(ids)]
    os.makedirs(root, exist_ok=True)
    write_recordio(os.path.join(root, "train.rec"), os.path.join(root, "train.idx"), head + records + tail)
    _text(os.path.join(root, "property"), [f"{ids},112,112"])


WRITERS = {"300w": write_300w, "celebamask_hq": write_celebamask_hq, "morph2": write_morph2,
           "affectnet": write_affectnet, "rafdb": write_rafdb, "celeba": write_celeba, "ms1mv3": write_ms1mv3}


def write_base_sets(root: str, files: int, seed: int = 0) -> dict:
    """Writes every set of WRITERS under root/<name>; returns {name: (folder, mean bytes per image file)}."""
    faces = Faces(min(files, 64), seed)
    out = {}
    for name, write in WRITERS.items():
        folder = os.path.join(root, name)
        write(folder, files * (RECORDS_PER_FILE if name == "ms1mv3" else 1), faces, np.random.default_rng(seed))
        sizes = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs
                 if f.endswith((".jpg", ".JPG", ".png", ".rec")) and "mask-anno" not in d]
        records = files * RECORDS_PER_FILE if name == "ms1mv3" else len(sizes)
        out[name] = (folder, sum(sizes) / max(records, 1))
    return out


# ---------------------------------------------------------------------------------------------- rates
def per_cpu_second(fn, seconds: float, min_calls: int = 8) -> float:
    """Calls of fn(i) per CPU-second of this process, over at least `seconds` and `min_calls`, after one warm-up."""
    fn(0)
    n, c0 = 0, time.process_time()
    while n < min_calls or time.process_time() - c0 < seconds:
        n += 1
        fn(n)
    return n / max(time.process_time() - c0, 1e-9)


def training_set(name: str, folder: str):
    return data.build_dataset(name, folder, "train", transform=data.default_transform(name, train=True))


def data_cost(heads: dict, rates: dict, step_ms: float) -> tuple:
    """(images per step, CPU-seconds of data per step = sum_t n_t / rate_t, cores to keep up with `step_ms`)."""
    images = sum(int(heads[h][0]) for h in heads)
    cpu_s = sum(int(heads[h][0]) / rates[h] for h in heads)
    return images, cpu_s, cpu_s / (step_ms / 1000.0)


def bench_rates(sets: dict, heads: dict, args) -> dict:
    print(f"{'dataset':14s} {'n_t':>4s} {'file KB':>8s} {'decode /CPU-s':>14s} {'+ augment /CPU-s':>17s}  written")
    rates = {}
    for name, (folder, nbytes) in sets.items():
        ds = training_set(name, folder)
        n = len(ds)
        decode = per_cpu_second(lambda i: ds.raw(i % n), args.seconds)
        rates[name] = per_cpu_second(lambda i: ds.get(i % n, i), args.seconds)
        print(f"{name:14s} {int(heads[name][0]):4d} {nbytes / 1024:8.1f} {decode:14.1f} {rates[name]:17.1f}  "
              f"{SOURCES[name]}")
    return rates


def composer_entries(sets: dict, heads: dict, scale: float = 1.0) -> list:
    return [(h, training_set(h, sets[h][0]), max(1, round(int(heads[h][0]) * scale))) for h in heads]


def bench_step(sets: dict, heads: dict, steps: int) -> tuple:
    """CPU-seconds of one whole Base step composed in this process and of its collation and normalisation alone
    (medians of `steps`, after one warm-up), and the bytes of the step's tensors (what a worker hands over)."""
    entries = composer_entries(sets, heads)
    c = MultiTaskComposer(entries, seed=0)
    step = c.next_batch()
    nbytes = sum(v.nbytes for batch in step.values() for v in batch.values() if torch.is_tensor(v))
    whole, coll = [], []
    for k in range(steps):
        t = time.process_time()
        c.next_batch()
        whole.append(time.process_time() - t)
        items = [(name, [ds.get(i % len(ds), k * 1000 + i) for i in range(n)], group)
                 for (name, ds, n), group in zip(entries, c.groups)]
        t = time.process_time()
        for name, its, group in items:
            data.collate(its, group, name)
        coll.append(time.process_time() - t)
    return statistics.median(whole), statistics.median(coll), nbytes


def cpu_seconds(pids) -> float:
    """CPU-seconds (user + system) this process and the processes `pids` have used so far; Linux /proc."""
    total = time.process_time()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:                                   # no /proc, or the process has ended
            return float("nan")
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")      # utime, stime
    return total


def run_pool(entries, pool: str, workers: int, args) -> tuple:
    """(steps/s wall, CPU-seconds per step of this process and its workers) over the timed steps of one pool."""
    before = {p.pid for p in multiprocessing.active_children()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This DataLoader will create")       # more workers than cores
        c = MultiTaskComposer(entries, seed=0, num_workers=workers, pool=pool)
        for _ in range(max(args.pool_warmup, 1)):                                       # starts the workers
            c.next_batch()
    pids = [p.pid for p in multiprocessing.active_children() if p.pid not in before]
    t, cpu = time.perf_counter(), cpu_seconds(pids)
    for _ in range(args.pool_steps):
        c.next_batch()
    t, cpu = time.perf_counter() - t, cpu_seconds(pids) - cpu
    c.close()
    return args.pool_steps / t, cpu / args.pool_steps


def bench_pools(sets: dict, heads: dict, args) -> None:
    configs = [("shared", w) for w in args.shared_workers] + [("per_head", w) for w in args.per_head_workers]
    entries = composer_entries(sets, heads, args.pool_batch_scale)
    per_step = sum(e[2] for e in entries)
    runs = {cfg: [] for cfg in configs}
    for _ in range(args.pool_rounds):
        for pool, w in configs:
            runs[(pool, w)].append(run_pool(entries, pool, w, args))
    print(f"\nworker pools ({per_step} images per step; median of {args.pool_rounds} alternating rounds of "
          f"{args.pool_steps} steps after {args.pool_warmup} warm-up steps; {os.cpu_count()} CPUs seen; CPU-s of this "
          "process and its workers, which also finish the steps already handed out)")
    print(f"{'pool':9s} {'workers/loader':>14s} {'processes':>9s} {'steps/s':>8s} {'images/s':>9s} {'CPU-s/step':>10s}"
          "  rounds (steps/s)")
    for (pool, w), r in runs.items():
        procs = w * (1 if pool == "shared" else len(entries))
        rate, cpu = statistics.median(x[0] for x in r), statistics.median(x[1] for x in r)
        print(f"{pool:9s} {w:14d} {procs:9d} {rate:8.3f} {rate * per_step:9.1f} {cpu:10.3f}  "
              + " ".join(f"{x[0]:.3f}" for x in r))


def report_data_cost(sets: dict, heads: dict, args) -> None:
    """Rates per set, the CPU-seconds of one step's data and the cores per GPU; the in-process cross-check."""
    rates = bench_rates(sets, heads, args)
    images, cpu_s, _ = data_cost(heads, rates, args.step_ms)
    print(f"\nBase preset, one GPU: {images} images per step; data cost sum_t n_t / rate_t = {cpu_s:.3f} CPU-s "
          "per step")
    for t_ms in sorted({60.0, args.step_ms, 240.0}):
        print(f"  step time {t_ms:5.0f} ms (target, not a measured GPU step): {data_cost(heads, rates, t_ms)[2]:5.1f} "
              "cores")
    if args.check_steps > 0:
        whole, coll, nbytes = bench_step(sets, heads, args.check_steps)
        print(f"cross-check, whole steps composed in-process (items, collation, normalisation): {whole:.3f} CPU-s "
              f"per step, of which collation + normalisation {coll:.3f}; {whole / (args.step_ms / 1000):.1f} cores at "
              f"{args.step_ms:.0f} ms; one step's tensors {nbytes / 2 ** 20:.1f} MiB")


def section_loaders(args):
    """Base preset's datasets in native format at real sizes: items/CPU-s, cores per GPU, shared vs per-head pool."""
    from train_config import BASE_HEADS
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or tmp
        t = time.perf_counter()
        sets = write_base_sets(root, args.files)
        print(f"torch {torch.__version__}, 1 thread; {args.files} images per set ({args.files * RECORDS_PER_FILE} "
              f"MS1MV3 records) written in {time.perf_counter() - t:.0f} s\n")
        if args.only in (None, "rates"):
            report_data_cost(sets, BASE_HEADS, args)
        if args.only in (None, "pools") and (args.shared_workers or args.per_head_workers):
            bench_pools(sets, BASE_HEADS, args)


def add_parser(sub) -> None:
    """The `loaders` section's command line, under bench.py's subcommands."""
    p = sub.add_parser("loaders", help=section_loaders.__doc__)
    p.add_argument("--files", type=int, default=24,
                   help=f"images written per dataset (MS1MV3: {RECORDS_PER_FILE}x as many records)")
    p.add_argument("--seconds", type=float, default=3.0, help="CPU-seconds spent timing each dataset and mode")
    p.add_argument("--step-ms", type=float, default=120.0,
                   help="GPU step time the data must keep up with, in ms (a target, not a measurement)")
    p.add_argument("--check-steps", type=int, default=2,
                   help="whole Base steps composed in-process to cross-check the sum (0: skip)")
    p.add_argument("--shared-workers", type=int, nargs="*", default=[2, 7],
                   help="worker counts of the shared pool to compare (one DataLoader per rank)")
    p.add_argument("--per-head-workers", type=int, nargs="*", default=[1, 2],
                   help="worker counts per head's DataLoader to compare (give neither list to skip the comparison)")
    p.add_argument("--pool-steps", type=int, default=14,
                   help="timed steps per pool configuration and round (a multiple of every worker count: W workers "
                        "deliver steps in bursts of W)")
    p.add_argument("--pool-warmup", type=int, default=14,
                   help="untimed steps after starting the workers (also a multiple of every worker count)")
    p.add_argument("--pool-rounds", type=int, default=2, help="alternating rounds over the pool configurations")
    p.add_argument("--pool-batch-scale", type=float, default=1.0, help="multiply every n_t in the pool comparison")
    p.add_argument("--only", choices=["rates", "pools"], default=None,
                   help="run only the rates and cores per GPU, or only the pool comparison")
    p.add_argument("--keep", default=None, help="write the files into this folder and keep them (default: temporary)")
