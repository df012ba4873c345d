"""The one torch reference of every op: what the model runs with `ops=torch`, what tests and bench
compare the Triton kernels against. Plain PyTorch, readable first; numerics chosen on purpose:

- attention softmax in fp32 (CrystalCoder/muP: scores scaled by 1/head_dim, not 1/sqrt)
- RoPE inverse frequencies and angles in fp32 whatever the activation dtype (LLM360 lesson: bf16
  angles lose position information at long context)
- cross-entropy on fp32 logits

Shapes: B batch, S sequence, H heads, D head dim, C d_model, F ffn hidden, V vocab, N = B*S tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Attention


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) document ids -> (B, 1, S, S) bool mask: key j visible to query i iff j <= i and same doc."""
    s = doc_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (causal & same_doc)[:, None]


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, doc_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal attention, q/k/v (B, H, S, D) -> (B, H, S, D), optionally masked per packed document.

    SDPA's kernels (flash, cuDNN, efficient, and the CPU math path for fp32) keep the softmax in
    fp32; `attention_math` below is the explicit fp32 formula the tests hold it to.
    """
    if doc_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=document_causal_mask(doc_ids), scale=scale)


def attention_math(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, doc_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialised fp32 attention; returns (out in q's dtype, log-sum-exp (B, H, S) in fp32)."""
    s = q.shape[-2]
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H, S, S)
    if doc_ids is None:
        mask = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    else:
        mask = document_causal_mask(doc_ids)
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    return torch.matmul(probs, v.float()).to(q.dtype), lse


# ----------------------------------------------------------------------------------------------
# Rotary position embedding


def rope_angles(positions: torch.Tensor, rotary_dims: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (..., S) -> cos, sin (..., S, rotary_dims/2), always fp32."""
    exponents = torch.arange(0, rotary_dims, 2, dtype=torch.float32, device=positions.device) / rotary_dims
    inv_freq = 1.0 / (theta**exponents)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return torch.cos(angles), torch.sin(angles)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """x (B, S, H, D); cos/sin (B or 1, S, R/2) fp32. Rotates x[..., :R], passes x[..., R:] through.

    interleaved (GPT-J, CrystalCoder): pairs (x0, x1), (x2, x3), ...; else rotate-half (NeoX, LLaMA):
    pairs (x_i, x_{i+R/2}).
    """
    rd = cos.shape[-1] * 2
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    xr = x[..., :rd].float()
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
    else:
        x1, x2 = xr[..., : rd // 2], xr[..., rd // 2 :]
    o1 = x1 * cos - x2 * sin
    o2 = x1 * sin + x2 * cos
    rotated = torch.stack((o1, o2), dim=-1).flatten(-2) if interleaved else torch.cat((o1, o2), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., rd:]), dim=-1)


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    *,
    rotary_dims: int,
    theta: float,
    interleaved: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (B, S, H, D); positions (B, S) or (S,) integer. Returns rotated (q, k)."""
    if positions.dim() == 1:
        positions = positions[None]
    cos, sin = rope_angles(positions, rotary_dims, theta)
    return apply_rotary(q, cos, sin, interleaved), apply_rotary(k, cos, sin, interleaved)


# ----------------------------------------------------------------------------------------------
# MLP and norms


def swiglu(
    x: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    w_gate: torch.Tensor,
    b_gate: torch.Tensor | None,
) -> torch.Tensor:
    """x (..., C); w_up/w_gate (F, C) -> (x @ w_up^T + b_up) * silu(x @ w_gate^T + b_gate), (..., F).

    CrystalCoder names: c_fc is up, c_fc2 is the gate; c_proj (the down projection) follows outside.
    """
    return F.linear(x, w_up, b_up) * F.silu(F.linear(x, w_gate, b_gate))


def layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


# ----------------------------------------------------------------------------------------------
# LM head + loss


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    logits_scale: float = 1.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """x (N, C), weight (V, C), targets (N,) -> mean cross-entropy over non-ignored tokens (fp32).

    Materialises (N, V) logits; the fused kernel exists to avoid exactly that. A batch whose targets
    are all ignored gives 0, not 0/0.
    """
    # Scaling the (N, C) input instead of the (N, V) logits is the same product with V/C times fewer
    # multiplies, forward and backward (the tiny model's head: 16x).
    logits = F.linear(x * logits_scale, weight).float()
    total = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    return total / (targets != ignore_index).sum().clamp(min=1)
