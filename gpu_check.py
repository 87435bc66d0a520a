"""The GPU check: one command that builds the CUDA extension, runs the GPU tests and measures the GPU path.

    python gpu_check.py --out gpu_results              # on a CUDA machine (budget: 8 minutes on one H200; not yet run)
    python gpu_check.py --out OUT --dry-run            # the same code at tiny sizes on CPU (tests run this)

Steps, each recorded in DIR/gpu_check.json (an error in one step is recorded and the next step still runs):
  1. environment: torch, triton, CUDA, device and capability; Triton must not be interpreted on a GPU;
  2. `python setup.py build_ext --inplace` for this device's arch, then the CUDA heatmap op must be in use;
  3. the GPU tests, `pytest -m gpu tests/test_gpu.py` with TRITON_INTERPRET=0 (pass / fail / skip counts);
  4. one decoder cross-attention layer (eqs. 6-7, projections included), bf16, B=64, HW=1024, 235 queries:
     fused Triton vs unfused SDPA vs the authors' style (nn.MultiheadAttention, need_weights=True, once per task
     head), fwd and fwd+bwd, medians of device-event timings, and the fused layer's fraction of the floor;
  5. all-head `Faceptor.predict`, Faceptor-Base, bf16 autocast: batch 1 eager / torch.compile / CUDA graph, and
     faces/s at batch 64;
  6. a Faceptor-Base stage-1 training step at the Table 2 Base batch (n_t per GPU as in the faceptor-base preset),
     bf16 autocast, AdamW, on fixed synthetic tensors: step time, peak memory, loss finite and falling over 20 steps.
Writes DIR/gpu_check.json and DIR/gpu_check.md (markdown rows for BENCHMARKS.md). Installs nothing.

Floors of the fused layer (per layer, stated in the JSON): attention-core exps B*H*Nq*6*HW at 3.9e12 exp/s (MUFU,
an estimate), MMA 4*B*Nq*6*HW*d FLOPs (fwd; x2.5 for fwd+bwd) at 790e12 FLOP/s bf16, and the K/V projection
4*B*6*HW*d^2 FLOPs at the same MMA peak; the floor is the larger of exp and MMA time plus the projection time.
"""
import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.abspath(__file__))
PEAK = dict(mma_flops=790e12, exp_per_s=3.9e12, bytes_per_s=4.3e12)     # H200 bf16 MMA, MUFU exp (est.), HBM


# ---------------------------------------------------------------------------------------------------------------
# Timing (synthetic inputs and the training step come from bench_train.py, shared with bench.py's sections)
def timed(fn, reps, cuda):
    """Median ms of fn() over reps calls after 2 warm-ups; device events on CUDA, perf_counter on CPU."""
    import torch
    for _ in range(2):
        fn()
    ts = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


# ---------------------------------------------------------------------------------------------------------------
# Steps
def step_env(dry):
    import torch
    import triton
    import ops_triton
    info = dict(torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                capability=list(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None,
                triton_interpreted=ops_triton.INTERPRET, dry_run=dry)
    if not dry and (not torch.cuda.is_available() or ops_triton.INTERPRET):
        raise RuntimeError("a GPU run needs a CUDA device and TRITON_INTERPRET unset or 0; use --dry-run on CPU")
    return info


def step_build(dry):
    import torch
    env = dict(os.environ, MAX_JOBS=str(os.cpu_count() or 4))
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        env.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    t = time.time()
    res = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError("setup.py build_ext failed:\n" + res.stderr[-3000:])
    return dict(seconds=round(time.time() - t, 1))


def step_ext_in_use():
    import torch
    import ops
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not ops._ext_supports(dev):
        raise RuntimeError(f"the faceptor extension has no {dev.type} kernel after the build")
    return dict(ext_device=dev.type)


def step_tests(out_dir):
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=ROOT)
    xml = os.path.join(out_dir, "gpu_tests.xml")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider",
                          f"--junitxml={xml}", os.path.join("tests", "test_gpu.py")],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", res.stdout)}
    return dict(returncode=res.returncode, **counts, tail=res.stdout[-2500:])


def step_attention(dry, reps):
    import torch
    import bench
    cuda = torch.cuda.is_available()
    B, HW, dtype = (1, 16, torch.float32) if dry else (64, 1024, torch.bfloat16)
    tasks = bench.ATTN_112 + bench.ATTN_512                                           # 235 queries
    # fused: the registered op (Triton on CUDA; its reference kernel in a CPU dry run)
    paths, leaves = bench.attention_case(B, HW, tasks, "cuda" if cuda else "cpu", dtype, fused=True)
    out = dict(B=B, HW=HW, Nq=sum(tasks), dtype=str(dtype)[6:])
    for mode in ("fwd", "fwd+bwd"):
        times = {}
        for name, fn in paths.items():
            def call(fn=fn):
                if mode == "fwd":
                    with torch.no_grad():
                        fn()
                else:
                    fn().float().sum().backward()
                    for t in leaves:
                        t.grad = None
            times[name] = timed(call, reps, cuda)
        out[mode] = times
    nq, d = sum(tasks), bench.D
    exps = B * bench.HEADS * nq * bench.LEVELS * HW
    core = 4 * B * nq * bench.LEVELS * HW * d
    proj = 4 * B * bench.LEVELS * HW * d * d
    for mode, k in (("fwd", 1.0), ("fwd+bwd", 2.5)):
        floor = (max(k * exps / PEAK["exp_per_s"], k * core / PEAK["mma_flops"]) + k * proj / PEAK["mma_flops"]) * 1e3
        out[f"floor_ms_{mode}"] = floor
        t = out[mode]
        if "fused" in t:
            out[f"fused_fraction_of_floor_{mode}"] = floor / t["fused"]
            out[f"fused_vs_sdpa_{mode}"] = t["grouped"] / t["fused"]
            out[f"fused_vs_authors_{mode}"] = t["authors"] / t["fused"]
    out["floor_inputs"] = dict(exps=exps, core_flops_fwd=core, proj_flops_fwd=proj, **PEAK)
    return out


def _predict_inputs(cfg, B, device):
    import torch
    return (torch.randn(B, 3, cfg.size_512, cfg.size_512, device=device),
            torch.randn(B, 3, cfg.size_112, cfg.size_112, device=device))


def step_predict(dry, reps):
    """All-head predict at batch 1 (eager, compiled, CUDA graph) and faces/s at the large batch."""
    import torch
    from model import Faceptor, FaceptorConfig
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    cfg = FaceptorConfig.tiny() if dry else FaceptorConfig.base()
    model = Faceptor(cfg).to(device).eval()
    dtype = torch.bfloat16 if cuda else torch.float32
    compiled = torch.compile(model.predict)
    out = dict(model="tiny" if dry else "base", dtype=str(dtype)[6:], heads=len(cfg.tasks))

    def runner(fn, x512, x112):
        def call():
            with torch.autocast(device, dtype=dtype, enabled=cuda):
                return fn(images_512=x512, images_112=x112)
        return call

    x512, x112 = _predict_inputs(cfg, 1, device)
    out["b1_eager_ms"] = timed(runner(model.predict, x512, x112), reps, cuda)
    out["b1_compiled_ms"] = timed(runner(compiled, x512, x112), reps, cuda)
    eager, comp = runner(model.predict, x512, x112)(), runner(compiled, x512, x112)()
    out["compiled_vs_eager_max_abs"] = max((eager[t][k].float() - comp[t][k].float()).abs().max().item()
                                           for t in eager for k in eager[t])
    if cuda:
        call = runner(model.predict, x512, x112)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                call()                                                    # warm-up (Triton and cuBLAS set-up)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = call()
        out["b1_cuda_graph_ms"] = timed(graph.replay, reps, cuda)
        out["cuda_graph_vs_eager_max_abs"] = max((static[t][k].float() - eager[t][k].float()).abs().max().item()
                                                 for t in eager for k in eager[t])
    big = 2 if dry else 64
    x512, x112 = _predict_inputs(cfg, big, device)
    ms = min(timed(runner(model.predict, x512, x112), reps, cuda), timed(runner(compiled, x512, x112), reps, cuda))
    out[f"b{big}_ms"] = ms
    out[f"b{big}_faces_per_s"] = big / ms * 1e3
    return out


def step_train(dry, steps):
    """Stage-1 step of Faceptor-Base at the Table 2 Base batch, bf16 autocast, on fixed synthetic tensors."""
    import torch
    from bench_train import synthetic_batches, training_setup
    import losses
    import train_config
    from model import FaceptorConfig
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if dry:
        mcfg = FaceptorConfig.tiny(tasks=tuple(train_config.BASE_HEADS))
        heads = {h: [2, a] for h, (_n, a) in train_config.BASE_HEADS.items()}
        identities = 100
    else:
        mcfg = train_config.model_config(train_config.PRESETS["faceptor-base"], stage=1)
        heads = train_config.PRESETS["faceptor-base"].heads
        identities = 93431                                                # MS1MV3 identities (CosFace classes)
    model, step_module, weights = training_setup(mcfg, heads, device, identities)
    batches = synthetic_batches(heads, mcfg, device, identities=identities)
    opt = torch.optim.AdamW(step_module.parameters(), lr=1e-4, weight_decay=0.05)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses_seen, times = [], []
    for _ in range(steps):
        t = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = losses.multitask_loss(step_module(batches), weights)                  # Eq. (8)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses_seen.append(loss.item())                                   # .item() synchronises the device
        times.append((time.perf_counter() - t) * 1e3)
    finite = all(map(lambda v: v == v and abs(v) != float("inf"), losses_seen))
    return dict(model="tiny" if dry else "base", images_per_step=sum(n for n, _ in heads.values()),
                heads={h: n for h, (n, _a) in heads.items()}, steps=steps,
                step_ms_median=statistics.median(times[2:] if steps > 4 else times),
                peak_memory_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
                loss_first=losses_seen[0], loss_last=losses_seen[-1], losses=losses_seen,
                loss_finite=finite, loss_falling=finite and losses_seen[-1] < losses_seen[0])


# ---------------------------------------------------------------------------------------------------------------
# Report
def markdown(res):
    """Rows for BENCHMARKS.md from the JSON result."""
    env = res.get("env", {})
    lines = [f"GPU check {res['date']}: {env.get('device')}, torch {env.get('torch')}, triton {env.get('triton')}, "
             f"CUDA {env.get('cuda')}; `python gpu_check.py --out DIR`{' --dry-run' if env.get('dry_run') else ''}",
             ""]
    t = res.get("tests", {})
    if "returncode" in t:
        lines += [f"GPU tests (`pytest -m gpu`): {t.get('passed', 0)} passed, {t.get('failed', 0)} failed, "
                  f"{t.get('skipped', 0)} skipped", ""]
    a = res.get("attention", {})
    if "fwd" in a:
        lines += [f"| cross-attention layer, B={a['B']}, HW={a['HW']}, Nq={a['Nq']}, {a['dtype']} | fused ms | "
                  f"unfused SDPA ms | authors' ms | fused vs SDPA | fused vs authors | floor ms | of floor |",
                  "|---|---|---|---|---|---|---|---|"]
        for mode in ("fwd", "fwd+bwd"):
            m = a[mode]
            lines.append(f"| {mode} | {m['fused']:.3f} | {m['grouped']:.3f} | {m['authors']:.3f} | "
                         f"{m['grouped'] / m['fused']:.2f}x | {m['authors'] / m['fused']:.2f}x | "
                         f"{a[f'floor_ms_{mode}']:.3f} | {a[f'floor_ms_{mode}'] / m['fused']:.1%} |")
        lines.append("")
    p = res.get("predict", {})
    if "b1_eager_ms" in p:
        big = [k for k in p if k.endswith("_faces_per_s")][0]
        lines += ["| all-head predict | batch 1 eager ms | compiled ms | CUDA graph ms | large batch faces/s |",
                  "|---|---|---|---|---|",
                  f"| Faceptor-{p['model']}, {p['heads']} heads, {p['dtype']} | {p['b1_eager_ms']:.2f} | "
                  f"{p['b1_compiled_ms']:.2f} | {p.get('b1_cuda_graph_ms', float('nan')):.2f} | "
                  f"{p[big]:.0f} ({big.split('_')[0]}) |", ""]
    tr = res.get("train", {})
    if "step_ms_median" in tr:
        mem = f"{tr['peak_memory_gib']:.1f} GiB" if tr["peak_memory_gib"] is not None else "n/a"
        lines += [f"Stage-1 step, Faceptor-{tr['model']}, {tr['images_per_step']} images/step: "
                  f"{tr['step_ms_median']:.1f} ms (median of {tr['steps']}), peak memory {mem}, loss "
                  f"{tr['loss_first']:.3f} -> {tr['loss_last']:.3f} (finite: {tr['loss_finite']}, "
                  f"falling: {tr['loss_falling']})", ""]
    errors = {k: v["error"].splitlines()[-1] for k, v in res.items() if isinstance(v, dict) and "error" in v}
    lines += [f"Step `{k}` failed: {v}" for k, v in errors.items()]
    return "\n".join(lines) + "\n"


def run(args):
    os.makedirs(args.out, exist_ok=True)
    res = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), command=" ".join(sys.argv))
    json_path = os.path.join(args.out, "gpu_check.json")
    reps = 3 if args.dry_run else args.reps
    steps = [("env", lambda: step_env(args.dry_run))]
    if not args.skip_build:
        steps.append(("build", lambda: step_build(args.dry_run)))
    steps += [("ext", step_ext_in_use), ("tests", lambda: step_tests(args.out)),
              ("attention", lambda: step_attention(args.dry_run, reps)),
              ("predict", lambda: step_predict(args.dry_run, reps)),
              ("train", lambda: step_train(args.dry_run, 5 if args.dry_run else args.train_steps))]
    t0 = time.time()
    for name, fn in steps:
        t = time.time()
        try:
            res[name] = fn()
        except Exception:                                            # recorded; the remaining steps still run
            res[name] = dict(error=traceback.format_exc()[-4000:])
        res[name]["seconds"] = round(time.time() - t, 1)
        print(f"[gpu_check] {name}: {round(time.time() - t, 1)} s{' ERROR' if 'error' in res[name] else ''}",
              flush=True)
        with open(json_path, "w") as f:                              # after every step: a timeout keeps the rest
            json.dump(res, f, indent=1)
        if name == "env" and "error" in res[name]:
            break
    res["total_seconds"] = round(time.time() - t0, 1)
    with open(json_path, "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(markdown(res))
    print(markdown(res))
    failed_tests = res.get("tests", {}).get("returncode", 0) != 0
    return 1 if failed_tests or any(isinstance(v, dict) and "error" in v for v in res.values()) else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md and gpu_tests.xml")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny sizes on CPU (Triton interpreted, reference kernels in the registered ops)")
    ap.add_argument("--skip-build", action="store_true", help="use the extension already built in place")
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions per GPU measurement (median)")
    ap.add_argument("--train-steps", type=int, default=20, help="training steps of the Base stage-1 check")
    args = ap.parse_args(argv)
    # before triton is imported: compiled kernels on a GPU, the interpreter in a CPU dry run
    os.environ["TRITON_INTERPRET"] = "1" if args.dry_run else "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.path.insert(0, ROOT)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
