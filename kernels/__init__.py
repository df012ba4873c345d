"""Custom ops for crystal's model: one op per file (Triton forward/backward + torch.library op), plus
`reference`, the torch twin of every op. Nothing here imports crystal/."""

from __future__ import annotations

from types import ModuleType

OP_NAMES = ("attention", "rope", "swiglu", "layernorm", "rmsnorm", "linear_cross_entropy")


def get_ops(name: str) -> ModuleType:
    """The op namespace the model calls: `torch` (reference.py) or `triton` (triton_ops.py), both in crystal.kernels."""
    if name == "torch":
        from crystal.kernels import reference

        return reference
    if name == "triton":
        from crystal.kernels import triton_ops

        return triton_ops
    raise ValueError(f"unknown ops {name!r}; use 'torch' or 'triton'")
