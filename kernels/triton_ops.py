"""`ops=triton`: the same names and signatures as crystal.kernels.reference, backed by the Triton custom ops
(crystal::attention, crystal::rope, crystal::swiglu, crystal::layernorm, crystal::linear_cross_entropy).

Autocast: custom ops fall through autocast untouched, so the matmul ops (swiglu, linear_cross_entropy)
cast their floating inputs here to the autocast dtype, as autocast would cast F.linear in the
reference; the casts are ordinary differentiable ops, so gradients reach fp32 master weights. The
other ops take their inputs' dtypes as they come (layernorm: output in x's dtype, fp32 statistics).

rmsnorm has no Triton kernel yet: it is the torch reference (only Amber-style configs use it).
"""

from __future__ import annotations

import torch
from crystal.kernels.attention import attention, attention_with_lse
from crystal.kernels.cross_entropy import linear_cross_entropy as _linear_cross_entropy
from crystal.kernels.layernorm import layernorm
from crystal.kernels.reference import rmsnorm
from crystal.kernels.rope import rope
from crystal.kernels.swiglu import swiglu as _swiglu

__all__ = ["attention", "attention_with_lse", "rope", "swiglu", "layernorm", "rmsnorm", "linear_cross_entropy"]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def swiglu(
    x: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    w_gate: torch.Tensor,
    b_gate: torch.Tensor | None,
) -> torch.Tensor:
    """x (..., C); w_up/w_gate (F, C) -> (x @ w_up^T + b_up) * silu(x @ w_gate^T + b_gate), (..., F)."""
    dtype = _compute_dtype(x)
    return _swiglu(*(_cast(t, dtype) for t in (x, w_up, b_up, w_gate, b_gate)))


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    logits_scale: float = 1.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """x (N, C), weight (V, C), targets (N,) -> mean cross-entropy over non-ignored tokens (fp32)."""
    dtype = _compute_dtype(x)
    return _linear_cross_entropy(
        _cast(x, dtype), _cast(weight, dtype), targets, logits_scale=logits_scale, ignore_index=ignore_index
    )
