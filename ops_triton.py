"""Fused Layer-Attention cross-attention in Triton (paper §3.3, eqs. 6-7; docs/design.md). Used by ops.layer_attention.

    s[q, (j, p)] = c q.(KF[j, p] + KP[p]) + LB[q, j],  c = 1/sqrt(dh)     (eq. 7 keys F^ + P + L_t, by linearity)
    O[q]         = softmax_{(j, p)}(s[q]) V                                (eq. 6 over the L*HW keys)

Flash-style: online softmax in log2 units over the layers j and key tiles p; the key tensor KF + KP (+ L_t) is
never written, KF + KP is formed per tile in registers (fp32 add). The per-(query, layer) bias LB carries the task
term, so queries of several task heads share one launch. LB = -inf masks a layer; a row whose keys are all masked
keeps m = -inf, uses m_safe = 0 and returns 0 (its LSE is stored as +inf so the backward's P is 0, not NaN).

Backward (three passes as in the Triton fused-attention tutorial): Delta = rowsum(dO * O) in torch; a dq kernel
(grid over query tiles) gives dQ and dLB[q, j] = sum_p dS (row sums, no atomics); a dkdv kernel (grid over key
tiles, loops over layers and all queries) gives dKF, dV and dKP = sum_j dKF per batch, summed over the batch in
torch when KP is shared. P is recomputed in both.

Precision: fp16/bf16 tiles go to tl.dot in their dtype with fp32 accumulation; fp32 uses IEEE fp32 dots (no TF32).
Interpreter (TRITON_INTERPRET=1) pitfalls handled here: bf16 arithmetic is wrong there, so DOT_F32 casts every tile
to fp32 after the load when interpreting bf16; out-of-bounds loads are not trapped there, so every load is masked;
tl.dot needs all dims >= 16 on GPU, so BLOCK_M, BLOCK_N, BLOCK_D >= 16 always (dh is padded to BLOCK_D).
"""
import contextlib
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634

# Shipped launch configs per dtype class (fixed: no autotune; tuning on a GPU is future work). Every entry compiles
# for sm_90 without local-memory spills (tests/test_ops_attention.py::test_shipped_configs_compile_for_sm90).
# fp32 uses IEEE fp32 dots, which hold whole tiles in registers: smaller tiles and 8 warps.
CONFIGS = {
    "half": {   # fp16 / bf16
        "fwd": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
        "dq": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
        "dkdv": dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
    },
    "fp32": {
        "fwd": dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2),
        "dq": dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2),
        "dkdv": dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
    },
}


# ---------------------------------------------------------------------------------------------------------------
# Kernels
@triton.jit
def _kv_tile(kf_ptr, kp_ptr, v_ptr, offs_p, offs_d, kd_ok, skp, skd, spp, spd, svp, svd):
    """One layer's key tile KF + KP (fp32 add in registers, never written to memory) and its value tile;
    kf_ptr and v_ptr point at that layer, kp_ptr at the shared position keys."""
    kf = tl.load(kf_ptr + offs_p[:, None] * skp + offs_d[None, :] * skd, mask=kd_ok, other=0.0)
    kp = tl.load(kp_ptr + offs_p[:, None] * spp + offs_d[None, :] * spd, mask=kd_ok, other=0.0)
    vt = tl.load(v_ptr + offs_p[:, None] * svp + offs_d[None, :] * svd, mask=kd_ok, other=0.0)
    return kf.to(tl.float32) + kp.to(tl.float32), vt


@triton.jit
def _la_fwd_kernel(Q, KF, KP, V, LB, O, LSE,
                   sqb, sqh, sqm, sqd, skb, skh, skl, skp, skd, spb, sph, spp, spd,
                   svb, svh, svl, svp, svd, slb, slh, slm, sll, sob, soh, som, sod,
                   H, NQ, NL, HW, DH, qk_scale,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < NQ
    d_ok = offs_d < DH

    # stage 1: the query tile [BLOCK_M, BLOCK_D] stays in registers
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    kf_base = KF + b * skb + h * skh
    kp_base = KP + b * spb + h * sph
    v_base = V + b * svb + h * svh
    lb_base = LB + b * slb + h * slh + offs_m * slm

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)   # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)                  # running sum of exp2
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for j in range(0, NL):
        # stage 2: per-(query, layer) bias, the task's L_t term (eq. 7), to log2 units
        lb = tl.load(lb_base + j * sll, mask=m_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        for start in range(0, HW, BLOCK_N):
            offs_p = start + offs_n
            p_ok = offs_p < HW
            kd_ok = p_ok[:, None] & d_ok[None, :]
            # stage 3: key tile KF + KP formed in registers (fp32 add), never written to memory
            k, vt = _kv_tile(kf_base + j * skl, kp_base, v_base + j * svl, offs_p, offs_d, kd_ok,
                             skp, skd, spp, spd, svp, svd)
            if DOT_F32:
                vt = vt.to(tl.float32)
                qk = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(k.to(q.dtype)))
            # stage 4: scores (eq. 6) and the online-softmax update with the all-masked-row guard
            s = qk * qk_scale + lb[:, None]
            s = tl.where(p_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if DOT_F32:
                acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
            m_i = m_new
    # stage 5: normalise; all-masked rows give 0 and LSE = +inf
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("inf"), m_i + tl.log2(l_safe))
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod, o.to(O.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * NQ + offs_m, lse, mask=m_ok)


@triton.jit
def _la_bwd_dq_kernel(Q, KF, KP, V, LB, DO, LSE, DELTA, DQ, DLB,
                      sqb, sqh, sqm, sqd, skb, skh, skl, skp, skd, spb, sph, spp, spd,
                      svb, svh, svl, svp, svd, slb, slh, slm, sll, sdb, sdh, sdm, sdd,
                      H, NQ, NL, HW, DH, qk_scale, sm_scale,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < NQ
    d_ok = offs_d < DH
    md_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=md_ok, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd, mask=md_ok, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row = pid_bh.to(tl.int64) * NQ + offs_m
    lse = tl.load(LSE + row, mask=m_ok, other=float("inf"))     # +inf: padded / all-masked rows get P = 0
    delta = tl.load(DELTA + row, mask=m_ok, other=0.0)          # rowsum(dO * O)
    kf_base = KF + b * skb + h * skh
    kp_base = KP + b * spb + h * sph
    v_base = V + b * svb + h * svh
    lb_base = LB + b * slb + h * slh + offs_m * slm

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for j in range(0, NL):
        lb = tl.load(lb_base + j * sll, mask=m_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        dlb = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, HW, BLOCK_N):
            offs_p = start + offs_n
            p_ok = offs_p < HW
            kd_ok = p_ok[:, None] & d_ok[None, :]
            k, vt = _kv_tile(kf_base + j * skl, kp_base, v_base + j * svl, offs_p, offs_d, kd_ok,
                             skp, skd, spp, spd, svp, svd)
            # recompute P = exp2(s - LSE), then dS = P (dO.V - Delta)
            if DOT_F32:
                vt = vt.to(tl.float32)
                qk = tl.dot(q, tl.trans(k), input_precision="ieee")
                dp = tl.dot(do, tl.trans(vt), input_precision="ieee")
            else:
                k = k.to(q.dtype)
                qk = tl.dot(q, tl.trans(k))
                dp = tl.dot(do, tl.trans(vt))
            s = tl.where(p_ok[None, :], qk * qk_scale + lb[:, None], float("-inf"))
            p = tl.exp2(s - lse[:, None])
            ds = p * (dp - delta[:, None])
            dlb += tl.sum(ds, 1)                                 # dLB[q, j] = sum_p dS
            if DOT_F32:
                dq += tl.dot(ds, k, input_precision="ieee")
            else:
                dq += tl.dot(ds.to(k.dtype), k)
        tl.store(DLB + row * NL + j, dlb, mask=m_ok)             # fp32 [B, H, Nq, L] contiguous
    tl.store(DQ + row[:, None] * DH + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=md_ok)


@triton.jit
def _la_bwd_dkdv_kernel(Q, KF, KP, V, LB, DO, LSE, DELTA, DKF, DV, DKP,
                        sqb, sqh, sqm, sqd, skb, skh, skl, skp, skd, spb, sph, spp, spd,
                        svb, svh, svl, svp, svd, slb, slh, slm, sll, sdb, sdh, sdm, sdd,
                        H, NQ, NL, HW, DH, qk_scale, sm_scale,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        DOT_F32: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_p = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_mb = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    p_ok = offs_p < HW
    d_ok = offs_d < DH
    kd_ok = p_ok[:, None] & d_ok[None, :]
    kp = tl.load(KP + b * spb + h * sph + offs_p[:, None] * spp + offs_d[None, :] * spd,
                 mask=kd_ok, other=0.0).to(tl.float32)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdb + h * sdh
    lb_base = LB + b * slb + h * slh
    out_kd = offs_p[:, None] * DH + offs_d[None, :]             # DKF, DV: contiguous [B, H, L, HW, dh]

    dkp = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for j in range(0, NL):
        kf = tl.load(KF + b * skb + h * skh + j * skl + offs_p[:, None] * skp + offs_d[None, :] * skd,
                     mask=kd_ok, other=0.0)
        vt = tl.load(V + b * svb + h * svh + j * svl + offs_p[:, None] * svp + offs_d[None, :] * svd,
                     mask=kd_ok, other=0.0)
        k = kf.to(tl.float32) + kp
        if DOT_F32:
            vt = vt.to(tl.float32)
        else:
            k = k.to(vt.dtype)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for start in range(0, NQ, BLOCK_M):
            offs_m = start + offs_mb
            m_ok = offs_m < NQ
            md_ok = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=md_ok, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * sdm + offs_d[None, :] * sdd, mask=md_ok, other=0.0)
            row = pid_bh.to(tl.int64) * NQ + offs_m
            lse = tl.load(LSE + row, mask=m_ok, other=float("inf"))
            delta = tl.load(DELTA + row, mask=m_ok, other=0.0)
            lb = tl.load(lb_base + offs_m * slm + j * sll, mask=m_ok, other=0.0).to(tl.float32) * 1.4426950408889634
            # transposed scores sT [BLOCK_N, BLOCK_M]; P^T = exp2(sT - LSE)
            if DOT_F32:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
                qk = tl.dot(k, tl.trans(q), input_precision="ieee")
            else:
                qk = tl.dot(k, tl.trans(q))
            s = tl.where(p_ok[:, None], qk * qk_scale + lb[None, :], float("-inf"))
            pt = tl.exp2(s - lse[None, :])
            # dV += P^T dO ; dS^T = P^T (V dO^T - Delta) ; dK += dS^T Q
            if DOT_F32:
                dv += tl.dot(pt, do, input_precision="ieee")
                dpt = tl.dot(vt, tl.trans(do), input_precision="ieee")
                dst = pt * (dpt - delta[None, :])
                dk += tl.dot(dst, q, input_precision="ieee")
            else:
                dv += tl.dot(pt.to(do.dtype), do)
                dpt = tl.dot(vt, tl.trans(do))
                dst = pt * (dpt - delta[None, :])
                dk += tl.dot(dst.to(q.dtype), q)
        dkv_off = (pid_bh.to(tl.int64) * NL + j) * HW * DH
        tl.store(DKF + dkv_off + out_kd, (dk * sm_scale).to(DKF.dtype.element_ty), mask=kd_ok)
        tl.store(DV + dkv_off + out_kd, dv.to(DV.dtype.element_ty), mask=kd_ok)
        dkp += dk                                                 # dKP = sum_j dKF (this batch element)
    tl.store(DKP + pid_bh.to(tl.int64) * HW * DH + out_kd, dkp * sm_scale, mask=kd_ok)


# ---------------------------------------------------------------------------------------------------------------
# Launchers (autograd and the torch.library op live in ops.py: faceptor::layer_attention and its backward)
def _block_d(dh: int) -> int:
    return max(16, triton.next_power_of_2(dh))


def _dot_f32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16)


def _empty(shape, dtype, device):
    """Every output buffer of the launchers (the GPU tests poison it with NaN to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _on_device(q):
    """Launch on q's GPU, not the current one (a --device cuda:1 run); grid y = B*H must fit CUDA's 65,535."""
    if q.shape[0] * q.shape[1] > 65535:
        raise ValueError(f"ops.layer_attention(impl='triton'): B*H = {q.shape[0] * q.shape[1]} exceeds the CUDA "
                         f"grid limit 65,535; split the batch")
    return torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()


def _kp_strides(kp):
    """(batch, head, position, dim) strides; batch stride 0 when KP is shared over the batch."""
    if kp.dim() == 3:
        return (0,) + tuple(kp.stride())
    return tuple(kp.stride())


def _config(kernel, dtype, blocks):
    """(BLOCK_M, BLOCK_N, launch options) of a kernel: the shipped config, tile sizes overridden by `blocks`."""
    cfg = CONFIGS["fp32" if dtype == torch.float32 else "half"][kernel]
    bm, bn = blocks if blocks is not None else (cfg["BLOCK_M"], cfg["BLOCK_N"])
    return bm, bn, dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def forward(q, kf, kp, v, lb, blocks=None):
    """-> (O [B,H,Nq,dh] in q.dtype, LSE [B,H,Nq] fp32 in log2 units, +inf on all-masked rows)."""
    B, H, NQ, DH = q.shape
    NL, HW = kf.shape[2], kf.shape[3]
    o = _empty((B, H, NQ, DH), q.dtype, q.device)
    lse = _empty((B, H, NQ), torch.float32, q.device)
    block_m, block_n, launch = _config("fwd", q.dtype, blocks)
    grid = (triton.cdiv(NQ, block_m), B * H)
    with _on_device(q):
        _la_fwd_kernel[grid](q, kf, kp, v, lb, o, lse, *q.stride(), *kf.stride(), *_kp_strides(kp), *v.stride(),
                             *lb.stride(), *o.stride(), H, NQ, NL, HW, DH, LOG2E / DH ** 0.5,
                             BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(DH), DOT_F32=_dot_f32(q.dtype),
                             **launch)
    return o, lse


def backward(do, q, kf, kp, v, lb, o, lse, blocks=None):
    """-> (dQ, dKF, dKP, dV, dLB), each in its input's dtype and shape, contiguous."""
    B, H, NQ, DH = q.shape
    NL, HW = kf.shape[2], kf.shape[3]
    delta = (do.float() * o.float()).sum(-1)                      # [B, H, Nq]
    dq = _empty((B, H, NQ, DH), q.dtype, q.device)
    dlb = _empty((B, H, NQ, NL), torch.float32, q.device)
    dkf = _empty((B, H, NL, HW, DH), kf.dtype, q.device)
    dv = _empty((B, H, NL, HW, DH), v.dtype, q.device)
    dkp = _empty((B, H, HW, DH), torch.float32, q.device)
    strides = (*q.stride(), *kf.stride(), *_kp_strides(kp), *v.stride(), *lb.stride(), *do.stride())
    common = dict(BLOCK_D=_block_d(DH), DOT_F32=_dot_f32(q.dtype))
    scales = (LOG2E / DH ** 0.5, DH ** -0.5)
    with _on_device(q):
        block_m, block_n, launch = _config("dq", q.dtype, blocks)
        _la_bwd_dq_kernel[(triton.cdiv(NQ, block_m), B * H)](
            q, kf, kp, v, lb, do, lse, delta, dq, dlb, *strides, H, NQ, NL, HW, DH, *scales,
            BLOCK_M=block_m, BLOCK_N=block_n, **launch, **common)
        block_m, block_n, launch = _config("dkdv", q.dtype, blocks)
        _la_bwd_dkdv_kernel[(triton.cdiv(HW, block_n), B * H)](
            q, kf, kp, v, lb, do, lse, delta, dkf, dv, dkp, *strides, H, NQ, NL, HW, DH, *scales,
            BLOCK_M=block_m, BLOCK_N=block_n, **launch, **common)
    dkp = (dkp.sum(0) if kp.dim() == 3 else dkp).to(kp.dtype)     # [H, HW, dh] when KP is shared over B
    return dq, dkf, dkp, dv, dlb.to(lb.dtype)


def check_blocks(block_m: int, block_n: int):
    """Tile-size override (0 = the shipped config): powers of 2 >= 16, the tl.dot minimum."""
    if block_m == 0 and block_n == 0:
        return None
    blocks = (block_m or 64, block_n or 64)
    if min(blocks) < 16 or any(b & (b - 1) for b in blocks):
        raise ValueError(f"ops.layer_attention: block sizes must be powers of 2 >= 16 (tl.dot), got {blocks}")
    return blocks


def check_inputs(q, kf, kp, v, lb):
    """What the kernels need beyond ops.layer_attention's shape checks: one dtype, one device, CUDA."""
    if not (q.dtype == kf.dtype == kp.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16,
                                                                          torch.float32):
        raise ValueError(f"ops.layer_attention(impl='triton'): q, kf, kp, v must share one dtype of float16/"
                         f"bfloat16/float32, got {q.dtype}, {kf.dtype}, {kp.dtype}, {v.dtype}")
    if not (q.device == kf.device == kp.device == v.device == lb.device):
        raise ValueError("ops.layer_attention(impl='triton'): all inputs must be on one device")
    if q.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("ops.layer_attention(impl='triton'): needs CUDA tensors (or TRITON_INTERPRET=1)")
