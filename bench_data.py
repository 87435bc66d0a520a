"""Data throughput: SyntheticFaces items/s per core at several sizes, RecordIO random reads/s, and the 112-px
augmentation pipeline. Prints one line per measurement; nothing is written.

    python bench_data.py                      # all measurements, single process
    python bench_data.py --sizes 64 112 --seconds 2
"""
import argparse
import os
import tempfile
import time

import numpy as np
import torch

from dataset_io import decode_image
from recordio import RecordIOReader, pack_irheader, unpack_irheader, write_recordio
from synthetic import SyntheticFaces
from transforms import DenseTransform, GlobalTransform


def rate(fn, seconds: float) -> str:
    """Calls of fn per wall-clock second and per CPU second of this process (the per-core figure, which stays
    meaningful when other jobs share the machine), over at least `seconds` after one warm-up call."""
    fn(0)
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        fn(n + 1)
        n += 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return f"{n / wall:9.1f} /s wall, {n / max(cpu, 1e-9):9.1f} /s per CPU-second"


def bench_synthetic(sizes, seconds):
    for size in sizes:
        ds = SyntheticFaces("train", size=size, length=10 ** 6, n_identities=1000)
        for i in range(1000):                      # identity parameters are cached after first use
            ds._identity(i)
        print(f"SyntheticFaces {size:4d} px items:                  {rate(lambda i: ds[i], seconds)}")


def bench_recordio(n_records, seconds):
    from PIL import Image
    import io
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    with tempfile.TemporaryDirectory() as d:
        rec, idx = os.path.join(d, "train.rec"), os.path.join(d, "train.idx")
        write_recordio(rec, idx, ((k, pack_irheader(float(k % 100), jpeg, k)) for k in range(n_records)))
        reader = RecordIOReader(rec, idx)
        keys = rng.integers(0, n_records, size=10 ** 6)
        read = lambda i: reader.read(int(keys[i]))                                    # noqa: E731
        decode = lambda i: decode_image(unpack_irheader(read(i))[4])                  # noqa: E731
        print(f"RecordIO random reads ({n_records} x {len(jpeg)} B):   {rate(read, seconds)}")
        print(f"RecordIO random read + JPEG decode 112 px:   {rate(decode, seconds)}")
        reader.close()


def bench_transforms(seconds):
    item = SyntheticFaces("train", size=112, length=10)[0]
    t = GlobalTransform(112, train=True)
    run = lambda i: t(item, torch.Generator().manual_seed(i))                          # noqa: E731
    print(f"112-px train transform (flip, RandAug, erase): {rate(run, seconds)}")
    big = SyntheticFaces("train", size=512, length=10, task="landmarks")[0]
    big["box"] = torch.tensor([100.0, 100.0, 400.0, 400.0])
    d = DenseTransform(512, "landmarks", train=True)
    run = lambda i: d(big, torch.Generator().manual_seed(i))                           # noqa: E731
    print(f"512-px dense train transform (warp, degrade): {rate(run, seconds)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[48, 64, 96, 112, 128, 512],
                    help="SyntheticFaces image sizes to time")
    ap.add_argument("--seconds", type=float, default=2.0, help="time spent on each measurement")
    ap.add_argument("--records", type=int, default=20000, help="number of records in the temporary .rec file")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 = per-core numbers)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bench_synthetic(args.sizes, args.seconds)
    bench_recordio(args.records, args.seconds)
    bench_transforms(args.seconds)


if __name__ == "__main__":
    main()
