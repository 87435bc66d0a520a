"""Benchmarks, side by side in one run; each section prints times and ratios (results go to BENCHMARKS.md).

    python bench.py ops                     # fast ops: CPU sections (2 threads), GPU sections when CUDA is available
    python bench.py ops --threads 2 --reps 7 --attn-batch 1 8
    python bench.py ops --only gpu          # GPU sections only
    python bench.py predict                 # all-head predict vs per-head, Faceptor-Base, batch 1, 2 threads, fp32
    python bench.py data --sizes 64 112     # data throughput per CPU-second (nothing is written)
    python bench.py loaders                 # bench_data.py: Base sets at real sizes, cores per GPU, worker pools
    python bench.py pipeline                # predict.py's whole pipeline on a folder of photos; detection alone
    python bench.py train --steps 12        # where one default-run step spends its CPU time (2 processes)
    python bench.py compile                 # torch.compile vs eager: demo training step and predict, 2 threads

Section `ops`, CPU:
  * heatmap -> coordinates (eq. 9): C++ op vs PyTorch reference, B in {4, 64}, K = 68, 128x128, fwd and fwd+bwd.
  * decoder cross-attention (eqs. 6-7, one layer incl. projections, out_proj, norm) at the paper's shapes:
    grouped reference path of decoder.CrossAttentionLayer (per task head: K = F^ + P + L_t materialised, SDPA)
    vs the authors' style (nn.MultiheadAttention with need_weights=True, one decode per task head).
    112 px: HW = 49, 148 queries = 101 (age) + 40 (attributes) + 7 (expression); 512 px: HW = 1024, 87 queries
    = 19 (parsing) + 68 (landmarks); 6 layers of memory, d = 256, 8 heads.
GPU (only when CUDA is available):
  * the same cross-attention layer: fused Triton ("fused") vs unfused SDPA ("ref" path) vs authors' style,
    fwd and fwd+bwd, B in {1, 64}, HW 1024 / 49 with all 235 queries, bf16 and fp16, and the fraction of the
    attention-core floors (docs/design.md section 10);
  * heatmap CUDA op vs reference, fp32 and bf16.
Section `predict`: `Faceptor.predict` (encoder once per input size, all heads in one decoder pass) against the
same model run the way the authors' evaluation runs it (encoder and decoder once per task head); both timed
alternately in one run, so machine noise hits both alike.
Section `pipeline`: faces per second of predict.py's pipeline (decode, MTCNN, framing, model, mapping back,
writing) on a folder of 640x480 photos made from tests/data/astronaut_256.png (one face each, at several sizes and
places), Faceptor-Base with random weights and the real-data framings (the authors' checkpoints' case), 2 threads,
with each stage's share; then MTCNN alone on one 640x480 photo (median). Needs the MTCNN weights.
Section `compile`: what torch.compile (inductor) buys on CPU threads: the demo preset's training step (the
model's forward on every head, the losses of eq. (8), backward) and the all-head predict of the demo model, eager
and compiled timed alternately in one run; prints the compile time and the largest difference to eager.
Section `data`: SyntheticFaces items/s at several sizes, RecordIO random reads/s (with and without JPEG decode),
and the 112-px and 512-px training transforms; per wall-clock second and per CPU-second of this process.
Section `train` (bench_train.py): one default-run training step per process, split into data (drawing, cache +
collation), encoder, decoder, pixel decoder + heads, losses, backward, optimiser and the gradient all-reduce;
`--world` processes with one thread each (gloo), as `torchrun --nproc_per_node=2 train.py` runs them. CPU time per
process (time.process_time), so other jobs on the machine do not inflate it; the all-reduce also in wall-clock time.
"""
import argparse
import io
import os
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn

import decoder
import ops
from bench_data import add_parser as add_loaders_parser, section_loaders
from bench_train import cpu_time, section_compile, section_train
from data.dataset_io import decode_image
from data.recordio import RecordIOReader, pack_irheader, unpack_irheader, write_recordio
from data.synthetic import SyntheticFaces
from data.transforms import DenseTransform, GlobalTransform
from model import TASKS, Faceptor, FaceptorConfig

ATTN_112 = (101, 40, 7)       # age, attributes, expression
ATTN_512 = (19, 68)           # parsing, landmarks
D, HEADS, LEVELS = 256, 8, 6


def gpu_time(fns, reps):
    from triton.testing import do_bench
    return {k: do_bench(fn, warmup=max(reps, 5), rep=50 * reps // 5 + 25) for k, fn in fns.items()}  # median ms


def row(label, times, base):
    """times: {path: ms}; ratios against `base`."""
    cells = "  ".join(f"{k} {v:9.2f} ms" for k, v in times.items())
    ratios = "  ".join(f"{base}/{k} {times[base] / v:6.2f}x" for k, v in times.items() if k != base)
    print(f"{label:<44s} {cells}   {ratios}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
def bench_heatmap(device, batches, dtypes, reps, timer):
    print(f"\n## heatmap -> coordinates ({device}), K=68, 128x128: ext vs ref (ratio = ref / ext)")
    if not ops._ext_supports(torch.device(device)):
        print(f"  skipped: the extension has no {device} kernel ({ops.BUILD_HINT})")
        return
    for dtype in dtypes:
        for B in batches:
            x = torch.randn(B, 68, 128, 128, device=device).to(dtype)
            xg = x.clone().requires_grad_()
            g = torch.randn(B, 68, 2, device=device)
            for mode in ("fwd", "fwd+bwd"):
                fns = {}
                for impl in ("ref", "ext"):
                    if mode == "fwd":
                        fns[impl] = lambda impl=impl: ops.heatmap_to_coords(x, impl=impl)
                    else:
                        def fn(impl=impl):
                            ops.heatmap_to_coords(xg, impl=impl).backward(g)
                            xg.grad = None
                        fns[impl] = fn
                times = timer(fns, reps)
                row(f"B={B:<3d} {str(dtype)[6:]:<8s} {mode}", times, "ref")


# ---------------------------------------------------------------------------------------------------------------
class AuthorsCrossAttention(nn.Module):
    """The official code's cross-attention: nn.MultiheadAttention (seq-first, need_weights=True, averaged map kept)
    run once per task head over keys F^ + L_t + P and values F^, then residual + LayerNorm (post-norm)."""

    def __init__(self, layer: decoder.CrossAttentionLayer):
        super().__init__()
        self.mha = nn.MultiheadAttention(D, HEADS)
        self.mha.in_proj_weight, self.mha.in_proj_bias = layer.in_proj_weight, layer.in_proj_bias
        self.mha.out_proj, self.norm = layer.out_proj, layer.norm

    def forward(self, tgt, query_pos, mem, pos, levels, tasks):
        outs, start = [], 0
        value = mem.flatten(1, 2).transpose(0, 1)                                   # [L*HW, B, d]
        for t, n in enumerate(tasks):
            key = (mem + levels[t][None, :, None] + pos).flatten(1, 2).transpose(0, 1)   # [L*HW, B, d]
            q = (tgt + query_pos)[:, start:start + n].transpose(0, 1)               # [N_t, B, d]
            o, weights = self.mha(q, key, value, need_weights=True)
            self.memory = weights.clone()                                           # as the official code keeps it
            outs.append(o.transpose(0, 1))
            start += n
        return self.norm(tgt + torch.cat(outs, 1))


def attention_case(B, HW, tasks, device, dtype, fused=None):
    """{path: fn} for one cross-attention layer; "fused" (the registered op) by default only on CUDA."""
    layer = decoder.CrossAttentionLayer(D, HEADS).to(device)
    nn.init.normal_(layer.in_proj_weight, std=D ** -0.5)
    layer = layer.to(dtype)
    authors = AuthorsCrossAttention(layer)
    nq = sum(tasks)
    levels = [torch.randn(LEVELS, D, device=device, dtype=dtype) for _ in tasks]
    groups, start = [], 0
    for t, n in enumerate(tasks):
        groups.append(decoder.QueryGroup(start, start + n, memory=0, level=levels[t]))
        start += n
    tgt = torch.randn(B, nq, D, device=device, dtype=dtype, requires_grad=True)
    qpos = torch.randn(B, nq, D, device=device, dtype=dtype)
    mem = torch.randn(B, LEVELS, HW, D, device=device, dtype=dtype, requires_grad=True)
    pos = torch.randn(HW, D, device=device, dtype=dtype)
    paths = {
        "authors": lambda: authors(tgt, qpos, mem, pos, levels, tasks),
        "grouped": lambda: layer(tgt, qpos, [mem], [pos], groups, impl="ref"),
    }
    if fused or (fused is None and device == "cuda"):
        paths["fused"] = lambda: layer(tgt, qpos, [mem], [pos], groups, impl="fused")
    return paths, (tgt, mem)


def bench_attention(device, cases, dtypes, modes, reps, timer, floors=False):
    print(f"\n## decoder cross-attention, one layer ({device}): ratios against the authors' style")
    for dtype in dtypes:
        for B, HW, tasks in cases:
            paths, leaves = attention_case(B, HW, tasks, device, dtype)
            for mode in modes:
                calls = {}
                for name, fn in paths.items():
                    if mode == "fwd":
                        calls[name] = fn
                    else:
                        def call(fn=fn):
                            fn().float().sum().backward()
                            for t in leaves:
                                t.grad = None
                        calls[name] = call
                with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                    times = timer(calls, reps)
                label = f"B={B:<3d} HW={HW:<5d} Nq={'+'.join(map(str, tasks))} {str(dtype)[6:]} {mode}"
                row(label, times, "authors")
                if "fused" in times:
                    print(f"{'':44s} fused vs unfused SDPA (grouped): {times['grouped'] / times['fused']:.2f}x")
                if floors and mode == "fwd":
                    nq = sum(tasks)
                    exps = B * HEADS * nq * LEVELS * HW
                    mma = 4 * B * nq * LEVELS * HW * D
                    t_exp, t_mma = exps / 3.9e12 * 1e3, mma / 790e12 * 1e3
                    print(f"{'':44s} attention-core floors: exp {t_exp:.3f} ms, MMA {t_mma:.3f} ms; fused layer "
                          f"at {max(t_exp, t_mma) / times['fused']:.2%} of the larger floor")


# -- section data

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


def section_data(args):
    """SyntheticFaces items/s per core at several sizes, RecordIO random reads/s, the augmentation pipelines."""
    torch.set_num_threads(args.threads)
    bench_synthetic(args.sizes, args.seconds)
    bench_recordio(args.records, args.seconds)
    bench_transforms(args.seconds)


def section_ops(args):
    """Heatmap op and decoder cross-attention, CPU and (when present) GPU."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} CPU threads, extension built: {ops.HAVE_EXT}, "
          f"triton: {ops.HAVE_TRITON}, CUDA: {torch.cuda.is_available()}")

    if args.only != "gpu":
        bench_heatmap("cpu", args.heatmap_batch, [torch.float32], args.reps, cpu_time)
        cases = [(B, 49, ATTN_112) for B in args.attn_batch] + [(B, 1024, ATTN_512) for B in args.attn_batch]
        bench_attention("cpu", cases, [torch.float32], args.attn_modes, max(3, args.reps // 2), cpu_time)

    if args.only != "cpu":
        if not torch.cuda.is_available():
            print("\n## GPU sections skipped: no CUDA device")
            return
        print(f"\nGPU: {torch.cuda.get_device_name()}")
        all_tasks = ATTN_112 + ATTN_512                                           # 235 queries in one launch
        cases = [(B, HW, all_tasks) for B in (1, 64) for HW in (1024, 49)]
        bench_attention("cuda", cases, [torch.bfloat16, torch.float16], ["fwd", "fwd+bwd"], args.reps, gpu_time,
                        floors=True)
        bench_heatmap("cuda", [64], [torch.float32, torch.bfloat16], args.reps, gpu_time)



def section_predict(args):
    """Faceptor.predict (all heads, one pass) vs the authors' way (encoder + decoder once per head)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = getattr(FaceptorConfig, args.preset)()
    model = Faceptor(cfg).eval().requires_grad_(False)
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
    # counted on the meta device: CPU's fused attention kernel is invisible to the FLOP counter, the meta one is not
    with torch.device("meta"):
        meta = Faceptor(cfg).eval().requires_grad_(False)
        m512, m112 = torch.empty_like(x512, device="meta"), torch.empty_like(x112, device="meta")
    flops = {"predict": count_flops(lambda: meta.predict(images_512=m512, images_112=m112)),
             "per-head": count_flops(lambda: [meta(m512 if TASKS[t].size == 512 else m112, t) for t in cfg.tasks]),
             "encoders": count_flops(lambda: (meta.encoder(m512), meta.encoder(m112)))}
    gflops = matmul_rate(args.threads)
    print(f"  arithmetic: predict {flops['predict'] / 1e9:.1f} GFLOP, per-head {flops['per-head'] / 1e9:.1f} GFLOP "
          f"(ratio {flops['per-head'] / flops['predict']:.2f}), the two encoders alone {flops['encoders'] / 1e9:.1f}")
    floor = flops["encoders"] / (gflops * 1e9)
    print(f"  fp32 matmul 4096^3 on {args.threads} threads: {gflops:.1f} GFLOP/s -> encoder floor "
          f"{floor * 1000:.1f} ms; predict runs at {flops['predict'] / med['predict'] / 1e9:.1f} GFLOP/s, "
          f"{med['predict'] / floor:.2f}x the floor")


def count_flops(fn) -> int:
    """Floating-point operations of fn() (torch.utils.flop_counter; matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_rate(threads: int, n: int = 4096, reps: int = 3) -> float:
    """GFLOP/s of a large fp32 matmul on this many threads: the machine's practical arithmetic ceiling."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9



def pipeline_photos(folder: str, n: int):
    """n 640x480 photos: the astronaut test photo at random scale and place on a grey gradient."""
    from PIL import Image
    src = Image.open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", "data", "astronaut_256.png"))
    rng = np.random.default_rng(0)
    ramp = np.linspace(60, 200, 640, dtype=np.float32)[None, :, None].repeat(480, 0).repeat(3, 2)
    for i in range(n):
        side = int(rng.integers(200, 420))
        canvas = Image.fromarray(ramp.astype(np.uint8))
        canvas.paste(src.convert("RGB").resize((side, side), Image.Resampling.BILINEAR),
                     (int(rng.integers(0, 640 - side)), int(rng.integers(0, 480 - side))))
        canvas.save(os.path.join(folder, f"photo_{i:03d}.jpg"), quality=92)


def section_pipeline(args):
    """predict.py's whole pipeline, faces/s and stage shares; MTCNN alone on a 640x480 photo."""
    import detect
    import framing
    import predict
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = getattr(FaceptorConfig, args.preset)()
    model = Faceptor(model).eval()
    framings = framing.head_framings(model.cfg.tasks, {"data": "synthetic"} if args.synthetic_framing else None)
    with tempfile.TemporaryDirectory() as tmp:
        pipeline_photos(tmp, args.photos)
        out = os.path.join(tmp, "out")
        pargs = predict.parse_args(["-", tmp, "--out-dir", out, "--batch-size", str(args.batch), "--no-draw"])
        det = detect.MTCNN.from_weights(args.detector_weights)
        photo = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(os.path.join(tmp, "photo_000.jpg")))
        det.detect(photo)                                                           # warm-up
        predict.process(model, framings, list(model.cfg.tasks), predict.parse_args(
            ["-", os.path.join(tmp, "photo_000.jpg"), "--out-dir", out, "--no-draw"]), det)
        t0, c0 = time.perf_counter(), time.process_time()
        failed, n_img, n_faces, timer, _ = predict.process(model, framings, list(model.cfg.tasks), pargs, det)
        wall, cpu_all = time.perf_counter() - t0, time.process_time() - c0
        times, cpu = [], []
        for _ in range(args.repeats):
            t, c = time.perf_counter(), time.process_time()
            det.detect(photo)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    groups = len(set(framings.values()))
    print(f"pipeline: Faceptor-{args.preset} ({len(model.cfg.tasks)} heads, {groups} framings), random weights, "
          f"{args.threads} threads, fp32, batch {args.batch}")
    print(f"  {n_img} photos 640x480, {n_faces} faces, {failed} failed: {wall:.2f} s, {n_faces / wall:.3f} faces/s "
          f"({cpu_all:.2f} CPU-seconds of this process, {cpu_all / max(n_faces, 1):.2f} per face)")
    total = sum(timer.values())
    print("  stages: " + ", ".join(f"{k} {v / total:.1%}" for k, v in timer.items()))
    print(f"  MTCNN alone, 640x480, median of {args.repeats}: {statistics.median(times) * 1000:.1f} ms wall "
          f"(min {min(times) * 1000:.1f} ms), {statistics.median(cpu) * 1000:.1f} ms CPU time of this process")
    print(f"  load average during the run: {os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} CPUs")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="section", required=True)
    p = sub.add_parser("ops", help=section_ops.__doc__)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--reps", type=int, default=7, help="timed repetitions per point (median reported)")
    p.add_argument("--heatmap-batch", type=int, nargs="+", default=[4, 64], help="B for the heatmap op")
    p.add_argument("--attn-batch", type=int, nargs="+", default=[1, 8], help="B for the CPU cross-attention")
    p.add_argument("--attn-modes", nargs="+", default=["fwd"], choices=["fwd", "fwd+bwd"],
                   help="CPU cross-attention modes")
    p.add_argument("--only", choices=["cpu", "gpu"], default=None, help="run only the CPU or the GPU sections")
    p = sub.add_parser("predict", help=section_predict.__doc__)
    p.add_argument("--preset", default="base", choices=["base", "full", "tiny"], help="model configuration")
    p.add_argument("--batch", type=int, default=1, help="faces per call")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions of each path (after one warm-up)")
    p = sub.add_parser("data", help=section_data.__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[48, 64, 96, 112, 128, 512],
                   help="SyntheticFaces image sizes to time")
    p.add_argument("--seconds", type=float, default=2.0, help="time spent on each measurement")
    p.add_argument("--records", type=int, default=20000, help="number of records in the temporary .rec file")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 = per-core numbers)")
    add_loaders_parser(sub)
    p = sub.add_parser("pipeline", help=section_pipeline.__doc__)
    p.add_argument("--preset", default="base", choices=["base", "full", "tiny"], help="model configuration")
    p.add_argument("--photos", type=int, default=8, help="photos in the folder (one face each)")
    p.add_argument("--batch", type=int, default=8, help="faces per model call")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=11, help="timed MTCNN runs on one photo (median reported)")
    p.add_argument("--synthetic-framing", action="store_true",
                   help="the framings of a SyntheticFaces checkpoint (2 encoder passes) instead of the real ones")
    p.add_argument("--detector-weights", default=None, help="folder with MTCNN pnet.pt, rnet.pt, onet.pt")
    p = sub.add_parser("train", help=section_train.__doc__)
    p.add_argument("--preset", default="demo", choices=["demo", "demo-long"], help="training preset (stage 1)")
    p.add_argument("--world", type=int, default=2, help="processes (one thread each), as torchrun would start")
    p.add_argument("--steps", type=int, default=10, help="timed steps (averaged)")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first (allocations, lazy init)")
    p = sub.add_parser("compile", help=section_compile.__doc__)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--batch", type=int, default=4, help="images per task head (training step) and faces (predict)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions of each path (median reported)")
    args = ap.parse_args()
    {"ops": section_ops, "predict": section_predict, "data": section_data, "loaders": section_loaders,
     "pipeline": section_pipeline, "train": section_train, "compile": section_compile}[args.section](args)


if __name__ == "__main__":
    main()
