"""Causal flash attention with optional document masking (FlashAttention-2, Dao 2023).

    out_i = sum_j P_ij v_j,  P_ij = softmax_j(scale * q_i . k_j) over keys j <= i of i's document
    lse_i = log sum_j exp(scale * q_i . k_j)                              (natural log, fp32)

Shapes: q, k, v, out (B, H, S, D); lse (B, H, S); doc_ids (B, S) integers. Any strides with a unit
stride on D (the model passes transposed views of its fused QKV projection). `out` is allocated as
(B, S, H, D) memory seen through a (B, H, S, D) view, so the model's transpose-and-reshape back to
(B, S, H*D) is free.

Numerics: scores, the running max and the running sum live in fp32 (base-2 exponentials with
log2(e) folded into the scale); P is rounded to the value dtype only for the P @ V product, as in
FlashAttention. CrystalCoder's muP scale is 1/head_dim; the caller passes it.

Document masking: query i sees key j iff j <= i and doc[i] == doc[j]. Key blocks before the first
token of the earliest document in a query block are never visited (forward and dQ), and query
blocks after the last token of the latest document in a key block are never visited (dK/dV), so
the work scales with the sum of squared document lengths, not S^2. Bounds come from per-token
first/last occurrence indices computed on the device without a host sync; ids need not be
contiguous or sorted (a repeated id is one document, as in the reference mask).

Backward: delta_i = sum_d dO_id * O_id (minus dLSE_i when the lse output has a gradient), then one
kernel per key block for dK, dV and one per query block for dQ, both recomputing P from lse.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from crystal.kernels.triton_utils import INTERPRET, autotune_configs, check_device, dot_precision, last_dim_contiguous

LOG2E = math.log2(math.e)


def _fp32_safe(config: triton.Config):
    """fp32 tiles are twice the bytes: autotune 16-bit inputs over the fast configs, fp32 (tests) over one
    small config that fits shared memory whatever the head dim."""

    def prune(configs, named_args, **kwargs):
        return [config] if named_args["Q"].element_size() == 4 else configs

    return None if INTERPRET else {"early_config_prune": prune}


# ----------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, doc_base, doc_q, offs_m, offs_d, lo, hi, seq_len,
    qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr, HAS_DOC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    offs_n = tl.arange(0, BLOCK_N)
    d_mask = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < seq_len
        kt = tl.load(
            k_base + cols[None, :] * stride_ks + offs_d[:, None], mask=col_ok[None, :] & d_mask[:, None], other=0.0
        )
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if CAUSAL_MASK or HAS_DOC:
            keep = col_ok[None, :]
            if CAUSAL_MASK:
                keep = keep & (cols[None, :] <= offs_m[:, None])
            if HAS_DOC:
                doc_k = tl.load(doc_base + cols, mask=col_ok, other=-1)
                keep = keep & (doc_q[:, None] == doc_k[None, :])
            qk = tl.where(keep, qk, float("-inf"))
        # m_i starts finite (-1e30), so a row whose keys are all masked in this block gives p = 0, not NaN.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=col_ok[:, None] & d_mask[None, :], other=0.0
        )
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# Every GPU config below compiles for sm_90 with pipelined loads (bench/compile_sm90.py); the only ones
# that spill a little are the 128x128 forward tile with document masking, which autotuning can pass over.
@triton.autotune(
    configs=autotune_configs(
        [
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        ],
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1),
    ),
    key=["seq_len", "HEAD_DIM", "HAS_DOC"],
    prune_configs_by=_fp32_safe(triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2)),
)
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, DOC, FIRST,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os, stride_db,
    n_heads, seq_len, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DOC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)  # B*H on axis 0: axis 1 is capped at 65535
    # Causal work grows with the query block: launch the last (heaviest) blocks first, less tail idling.
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seq_len
    d_mask = offs_d < HEAD_DIM

    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
        mask=row_ok[:, None] & d_mask[None, :],
        other=0.0,
    )
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    lo = 0
    doc_base = DOC + b * stride_db
    doc_q = tl.zeros([BLOCK_M], dtype=tl.int32)
    if HAS_DOC:
        doc_q = tl.load(doc_base + offs_m, mask=row_ok, other=-1)
        first = tl.load(FIRST + b * stride_db + offs_m, mask=row_ok, other=seq_len)
        lo = (tl.min(first, 0) // BLOCK_N) * BLOCK_N  # earliest key any row of this block can see

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Keys strictly below the block's first row: no causal mask needed (BLOCK_M % BLOCK_N == 0).
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, doc_base, doc_q, offs_m, offs_d, lo, m0, seq_len,
        qk_scale, HEAD_DIM, BLOCK_N, False, HAS_DOC, DOT_PRECISION,
    )  # fmt: skip
    # The diagonal: keys m0 .. m0 + BLOCK_M - 1 with the causal mask.
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, doc_base, doc_q, offs_m, offs_d, m0,
        tl.minimum(m0 + BLOCK_M, seq_len), seq_len, qk_scale, HEAD_DIM, BLOCK_N, True, HAS_DOC, DOT_PRECISION,
    )  # fmt: skip

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only padded rows (never stored) can have l = 0
    out = acc / l_safe[:, None]
    tl.store(
        O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
        out.to(O.dtype.element_ty),
        mask=row_ok[:, None] & d_mask[None, :],
    )
    lse = (m_i + tl.log2(l_safe)) / 1.4426950408889634  # back to natural log
    tl.store(LSE + pid_bh.to(tl.int64) * seq_len + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_delta_kernel(
    O, DO, DLSE, DELTA, stride_ob, stride_oh, stride_os, stride_dob, stride_doh, stride_dos, n_heads, seq_len,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """delta_i = sum_d dO_id * O_id - dLSE_i (fp32): the row term of dS = P * (dP - delta)."""
    pid_bh = tl.program_id(0)  # B*H on axis 0: axis 1 is capped at 65535
    pid_m = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < seq_len)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :], mask=mask, other=0.0
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = pid_bh.to(tl.int64) * seq_len + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + row, mask=offs_m < seq_len, other=0.0)
    tl.store(DELTA + row, delta, mask=offs_m < seq_len)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, q_base, do_base, stride_qs, stride_dos, lse_base, delta_base, doc_base, doc_k, offs_n, offs_d,
    lo, hi, seq_len, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL_MASK: tl.constexpr,
    HAS_DOC: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    offs_m = tl.arange(0, BLOCK_M)
    d_mask = offs_d < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < seq_len
        qt = tl.load(
            q_base + rows[None, :] * stride_qs + offs_d[:, None], mask=row_ok[None, :] & d_mask[:, None], other=0.0
        )
        do = tl.load(
            do_base + rows[:, None] * stride_dos + offs_d[None, :], mask=row_ok[:, None] & d_mask[None, :], other=0.0
        )
        # Padded rows read lse = +inf, so their P is exactly 0 and they add nothing.
        lse2 = tl.load(lse_base + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        pt = tl.exp2(tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale - lse2[None, :])  # (BLOCK_N, BLOCK_M)
        if CAUSAL_MASK or HAS_DOC:
            keep = row_ok[None, :]
            if CAUSAL_MASK:
                keep = keep & (offs_n[:, None] <= rows[None, :])
            if HAS_DOC:
                doc_q = tl.load(doc_base + rows, mask=row_ok, other=-1)
                keep = keep & (doc_k[:, None] == doc_q[None, :])
            pt = tl.where(keep, pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.autotune(
    configs=autotune_configs(
        [
            triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        ],
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1),
    ),
    key=["seq_len", "HEAD_DIM", "HAS_DOC"],
    prune_configs_by=_fp32_safe(triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=2)),
)
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, DOC, LAST,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos, stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs,
    stride_db, n_heads, seq_len, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DOC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program per key block: dV = P^T dO, dK = scale * dS^T Q over the query blocks that see it."""
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < seq_len
    kv_mask = col_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(
        K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0
    )
    v = tl.load(
        V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0
    )
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    lse_base = LSE + pid_bh.to(tl.int64) * seq_len
    delta_base = DELTA + pid_bh.to(tl.int64) * seq_len

    hi = seq_len
    doc_base = DOC + b * stride_db
    doc_k = tl.zeros([BLOCK_N], dtype=tl.int32)
    if HAS_DOC:
        doc_k = tl.load(doc_base + offs_n, mask=col_ok, other=-2)
        last = tl.load(LAST + b * stride_db + offs_n, mask=col_ok, other=-1)
        hi = tl.minimum(tl.max(last, 0) + 1, seq_len)  # no query after this sees any key of the block

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Query rows inside the key block's span need the causal mask (BLOCK_N % BLOCK_M == 0) ...
    dk, dv = _bwd_dkdv_inner(
        dk, dv, k, v, q_base, do_base, stride_qs, stride_dos, lse_base, delta_base, doc_base, doc_k, offs_n, offs_d,
        n0, tl.minimum(n0 + BLOCK_N, hi), seq_len, qk_scale, HEAD_DIM, BLOCK_M, True, HAS_DOC, DOT_PRECISION,
    )  # fmt: skip
    # ... rows after it see every key of the block.
    dk, dv = _bwd_dkdv_inner(
        dk, dv, k, v, q_base, do_base, stride_qs, stride_dos, lse_base, delta_base, doc_base, doc_k, offs_n, offs_d,
        n0 + BLOCK_N, hi, seq_len, qk_scale, HEAD_DIM, BLOCK_M, False, HAS_DOC, DOT_PRECISION,
    )  # fmt: skip
    dk = dk * sm_scale
    tl.store(
        DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :],
        dk.to(DK.dtype.element_ty),
        mask=kv_mask,
    )
    tl.store(
        DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :],
        dv.to(DV.dtype.element_ty),
        mask=kv_mask,
    )


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, doc_base, doc_q, offs_m, offs_d, lo, hi, seq_len,
    qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr, HAS_DOC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    offs_n = tl.arange(0, BLOCK_N)
    d_mask = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < seq_len
        kt = tl.load(
            k_base + cols[None, :] * stride_ks + offs_d[:, None], mask=col_ok[None, :] & d_mask[:, None], other=0.0
        )
        vt = tl.load(
            v_base + cols[None, :] * stride_vs + offs_d[:, None], mask=col_ok[None, :] & d_mask[:, None], other=0.0
        )
        p = tl.exp2(tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale - lse2[:, None])  # (BLOCK_M, BLOCK_N)
        if CAUSAL_MASK or HAS_DOC:
            keep = col_ok[None, :]
            if CAUSAL_MASK:
                keep = keep & (cols[None, :] <= offs_m[:, None])
            if HAS_DOC:
                doc_k = tl.load(doc_base + cols, mask=col_ok, other=-2)
                keep = keep & (doc_q[:, None] == doc_k[None, :])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PRECISION)
    return dq


@triton.autotune(
    configs=autotune_configs(
        [
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        ],
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1),
    ),
    key=["seq_len", "HEAD_DIM", "HAS_DOC"],
    prune_configs_by=_fp32_safe(triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2)),
)
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, DOC, FIRST,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos, stride_dqb, stride_dqh, stride_dqs,
    stride_db, n_heads, seq_len, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DOC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program per query block: dQ = scale * dS K over the key blocks it sees."""
    pid_bh = tl.program_id(0)  # B*H on axis 0: axis 1 is capped at 65535
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)  # heaviest query blocks first
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seq_len
    qd_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :], mask=qd_mask, other=0.0
    )
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :], mask=qd_mask, other=0.0
    )
    row = pid_bh.to(tl.int64) * seq_len + offs_m
    lse2 = tl.load(LSE + row, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + row, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    lo = 0
    doc_base = DOC + b * stride_db
    doc_q = tl.zeros([BLOCK_M], dtype=tl.int32)
    if HAS_DOC:
        doc_q = tl.load(doc_base + offs_m, mask=row_ok, other=-1)
        first = tl.load(FIRST + b * stride_db + offs_m, mask=row_ok, other=seq_len)
        lo = (tl.min(first, 0) // BLOCK_N) * BLOCK_N

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, doc_base, doc_q, offs_m, offs_d, lo, m0, seq_len,
        qk_scale, HEAD_DIM, BLOCK_N, False, HAS_DOC, DOT_PRECISION,
    )  # fmt: skip
    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, doc_base, doc_q, offs_m, offs_d, m0,
        tl.minimum(m0 + BLOCK_M, seq_len), seq_len, qk_scale, HEAD_DIM, BLOCK_N, True, HAS_DOC, DOT_PRECISION,
    )  # fmt: skip
    dq = dq * sm_scale
    tl.store(
        DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=qd_mask,
    )


# ----------------------------------------------------------------------------------------------
# Launchers


def document_bounds(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S) ids -> (first, last) (B, S) int32: the first and last index holding each token's id.

    Device-only (stable sort, cummax, scatter): no host sync, safe inside a CUDA graph or a compiled step.
    """
    b, s = doc_ids.shape
    sorted_ids, order = torch.sort(doc_ids, dim=-1, stable=True)
    pos = torch.arange(s, device=doc_ids.device).expand(b, s)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    group_start = torch.where(starts, pos, 0).cummax(-1).values  # sorted position where my group starts
    group_end = torch.where(ends, pos, s - 1).flip(-1).cummin(-1).values.flip(-1)
    # Stable sort: the group's first sorted entry has the smallest original index, its last the largest.
    first = torch.empty_like(order).scatter_(-1, order, order.gather(-1, group_start))
    last = torch.empty_like(order).scatter_(-1, order, order.gather(-1, group_end))
    return first.to(torch.int32), last.to(torch.int32)


def _prepare_doc(doc_ids: torch.Tensor | None, b: int, s: int, device: torch.device):
    if doc_ids is None:
        dummy = torch.empty(1, dtype=torch.int32, device=device)
        return dummy, dummy, dummy, 0
    if doc_ids.dim() == 1:
        doc_ids = doc_ids[None].expand(b, s)
    if tuple(doc_ids.shape) != (b, s):
        raise ValueError(f"doc_ids has shape {tuple(doc_ids.shape)}; expected (B, S) = ({b}, {s})")
    doc = doc_ids.to(torch.int32).contiguous()
    first, last = document_bounds(doc)
    return doc, first, last, doc.stride(0)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one (B, H, S, D) shape; got {q.shape}, {k.shape}, {v.shape}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one of fp16/bf16/fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] > 256:
        raise ValueError(f"head dim {q.shape[-1]} > 256 is not supported by the flash kernel")
    check_device(q, k, v)


def _empty_bshd_view(q: torch.Tensor) -> torch.Tensor:
    """A (B, H, S, D) tensor whose memory is (B, S, H, D): the model's output reshape becomes a view."""
    b, h, s, d = q.shape
    return torch.empty((b, s, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, doc_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_qkv(q, k, v)
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    b, h, s, d = q.shape
    out = _empty_bshd_view(q)
    lse = torch.empty((b, h, s), dtype=torch.float32, device=q.device)
    doc, first, _, stride_db = _prepare_doc(doc_ids, b, s, q.device)
    grid = lambda meta: (b * h, triton.cdiv(s, meta["BLOCK_M"]))  # noqa: E731
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, doc, first,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), out.stride(0), out.stride(1), out.stride(2), stride_db,
        h, s, scale * LOG2E,
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), HAS_DOC=doc_ids is not None,
        DOT_PRECISION=dot_precision(q.dtype),
    )  # fmt: skip
    return out, lse


def attention_backward(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    doc_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, out, grad_out = (last_dim_contiguous(t) for t in (q, k, v, out, grad_out))
    b, h, s, d = q.shape
    block_d = max(16, triton.next_power_of_2(d))
    precision = dot_precision(q.dtype)
    has_doc = doc_ids is not None
    doc, first, last, stride_db = _prepare_doc(doc_ids, b, s, q.device)

    delta = torch.empty((b, h, s), dtype=torch.float32, device=q.device)
    dlse = grad_lse.contiguous() if grad_lse is not None else delta  # placeholder pointer when absent
    _bwd_delta_kernel[(b * h, triton.cdiv(s, 64))](
        out, grad_out, dlse, delta, out.stride(0), out.stride(1), out.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), h, s,
        HEAD_DIM=d, BLOCK_D=block_d, HAS_DLSE=grad_lse is not None, BLOCK_M=64,
    )  # fmt: skip

    dq, dk, dv = _empty_bshd_view(q), _empty_bshd_view(k), _empty_bshd_view(v)
    _attn_bwd_dkdv_kernel[lambda meta: (b * h, triton.cdiv(s, meta["BLOCK_N"]))](
        q, k, v, grad_out, dk, dv, lse, delta, doc, last,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), dk.stride(0), dk.stride(1),
        dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), stride_db, h, s, scale * LOG2E, scale,
        HEAD_DIM=d, BLOCK_D=block_d, HAS_DOC=has_doc, DOT_PRECISION=precision,
    )  # fmt: skip
    _attn_bwd_dq_kernel[lambda meta: (b * h, triton.cdiv(s, meta["BLOCK_M"]))](
        q, k, v, grad_out, dq, lse, delta, doc, first,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), dq.stride(0), dq.stride(1),
        dq.stride(2), stride_db, h, s, scale * LOG2E, scale,
        HEAD_DIM=d, BLOCK_D=block_d, HAS_DOC=has_doc, DOT_PRECISION=precision,
    )  # fmt: skip
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# torch.library custom ops (opaque to torch.compile)


@torch.library.custom_op("crystal::attention", mutates_args=())
def attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, doc_ids: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, scale, doc_ids)


@attention_op.register_fake
def _(q, k, v, scale, doc_ids):
    b, h, s, _ = q.shape
    return _empty_bshd_view(q), q.new_empty((b, h, s), dtype=torch.float32)


@torch.library.custom_op("crystal::attention_backward", mutates_args=())
def attention_backward_op(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    doc_ids: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(grad_out, grad_lse, q, k, v, out, lse, scale, doc_ids)


@attention_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, scale, doc_ids):
    return _empty_bshd_view(q), _empty_bshd_view(k), _empty_bshd_view(v)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, doc_ids = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, doc_ids)
    ctx.scale = scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, doc_ids = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = attention_backward_op(grad_out, grad_lse, q, k, v, out, lse, ctx.scale, doc_ids)
    return dq, dk, dv, None, None


attention_op.register_autograd(_backward, setup_context=_setup_context)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, doc_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal (optionally document-masked) attention, q/k/v (B, H, S, D) -> (B, H, S, D)."""
    return attention_op(q, k, v, scale, doc_ids)[0]


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, doc_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """As `attention`, plus the fp32 log-sum-exp (B, H, S) in natural log (differentiable too)."""
    return attention_op(q, k, v, scale, doc_ids)
