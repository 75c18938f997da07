"""FlashAttention-2 style Triton kernels, non-causal, forward and backward (docs/method.md §5).

Legend: B batch, H heads, Tq/Tk query/key length, Dh head width, BH = B·H programs' axis.
Dao 2023 (FlashAttention-2): the forward streams key tiles through an online softmax and saves
only the per-row log-sum-exp (O(T) extra memory); the backward recomputes the probabilities
from it, one kernel for dK/dV (a key tile looping over queries) and one for dQ (a query tile
looping over keys), so neither needs atomics.

Scores live in the exp2 domain: s2 = (q·kᵀ·scale + bias + alibi)·log2(e). Head widths that are
not a power of two (80) use a power-of-two block with the extra columns masked to zero.
Options, each a constexpr so absent ones cost nothing: key padding, a dense bias with any
broadcast (stride 0) over B and H, ALiBi from per-head coefficients and kept positions, and
dropout from Philox counters (seed + bh, offset + i·Tk + j), regenerated in backward.
A query whose keys are all masked has l = 0: it outputs 0 and saves lse = +inf, so its
recomputed probabilities are exp2(s - inf) = 0 and its gradients are 0, never NaN.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


# Arguments that change from call to call (lengths, the stride that equals the key length, the
# dropout seed): not specialised on divisibility or == 1, so one compiled variant serves every
# batch of a run instead of a recompile whenever T % 16 or the seed changes.
_PER_CALL = ["Tq", "Tk", "skpm_b", "spos_b", "seed", "rng_offset"]


@triton.jit
def _alibi_dist(POS, spos_b, b, offs_m, offs_n, Tq, Tk, HAS_POS: tl.constexpr):
    """|p_i - p_j| in fp32 for a tile; positions default to the indices themselves."""
    if HAS_POS:
        pi = tl.load(POS + b * spos_b + offs_m, mask=offs_m < Tq, other=0).to(tl.float32)
        pj = tl.load(POS + b * spos_b + offs_n, mask=offs_n < Tk, other=0).to(tl.float32)
    else:
        pi = offs_m.to(tl.float32)
        pj = offs_n.to(tl.float32)
    return tl.abs(pi[:, None] - pj[None, :])


@triton.jit
def _scores(q, k, b, h, offs_m, offs_n, Tq, Tk, qk_scale2,
            KPM, skpm_b, BIAS, sb_b, sb_h, sb_m, sb_n, COEF, POS, spos_b,
            HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr,
            HAS_POS: tl.constexpr, PREC: tl.constexpr):
    """BLOCK_M×BLOCK_N scores in the exp2 domain, -inf at keys past Tk or padded."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale2
    if HAS_BIAS:
        in_tile = (offs_m[:, None] < Tq) & (offs_n[None, :] < Tk)
        bias = tl.load(BIAS + b * sb_b + h * sb_h + offs_m[:, None] * sb_m + offs_n[None, :] * sb_n,
                       mask=in_tile, other=0.0)
        s += bias.to(tl.float32) * 1.4426950408889634
    if HAS_ALIBI:
        coef2 = tl.load(COEF + h) * 1.4426950408889634
        s -= _alibi_dist(POS, spos_b, b, offs_m, offs_n, Tq, Tk, HAS_POS) * coef2
    valid = offs_n < Tk
    if HAS_KPM:
        pad = tl.load(KPM + b * skpm_b + offs_n, mask=valid, other=1)
        valid = valid & (pad == 0)
    return tl.where(valid[None, :], s, float("-inf"))


@triton.jit
def _keep(seed, rng_offset, bh, offs_m, offs_n, Tk, dropout_p):
    """Dropout keep-mask of a tile: one Philox stream per (b, h), counter i·Tk + j."""
    counter = rng_offset + offs_m[:, None] * Tk + offs_n[None, :]
    return tl.rand(seed + bh, counter) >= dropout_p


@triton.jit(do_not_specialize=_PER_CALL)
def _fwd_kernel(Q, K, V, O, LSE, KPM, BIAS, COEF, POS,
                sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, so_b, so_h, so_t,
                skpm_b, sb_b, sb_h, sb_m, sb_n, spos_b,
                H, Tq, Tk, qk_scale2, dropout_p, seed, rng_offset,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_ALIBI: tl.constexpr, HAS_POS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # 64-bit base offsets: B·H·T·T passes 2**31
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :],
                mask=(offs_m[:, None] < Tq) & d_ok, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, Tk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < Tk) & d_ok
        k = tl.load(K + b * sk_b + h * sk_h + offs_n[:, None] * sk_t + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(V + b * sv_b + h * sv_h + offs_n[:, None] * sv_t + offs_d[None, :], mask=kv_ok, other=0.0)
        s = _scores(q, k, b, h, offs_m, offs_n, Tq, Tk, qk_scale2, KPM, skpm_b,
                    BIAS, sb_b, sb_h, sb_m, sb_n, COEF, POS, spos_b,
                    HAS_KPM, HAS_BIAS, HAS_ALIBI, HAS_POS, PREC)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # While a row has seen only masked keys its max is -inf; shift by 0 instead so that
        # exp2(-inf - shift) is 0 rather than NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - shift)
        p = tl.exp2(s - shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            # The normalizer l sums all probabilities; dropout only zeroes what reaches V.
            p = tl.where(_keep(seed, rng_offset, bh, offs_m, offs_n, Tk, dropout_p), p, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    alive = l_i > 0.0
    l_safe = tl.where(alive, l_i, 1.0)
    inv_l = tl.where(alive, 1.0 / l_safe, 0.0)
    if HAS_DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    o = acc * inv_l[:, None]
    tl.store(O + b * so_b + h * so_h + offs_m[:, None] * so_t + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < Tq) & d_ok)
    lse = tl.where(alive, m_i + tl.log2(l_safe), float("inf"))
    tl.store(LSE + bh * Tq + offs_m, lse, mask=offs_m < Tq)


@triton.jit(do_not_specialize=_PER_CALL)
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DBIAS, DCOEF, KPM, BIAS, COEF, POS,
                     sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sdo_b, sdo_h, sdo_t,
                     skpm_b, sb_b, sb_h, sb_m, sb_n, spos_b,
                     H, Tq, Tk, qk_scale2, sm_scale, dropout_p, seed, rng_offset,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_ALIBI: tl.constexpr, HAS_POS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                     BIAS_GRAD: tl.constexpr, ALIBI_GRAD: tl.constexpr, PREC: tl.constexpr):
    """dK, dV for one key tile; also writes dS (= dbias before the broadcast sum) and the
    per-tile partial sums of dS·(-|p_i - p_j|) for the ALiBi coefficient."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    kv_ok = (offs_n[:, None] < Tk) & d_ok
    k = tl.load(K + b * sk_b + h * sk_h + offs_n[:, None] * sk_t + offs_d[None, :], mask=kv_ok, other=0.0)
    v = tl.load(V + b * sv_b + h * sv_h + offs_n[:, None] * sv_t + offs_d[None, :], mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dcoef = tl.zeros([BLOCK_N], tl.float32)
    for start_m in range(0, Tq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < Tq
        q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok, other=0.0)
        do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_t + offs_d[None, :],
                     mask=m_ok[:, None] & d_ok, other=0.0)
        # lse = +inf past Tq makes those rows' probabilities exactly 0.
        lse = tl.load(LSE + bh * Tq + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + bh * Tq + offs_m, mask=m_ok, other=0.0)
        s = _scores(q, k, b, h, offs_m, offs_n, Tq, Tk, qk_scale2, KPM, skpm_b,
                    BIAS, sb_b, sb_h, sb_m, sb_n, COEF, POS, spos_b,
                    HAS_KPM, HAS_BIAS, HAS_ALIBI, HAS_POS, PREC)
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        if HAS_DROPOUT:
            keep = _keep(seed, rng_offset, bh, offs_m, offs_n, Tk, dropout_p)
            p_dropped = tl.where(keep, p / (1.0 - dropout_p), 0.0)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        else:
            p_dropped = p
        dv += tl.dot(tl.trans(p_dropped.to(do.dtype)), do, input_precision=PREC)
        ds = p * (dp - delta[:, None])
        if BIAS_GRAD:
            tl.store(DBIAS + bh * Tq * Tk + offs_m[:, None] * Tk + offs_n[None, :], ds,
                     mask=m_ok[:, None] & (offs_n[None, :] < Tk))
        if ALIBI_GRAD:
            dist = _alibi_dist(POS, spos_b, b, offs_m, offs_n, Tq, Tk, HAS_POS)
            dcoef -= tl.sum(ds * dist, 0)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    dk = dk * sm_scale
    tl.store(DK + b * sk_b + h * sk_h + offs_n[:, None] * sk_t + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + b * sv_b + h * sv_h + offs_n[:, None] * sv_t + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_ok)
    if ALIBI_GRAD:
        tl.store(DCOEF + bh * tl.num_programs(0) + pid_n, tl.sum(dcoef, 0))


@triton.jit(do_not_specialize=_PER_CALL)
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, KPM, BIAS, COEF, POS,
                   sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sdo_b, sdo_h, sdo_t,
                   skpm_b, sb_b, sb_h, sb_m, sb_n, spos_b,
                   H, Tq, Tk, qk_scale2, sm_scale, dropout_p, seed, rng_offset,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr,
                   HAS_ALIBI: tl.constexpr, HAS_POS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                   PREC: tl.constexpr):
    """dQ for one query tile (dQ uses q's strides: it is allocated like q)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    m_ok = offs_m < Tq
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :], mask=m_ok[:, None] & d_ok, other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_t + offs_d[None, :],
                 mask=m_ok[:, None] & d_ok, other=0.0)
    lse = tl.load(LSE + bh * Tq + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + bh * Tq + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, Tk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < Tk) & d_ok
        k = tl.load(K + b * sk_b + h * sk_h + offs_n[:, None] * sk_t + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(V + b * sv_b + h * sv_h + offs_n[:, None] * sv_t + offs_d[None, :], mask=kv_ok, other=0.0)
        s = _scores(q, k, b, h, offs_m, offs_n, Tq, Tk, qk_scale2, KPM, skpm_b,
                    BIAS, sb_b, sb_h, sb_m, sb_n, COEF, POS, spos_b,
                    HAS_KPM, HAS_BIAS, HAS_ALIBI, HAS_POS, PREC)
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        if HAS_DROPOUT:
            keep = _keep(seed, rng_offset, bh, offs_m, offs_n, Tk, dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    dq = dq * sm_scale
    tl.store(DQ + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=m_ok[:, None] & d_ok)


@triton.jit
def _keep_mask_kernel(OUT, Tq, Tk, dropout_p, seed, rng_offset,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Materializes the kernels' dropout keep-mask (B·H×Tq×Tk int8) for the parity tests."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep(seed, rng_offset, bh, offs_m, offs_n, Tk, dropout_p)
    tl.store(OUT + bh * Tq * Tk + offs_m[:, None] * Tk + offs_n[None, :], keep.to(tl.int8),
             mask=(offs_m[:, None] < Tq) & (offs_n[None, :] < Tk))
