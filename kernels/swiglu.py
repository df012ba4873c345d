"""Fused SwiGLU projection (Shazeer 2020, "GLU variants"), CrystalCoder naming:

    u = x W_up^T + b_up (c_fc)     g = x W_gate^T + b_gate (c_fc2)     h = u * silu(g)

Shapes: x (N, C) (the op flattens leading dims), W_up / W_gate (F, C), biases (F,), h (N, F).

Forward: one Triton matmul with two fp32 accumulators sharing each x tile; the epilogue adds the
biases and applies u * silu(g), so only h (N, F) reaches memory, never the (N, 2F) projections.
Backward recomputes u and g with the same kernel (its epilogue reads dh instead), producing
    du = dh * silu(g)      dg = dh * u * sig(g) * (1 + g (1 - sig(g)))
then dx = du W_up + dg W_gate, dW = d{u,g}^T x and db = column sums run on cuBLAS (torch.mm).
Saved for backward: x only (plus the weights), versus u, g, silu(g) in eager PyTorch: the cost
is a second pass of the 4 N C F forward FLOPs. F need not be a multiple of any tile (10922).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from crystal.kernels.triton_utils import INTERPRET, check_device, dot_precision

# ----------------------------------------------------------------------------------------------
# Triton kernel


def _prune_by_shared_memory(configs, named_args, **kwargs):
    """fp32 tiles are twice as large: drop configs whose pipelined tiles overflow H100's 228 KB."""
    elem = named_args["X"].element_size()
    fits = [
        c
        for c in configs
        if c.num_stages * (c.kwargs["BLOCK_M"] + 2 * c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * elem <= 200 * 1024
    ]
    return fits or configs[-1:]


# Checked by compiling for sm_90 (Triton 3.9): all four pipeline (96-144 KB shared memory) and only the
# 128x128 tile spills registers, in the backward epilogue, where autotuning falls back on the 128x64 tile.
_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=3),
]
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 256, "BLOCK_K": 32, "GROUP_M": 4})


@triton.autotune(
    configs=[_INTERPRETER_CONFIG] if INTERPRET else _GPU_CONFIGS,
    key=["M", "N_FFN", "K", "BACKWARD"],
    prune_configs_by=None if INTERPRET else {"early_config_prune": _prune_by_shared_memory},
)
@triton.jit
def _swiglu_kernel(
    X, WU, BU, WG, BG, H, DH, DU, DG,
    M, N_FFN, K, stride_xm, stride_wu, stride_wg, stride_hm,
    HAS_BIAS: tl.constexpr, BACKWARD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """Forward: H = u * silu(g). Backward (BACKWARD): reads DH, writes DU, DG (H unused)."""
    # Grouped tile order: GROUP_M row-tiles walk the columns together so x and W tiles stay in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N_FFN, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows/cols read a valid row instead (wrapped): no masks in the hot loop, results discarded.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N_FFN).to(tl.int64)
    x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :]
    wu_ptrs = WU + cols[None, :] * stride_wu + offs_k[:, None]  # (BLOCK_K, BLOCK_N) view of W_up^T
    wg_ptrs = WG + cols[None, :] * stride_wg + offs_k[:, None]

    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        wu = tl.load(wu_ptrs, mask=k_ok[:, None], other=0.0)
        wg = tl.load(wg_ptrs, mask=k_ok[:, None], other=0.0)
        acc_u = tl.dot(x, wu, acc_u, input_precision=DOT_PRECISION)
        acc_g = tl.dot(x, wg, acc_g, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K

    if HAS_BIAS:
        col_ok = offs_n < N_FFN
        acc_u += tl.load(BU + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc_g += tl.load(BG + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]

    out_mask = (offs_m < M)[:, None] & (offs_n < N_FFN)[None, :]
    out_off = offs_m.to(tl.int64)[:, None] * stride_hm + offs_n[None, :]
    sig = tl.sigmoid(acc_g)
    silu = acc_g * sig
    if BACKWARD:
        dh = tl.load(DH + out_off, mask=out_mask, other=0.0).to(tl.float32)
        du = dh * silu
        dg = dh * acc_u * sig * (1.0 + acc_g * (1.0 - sig))
        tl.store(DU + out_off, du.to(DU.dtype.element_ty), mask=out_mask)
        tl.store(DG + out_off, dg.to(DG.dtype.element_ty), mask=out_mask)
    else:
        tl.store(H + out_off, (acc_u * silu).to(H.dtype.element_ty), mask=out_mask)


# ----------------------------------------------------------------------------------------------
# Launchers


def _check(x, w_up, b_up, w_gate, b_gate) -> None:
    if x.dim() != 2 or w_up.dim() != 2 or w_up.shape != w_gate.shape or w_up.shape[1] != x.shape[1]:
        raise ValueError(f"swiglu wants x (N, C), W (F, C); got x {tuple(x.shape)}, W {tuple(w_up.shape)}")
    if (b_up is None) != (b_gate is None):
        raise ValueError("swiglu: give both biases or neither")
    tensors = [t for t in (x, w_up, b_up, w_gate, b_gate) if t is not None]
    if len({t.dtype for t in tensors}) != 1:
        raise ValueError(f"swiglu: all inputs must share one dtype; got {[t.dtype for t in tensors]}")
    check_device(*tensors)


def _launch(x, w_up, b_up, w_gate, b_gate, h=None, dh=None, du=None, dg=None) -> None:
    m, k = x.shape
    f = w_up.shape[0]
    backward = dh is not None
    dummy = x  # never read: the constexpr branches that would use it are compiled out
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(f, meta["BLOCK_N"]),)  # noqa: E731
    _swiglu_kernel[grid](
        x, w_up, b_up if b_up is not None else dummy, w_gate, b_gate if b_gate is not None else dummy,
        h if h is not None else dummy, dh if backward else dummy, du if backward else dummy,
        dg if backward else dummy, m, f, k, x.stride(0), w_up.stride(0), w_gate.stride(0), f,
        HAS_BIAS=b_up is not None, BACKWARD=backward, DOT_PRECISION=dot_precision(x.dtype),
    )  # fmt: skip


def swiglu_forward(x, w_up, b_up, w_gate, b_gate) -> torch.Tensor:
    _check(x, w_up, b_up, w_gate, b_gate)
    x, w_up, w_gate = x.contiguous(), w_up.contiguous(), w_gate.contiguous()
    h = torch.empty((x.shape[0], w_up.shape[0]), dtype=x.dtype, device=x.device)
    if x.shape[0]:
        _launch(x, w_up, b_up, w_gate, b_gate, h=h)
    return h


def swiglu_backward_pre(dh, x, w_up, b_up, w_gate, b_gate) -> tuple[torch.Tensor, torch.Tensor]:
    """Recompute u, g and return (du, dg), each (N, F) in x's dtype."""
    x, w_up, w_gate, dh = x.contiguous(), w_up.contiguous(), w_gate.contiguous(), dh.contiguous()
    du = torch.empty(dh.shape, dtype=x.dtype, device=x.device)
    dg = torch.empty_like(du)
    if x.shape[0]:
        _launch(x, w_up, b_up, w_gate, b_gate, dh=dh, du=du, dg=dg)
    return du, dg


# ----------------------------------------------------------------------------------------------
# torch.library custom ops


@torch.library.custom_op("crystal::swiglu", mutates_args=())
def swiglu_op(
    x: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    w_gate: torch.Tensor,
    b_gate: torch.Tensor | None,
) -> torch.Tensor:
    return swiglu_forward(x, w_up, b_up, w_gate, b_gate)


@swiglu_op.register_fake
def _(x, w_up, b_up, w_gate, b_gate):
    return x.new_empty((x.shape[0], w_up.shape[0]))


@torch.library.custom_op("crystal::swiglu_backward", mutates_args=())
def swiglu_backward_op(
    dh: torch.Tensor,
    x: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    w_gate: torch.Tensor,
    b_gate: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return swiglu_backward_pre(dh, x, w_up, b_up, w_gate, b_gate)


@swiglu_backward_op.register_fake
def _(dh, x, w_up, b_up, w_gate, b_gate):
    return dh.new_empty(dh.shape), dh.new_empty(dh.shape)


def _setup_context(ctx, inputs, output):
    x, w_up, b_up, w_gate, b_gate = inputs
    ctx.save_for_backward(x, w_up, b_up, w_gate, b_gate)


def _backward(ctx, dh):
    x, w_up, b_up, w_gate, b_gate = ctx.saved_tensors
    du, dg = swiglu_backward_op(dh, x, w_up, b_up, w_gate, b_gate)
    needs = ctx.needs_input_grad
    dx = dwu = dbu = dwg = dbg = None
    if needs[0]:
        dx = torch.mm(du, w_up)
        dx.addmm_(dg, w_gate)  # dx = du W_up + dg W_gate without a second (N, C) temporary
    if needs[1]:
        dwu = torch.mm(du.t(), x)
    if needs[3]:
        dwg = torch.mm(dg.t(), x)
    if b_up is not None and needs[2]:
        dbu = du.sum(0)
    if b_gate is not None and needs[4]:
        dbg = dg.sum(0)
    return dx, dwu, dbu, dwg, dbg


swiglu_op.register_autograd(_backward, setup_context=_setup_context)


def swiglu(
    x: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    w_gate: torch.Tensor,
    b_gate: torch.Tensor | None,
) -> torch.Tensor:
    """x (..., C) -> (x W_up^T + b_up) * silu(x W_gate^T + b_gate), (..., F)."""
    lead = x.shape[:-1]
    h = swiglu_op(x.reshape(-1, x.shape[-1]), w_up, b_up, w_gate, b_gate)
    return h.view(*lead, w_up.shape[0])
