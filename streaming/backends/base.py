"""What every engine shares: the model protocol it drives, optimizer settings and a step result.

An engine owns the model's parameters and optimizer state wherever they live (device, host store,
Cerebras), runs one optimizer step over a list of micro-batches, evaluates, and round-trips its
state as flat {name: tensor} dicts so checkpoints interchange between engines.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn as nn


class StreamableModel(Protocol):
    """A model as engines see it: embed -> identical blocks -> head/loss, with per-batch block args.

    Implemented outside streaming/ (crystal wraps its model in an adapter) so that nothing here
    depends on a particular model."""

    model: nn.Module
    blocks: nn.ModuleList

    def loss(self, batch: Any) -> torch.Tensor: ...  # whole forward to a scalar loss
    def embed(self, batch: Any) -> torch.Tensor: ...  # (B, S, C) input of block 0
    def block_args(self, batch: Any) -> tuple: ...  # extra positional args every block takes
    def head_loss(self, x: torch.Tensor, batch: Any) -> torch.Tensor: ...  # last block's output -> loss
    def to_device(self, batch: Any, device: torch.device) -> Any: ...
    def num_tokens(self, batch: Any) -> int: ...


ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq", "step")  # per parameter, in checkpoints as <name>.<key>


def check_adam_state_keys(param_names: Iterable[str], flat: dict[str, Any]) -> None:
    """A flat optimizer state ({<param name>.<key>: tensor}) must cover exactly the model's parameters;
    an empty one (a fresh optimizer) always fits."""
    expected = {f"{n}.{k}" for n in param_names for k in ADAM_STATE_KEYS}
    if flat and set(flat) != expected:
        missing, extra = sorted(expected - set(flat)), sorted(set(flat) - expected)
        raise ValueError(f"optimizer state does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")


@dataclass
class AdamWSettings:
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-9
    grad_clip: float = 1.0  # max global grad norm; <= 0 disables clipping


@dataclass
class ParamGroupSpec:
    """A muP group: which parameters (by name), its LR multiplier and weight decay."""

    name: str
    param_names: list[str]
    lr_scale: float
    weight_decay: float


@dataclass
class StepResult:
    loss: float  # mean over micro-batches
    grad_norm: float  # global L2 norm before clipping
    skipped: bool  # True when the loss or gradients were not finite and no update was made
    tokens: int


def build_adamw(groups: list[ParamGroupSpec], named: dict[str, torch.Tensor], settings: AdamWSettings,
                device: torch.device) -> torch.optim.AdamW:  # fmt: skip
    """torch AdamW over the muP groups (LR 0: engines set lr x lr_scale per step), refusing groups that do not cover
    the model's parameters exactly; fused where torch has the kernel (CPU, CUDA)."""
    grouped = {n for g in groups for n in g.param_names}
    if grouped != set(named):
        raise ValueError(f"parameter groups do not cover the model exactly: {sorted(set(named) ^ grouped)[:5]}")
    torch_groups = [
        {"params": [named[n] for n in g.param_names], "lr_scale": g.lr_scale, "weight_decay": g.weight_decay,
         "name": g.name}
        for g in groups if g.param_names
    ]  # fmt: skip
    return torch.optim.AdamW(torch_groups, lr=0.0, betas=tuple(settings.betas), eps=settings.eps,
                             fused=device.type in ("cpu", "cuda"))  # fmt: skip


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision of the resident and fsdp engines' compute: None runs as the weights are."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def accumulate_gradients(adapter: StreamableModel, micro_batches: list[Any], device: torch.device,
                         autocast_dtype: torch.dtype | None, before_each=None) -> tuple[torch.Tensor, int]:  # fmt: skip
    """Forward + backward of each micro-batch with its loss / count, so that the gradients sum to those of the mean
    loss; returns the sum of the losses (on the device) and the tokens. before_each(i) runs before micro-batch i."""
    n = len(micro_batches)
    total = torch.zeros((), device=device)
    tokens = 0
    for i, mb in enumerate(micro_batches):
        if before_each is not None:
            before_each(i)
        mb = adapter.to_device(mb, device)
        with autocast(device, autocast_dtype):
            loss = adapter.loss(mb)
        (loss / n).backward()
        total += loss.detach().float()
        tokens += adapter.num_tokens(mb)
    return total, tokens
