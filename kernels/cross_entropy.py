"""Fused LM head + cross-entropy: final projection (tied embedding, muP logits scale) and mean CE
over non-ignored tokens, chunked over tokens so the (N, V) logits never exist, with the gradient
computed during the forward (the approach of Liger-Kernel's fused linear cross-entropy).

    z = s * (x W^T)   (s = logits_scale; x W^T rounded to x's dtype first, as the reference does)
    loss = sum_{i: t_i != ignore} (logsumexp(z_i) - z_{i, t_i}) / n_valid
    dz_i = (softmax(z_i) - onehot(t_i)) / n_valid   (0 for ignored rows)
    dx = s * dz W,   dW = s * dz^T x

Shapes: x (N, C), W (V, C), targets (N,) integers; loss scalar fp32.

Per chunk of tokens: logits (chunk, V) = x_chunk W^T on cuBLAS, then one Triton program per row
makes two passes over V in fp32 (online max/sum for the log-sum-exp, then the gradient written over
the logits in place), then dx_chunk = dlogits W and dW += dlogits^T x_chunk on cuBLAS, dW summed in fp32
and cast to W's dtype once at the end. Only one
chunk of logits is alive at a time; the chunk is sized so it holds about as many elements as x.
The backward only multiplies the stored dx, dW by the incoming scalar gradient.
n_valid stays on the device (no host sync); a batch with every target ignored gives loss 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from crystal.kernels.triton_utils import INTERPRET, check_device

# ----------------------------------------------------------------------------------------------
# Triton kernel


@triton.jit
def _ce_rows_kernel(
    LOGITS, TARGETS, LOSS, N_VALID, stride_row, n_vocab, logits_scale, ignore_index,
    COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """One row: loss_i / n_valid into LOSS; with COMPUTE_GRAD the row's logits become s * dz_i."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    target = tl.load(TARGETS + row).to(tl.int32)
    valid = target != ignore_index
    n_valid = tl.maximum(tl.load(N_VALID).to(tl.float32), 1.0)
    offs = tl.arange(0, BLOCK_V)

    # Pass 1: running max and sum of exp over the vocabulary (fp32).
    # The running max starts finite, so lanes past the vocabulary's end (z = -inf) add exp(-inf) = 0
    # instead of exp(-inf - -inf) = nan.
    m = tl.full([BLOCK_V], -1.0e30, dtype=tl.float32)
    acc = tl.zeros([BLOCK_V], dtype=tl.float32)
    for v0 in range(0, n_vocab, BLOCK_V):
        cols = v0 + offs
        col_ok = cols < n_vocab
        z = tl.where(col_ok, tl.load(base + cols, mask=col_ok, other=0.0).to(tl.float32) * logits_scale, float("-inf"))
        m_new = tl.maximum(m, z)
        acc = acc * tl.exp(m - m_new) + tl.exp(z - m_new)
        m = m_new
    row_max = tl.max(m, 0)
    lse = row_max + tl.log(tl.sum(acc * tl.exp(m - row_max), 0))

    target_ok = valid & (target >= 0) & (target < n_vocab)
    z_target = tl.load(base + target, mask=target_ok, other=0.0).to(tl.float32) * logits_scale
    tl.store(LOSS + row, tl.where(valid, (lse - z_target) / n_valid, 0.0))

    if COMPUTE_GRAD:
        # Pass 2: d loss / d raw logit = s * (softmax - onehot) / n_valid, over the logits in place.
        factor = tl.where(valid, logits_scale / n_valid, 0.0)
        for v0 in range(0, n_vocab, BLOCK_V):
            cols = v0 + offs
            col_ok = cols < n_vocab
            z = tl.load(base + cols, mask=col_ok, other=0.0).to(tl.float32) * logits_scale
            grad = tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)
            tl.store(base + cols, (grad * factor).to(LOGITS.dtype.element_ty), mask=col_ok)


# ----------------------------------------------------------------------------------------------
# Launcher

_ADDMM_OUT_DTYPE = hasattr(torch.ops.aten.addmm, "dtype_out")  # 16-bit matmul with an fp32 output


def _check(x, weight, targets) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1] or targets.shape != (x.shape[0],):
        raise ValueError(
            f"linear_cross_entropy wants x (N, C), weight (V, C), targets (N,); got {tuple(x.shape)}, "
            f"{tuple(weight.shape)}, {tuple(targets.shape)}"
        )
    if x.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: x and weight dtypes differ ({x.dtype} vs {weight.dtype})")
    check_device(x, weight, targets)


def default_chunk_size(n_tokens: int, n_vocab: int, d_model: int) -> int:
    """Tokens per chunk so one chunk of logits holds about as many elements as x (power of two)."""
    return min(n_tokens, triton.next_power_of_2(triton.cdiv(n_tokens, triton.cdiv(n_vocab, d_model))))


def linear_cross_entropy_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    logits_scale: float,
    ignore_index: int,
    compute_grad: bool,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss fp32 scalar, dx (N, C), dW (V, C)); dx, dW are empty (0,) when not compute_grad."""
    _check(x, weight, targets)
    x, weight, targets = x.contiguous(), weight.contiguous(), targets.contiguous()
    n, c = x.shape
    v = weight.shape[0]
    loss_rows = torch.zeros(n, dtype=torch.float32, device=x.device)
    n_valid = (targets != ignore_index).sum()  # stays on the device
    grad_x = torch.empty((n, c) if compute_grad else (0,), dtype=x.dtype, device=x.device)
    # dW sums over every chunk: in fp32, cast once at the end. A 16-bit running sum would round after every
    # chunk, an error that grows with the number of chunks (hundreds at 7B batch sizes).
    grad_w = torch.empty((v, c) if compute_grad else (0,), dtype=torch.float32, device=x.device)
    chunk = chunk_size or default_chunk_size(n, v, c)
    block_v = min(triton.next_power_of_2(v), 8192 if INTERPRET else 4096)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        x_chunk = x[start:end]
        logits = torch.mm(x_chunk, weight.t())  # (chunk, V) in x's dtype, like F.linear in the reference
        _ce_rows_kernel[(end - start,)](
            logits, targets[start:end], loss_rows[start:end], n_valid, logits.stride(0), v, logits_scale,
            ignore_index, COMPUTE_GRAD=compute_grad, BLOCK_V=block_v, num_warps=8 if block_v >= 4096 else 4,
        )  # fmt: skip
        if compute_grad:  # logits now hold d loss / d (x W^T)
            torch.mm(logits, weight, out=grad_x[start:end])
            _accumulate_grad_w(grad_w, logits.t(), x_chunk, first=start == 0)
    return loss_rows.sum(), grad_x, grad_w.to(weight.dtype)


def _accumulate_grad_w(grad_w: torch.Tensor, dlogits_t: torch.Tensor, x_chunk: torch.Tensor, first: bool) -> None:
    """grad_w (V, C) fp32 (+)= dlogits_t (V, chunk) @ x_chunk (chunk, C). 16-bit inputs: on CUDA the matmul
    writes fp32 directly (addmm's out_dtype, torch >= 2.8; the tensor cores accumulate in fp32 anyway);
    elsewhere the inputs are widened (exactly) and multiplied in fp32: the same products, summed in fp32."""
    if dlogits_t.dtype != torch.float32:
        if dlogits_t.is_cuda and _ADDMM_OUT_DTYPE:
            torch.addmm(grad_w, dlogits_t, x_chunk, beta=0.0 if first else 1.0, out_dtype=torch.float32, out=grad_w)
            return
        dlogits_t, x_chunk = dlogits_t.float(), x_chunk.float()
    if first:
        torch.mm(dlogits_t, x_chunk, out=grad_w)
    else:
        grad_w.addmm_(dlogits_t, x_chunk)


# ----------------------------------------------------------------------------------------------
# torch.library custom op


@torch.library.custom_op("crystal::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    logits_scale: float,
    ignore_index: int,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return linear_cross_entropy_forward(x, weight, targets, logits_scale, ignore_index, compute_grad)


@linear_cross_entropy_op.register_fake
def _(x, weight, targets, logits_scale, ignore_index, compute_grad):
    loss = x.new_empty((), dtype=torch.float32)
    if not compute_grad:
        return loss, x.new_empty((0,)), weight.new_empty((0,))
    return loss, x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    _, grad_x, grad_w = output
    ctx.save_for_backward(grad_x, grad_w)
    ctx.mark_non_differentiable(grad_x, grad_w)


def _backward(ctx, grad_loss, _gx, _gw):
    grad_x, grad_w = ctx.saved_tensors
    if grad_x.numel() == 0 and any(ctx.needs_input_grad[:2]):
        raise RuntimeError("linear_cross_entropy was called with compute_grad=False; its backward cannot run")
    # a 0-dim fp32 factor keeps the tensors' dtype; the product is formed in fp32 inside the kernel
    dx = grad_x * grad_loss if ctx.needs_input_grad[0] else None
    dw = grad_w * grad_loss if ctx.needs_input_grad[1] else None
    return dx, dw, None, None, None, None


linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    logits_scale: float = 1.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """x (N, C), weight (V, C), targets (N,) -> mean cross-entropy over non-ignored tokens (fp32 scalar)."""
    compute_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    loss, _, _ = linear_cross_entropy_op(x, weight, targets, logits_scale, ignore_index, compute_grad)
    return loss
