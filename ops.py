"""Fast ops of Faceptor: heatmap -> coordinates (eq. 9) and fused Layer-Attention cross-attention (eqs. 6-7).

Two public functions, each with reference math in this file and one dispatch with `impl=`:

* `heatmap_to_coords(logits, impl="auto"|"ref"|"ext")`: the "normalising channel k" of eq. (9) (App. A.3) as the
  authors' code does it (docs/design.md): sigmoid, sum-normalise, expected column/row, pixel-centre convention.
  "ext" is the C++/CUDA op `torch.ops.faceptor.heatmap_to_coords_fwd/bwd` (csrc/; the CUDA kernel takes the
  current stream from ATen itself, so it is right under torch.compile and CUDA graphs), built with
  `python setup.py build_ext --inplace`; "auto" uses it when built (and built for the tensor's device), else the
  reference, and says once how to build it.
* `layer_attention(q, kf, kp, v, lb, impl="auto"|"ref"|"op"|"triton")`: the decoder cross-attention with
  Layer-Attention, eq. (7) keys K = F^ + L_t + P fed to eq. (6) attention, rewritten by linearity
  (docs/design.md): score(q, (j, p)) = q.(KF[j,p] + KP[p]) / sqrt(dh) + LB[q, j]; the task term q.W_k L_t,j is the
  per-(query, layer) bias LB, so queries of several task heads share one launch. "op" is the registered
  `torch.ops.faceptor.layer_attention` (custom_op + register_fake + register_autograd, so torch.compile traces
  through it with no graph break and torch.export keeps it as one node): its CUDA kernel is the fused flash-style
  Triton kernel of ops_triton.py, its CPU kernel the reference below. "triton" is the same op forced onto the
  Triton kernels (CPU tensors only under TRITON_INTERPRET=1); "auto" = "op" for CUDA tensors, "ref" elsewhere.

Divergences / conventions:
* heatmap_to_coords returns float32 for float32/float16/bfloat16 logits (the sums are accumulated in fp32 rows
  and fp64 channels) and float64 for float64 logits. The paper's eq. (9) does not say how channels are
  normalised; we follow the authors' code (sigmoid / sum, S clamped at 1e-6), not a softmax.
* layer_attention takes already projected, already scaled inputs: b_k is folded into kp (it cancels in the
  softmax anyway) and b_v is added by the caller after the op. A layer bias of -inf masks a layer (Layer-Attention
  switched off, paper: "can be excluded during inference"); a row with every key masked returns 0, not NaN.
"""
import functools
import logging
from typing import Tuple

import torch

log = logging.getLogger(__name__)

LOG2E = 1.4426950408889634
BUILD_HINT = "build it with `python setup.py build_ext --inplace` in the repository root"

# ---------------------------------------------------------------------------------------------------------------
# Availability of the fast paths, decided once at import.
try:
    import _faceptor_ops  # noqa: F401  (loading it registers torch.ops.faceptor.*)
    HAVE_EXT = True
except ImportError as _err:
    HAVE_EXT = False
    _EXT_IMPORT_ERROR = str(_err)

try:
    import ops_triton
    HAVE_TRITON = True
except ImportError:
    ops_triton = None
    HAVE_TRITON = False


# ---------------------------------------------------------------------------------------------------------------
# heatmap -> coordinates: reference
def heatmap_to_coords_ref(logits: torch.Tensor) -> torch.Tensor:
    """Sigmoid-weighted soft-argmax (docs/design.md). logits [B,K,H,W] -> coords [B,K,2] as normalised (x, y)."""
    B, K, H, W = logits.shape
    x = logits if logits.dtype == torch.float64 else logits.float()
    s = torch.sigmoid(x)                                            # [B, K, H, W]
    S = s.sum((-2, -1)).clamp_min(1e-6)                             # [B, K]
    cols = torch.arange(W, dtype=x.dtype, device=x.device)
    rows = torch.arange(H, dtype=x.dtype, device=x.device)
    u = (s.sum(-2) * cols).sum(-1) / S                              # [B, K] expected column
    v = (s.sum(-1) * rows).sum(-1) / S                              # [B, K] expected row
    return torch.stack([(u + 0.5) / W, (v + 0.5) / H], dim=-1)     # Eq. (9) normalised channel -> (x, y)


# ---------------------------------------------------------------------------------------------------------------
# heatmap -> coordinates: the C++/CUDA op (csrc/); Python supplies the fake (meta) kernel and the autograd formula.
def _coords_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_EXT_REGISTERED = False
_EXT_DEVICES = frozenset()   # device types the loaded extension has kernels for ("cpu", "cuda")


def _register_ext_python_parts():
    """register_fake + register_autograd for the C++ op; runs once after the library is loaded."""
    global _EXT_REGISTERED, _EXT_DEVICES, HAVE_EXT
    if _EXT_REGISTERED:
        return
    fwd_name, bwd_name = "faceptor::heatmap_to_coords_fwd", "faceptor::heatmap_to_coords_bwd"

    @torch.library.register_fake(fwd_name)
    def _(logits):
        B, K = logits.shape[:2]
        dt = _coords_dtype(logits.dtype)
        return logits.new_empty((B, K, 2), dtype=dt), logits.new_empty((B, K, 3), dtype=dt)

    @torch.library.register_fake(bwd_name)
    def _(grad, logits, stats):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    def setup_context(ctx, inputs, output):
        (logits,) = inputs
        ctx.save_for_backward(logits, output[1])                 # stats = (S flagged, u, v) per channel
        ctx.mark_non_differentiable(output[1])

    def backward(ctx, grad_coords, grad_stats):
        logits, stats = ctx.saved_tensors
        return torch.ops.faceptor.heatmap_to_coords_bwd(grad_coords, logits, stats)

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)
    _EXT_DEVICES = frozenset(dev for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))
                             if torch._C._dispatch_has_kernel_for_dispatch_key(fwd_name, key))
    _EXT_REGISTERED = True
    HAVE_EXT = True


def load_extension_library(path: str):
    """Load a separately built extension library (e.g. by cpp_extension.load in the tests) and enable "ext"."""
    torch.ops.load_library(path)
    _register_ext_python_parts()


if HAVE_EXT:
    _register_ext_python_parts()


def _ext_supports(device: torch.device) -> bool:
    return device.type in _EXT_DEVICES


_HINT_GIVEN = False


def _hint_once(what: str):
    global _HINT_GIVEN
    if not _HINT_GIVEN:
        _HINT_GIVEN = True
        log.warning("ops.%s: the faceptor extension is not available (%s); using the PyTorch reference. To use "
                    "the fast op, %s.", what, _EXT_IMPORT_ERROR if not HAVE_EXT else "no kernel for this device",
                    BUILD_HINT)


_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_logits(logits):
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"ops.heatmap_to_coords: logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 4:
        raise ValueError(f"ops.heatmap_to_coords: logits must be [B, K, H, W], got shape {tuple(logits.shape)}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"ops.heatmap_to_coords: logits must be float32/float64/float16/bfloat16, got {logits.dtype}")
    if logits.numel() == 0:
        raise ValueError(f"ops.heatmap_to_coords: logits must be non-empty, got shape {tuple(logits.shape)}")


def heatmap_to_coords(logits: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """logits [B,K,H,W] (fp32/fp16/bf16/fp64, any strides) -> coords [B,K,2] normalised (x, y), fp32 (fp64 for
    fp64 input). Differentiable. impl: "auto" (the extension when built for this device), "ref" or "ext"."""
    _check_logits(logits)
    if impl not in ("auto", "ref", "ext"):
        raise ValueError(f"ops.heatmap_to_coords: impl must be 'auto', 'ref' or 'ext', got {impl!r}")
    if impl == "ext" and not _ext_supports(logits.device):
        raise RuntimeError(f"ops.heatmap_to_coords(impl='ext'): the faceptor extension has no kernel for "
                           f"{logits.device.type} tensors; {BUILD_HINT}")
    if impl == "ref" or not _ext_supports(logits.device):
        if impl == "auto":
            _hint_once("heatmap_to_coords")
        return heatmap_to_coords_ref(logits)
    return torch.ops.faceptor.heatmap_to_coords_fwd(logits)[0]


# ---------------------------------------------------------------------------------------------------------------
# Layer-Attention cross-attention: reference (float64-capable, plain PyTorch)
def layer_attention_ref(q, kf, kp, v, lb):
    """softmax_{(j,p)}(q.(kf[j,p] + kp[p]) / sqrt(dh) + lb[q, j]) @ v over the L*HW keys.

    q [B,H,Nq,dh], kf and v [B,H,L,HW,dh], kp [H,HW,dh] or [B,H,HW,dh], lb [B,H,Nq,L] -> [B,H,Nq,dh].
    """
    return _layer_attention_ref_lse(q, kf, kp, v, lb)[0]


def _layer_attention_ref_lse(q, kf, kp, v, lb):
    """layer_attention_ref and the row log-sum-exp in log2 units (+inf for an all-masked row), as the kernel."""
    B, H, L, HW, dh = kf.shape
    if kp.dim() == 3:
        kp = kp.unsqueeze(0)
    k = kf + kp.unsqueeze(2)                                        # [B, H, L, HW, dh]  Eq. (7) keys (minus L_t)
    s = torch.einsum("bhqd,bhlpd->bhqlp", q, k) * dh ** -0.5 + lb.unsqueeze(-1)   # Eq. (6) scores + L_t term
    s = s.flatten(-2)                                               # [B, H, Nq, L*HW]
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)         # all-masked row guard
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    out = p @ v.flatten(2, 3)                                       # [B, H, Nq, dh]
    lse = torch.where(l == 0, torch.inf, m + torch.log(l)).squeeze(-1) * LOG2E    # [B, H, Nq]
    return out / torch.where(l == 0, torch.ones_like(l), l), lse


def _check_layer_attention_args(q, kf, kp, v, lb):
    for name, t in (("q", q), ("kf", kf), ("kp", kp), ("v", v), ("lb", lb)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"ops.layer_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"ops.layer_attention: {name} must be floating point, got {t.dtype}")
    if q.dim() != 4 or kf.dim() != 5:
        raise ValueError(f"ops.layer_attention: q must be [B,H,Nq,dh] and kf [B,H,L,HW,dh], got "
                         f"{tuple(q.shape)} and {tuple(kf.shape)}")
    B, H, Nq, dh = q.shape
    _, _, L, HW, _ = kf.shape
    if tuple(kf.shape) != (B, H, L, HW, dh) or tuple(v.shape) != (B, H, L, HW, dh):
        raise ValueError(f"ops.layer_attention: kf and v must be [B,H,L,HW,dh] = {(B, H, L, HW, dh)}, got "
                         f"{tuple(kf.shape)} and {tuple(v.shape)}")
    if tuple(kp.shape) not in ((H, HW, dh), (B, H, HW, dh)):
        raise ValueError(f"ops.layer_attention: kp must be [H,HW,dh] or [B,H,HW,dh] = {(B, H, HW, dh)}, got "
                         f"{tuple(kp.shape)}")
    if tuple(lb.shape) != (B, H, Nq, L):
        raise ValueError(f"ops.layer_attention: lb must be [B,H,Nq,L] = {(B, H, Nq, L)}, got {tuple(lb.shape)}")
    if any(n == 0 for n in (B, H, Nq, L, HW, dh)):         # not min(): a symbolic batch under torch.export
        raise ValueError(f"ops.layer_attention: empty input, q {tuple(q.shape)}, kf {tuple(kf.shape)}")


# ---------------------------------------------------------------------------------------------------------------
# Layer-Attention cross-attention: the registered op faceptor::layer_attention (Triton on CUDA, reference on CPU)
def _la_out_dtype(q, kf, kp, v, lb, fused):
    if fused:
        return q.dtype
    return functools.reduce(torch.promote_types, (t.dtype for t in (q, kf, kp, v, lb)))


@torch.library.custom_op("faceptor::layer_attention", mutates_args=())
def _la_op(q: torch.Tensor, kf: torch.Tensor, kp: torch.Tensor, v: torch.Tensor, lb: torch.Tensor, fused: bool,
           block_m: int, block_n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (O [B,H,Nq,dh], LSE [B,H,Nq] fp32, log2 units). fused: the Triton kernels (CUDA, or the interpreter)."""
    if fused:
        ops_triton.check_inputs(q, kf, kp, v, lb)
        return ops_triton.forward(q, kf, kp, v, lb, ops_triton.check_blocks(block_m, block_n))
    out, lse = _layer_attention_ref_lse(q, kf, kp, v, lb)
    return out.contiguous(), lse.float()


@_la_op.register_fake
def _(q, kf, kp, v, lb, fused, block_m, block_n):
    B, H, NQ, DH = q.shape
    return q.new_empty((B, H, NQ, DH), dtype=_la_out_dtype(q, kf, kp, v, lb, fused)), \
        q.new_empty((B, H, NQ), dtype=torch.float32)


@torch.library.custom_op("faceptor::layer_attention_bwd", mutates_args=())
def _la_bwd_op(do: torch.Tensor, q: torch.Tensor, kf: torch.Tensor, kp: torch.Tensor, v: torch.Tensor,
               lb: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, fused: bool, block_m: int,
               block_n: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dQ, dKF, dKP, dV, dLB), contiguous, each in its input's dtype: the Triton kernels (fused) or the
    reference backward below."""
    if fused:
        return ops_triton.backward(do, q, kf, kp, v, lb, o, lse, ops_triton.check_blocks(block_m, block_n))
    return _layer_attention_ref_bwd(do, q, kf, kp, v, lb)


def _layer_attention_ref_bwd(do, q, kf, kp, v, lb):
    """Gradients of layer_attention_ref, written out (an op's kernel runs below autograd), the kernels' formulas:
    dV = P^T dO, dS = P (dO V^T - rowsum(dO * O)), dQ = c dS K, dK = c dS^T Q, dKP = sum_j dKF, dLB = sum_p dS."""
    B, H, L, HW, dh = kf.shape
    c = dh ** -0.5
    dt = functools.reduce(torch.promote_types, (t.dtype for t in (do, q, kf, kp, v, lb)))
    kp4 = kp if kp.dim() == 4 else kp.unsqueeze(0)
    k = (kf + kp4.unsqueeze(2)).flatten(2, 3).to(dt)                # [B, H, L*HW, dh]  keys (minus L_t)
    vf, qd, dod = v.flatten(2, 3).to(dt), q.to(dt), do.to(dt)       # [B, H, L*HW, dh], [B, H, Nq, dh]
    s = qd @ k.transpose(-1, -2) * c + lb.to(dt).repeat_interleave(HW, dim=-1)    # [B, H, Nq, L*HW]  Eq. (6)
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)         # all-masked row guard
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    p = p / torch.where(l == 0, torch.ones_like(l), l)              # softmax; 0 on an all-masked row
    dp = dod @ vf.transpose(-1, -2)                                 # [B, H, Nq, L*HW]
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dkf = (c * ds.transpose(-1, -2) @ qd).unflatten(2, (L, HW))     # [B, H, L, HW, dh]
    dkp = dkf.sum(2) if kp.dim() == 4 else dkf.sum((0, 2))          # [B, H, HW, dh] or [H, HW, dh]
    grads = (c * ds @ k, dkf, dkp, (p.transpose(-1, -2) @ dod).unflatten(2, (L, HW)),
             ds.unflatten(-1, (L, HW)).sum(-1))                     # dQ, dKF, dKP, dV, dLB [B, H, Nq, L]
    return tuple(g.to(t.dtype).contiguous() for g, t in zip(grads, (q, kf, kp, v, lb)))


@_la_bwd_op.register_fake
def _(do, q, kf, kp, v, lb, o, lse, fused, block_m, block_n):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, kf, kp, v, lb))


def _la_setup_context(ctx, inputs, output):
    q, kf, kp, v, lb, fused, block_m, block_n = inputs
    o, lse = output
    ctx.save_for_backward(q, kf, kp, v, lb, o, lse)
    ctx.args = (fused, block_m, block_n)
    ctx.mark_non_differentiable(lse)


def _la_backward(ctx, do, _dlse):
    q, kf, kp, v, lb, o, lse = ctx.saved_tensors
    grads = torch.ops.faceptor.layer_attention_bwd(do.contiguous(), q, kf, kp, v, lb, o, lse, *ctx.args)
    return (*grads, None, None, None)


_la_op.register_autograd(_la_backward, setup_context=_la_setup_context)


def layer_attention(q, kf, kp, v, lb, impl: str = "auto", block_m: int = 0, block_n: int = 0):
    """Fused Layer-Attention cross-attention (eqs. 6-7), see layer_attention_ref for the math and shapes.

    impl: "auto" ("op" for CUDA tensors when triton is installed, "ref" elsewhere), "ref" (plain PyTorch),
    "op" (the registered op: Triton on CUDA, reference on CPU) or "triton" (the op on its Triton kernels).
    block_m / block_n override the shipped Triton tile sizes (powers of 2 >= 16; the tests exercise the tiling).
    """
    _check_layer_attention_args(q, kf, kp, v, lb)
    if impl == "auto":
        impl = "op" if (q.is_cuda and HAVE_TRITON) else "ref"
    if impl == "ref":
        return layer_attention_ref(q, kf, kp, v, lb)
    if impl not in ("op", "triton"):
        raise ValueError(f"ops.layer_attention: impl must be 'auto', 'ref', 'op' or 'triton', got {impl!r}")
    fused = impl == "triton" or q.is_cuda
    if fused and not HAVE_TRITON:
        raise RuntimeError(f"ops.layer_attention(impl={impl!r}): triton is not installed (pip install triton)")
    if fused:
        ops_triton.check_inputs(q, kf, kp, v, lb)
        ops_triton.check_blocks(block_m, block_n)
    return torch.ops.faceptor.layer_attention(q, kf, kp, v, lb, fused, block_m, block_n)[0]


__all__ = ["heatmap_to_coords", "heatmap_to_coords_ref", "layer_attention", "layer_attention_ref",
           "HAVE_EXT", "HAVE_TRITON", "load_extension_library"]
