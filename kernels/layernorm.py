"""LayerNorm (Ba et al. 2016) with weight and bias, fused forward and backward.

    mean = sum(x) / C      rstd = 1 / sqrt(sum((x - mean)^2) / C + eps)      (fp32, whatever x is)
    y = (x - mean) * rstd * w + b
    dx = rstd * (w dy - mean(w dy) - xhat * mean(w dy * xhat)),   xhat = (x - mean) * rstd
    dw = sum_rows dy * xhat,   db = sum_rows dy

Shapes: x, y (N, C) (the op flattens leading dims); w, b (C,); mean, rstd (N,) fp32, saved for the
backward so it never recomputes the statistics. The forward keeps a whole row in registers (two-pass
variance on the loaded row, no Welford needed); C up to 32768.

Row-parallel dW/db: the backward launches a fixed number of programs (a few per SM), each walking a
contiguous chunk of rows and accumulating its partial dW, db in fp32 registers; the (programs, C)
partials are summed once at the end. Deterministic (no atomics), and the partials are tiny.
y and dx have x's dtype; dw, db have the weight's (weights may be fp32 under bf16 activations).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from crystal.kernels.triton_utils import INTERPRET, check_device, num_programs_for_reduction

MAX_COLS = 32768

# ----------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _ln_fwd_kernel(
    X, Y, W, B, MEAN, RSTD, stride_x, stride_y, n_rows, n_cols, eps,
    HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, 1) / n_cols
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / n_cols + eps)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _ln_bwd_kernel(
    DY, X, W, MEAN, RSTD, DX, DW_PART, DB_PART, stride_dy, stride_x, stride_dx, n_rows, n_cols, rows_per_program,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dy
        c1 = tl.sum(xhat * wdy, 1) / n_cols
        c2 = tl.sum(wdy, 1) / n_cols
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, 0)
        db += tl.sum(dy, 0)
    tl.store(DW_PART + pid * n_cols + cols, dw, mask=col_ok)
    tl.store(DB_PART + pid * n_cols + cols, db, mask=col_ok)


# ----------------------------------------------------------------------------------------------
# Launchers


def _tile(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps): one 4096-wide row per program on a GPU, several narrow rows."""
    block_c = triton.next_power_of_2(n_cols)
    budget = 16384 if INTERPRET else 4096  # elements per tile
    block_r = max(1, budget // block_c)
    num_warps = min(16, max(4, block_c * block_r // 512))
    return block_r, block_c, num_warps


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dim() != 2 or weight.shape != (x.shape[1],) or (bias is not None and bias.shape != weight.shape):
        raise ValueError(f"layernorm wants x (N, C), weight/bias (C,); got {tuple(x.shape)}, {tuple(weight.shape)}")
    if x.shape[1] > MAX_COLS:
        raise ValueError(f"layernorm: C={x.shape[1]} > {MAX_COLS} does not fit one row per program")
    check_device(*(t for t in (x, weight, bias) if t is not None))


def layernorm_forward(x, weight, bias, eps: float):
    _check(x, weight, bias)
    x = x if x.stride(-1) == 1 else x.contiguous()
    n, c = x.shape
    y = torch.empty((n, c), dtype=x.dtype, device=x.device)
    mean = torch.empty(n, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n, dtype=torch.float32, device=x.device)
    block_r, block_c, num_warps = _tile(c)
    _ln_fwd_kernel[(triton.cdiv(n, block_r),)](
        x, y, weight, bias if bias is not None else weight, mean, rstd, x.stride(0), y.stride(0), n, c, eps,
        HAS_BIAS=bias is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
    )  # fmt: skip
    return y, mean, rstd


def layernorm_backward(dy, x, weight, mean, rstd):
    """-> dx (x's dtype), dw, db (weight's dtype)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    n, c = x.shape
    block_r, block_c, num_warps = _tile(c)
    programs = max(1, min(num_programs_for_reduction(x.device), triton.cdiv(n, block_r)))
    rows_per_program = triton.cdiv(n, programs)
    dx = torch.empty((n, c), dtype=x.dtype, device=x.device)
    dw_part = torch.empty((programs, c), dtype=torch.float32, device=x.device)
    db_part = torch.empty((programs, c), dtype=torch.float32, device=x.device)
    _ln_bwd_kernel[(programs,)](
        dy, x, weight, mean, rstd, dx, dw_part, db_part, dy.stride(0), x.stride(0), dx.stride(0), n, c,
        rows_per_program, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
    )  # fmt: skip
    return dx, dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(weight.dtype)


# ----------------------------------------------------------------------------------------------
# torch.library custom ops


@torch.library.custom_op("crystal::layernorm", mutates_args=())
def layernorm_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layernorm_forward(x, weight, bias, eps)


@layernorm_op.register_fake
def _(x, weight, bias, eps):
    n = x.shape[0]
    return x.new_empty(x.shape), x.new_empty(n, dtype=torch.float32), x.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("crystal::layernorm_backward", mutates_args=())
def layernorm_backward_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layernorm_backward(dy, x, weight, mean, rstd)


@layernorm_backward_op.register_fake
def _(dy, x, weight, mean, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = layernorm_backward_op(dy, x, weight, mean, rstd)
    return dx, dw, db if ctx.has_bias else None, None


layernorm_op.register_autograd(_backward, setup_context=_setup_context)


def layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x (..., C) -> LayerNorm over C, in x's dtype (fp32 statistics)."""
    y, _, _ = layernorm_op(x.reshape(-1, x.shape[-1]), weight, bias, eps)
    return y.view(x.shape)
