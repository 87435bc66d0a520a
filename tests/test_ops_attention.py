"""Tests of the fused Layer-Attention cross-attention (ops.layer_attention, ops_triton.py).

The Triton kernels run under TRITON_INTERPRET=1 on CPU (set in conftest.py), against a float64 reference:
outputs and all five gradients (dQ, dKF, dKP, dV, dLB), masked layers and all-masked rows, out-of-bounds reads
(NaN sentinels), an end-to-end check against nn.MultiheadAttention run once per task head, and an ahead-of-time
compile of every shipped kernel config for sm_90 (catches what the interpreter does not check).
"""
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, strategies as st

import ops
from test_ops import assert_close_normwise

pytestmark = pytest.mark.skipif(not ops.HAVE_TRITON, reason="triton is not installed")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
NAMES = ("out", "dq", "dkf", "dkp", "dv", "dlb")


def make_inputs(B, H, NQ, NL, HW, dh, dtype, shared_kp=True, masked=(), gen=None, views=False):
    """Random inputs in float64, rounded to dtype. masked: layers whose bias is -inf for every query.
    views=True builds kf / v as head-split views of a [B, L, HW, H*dh] projection (the decoder's layout)."""
    gen = gen or torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)   # noqa: E731
    q = r(B, H, NQ, dh)
    if views:
        kf = r(B, NL, HW, H * dh).view(B, NL, HW, H, dh).permute(0, 3, 1, 2, 4)   # [B, H, L, HW, dh] view
        v = r(B, NL, HW, H * dh).view(B, NL, HW, H, dh).permute(0, 3, 1, 2, 4)
    else:
        kf, v = r(B, H, NL, HW, dh), r(B, H, NL, HW, dh)
    kp = r(H, HW, dh) if shared_kp else r(B, H, HW, dh)
    lb = r(B, H, NQ, NL)
    for j in masked:
        lb[..., j] = float("-inf")
    return [t.to(dtype) for t in (q, kf, kp, v, lb)]


def run(impl, inputs, grad_out, **kw):
    """Output and gradients w.r.t. every input."""
    xs = [t.detach().requires_grad_() for t in inputs]
    out = ops.layer_attention(*xs, impl="triton", **kw) if impl == "triton-blocks" else \
        ops.layer_attention(*xs, impl=impl)
    grads = torch.autograd.grad(out, xs, grad_out.to(out.dtype))
    return [out.detach(), *grads]


def check_against_float64(inputs, grad_out, dtype, block_m, block_n, what):
    got = run("triton-blocks", inputs, grad_out, block_m=block_m, block_n=block_n)
    exp = run("ref", [t.detach().double() for t in inputs], grad_out.double())
    for name, a, b in zip(NAMES, got, exp):
        assert a.dtype == dtype and a.shape == b.shape, f"{what} {name}: {a.dtype} {tuple(a.shape)}"
        assert_close_normwise(a, b, TOL[dtype], what=f"{what} {name}")


@st.composite
def attention_cases(draw):
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    NQ = draw(st.one_of(st.integers(1, 70), st.sampled_from([1, 15, 16, 17, 49, 65])))
    HW = draw(st.one_of(st.integers(1, 64), st.sampled_from([1, 31, 33, 49])))
    NL = draw(st.integers(1, 6))
    dh = draw(st.sampled_from([16, 32, 24, 8]))         # 24 and 8: padded to BLOCK_D = 32 / 16
    blocks = draw(st.sampled_from([(64, 64), (16, 32), (32, 16)]))
    masked = draw(st.sets(st.integers(0, NL - 1), max_size=NL))    # may mask every layer: all-masked rows
    shared_kp, views = draw(st.booleans()), draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 16))
    return dict(B=B, H=H, NQ=NQ, NL=NL, HW=HW, dh=dh, shared_kp=shared_kp, masked=tuple(masked), views=views,
                seed=seed), blocks


def _check_case(case, blocks, dtype):
    gen = torch.Generator().manual_seed(case.pop("seed"))
    inputs = make_inputs(**case, dtype=dtype, gen=gen)
    grad_out = torch.randn(case["B"], case["H"], case["NQ"], case["dh"], generator=gen, dtype=torch.float64)
    check_against_float64(inputs, grad_out, dtype, *blocks, what=f"{dtype} {case} blocks {blocks}")


@given(attention_cases())
def test_triton_fp32_matches_float64_reference(case):
    _check_case(*case, dtype=torch.float32)


@given(attention_cases())
def test_triton_fp16_matches_float64_reference(case):
    _check_case(*case, dtype=torch.float16)


def test_triton_bf16_runs_interpreted():
    # bf16 tiles are widened to fp32 in the interpreter (its bf16 arithmetic is wrong); the bf16 dot path itself
    # is only checked on a GPU. Here: I/O in bf16, values vs float64 at the bf16 tolerance.
    inputs = make_inputs(2, 2, 23, 3, 49, 32, torch.bfloat16)
    check_against_float64(inputs, torch.randn(2, 2, 23, 32, dtype=torch.float64), torch.bfloat16, 16, 32, "bf16")


def test_triton_paper_shape_lite():
    # one head of the 512 px case: all 235 queries, 6 layers of 32x32 memory, dh = 32 (forward only)
    q, kf, kp, v, lb = make_inputs(1, 1, 235, 6, 1024, 32, torch.float32)
    out = ops.layer_attention(q, kf, kp, v, lb, impl="triton", block_m=128, block_n=128)
    exp = ops.layer_attention_ref(*(t.double() for t in (q, kf, kp, v, lb)))
    assert_close_normwise(out, exp, TOL[torch.float32], what="paper-shape-lite")


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_masked_layers_equal_attention_over_the_rest(impl):
    # LB = -inf on layers 1..5 (Layer-Attention off) must equal attention over layer 0 alone; a row with every
    # layer masked is finite and 0, and gets zero gradients
    q, kf, kp, v, lb = make_inputs(2, 2, 20, 6, 49, 32, torch.float32, masked=(1, 2, 3, 4, 5))
    lb[:, :, 3] = float("-inf")                                   # query 3: every key masked
    out = ops.layer_attention(q, kf, kp, v, lb, impl=impl)
    alone = ops.layer_attention_ref(q.double(), kf[:, :, :1].double(), kp.double(), v[:, :, :1].double(),
                                    lb[..., :1].double())
    alone[:, :, 3] = 0
    assert torch.isfinite(out).all()
    assert_close_normwise(out, alone, TOL[torch.float32], what=f"masked layers {impl}")
    xs = [t.requires_grad_() for t in (q, kf, kp, v, lb)]
    g = torch.autograd.grad(ops.layer_attention(*xs, impl=impl), xs, torch.randn_like(q))
    assert all(torch.isfinite(t).all() for t in g)
    assert (g[0][:, :, 3] == 0).all() and (g[4][..., 1:] == 0).all()
    assert (g[1][:, :, 1:] == 0).all() and (g[3][:, :, 1:] == 0).all()       # masked layers: dKF = dV = 0


def test_nan_sentinel_no_out_of_bounds_reads():
    # every input is a view into a NaN-filled buffer (padding before, after and between rows); sizes are off
    # every block size, dh = 24 < BLOCK_D = 32. Any read outside the views would make outputs or gradients NaN.
    B, H, NQ, NL, HW, dh = 2, 2, 19, 3, 37, 24
    vals = make_inputs(B, H, NQ, NL, HW, dh, torch.float32, shared_kp=False)

    def in_nan_buffer(t):
        buf = torch.full([s + 3 for s in t.shape], float("nan"), dtype=t.dtype)
        view = buf[tuple(slice(1, 1 + s) for s in t.shape)]
        view.copy_(t)
        return view

    for shared in (False, True):
        inputs = [in_nan_buffer(t) for t in vals]
        if shared:
            inputs[2] = in_nan_buffer(vals[2][0])
        grad_out = in_nan_buffer(torch.randn(B, H, NQ, dh))
        for blocks in ((16, 16), (64, 64)):
            got = run("triton-blocks", inputs, grad_out, block_m=blocks[0], block_n=blocks[1])
            exp = run("ref", [t.detach().double().contiguous() for t in inputs], grad_out.double().contiguous())
            for name, a, b in zip(NAMES, got, exp):
                assert torch.isfinite(a).all(), f"{name}: non-finite values (out-of-bounds read), blocks {blocks}"
                assert_close_normwise(a, b, TOL[torch.float32], what=f"nan sentinel {name} blocks {blocks}")


def test_end_to_end_against_multihead_attention_per_task():
    """Queries of 3 task heads in one launch vs nn.MultiheadAttention run once per task head (weights copied):
    checks the linear rewrite of eq. (7) keys F^ + L_t + P, the folding of b_k into KP and b_v after the op."""
    torch.manual_seed(0)
    d, nh, B, NL, HW, tasks = 64, 4, 2, 6, 20, (5, 11, 3)
    dh, T = d // nh, len(tasks)
    mha = torch.nn.MultiheadAttention(d, nh, batch_first=True).double()
    with torch.no_grad():
        mha.in_proj_bias.normal_()                               # non-zero b_q, b_k, b_v
        mha.out_proj.bias.normal_()
    F = torch.randn(B, NL, HW, d, dtype=torch.float64, requires_grad=True)      # projected memory F^
    P = torch.randn(HW, d, dtype=torch.float64, requires_grad=True)             # position P
    Lt = torch.randn(T, NL, d, dtype=torch.float64, requires_grad=True)         # per-task layer embedding L_t
    X = [torch.randn(B, n, d, dtype=torch.float64, requires_grad=True) for n in tasks]   # task queries
    leaves = [F, P, Lt, *X]

    # the authors' style: one attention per task head over keys F^ + L_t + P, values F^
    ref_out = []
    for t, x in enumerate(X):
        keys = (F + Lt[t][None, :, None, :] + P).flatten(1, 2)              # [B, 6*HW, d]
        ref_out.append(mha(x, keys, F.flatten(1, 2), need_weights=True)[0])
    ref_out = torch.cat(ref_out, 1)                                            # [B, sum N_t, d]
    g = torch.randn_like(ref_out)
    ref_grads = torch.autograd.grad(ref_out, leaves, g)

    Wq, Wk, Wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    task_of_query = torch.cat([torch.full((n,), t) for t, n in enumerate(tasks)])

    def fused(impl, dtype):
        x = torch.cat(X, 1)                                                    # [B, Nq, d] all tasks
        q = (x @ Wq.T + bq).unflatten(-1, (nh, dh)).transpose(1, 2)           # [B, H, Nq, dh]
        kf = (F @ Wk.T).unflatten(-1, (nh, dh)).permute(0, 3, 1, 2, 4)        # [B, H, L, HW, dh] view
        kp = (P @ Wk.T + bk).unflatten(-1, (nh, dh)).transpose(0, 1)          # [H, HW, dh], b_k folded
        kl = (Lt @ Wk.T).unflatten(-1, (nh, dh))                               # [T, L, H, dh]
        lb = torch.einsum("bhqd,qlhd->bhql", q, kl[task_of_query]) / math.sqrt(dh)   # [B, H, Nq, L]
        v = (F @ Wv.T).unflatten(-1, (nh, dh)).permute(0, 3, 1, 2, 4)         # [B, H, L, HW, dh] view
        o = ops.layer_attention(*(t.to(dtype) for t in (q, kf, kp, v, lb)), impl=impl).to(torch.float64)
        o = o.transpose(1, 2).flatten(2) + bv                                  # [B, Nq, d], b_v after the op
        return mha.out_proj(o)

    for impl, dtype, tol in (("ref", torch.float64, 1e-10), ("triton", torch.float32, 1e-5)):
        out = fused(impl, dtype)
        grads = torch.autograd.grad(out, leaves, g)
        assert_close_normwise(out, ref_out, tol, what=f"MHA per task vs fused {impl} out")
        for name, a, b in zip(("F", "P", "L", "x0", "x1", "x2"), grads, ref_grads):
            assert_close_normwise(a, b, tol, what=f"MHA per task vs fused {impl} d{name}")


def test_auto_dispatch_and_bad_input():
    q, kf, kp, v, lb = make_inputs(1, 2, 5, 2, 7, 16, torch.float32)
    assert torch.equal(ops.layer_attention(q, kf, kp, v, lb), ops.layer_attention_ref(q, kf, kp, v, lb))  # CPU
    with pytest.raises(ValueError, match="lb must be"):
        ops.layer_attention(q, kf, kp, v, lb[..., :1])
    with pytest.raises(ValueError, match="kp must be"):
        ops.layer_attention(q, kf, kp[:, :3], v, lb)
    with pytest.raises(ValueError, match="kf and v"):
        ops.layer_attention(q, kf, kp, v[:, :, :1], lb)
    with pytest.raises(ValueError, match="impl"):
        ops.layer_attention(q, kf, kp, v, lb, impl="flash")
    with pytest.raises(ValueError, match="one dtype"):
        ops.layer_attention(q.double(), kf.double(), kp.double(), v.double(), lb, impl="triton")
    with pytest.raises(ValueError, match=">= 16"):
        ops.layer_attention(q, kf, kp, v, lb, impl="triton", block_m=8)


AOT_SCRIPT = textwrap.dedent("""
    import json, os, re, subprocess, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import ops_triton as T
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    KERNELS = {"fwd": T._la_fwd_kernel, "dq": T._la_bwd_dq_kernel, "dkdv": T._la_bwd_dkdv_kernel}
    FP32_PTRS = {"LSE", "DELTA", "DLB", "DKP"}
    results = []
    for dtype, dot_f32 in (("bf16", False), ("fp16", False), ("fp32", True)):
        for name, fn in KERNELS.items():
            cfg = T.CONFIGS["fp32" if dot_f32 else "half"][name]
            sig = {}
            for a in fn.arg_names:
                if a in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "DOT_F32"):
                    sig[a] = "constexpr"
                elif a.isupper() and a not in ("H", "NQ", "NL", "HW", "DH"):
                    sig[a] = "*fp32" if a in FP32_PTRS else "*" + dtype
                else:
                    sig[a] = "fp32" if a.endswith("scale") else "i32"
            consts = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=32, DOT_F32=dot_f32)
            k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                               options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
            path = os.path.join(sys.argv[1], f"{name}_{dtype}.cubin")
            open(path, "wb").write(k.asm["cubin"])
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True,
                                   text=True).stdout
            reg = re.search(r"REG:(\\d+)", usage)
            stack = re.search(r"STACK:(\\d+)", usage)
            results.append(dict(kernel=name, dtype=dtype, regs=int(reg.group(1)) if reg else None,
                                stack=int(stack.group(1)) if stack else None))
    print("AOT" + json.dumps(results))
""")


def test_shipped_configs_compile_for_sm90(tmp_path):
    """Every shipped (kernel, dtype, tile, warps) config through the real compiler for sm_90 on this CPU, with
    the bundled ptxas; reports registers and stack (local memory) per kernel. Runs without TRITON_INTERPRET."""
    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("triton's bundled ptxas is missing: cannot compile for sm_90 on this machine")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", AOT_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=170)
    assert res.returncode == 0, res.stderr[-4000:]
    import json
    results = json.loads(re.search(r"^AOT(.*)$", res.stdout, re.M).group(1))
    print("\n".join(str(r) for r in results))
    assert len(results) == 9
    for r in results:
        assert r["regs"] is not None and r["regs"] <= 255, r
        assert r["stack"] == 0, f"local-memory spill: {r}"
