"""Benchmark: `Faceptor.predict` (encoder once per input size, all heads in one decoder pass) against the same
model run the way the authors' evaluation runs it (encoder and decoder once per task head).

    python bench_predict.py                      # Faceptor-Base, batch 1, 2 CPU threads, fp32
    python bench_predict.py --threads 1 --repeats 5

Both paths are timed alternately in one run, so machine noise hits both alike; the ratio is what matters.
"""
import argparse
import statistics
import time

import torch

from model import TASKS, Faceptor, FaceptorConfig


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="base", choices=["base", "full", "tiny"], help="model configuration")
    ap.add_argument("--batch", type=int, default=1, help="faces per call")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions of each path (after one warm-up)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = getattr(FaceptorConfig, args.preset)()
    model = Faceptor(cfg).eval()
    x512 = torch.randn(args.batch, 3, cfg.size_512, cfg.size_512)
    x112 = torch.randn(args.batch, 3, cfg.size_112, cfg.size_112)

    def one_pass():
        return model.predict(images_512=x512, images_112=x112)

    @torch.no_grad()
    def per_head():
        return {t: model(x512 if TASKS[t].size == 512 else x112, t) for t in cfg.tasks}

    a, b = one_pass(), per_head()
    err = max((a[t][k] - b[t][k]).abs().max().item() for t in a for k in a[t])
    times = {"predict": [], "per-head": []}
    for _ in range(args.repeats):
        for name, fn in (("predict", one_pass), ("per-head", per_head)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"Faceptor-{args.preset} ({len(cfg.tasks)} heads), batch {args.batch}, {args.threads} threads, fp32, "
          f"median of {args.repeats}")
    print(f"  per-head (encoder + decoder once per head): {med['per-head'] * 1000:8.1f} ms")
    print(f"  predict  (one pass over all heads):         {med['predict'] * 1000:8.1f} ms")
    print(f"  speed-up: {med['per-head'] / med['predict']:.2f}x   (max abs difference of outputs {err:.2e})")


if __name__ == "__main__":
    main()
