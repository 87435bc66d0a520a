"""Tests of the heatmap -> coordinates op (ops.heatmap_to_coords, csrc/): C++ CPU kernel vs a float64 reference,
gradcheck, opcheck, torch.compile, out-of-bounds reads, bad input, and the CUDA source through nvcc.

The extension is built once per session (build/_faceptor_ops_<source hash>/) unless `python setup.py build_ext
--inplace` already left an importable module next to ops.py.
"""
import hashlib
import os
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import given, strategies as st

import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")


def assert_close_normwise(actual, expected, rtol, atol=None, what=""):
    """||a - b|| <= rtol ||b|| + atol sqrt(n) (docs/design.md section 10); prints max/mean abs difference on failure."""
    atol = rtol if atol is None else atol
    a, b = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = (a - b).norm().item()
    bound = rtol * b.norm().item() + atol * b.numel() ** 0.5
    d = (a - b).abs()
    assert err <= bound, (f"{what}: ||diff|| {err:.3e} > {bound:.3e}; max abs diff {d.max().item():.3e}, "
                          f"mean abs diff {d.mean().item():.3e}")


@pytest.fixture(scope="session")
def ext():
    """Make impl="ext" available: the setup.py-built module if importable, else a cached cpp_extension.load."""
    if not ops.HAVE_EXT:
        from torch.utils import cpp_extension
        import setup
        sources, macros = setup.extension_sources(with_cuda=False)
        paths = [os.path.join(ROOT, s) for s in sources] + [os.path.join(CSRC, "heatmap.h")]
        digest = hashlib.sha256(torch.__version__.encode() + b"".join(open(p, "rb").read() for p in paths))
        build_dir = os.path.join(ROOT, "build", "_faceptor_ops_" + digest.hexdigest()[:12])
        os.makedirs(build_dir, exist_ok=True)
        cpp_extension.load("_faceptor_ops", [os.path.join(ROOT, s) for s in sources], build_directory=build_dir,
                           extra_cflags=setup.CXX_FLAGS, extra_ldflags=setup.LINK_FLAGS, is_python_module=False)
        ops.load_extension_library(os.path.join(build_dir, "_faceptor_ops.so"))
        EXT_LIBRARY.append(os.path.join(build_dir, "_faceptor_ops.so"))
    assert ops.HAVE_EXT and ops._ext_supports(torch.device("cpu"))
    return torch.ops.faceptor


EXT_LIBRARY = []   # the library the ext fixture built and loaded, when not the setup.py-built module


def ref64_with_grad(x, g):
    """float64 reference coords and d(coords . g)/dx at the values the op actually sees."""
    x64 = x.detach().double().requires_grad_()
    out = ops.heatmap_to_coords_ref(x64)
    out.backward(g.double())
    return out.detach(), x64.grad


TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@st.composite
def heatmaps(draw):
    B, K = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    H = draw(st.sampled_from([1, 2, 7, 8, 9, 17, 49, 64, 65]))
    W = draw(st.sampled_from([1, 3, 8, 15, 16, 33, 49, 128]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
    shift = draw(st.sampled_from([0.0, -3.0, 4.0, -40.0]))   # -40: sum sigmoid < 1e-6, the clamp branch
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    seed = draw(st.integers(0, 2 ** 16))
    gen = torch.Generator().manual_seed(seed)
    if layout == "transposed":     # [B, K, H, W] view of a [B, K, W, H] tensor: W stride != 1
        x = torch.randn(B, K, W, H, generator=gen, dtype=torch.float64).transpose(2, 3)
    elif layout == "strided":      # every other row and column of a larger map, channels permuted
        x = torch.randn(K, B, 2 * H, 2 * W, generator=gen, dtype=torch.float64)[:, :, ::2, ::2].transpose(0, 1)
    else:
        x = torch.randn(B, K, H, W, generator=gen, dtype=torch.float64)
    x = (x * 3 + shift).to(dtype)
    g = torch.randn(B, K, 2, generator=gen, dtype=torch.float64)
    return x, g


@given(heatmaps(), st.sampled_from(["ext", "ref"]))
def test_heatmap_matches_float64_reference(ext, case, impl):
    x, g = case
    exp_out, exp_grad = ref64_with_grad(x, g)
    xi = x.detach().clone().requires_grad_() if x.is_contiguous() else x.detach().requires_grad_()
    out = ops.heatmap_to_coords(xi, impl=impl)
    assert out.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    out.backward(g.to(out.dtype))
    assert xi.grad.dtype == x.dtype and xi.grad.shape == x.shape
    # the coords are fp32 (accumulated from the rounded input), so 1e-5 holds for every input dtype
    ctol = TOL[torch.float64] if x.dtype == torch.float64 else TOL[torch.float32]
    assert_close_normwise(out, exp_out, ctol, what=f"coords {impl} {x.dtype} {tuple(x.shape)}")
    # the gradient is returned in the input dtype, so it carries that dtype's rounding
    assert_close_normwise(xi.grad, exp_grad, TOL[x.dtype], what=f"grad {impl} {x.dtype} {tuple(x.shape)}")


def test_heatmap_pixel_centre_convention(ext):
    # a single hot pixel at (row 2, col 5) of a 4x8 map -> ((5 + 0.5) / 8, (2 + 0.5) / 4)
    x = torch.full((1, 1, 4, 8), -60.0)
    x[0, 0, 2, 5] = 60.0
    for impl in ("ref", "ext"):
        out = ops.heatmap_to_coords(x, impl=impl)
        torch.testing.assert_close(out, torch.tensor([[[5.5 / 8, 2.5 / 4]]]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shift", [0.0, -40.0], ids=["plain", "clamped"])
def test_heatmap_gradcheck(ext, shift):
    x = (torch.randn(2, 3, 16, 24, dtype=torch.float64) + shift).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ops.heatmap_to_coords(t, impl="ext"), (x,))
    xt = (torch.randn(2, 3, 11, 5, dtype=torch.float64)).transpose(2, 3).requires_grad_()   # strided
    assert torch.autograd.gradcheck(lambda t: ops.heatmap_to_coords(t, impl="ext"), (xt,))


def test_heatmap_opcheck(ext):
    samples = [torch.randn(2, 3, 16, 24), torch.randn(2, 3, 16, 24, dtype=torch.float64),
               torch.randn(1, 2, 9, 7).transpose(2, 3), torch.randn(2, 1, 5, 6, dtype=torch.float16)]
    for x in samples:
        torch.library.opcheck(ext.heatmap_to_coords_fwd.default, (x.requires_grad_(),))
        coords, stats = ext.heatmap_to_coords_fwd(x.detach())
        torch.library.opcheck(ext.heatmap_to_coords_bwd.default, (torch.randn_like(coords), x.detach(), stats))


def test_heatmap_torch_compile_fullgraph(ext):
    torch._dynamo.reset()
    f = torch.compile(lambda t: ops.heatmap_to_coords(t, impl="ext").square().sum(), fullgraph=True)
    x = torch.randn(2, 5, 12, 20, requires_grad=True)
    loss = f(x)
    loss.backward()
    x2 = x.detach().clone().requires_grad_()
    ops.heatmap_to_coords(x2, impl="ext").square().sum().backward()
    torch.testing.assert_close(loss, ops.heatmap_to_coords(x2.detach(), impl="ext").square().sum())
    torch.testing.assert_close(x.grad, x2.grad)


def test_heatmap_nan_sentinel_no_out_of_bounds_reads(ext):
    # every logit the op may read is finite; everything around the view is NaN
    for dtype in (torch.float32, torch.float16, torch.float64):
        buf = torch.full((3, 6, 40, 50), float("nan"), dtype=dtype)
        x = buf[1:, 1:5:2, 3:20, 5:38:3]                           # [2, 2, 17, 11], every stride != contiguous
        x.copy_(torch.randn(x.shape, dtype=dtype))
        xv = x.detach().requires_grad_()
        out = ops.heatmap_to_coords(xv, impl="ext")
        out.backward(torch.randn_like(out))
        assert torch.isfinite(out).all() and torch.isfinite(xv.grad).all()
        assert_close_normwise(out, ops.heatmap_to_coords_ref(x.double()), 1e-5, what=f"nan sentinel {dtype}")


# Run in a subprocess with FACEPTOR_CPU_ISA set (read once when the library loads): the CPU kernel has AVX-512,
# AVX2+FMA and scalar fp32 paths, and the tests above only reach the widest one this CPU has.
ISA_CHECK = r"""
import sys, torch, ops
if not ops.HAVE_EXT:
    ops.load_extension_library(sys.argv[1])
from tests.test_ops import assert_close_normwise, ref64_with_grad
gen = torch.Generator().manual_seed(0)
for H, W in [(1, 1), (9, 7), (8, 8), (17, 15), (5, 16), (33, 17), (65, 33), (3, 49), (64, 128), (40, 300)]:
    for shift in (0.0, 4.0, -40.0):
        for transposed in (False, True):
            x = torch.randn(2, 3, W, H, generator=gen, dtype=torch.float64).transpose(2, 3) if transposed else \
                torch.randn(2, 3, H, W, generator=gen, dtype=torch.float64)
            for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
                xd = (x * 3 + shift).to(dtype)
                g = torch.randn(2, 3, 2, generator=gen, dtype=torch.float64)
                exp_out, exp_grad = ref64_with_grad(xd, g)
                xi = xd.detach().requires_grad_()
                out = ops.heatmap_to_coords(xi, impl="ext")
                out.backward(g.float())
                what = f"{dtype} {(H, W)} shift {shift} transposed {transposed}"
                assert_close_normwise(out, exp_out, 1e-5, what="coords " + what)
                assert_close_normwise(xi.grad, exp_grad, tol, what="grad " + what)
print("ok")
"""


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_heatmap_narrower_cpu_paths(ext, isa):
    lib = EXT_LIBRARY[0] if EXT_LIBRARY else ""
    env = dict(os.environ, FACEPTOR_CPU_ISA=isa, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", ISA_CHECK, lib], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout[-2000:] + res.stderr[-4000:]


def test_heatmap_bad_input_raises(ext):
    for impl in ("ref", "ext", "auto"):
        with pytest.raises(ValueError, match=r"\[B, K, H, W\]"):
            ops.heatmap_to_coords(torch.randn(3, 8, 8), impl=impl)
        with pytest.raises(ValueError, match="float32"):
            ops.heatmap_to_coords(torch.zeros(1, 1, 4, 4, dtype=torch.int64), impl=impl)
        with pytest.raises(ValueError, match="non-empty"):
            ops.heatmap_to_coords(torch.zeros(0, 3, 4, 4), impl=impl)
    with pytest.raises(ValueError, match="impl"):
        ops.heatmap_to_coords(torch.zeros(1, 1, 4, 4), impl="fast")
    # the op itself checks too (direct callers, e.g. other frontends)
    with pytest.raises(RuntimeError, match="B, K, H, W"):
        ext.heatmap_to_coords_fwd(torch.randn(3, 8, 8))
    with pytest.raises(RuntimeError, match="non-empty"):
        ext.heatmap_to_coords_fwd(torch.zeros(1, 0, 4, 4))
    with pytest.raises(RuntimeError, match="float32"):
        ext.heatmap_to_coords_fwd(torch.zeros(1, 1, 4, 4, dtype=torch.int32))


def test_heatmap_auto_uses_ext_when_built(ext):
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(ops.heatmap_to_coords(x), ext.heatmap_to_coords_fwd(x)[0], rtol=0, atol=0)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: the CUDA kernel source is not compiled")
def test_cuda_source_compiles_with_nvcc(tmp_path):
    """The whole CUDA side of the op (kernels, at::Tensor wrappers, stream from ATen, TORCH_LIBRARY_IMPL) through
    nvcc for sm_90 against this torch's headers. A CPU-only torch ships the CUDA headers but not the generated
    cuda_cmake_macros.h (it only sets Windows export macros), hence C10_CUDA_NO_CMAKE_CONFIGURE_FILE here."""
    import sysconfig
    from torch.utils import cpp_extension
    out = tmp_path / "heatmap_cuda.o"
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}"]
    cmd = ["nvcc", "-O3", "--use_fast_math", "-arch=sm_90", "-std=c++20", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
           *includes, "-c", os.path.join(CSRC, "heatmap_cuda.cu"), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)   # ~30 s on an idle core
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}"
    assert out.stat().st_size > 0
