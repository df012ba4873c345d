"""The resident engine: the whole model and its AdamW state on one device (the plain baseline)."""

from __future__ import annotations

import math
from typing import Any

import torch
from crystal.streaming.backends.base import (
    ADAM_STATE_KEYS,
    AdamWSettings,
    ParamGroupSpec,
    StepResult,
    StreamableModel,
    accumulate_gradients,
    autocast,
    build_adamw,
    check_adam_state_keys,
)


def flatten_adam_state(
    optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str]
) -> dict[str, torch.Tensor]:
    """torch AdamW state -> {<param name>.exp_avg|.exp_avg_sq|.step: tensor} (independent of param order)."""
    flat = {}
    for p, state in optimizer.state.items():
        for key in ADAM_STATE_KEYS:
            if key in state:
                v = state[key]
                flat[f"{names[p]}.{key}"] = v if torch.is_tensor(v) else torch.tensor(float(v))
    return flat


def load_adam_state(
    optimizer: torch.optim.Optimizer, named: dict[str, torch.nn.Parameter], flat: dict[str, torch.Tensor]
) -> None:
    check_adam_state_keys(named, flat)
    optimizer.state.clear()
    for n, p in named.items():
        if f"{n}.step" not in flat:
            continue
        optimizer.state[p] = {
            "step": flat[f"{n}.step"].to(p.device, torch.float32).clone(),  # fused AdamW keeps it on device
            "exp_avg": flat[f"{n}.exp_avg"].to(p.device, p.dtype).clone(),
            "exp_avg_sq": flat[f"{n}.exp_avg_sq"].to(p.device, p.dtype).clone(),
        }


class ResidentEngine:
    """Forward/backward over micro-batches, global-norm clipping, muP-grouped AdamW, on one device."""

    def __init__(
        self,
        adapter: StreamableModel,
        groups: list[ParamGroupSpec],
        settings: AdamWSettings,
        device: torch.device,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.adapter, self.settings, self.device, self.autocast_dtype = adapter, settings, device, autocast_dtype
        self.model = adapter.model.to(device)
        self.named = dict(self.model.named_parameters())
        self.names = {p: n for n, p in self.named.items()}
        self.optimizer = build_adamw(groups, self.named, settings, device)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]

    def _autocast(self):
        return autocast(self.device, self.autocast_dtype)

    def train_step(self, micro_batches: list[Any], lr: float) -> StepResult:
        self.model.train()
        n = len(micro_batches)
        total, tokens = accumulate_gradients(self.adapter, micro_batches, self.device, self.autocast_dtype)
        clip = self.settings.grad_clip if self.settings.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=True)
        loss_value, norm_value = (total / n).item(), norm.item()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(loss_value, norm_value, True, tokens)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_value, norm_value, False, tokens)

    @torch.no_grad()
    def eval_loss(self, batch: Any) -> float:
        self.model.eval()
        with self._autocast():
            return self.adapter.loss(self.adapter.to_device(batch, self.device)).item()

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"model": self.model.state_dict(), "optimizer": flatten_adam_state(self.optimizer, self.names)}

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]], load_optimizer: bool = True) -> None:
        missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        if load_optimizer:
            load_adam_state(self.optimizer, self.named, state.get("optimizer", {}))
