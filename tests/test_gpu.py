"""GPU tests (marker `gpu`): compiled Triton Layer-Attention and the CUDA heatmap op on a CUDA device.

Skipped, and reported as skipped, without CUDA or under TRITON_INTERPRET=1 (tests/conftest.py); gpu_check.py runs
them with TRITON_INTERPRET=0. Fresh random inputs every run (no fixed seed). Every output buffer of the Triton
launchers is filled with NaN first, so an element a kernel forgets to write fails the comparison.

Tolerances come from the reference itself: the plain PyTorch reference run in the same precision (bf16 / fp16 /
fp32, its own autograd) is compared with float64, and the kernel may be at most 3x that error plus a small floor.
"""
import math

import pytest
import torch

import ops
import ops_triton
from test_ops import assert_close_normwise

pytestmark = pytest.mark.gpu
NAMES = ("out", "dq", "dkf", "dkp", "dv", "dlb")
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 2e-4}     # when the reference's error is ~0
# Paper shapes: 512 px -> HW 1024 (32x32 tokens), 112 px -> HW 49; 235 queries = all heads, 148 = age + attributes
# + expression, 87 = parsing + landmarks; 6 layers of memory, 8 heads of dim 32.
PAPER_SHAPES = [(1, 1024, 235), (1, 1024, 87), (1, 49, 235), (1, 49, 148), (64, 1024, 235), (64, 49, 148)]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(ops_triton, "_empty", nan_empty)


def inputs(B, NQ, HW, dtype, NL=6, H=8, dh=32, shared_kp=True, masked=()):
    r = lambda *s: torch.randn(*s, device="cuda", dtype=torch.float64)   # noqa: E731
    q, kf, v = r(B, H, NQ, dh), r(B, H, NL, HW, dh), r(B, H, NL, HW, dh)
    kp = r(H, HW, dh) if shared_kp else r(B, H, HW, dh)
    lb = r(B, H, NQ, NL)
    for j in masked:
        lb[..., j] = float("-inf")
    return [t.to(dtype) for t in (q, kf, kp, v, lb)]


def outputs_and_grads(impl, xs, do):
    xs = [t.detach().requires_grad_() for t in xs]
    out = ops.layer_attention(*xs, impl=impl)
    return [out.detach(), *torch.autograd.grad(out, xs, do.to(out.dtype))]


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def test_not_interpreted_and_extension_on_cuda():
    assert not ops_triton.INTERPRET
    assert ops._ext_supports(torch.device("cuda")), "the CUDA heatmap op is not built: python setup.py build_ext"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("B,HW,NQ", PAPER_SHAPES, ids=[f"B{b}-HW{h}-Nq{n}" for b, h, n in PAPER_SHAPES])
def test_triton_matches_float64_at_paper_shapes(B, HW, NQ, dtype):
    xs = inputs(B, NQ, HW, dtype)
    do = torch.randn(B, 8, NQ, 32, device="cuda", dtype=torch.float64)
    exact = outputs_and_grads("ref", [t.double() for t in xs], do)
    same_precision = outputs_and_grads("ref", xs, do)
    fused = outputs_and_grads("triton", xs, do)
    for name, e, s, f in zip(NAMES, exact, same_precision, fused):
        assert not torch.isnan(f).any(), f"{name}: unwritten (NaN-poisoned) or NaN elements"
        bound = 3 * rel_err(s, e) + FLOOR[dtype]
        err = rel_err(f, e)
        print(f"{dtype} B{B} HW{HW} Nq{NQ} {name}: fused {err:.2e}, reference in {dtype} {rel_err(s, e):.2e}")
        assert err <= bound, f"{name}: fused rel err {err:.3e} > {bound:.3e} (3x the reference's own + floor)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_masked_layers_and_fully_masked_row(dtype):
    xs = inputs(2, 70, 49, dtype, shared_kp=False, masked=(1, 2, 3, 4, 5))
    xs[4][:, :, 5] = float("-inf")                                   # query 5: every key masked
    do = torch.randn(2, 8, 70, 32, device="cuda", dtype=torch.float64)
    fused = outputs_and_grads("triton", xs, do)
    exact = outputs_and_grads("ref", [t.double() for t in xs], do)
    assert all(torch.isfinite(t).all() for t in fused[:5]) and not torch.isnan(fused[5]).any()
    assert (fused[0][:, :, 5] == 0).all() and (fused[1][:, :, 5] == 0).all()
    assert (fused[2][:, :, 1:] == 0).all() and (fused[4][:, :, 1:] == 0).all()     # masked layers: dKF = dV = 0
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, f, e in zip(NAMES[:5], fused, exact):
        assert_close_normwise(f, e, tol, what=f"masked {dtype} {name}")


def test_bf16_paper_shape_deterministic():
    xs = inputs(64, 235, 1024, torch.bfloat16)
    do = torch.randn(64, 8, 235, 32, device="cuda", dtype=torch.bfloat16)
    a = outputs_and_grads("triton", xs, do)
    b = outputs_and_grads("triton", xs, do)
    assert all(torch.equal(x, y) for x, y in zip(a, b)), "two runs of the fused kernels differ"


def test_layer_attention_op_opcheck_on_cuda():
    xs = [t.requires_grad_() for t in inputs(2, 17, 49, torch.float32, NL=2, H=2)]
    torch.library.opcheck(torch.ops.faceptor.layer_attention.default, (*xs, True, 0, 0))


# ---------------------------------------------------------------------------------------------------------------
# CUDA heatmap op
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("shape", [(2, 3, 17, 33), (64, 68, 128, 128)], ids=["small", "paper"])
def test_heatmap_cuda_matches_float64(shape, layout, dtype):
    B, K, H, W = shape
    if layout == "transposed":
        x = torch.randn(B, K, W, H, device="cuda", dtype=torch.float64).transpose(2, 3)
    elif layout == "strided":
        x = torch.randn(K, B, 2 * H, 2 * W, device="cuda", dtype=torch.float64)[:, :, ::2, ::2].transpose(0, 1)
    else:
        x = torch.randn(B, K, H, W, device="cuda", dtype=torch.float64)
    x = (3 * x - 2).to(dtype)
    g = torch.randn(B, K, 2, device="cuda", dtype=torch.float64)
    x64 = x.detach().double().requires_grad_()
    exp = ops.heatmap_to_coords_ref(x64)
    exp.backward(g)
    xi = x.detach().requires_grad_()
    out = ops.heatmap_to_coords(xi, impl="ext")
    out.backward(g.to(out.dtype))
    assert_close_normwise(out, exp, 1e-10 if dtype == torch.float64 else 1e-5, what=f"coords {dtype} {layout}")
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    assert_close_normwise(xi.grad, x64.grad, tol, what=f"grad {dtype} {layout}")


def test_heatmap_cuda_runs_on_the_current_stream():
    x = torch.randn(8, 68, 128, 128, device="cuda")
    expected = ops.heatmap_to_coords(x, impl="ext")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = x * 1.0                                                  # produced on the side stream
        out = ops.heatmap_to_coords(y, impl="ext")                   # must be ordered after it, on that stream
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(out, expected)


def test_heatmap_cuda_opcheck_and_gradcheck():
    for x in (torch.randn(2, 3, 16, 24, device="cuda"), torch.randn(2, 3, 9, 7, device="cuda").transpose(2, 3),
              torch.randn(2, 1, 5, 6, device="cuda", dtype=torch.float16)):
        torch.library.opcheck(torch.ops.faceptor.heatmap_to_coords_fwd.default, (x.requires_grad_(),))
    for shift in (0.0, -40.0):                                       # -40: the 1e-6 clamp branch
        x = (torch.randn(2, 3, 16, 24, device="cuda", dtype=torch.float64) + shift).requires_grad_()
        assert torch.autograd.gradcheck(lambda t: ops.heatmap_to_coords(t, impl="ext"), (x,))
    assert math.isfinite(ops.heatmap_to_coords(torch.full((1, 1, 4, 4), -80.0, device="cuda"), impl="ext").sum())
