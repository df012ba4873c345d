"""AdamW on the host store, one unit (block) at a time, in two phases so clipping never serialises a step.

Phase 1, as a block's gradients become final (while the device still works on earlier blocks): the
per-parameter gradient norms of that block. Phase 2, once every norm is in: the global clip factor is one
scalar, and each block's update applies it inside the update (scale the gradient, then the fused AdamW
kernel; with fused_clip the kernel's grad_scale does the scaling). Phase 2 runs block by block in forward
order, so on a GPU the update of block i overlaps the next step's forward of blocks < i; only the first
block's update is exposed at the step boundary.

The update is torch's own fused CPU AdamW kernel (`torch._fused_adamw_`, vectorised and multi-threaded
with at::parallel_for) called per block and muP group, and the norms are computed with the same ops as
torch.nn.utils.clip_grad_norm_, so a streamed step equals a resident step bit for bit (fused_clip off).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from crystal.streaming.backends.base import AdamWSettings, ParamGroupSpec
from crystal.streaming.store import HostStore, Unit


@dataclass
class _Group:
    index: int  # position in the resident engine's param_groups (fixes the order of the global norm)
    lr_scale: float
    weight_decay: float
    members: list[int]  # parameter positions within the unit


class HostAdamW:
    """`fused_clip`: hand the clip factor to the fused AdamW kernel (as grad_scale = 1 / clip, one pass over the
    gradients fewer) instead of scaling the gradients first as clip_grad_norm_ does. Dividing by 1 / clip rounds
    differently from multiplying by clip, so this gives up bitwise parity with the resident engine."""

    def __init__(self, store: HostStore, groups: list[ParamGroupSpec], settings: AdamWSettings,
                 fused_clip: bool = False) -> None:  # fmt: skip
        self.store, self.settings, self.fused_clip = store, settings, fused_clip
        group_of: dict[str, tuple[int, ParamGroupSpec]] = {}
        order: list[str] = []  # every parameter in the order torch's AdamW over the same groups sees them
        for gi, g in enumerate(groups):
            for name in g.param_names:
                group_of[name] = (gi, g)
                order.append(name)
        if set(order) != set(store.by_name) or len(order) != len(store.by_name):
            raise ValueError(
                f"parameter groups do not cover the model exactly: {sorted(set(store.by_name) ^ set(order))[:5]}"
            )
        self.unit_groups: dict[int, list[_Group]] = {}
        for u in store.units:
            by_group: dict[int, _Group] = {}
            for k, slot_k in enumerate(u.piece_slots):  # k: position in the unit's params/grads lists
                gi, spec = group_of[u.layout.slots[slot_k].full_name]
                by_group.setdefault(gi, _Group(gi, spec.lr_scale, spec.weight_decay, [])).members.append(k)
            self.unit_groups[id(u)] = [by_group[gi] for gi in sorted(by_group)]
        self.norm_order = [store.by_name[n] for n in order]  # (unit, position) in group order
        self.norms: dict[int, list[torch.Tensor]] = {}  # id(unit) -> per-parameter gradient norms

    # -- phase 1 --------------------------------------------------------------------------------------

    @torch.no_grad()
    def gradient_final(self, unit: Unit) -> None:
        """The unit's gradient for this step is complete (every micro-batch, every replica)."""
        self.norms[id(unit)] = list(torch._foreach_norm(unit.grads, 2.0))

    def clip_factor(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(global grad norm, clamped clip factor), as clip_grad_norm_ computes them."""
        missing = [u.name for u in self.store.units if id(u) not in self.norms]
        if missing:
            raise RuntimeError(f"gradients never became final for {missing[:3]}")
        stacked = torch.stack([self.norms[id(u)][k] for u, k in self.norm_order])
        total = torch.linalg.vector_norm(stacked, 2.0)
        return total, self.clip_of(total)

    def clip_of(self, total: torch.Tensor) -> torch.Tensor:
        max_norm = self.settings.grad_clip if self.settings.grad_clip > 0 else math.inf
        return torch.clamp(max_norm / (total + 1e-6), max=1.0)

    # -- phase 2 --------------------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, unit: Unit, lr: float, clip: torch.Tensor) -> None:
        grad_scale = None
        if clip.item() < 1.0:  # x * 1.0 == x exactly: an unclipped step skips a pass over the gradients
            if self.fused_clip:
                grad_scale = 1.0 / clip
            else:
                torch._foreach_mul_(unit.grads, clip)
        beta1, beta2 = self.settings.betas
        # Every parameter's counter once (all of them, also those with no piece on a rank of a sharded store, so
        # that every rank's counters agree); the same as incrementing each group's before its update.
        if unit.steps:
            torch._foreach_add_(unit.steps, 1)
        for g in self.unit_groups[id(unit)]:
            steps = [unit.piece_steps[k] for k in g.members]
            torch._fused_adamw_(
                [unit.params[k] for k in g.members], [unit.grads[k] for k in g.members],
                [unit.exp_avgs[k] for k in g.members], [unit.exp_avg_sqs[k] for k in g.members], [], steps,
                amsgrad=False, lr=lr * g.lr_scale, beta1=beta1, beta2=beta2, weight_decay=g.weight_decay,
                eps=self.settings.eps, maximize=False, grad_scale=grad_scale, found_inf=None,
            )  # fmt: skip
        unit.refresh_shadow()
        unit.zero_grad()

    def discard(self) -> None:
        """A skipped step: forget this step's gradients."""
        self.norms.clear()
        for u in self.store.units:
            u.zero_grad()

    def start_step(self) -> None:
        self.norms.clear()
