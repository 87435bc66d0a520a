"""Benchmarks of the fast ops, side by side in one run; prints times and ratios (results go to BENCHMARKS.md).

    python bench.py                         # CPU sections (2 threads), and the GPU sections when CUDA is available
    python bench.py --threads 2 --reps 7 --attn-batch 1 8
    python bench.py --only gpu              # GPU sections only

CPU:
  * heatmap -> coordinates (eq. 9): C++ op vs PyTorch reference, B in {4, 64}, K = 68, 128x128, fwd and fwd+bwd.
  * decoder cross-attention (eqs. 6-7, one layer incl. projections, out_proj, norm) at the paper's shapes:
    grouped reference path of decoder.CrossAttentionLayer (per task head: K = F^ + P + L_t materialised, SDPA)
    vs the authors' style (nn.MultiheadAttention with need_weights=True, one decode per task head).
    112 px: HW = 49, 148 queries = 101 (age) + 40 (attributes) + 7 (expression); 512 px: HW = 1024, 87 queries
    = 19 (parsing) + 68 (landmarks); 6 layers of memory, d = 256, 8 heads.
GPU (only when CUDA is available):
  * the same cross-attention layer: fused Triton ("fused") vs unfused SDPA ("ref" path) vs authors' style,
    fwd and fwd+bwd, B in {1, 64}, HW 1024 / 49 with all 235 queries, bf16 and fp16, and the fraction of the
    attention-core floors of KERNELS.md §2;
  * heatmap CUDA op vs reference, fp32 and bf16.
"""
import argparse
import statistics
import time

import torch
import torch.nn as nn

import decoder
import ops

TASKS_112 = (101, 40, 7)       # age, attributes, expression
TASKS_512 = (19, 68)           # parsing, landmarks
D, HEADS, LEVELS = 256, 8, 6


def cpu_time(fns, reps):
    """{path: fn} -> {path: median ms}. The paths are interleaved rep by rep, so a busy machine slows them alike."""
    ts = {k: [] for k in fns}
    for fn in fns.values():
        fn()                                                          # warm-up (allocations, lazy init)
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in ts.items()}


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


def attention_case(B, HW, tasks, device, dtype):
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
    if device == "cuda":
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--reps", type=int, default=7, help="timed repetitions per point (median reported)")
    p.add_argument("--heatmap-batch", type=int, nargs="+", default=[4, 64], help="B for the heatmap op")
    p.add_argument("--attn-batch", type=int, nargs="+", default=[1, 8], help="B for the CPU cross-attention")
    p.add_argument("--attn-modes", nargs="+", default=["fwd"], choices=["fwd", "fwd+bwd"],
                   help="CPU cross-attention modes")
    p.add_argument("--only", choices=["cpu", "gpu"], default=None, help="run only the CPU or the GPU sections")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} CPU threads, extension built: {ops.HAVE_EXT}, "
          f"triton: {ops.HAVE_TRITON}, CUDA: {torch.cuda.is_available()}")

    if args.only != "gpu":
        bench_heatmap("cpu", args.heatmap_batch, [torch.float32], args.reps, cpu_time)
        cases = [(B, 49, TASKS_112) for B in args.attn_batch] + [(B, 1024, TASKS_512) for B in args.attn_batch]
        bench_attention("cpu", cases, [torch.float32], args.attn_modes, max(3, args.reps // 2), cpu_time)

    if args.only != "cpu":
        if not torch.cuda.is_available():
            print("\n## GPU sections skipped: no CUDA device")
            return
        print(f"\nGPU: {torch.cuda.get_device_name()}")
        all_tasks = TASKS_112 + TASKS_512                                           # 235 queries in one launch
        cases = [(B, HW, all_tasks) for B in (1, 64) for HW in (1024, 49)]
        bench_attention("cuda", cases, [torch.bfloat16, torch.float16], ["fwd", "fwd+bwd"], args.reps, gpu_time,
                        floors=True)
        bench_heatmap("cuda", [64], [torch.float32, torch.bfloat16], args.reps, gpu_time)


if __name__ == "__main__":
    main()
