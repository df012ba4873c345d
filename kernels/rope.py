"""Rotary position embedding on the first `rotary_dims` of each head, q and k in one launch.

    inv_freq_i = theta^(-2i/R)        angle_{t,i} = position_t * inv_freq_i      (fp32, always)
    interleaved (GPT-J, CrystalCoder): pair (x_2i, x_2i+1)      rotate-half (NeoX, LLaMA): (x_i, x_i+R/2)
    (a, b) -> (a cos - b sin, a sin + b cos);   dims R..D pass through unchanged

Shapes: q, k (B, S, H, D) with any strides except a unit stride on D (the model passes views of its
fused QKV output); positions (B, S) or (S,) integers, per token, so they may restart at every packed
document. Each program rotates BLOCK_T tokens x BLOCK_H heads of both q and k; the angles are
computed once per token in fp32 from an inv_freq table made by the same torch expression as the
reference (LLM360 lesson: bf16 angles lose position information at long context).

Each output element is x_d cos_d + sign_d x_partner(d) sin_d, so the pass-through dims are the
same formula with cos 1 and sin 0, and interleaved and rotate-half differ only in partner(d).
The backward is the rotation by -angle (sin negated), by the same kernel.

In place when autograd allows: with no gradient to track, `rope` rotates q and k in place (only the
R rotary dims are read and written). A custom op that mutates its inputs cannot carry an autograd
formula, so with gradients the functional op writes new tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from crystal.kernels.triton_utils import INTERPRET, check_device

# ----------------------------------------------------------------------------------------------
# Triton kernel


@triton.jit
def _rotate_tile(
    X, OUT, stride_xb, stride_xs, stride_xh, stride_ob, stride_os, stride_oh, b, s, offs_h, offs_d, tok_ok,
    cos, sin, n_heads, HEAD_DIM: tl.constexpr, ROTARY_DIMS: tl.constexpr, INTERLEAVED: tl.constexpr,
):  # fmt: skip
    # tile (BLOCK_T, BLOCK_H, BLOCK_D); cos/sin (BLOCK_T, 1, BLOCK_D) already 1/0 outside the rotary dims
    is_rot = offs_d < ROTARY_DIMS
    if INTERLEAVED:
        partner = offs_d ^ 1
        sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)
    else:
        half = ROTARY_DIMS // 2
        partner = tl.where(offs_d < half, offs_d + half, offs_d - half)
        sign = tl.where(offs_d < half, -1.0, 1.0)
    mask = tok_ok[:, None, None] & (offs_h < n_heads)[None, :, None] & (offs_d < HEAD_DIM)[None, None, :]
    base = b[:, None, None] * stride_xb + s[:, None, None] * stride_xs + offs_h[None, :, None] * stride_xh
    x = tl.load(X + base + offs_d[None, None, :], mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(X + base + partner[None, None, :], mask=mask & is_rot[None, None, :], other=0.0).to(tl.float32)
    out = x * cos + sign[None, None, :] * xp * sin
    obase = b[:, None, None] * stride_ob + s[:, None, None] * stride_os + offs_h[None, :, None] * stride_oh
    tl.store(OUT + obase + offs_d[None, None, :], out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q, K, QO, KO, POS, INV_FREQ,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_qob, stride_qos, stride_qoh, stride_kob, stride_kos, stride_koh,
    stride_pb, stride_ps, n_tokens, seq_len, n_heads,
    HEAD_DIM: tl.constexpr, ROTARY_DIMS: tl.constexpr, INTERLEAVED: tl.constexpr, BACKWARD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = tok < n_tokens
    b = (tok // seq_len).to(tl.int64)
    s = (tok % seq_len).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    is_rot = offs_d < ROTARY_DIMS
    if INTERLEAVED:
        freq_idx = offs_d // 2
    else:
        freq_idx = offs_d % (ROTARY_DIMS // 2)
    inv_freq = tl.load(INV_FREQ + freq_idx, mask=is_rot, other=0.0)
    pos = tl.load(POS + b * stride_pb + s * stride_ps, mask=tok_ok, other=0).to(tl.float32)
    angle = pos[:, None] * inv_freq[None, :]  # (BLOCK_T, BLOCK_D), fp32 like the reference
    cos = tl.where(is_rot[None, :], tl.cos(angle), 1.0)[:, None, :]
    sin = tl.where(is_rot[None, :], tl.sin(angle), 0.0)[:, None, :]
    if BACKWARD:
        sin = -sin  # the transpose of a rotation is the rotation by -angle
    _rotate_tile(
        Q, QO, stride_qb, stride_qs, stride_qh, stride_qob, stride_qos, stride_qoh, b, s, offs_h, offs_d, tok_ok,
        cos, sin, n_heads, HEAD_DIM, ROTARY_DIMS, INTERLEAVED,
    )  # fmt: skip
    _rotate_tile(
        K, KO, stride_kb, stride_ks, stride_kh, stride_kob, stride_kos, stride_koh, b, s, offs_h, offs_d, tok_ok,
        cos, sin, n_heads, HEAD_DIM, ROTARY_DIMS, INTERLEAVED,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Launcher

_INV_FREQ: dict[tuple, torch.Tensor] = {}


def inv_freq(rotary_dims: int, theta: float, device: torch.device) -> torch.Tensor:
    """(R/2,) fp32, the same torch expression as crystal.kernels.reference.rope_angles, cached per device."""
    key = (rotary_dims, float(theta), str(device))
    if key not in _INV_FREQ:
        exponents = torch.arange(0, rotary_dims, 2, dtype=torch.float32, device=device) / rotary_dims
        _INV_FREQ[key] = 1.0 / (theta**exponents)
    return _INV_FREQ[key]


def _check(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, rotary_dims: int) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.dtype != k.dtype:
        raise ValueError(
            f"q and k must share one (B, S, H, D) shape and dtype; got {q.shape} {q.dtype}, {k.shape} {k.dtype}"
        )
    b, s, _, d = q.shape
    if rotary_dims % 2 or not 0 < rotary_dims <= d:
        raise ValueError(f"rotary_dims={rotary_dims} must be even and in (0, head_dim={d}]")
    if positions.shape not in ((s,), (b, s)) or positions.is_floating_point():
        raise ValueError(
            f"positions must be integer (S,) or (B, S) = ({b}, {s}); got {positions.dtype} {positions.shape}"
        )
    check_device(q, k, positions)


def rope_apply(
    q: torch.Tensor,
    k: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    positions: torch.Tensor,
    rotary_dims: int,
    theta: float,
    interleaved: bool,
    backward: bool = False,
    rotary_only: bool = False,
) -> None:
    """Rotate q -> q_out and k -> k_out (the outputs may be the inputs). rotary_only: touch dims < R only."""
    _check(q, k, positions, rotary_dims)
    b, s, h, d = q.shape
    pos = positions if positions.dim() == 2 else positions[None]
    stride_pb = pos.stride(0) if positions.dim() == 2 else 0
    block_d = triton.next_power_of_2(rotary_dims if rotary_only else d)
    block_h = min(triton.next_power_of_2(h), max(1, 4096 // block_d))
    # ~4k elements per tensor per program on a GPU; the interpreter prefers few, large programs.
    block_t = max(1, (16384 if INTERPRET else 4096) // (block_h * block_d))
    n_tokens = b * s
    grid = (triton.cdiv(n_tokens, block_t), triton.cdiv(h, block_h))
    _rope_kernel[grid](
        q, k, q_out, k_out, pos, inv_freq(rotary_dims, theta, q.device),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        stride_pb, pos.stride(-1), n_tokens, s, h,
        HEAD_DIM=rotary_dims if rotary_only else d, ROTARY_DIMS=rotary_dims, INTERLEAVED=interleaved,
        BACKWARD=backward, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=4 if block_t * block_h * block_d < 4096 else 8,
    )  # fmt: skip


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------------------------
# torch.library custom ops


@torch.library.custom_op("crystal::rope", mutates_args=())
def rope_op(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, rotary_dims: int, theta: float, interleaved: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k = _unit_last(q), _unit_last(k)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    rope_apply(q, k, q_out, k_out, positions, rotary_dims, theta, interleaved)
    return q_out, k_out


@rope_op.register_fake
def _(q, k, positions, rotary_dims, theta, interleaved):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)


@torch.library.custom_op("crystal::rope_backward", mutates_args=())
def rope_backward_op(
    grad_q: torch.Tensor,
    grad_k: torch.Tensor,
    positions: torch.Tensor,
    rotary_dims: int,
    theta: float,
    interleaved: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    grad_q, grad_k = _unit_last(grad_q), _unit_last(grad_k)
    dq = torch.empty(grad_q.shape, dtype=grad_q.dtype, device=grad_q.device)
    dk = torch.empty(grad_k.shape, dtype=grad_k.dtype, device=grad_k.device)
    rope_apply(grad_q, grad_k, dq, dk, positions, rotary_dims, theta, interleaved, backward=True)
    return dq, dk


@rope_backward_op.register_fake
def _(grad_q, grad_k, positions, rotary_dims, theta, interleaved):
    return torch.empty_like(grad_q, memory_format=torch.contiguous_format), torch.empty_like(
        grad_k, memory_format=torch.contiguous_format
    )


@torch.library.custom_op("crystal::rope_", mutates_args=("q", "k"))
def rope_inplace_op(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, rotary_dims: int, theta: float, interleaved: bool
) -> None:
    rope_apply(q, k, q, k, positions, rotary_dims, theta, interleaved, rotary_only=True)


@rope_inplace_op.register_fake
def _(q, k, positions, rotary_dims, theta, interleaved):
    return None


def _setup_context(ctx, inputs, output):
    _, _, positions, rotary_dims, theta, interleaved = inputs
    ctx.save_for_backward(positions)
    ctx.args = (rotary_dims, theta, interleaved)


def _backward(ctx, grad_q, grad_k):
    (positions,) = ctx.saved_tensors
    grad_q = torch.zeros_like(grad_k) if grad_q is None else grad_q
    grad_k = torch.zeros_like(grad_q) if grad_k is None else grad_k
    dq, dk = rope_backward_op(grad_q, grad_k, positions, *ctx.args)
    return dq, dk, None, None, None, None


rope_op.register_autograd(_backward, setup_context=_setup_context)


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    *,
    rotary_dims: int,
    theta: float,
    interleaved: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (B, S, H, D); positions (B, S) or (S,). Returns rotated (q, k).

    Without autograd (no grad mode, or neither input requires grad) q and k are rotated IN PLACE
    and returned; pass clones if the originals are still needed.
    """
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    if needs_grad or q.stride(-1) != 1 or k.stride(-1) != 1:
        return rope_op(q, k, positions, rotary_dims, theta, interleaved)
    rope_inplace_op(q, k, positions, rotary_dims, theta, interleaved)
    return q, k
