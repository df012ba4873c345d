"""What every engine shares: the model protocol it drives, optimizer settings and a step result.

An engine owns the model's parameters and optimizer state wherever they live (device, host store,
Cerebras), runs one optimizer step over a list of micro-batches, evaluates, and round-trips its
state as flat {name: tensor} dicts so checkpoints interchange between engines.
"""

from __future__ import annotations

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
