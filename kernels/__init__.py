"""Custom ops for crystal's model: one op per file (Triton forward/backward + torch.library op), plus
`reference`, the torch twin of every op. Nothing here imports crystal/."""

from __future__ import annotations

from types import ModuleType

OP_NAMES = ("attention", "rope", "swiglu", "layernorm", "rmsnorm", "linear_cross_entropy")


def get_ops(name: str) -> ModuleType:
    """The op namespace the model calls: `torch` (kernels.reference) or `triton` (kernels.triton_ops)."""
    if name == "torch":
        from kernels import reference

        return reference
    if name == "triton":
        from kernels import triton_ops

        return triton_ops
    raise ValueError(f"unknown ops {name!r}; use 'torch' or 'triton'")
