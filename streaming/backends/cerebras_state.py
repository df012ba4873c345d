"""cstorch's checkpoint layout <-> the engines' flat state, in plain torch (no cerebras import).

Every engine round-trips its state as flat dicts (streaming/backends/base.py):

    model:      {<param name>: tensor}
    optimizer:  {<param name>.exp_avg | .exp_avg_sq | .step: tensor}    (torch AdamW's state, by name)

A cerebras-pytorch training checkpoint (what `cstorch.save` writes, and what Cerebras' Model Zoo keeps)
is one nested state dict:

    model:        model.state_dict()
    optimizer:    cstorch AdamW's state_dict(): {"state": {i: {exp_avg, exp_avg_sq, beta1_power,
                  beta2_power}}, "param_groups": [{"params": [i, ...], "lr", "betas", "eps",
                  "weight_decay", "correct_bias", "adjust_learning_rate", ...}]}, parameters numbered in
                  param-group order
    global_step:  optimizer updates attempted so far
    crystal:      (written by this project) JSON strings: which parameter names make up each group, the
                  trainer's state and the resolved config, so that nothing is lost on a round trip

Two differences need converting. cstorch numbers parameters instead of naming them: the groups (from
the checkpoint's own `crystal` record, or the model's muP groups) give the names back. And cstorch's
AdamW keeps bias-correction powers instead of the step count t: after t updates it holds beta^(t+1), the
power its next update uses (it starts at fp32(beta) and multiplies by beta after each update, in fp32;
powers_for_step replays those products, so the round trip is exact). So
t = log(beta2_power) / log(beta2) - 1, exact while the power is a normal fp32 number (t up to about 1,700
for beta2 = 0.95); beyond that it has underflowed, bias correction is exactly 1 either way, and t is
taken from the fallback the caller gives (the updates it counted, or global_step).

cstorch 2.10's own AdamW.load_state_dict converts a torch-style `step` t into beta^t, one update behind:
the next update then uses the bias correction of update t instead of t+1 (measured: 1.4e-4 relative
error in the weights after one update at t = 5, vs 3.5e-8 with beta^(t+1)). This module always writes
the powers itself, so that conversion never runs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch
from crystal.streaming.backends.base import ParamGroupSpec

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
FP32_TINY = torch.finfo(torch.float32).tiny  # smallest normal fp32: below it beta^t has lost its precision


class CstorchLayoutError(ValueError):
    """A state dict that is not in the cstorch layout this module reads; the message says what is off."""


def group_names(groups: Sequence[ParamGroupSpec]) -> list[list[str]]:
    """Parameter names in cstorch's numbering order: group by group, as the optimizer was built."""
    return [list(g.param_names) for g in groups if g.param_names]


def powers_for_step(step: float, betas: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """cstorch AdamW's (beta1_power, beta2_power) after `step` updates, bit for bit: it starts at
    fp32(beta) and multiplies by beta once per update, in fp32, so a resume continues exactly."""
    return tuple(_fp32_power(float(beta), int(step)) for beta in betas[:2])  # type: ignore[return-value]


@lru_cache(maxsize=64)
def _fp32_power_value(beta: float, step: int) -> torch.Tensor:
    power = torch.tensor(beta, dtype=torch.float32)
    for _ in range(step):
        if power == 0:  # underflowed (after ~2,000 updates for beta = 0.95): stays 0
            break
        power = power * beta
    return power


def _fp32_power(beta: float, step: int) -> torch.Tensor:
    return _fp32_power_value(beta, step).clone()


def step_from_powers(beta1_power: float, beta2_power: float, betas: Sequence[float], fallback: int | None) -> int:
    """Adam's step count t from cstorch's beta^(t+1) powers (see the module docstring)."""
    estimates = [
        math.log(power) / math.log(beta) - 1.0
        for power, beta in ((beta2_power, betas[1]), (beta1_power, betas[0]))
        if FP32_TINY <= power < 1.0 and 0.0 < beta < 1.0
    ]
    if estimates:
        return max(0, int(round(estimates[0])))
    if fallback is None:
        raise CstorchLayoutError(
            "optimizer state has underflowed bias-correction powers and the checkpoint has no global_step; "
            "the Adam step count cannot be recovered"
        )
    return int(fallback)


def flat_to_cstorch(
    model: dict[str, torch.Tensor],
    optimizer: dict[str, torch.Tensor],
    groups: Sequence[ParamGroupSpec],
    betas: Sequence[float],
    eps: float,
    global_step: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The engines' flat state -> a cstorch training state dict (module docstring). Parameters without
    optimizer state (a run that has not stepped yet) get none, as a fresh cstorch optimizer would."""
    groups = [g for g in groups if g.param_names]
    names = group_names(groups)
    state: dict[int, dict[str, torch.Tensor]] = {}
    param_groups = []
    index = 0
    for g, members in zip(groups, names):
        ids = []
        for name in members:
            if name not in model:
                raise CstorchLayoutError(f"parameter {name!r} of group {g.name!r} is not in the model state")
            if f"{name}.step" in optimizer:
                beta1_power, beta2_power = powers_for_step(float(optimizer[f"{name}.step"]), betas)
                state[index] = {
                    "exp_avg": optimizer[f"{name}.exp_avg"],
                    "exp_avg_sq": optimizer[f"{name}.exp_avg_sq"],
                    "beta1_power": beta1_power,
                    "beta2_power": beta2_power,
                }
            ids.append(index)
            index += 1
        param_groups.append(
            {
                "params": ids, "name": g.name, "lr": 0.0, "betas": tuple(betas), "eps": eps,
                "weight_decay": g.weight_decay, "l2_regularization_rate": 0.0, "correct_bias": True,
                "amsgrad": False, "adjust_learning_rate": g.lr_scale,
            }
        )  # fmt: skip
    record = {"param_groups": json.dumps([{"name": g.name, "params": m} for g, m in zip(groups, names)])}
    record.update(extra or {})
    return {
        "model": dict(model),
        "optimizer": {"state": state, "param_groups": param_groups},
        "global_step": torch.tensor(global_step, dtype=torch.int64),
        "crystal": record,
    }


def recorded_group_names(state: dict[str, Any]) -> list[list[str]] | None:
    record = state.get("crystal")
    if not isinstance(record, dict) or "param_groups" not in record:
        return None
    return [g["params"] for g in json.loads(record["param_groups"])]


def cstorch_to_flat(
    state: dict[str, Any], groups: Sequence[ParamGroupSpec] | None = None, adam_steps: int | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A cstorch training state dict -> (model, optimizer) flat dicts. Parameter names come from the
    checkpoint's own `crystal` record, else from `groups` (the model's muP groups, in build order).
    `adam_steps` (else the checkpoint's global_step) stands in for t once the powers have underflowed."""
    for key in ("model", "optimizer"):
        if key not in state:
            raise CstorchLayoutError(f"no {key!r} entry (top-level keys: {sorted(state)[:8]})")
    optim = state["optimizer"]
    if not isinstance(optim, dict) or "state" not in optim or "param_groups" not in optim:
        raise CstorchLayoutError("the 'optimizer' entry is not an optimizer state_dict (needs 'state', 'param_groups')")
    names = recorded_group_names(state) or (group_names(groups) if groups is not None else None)
    if names is None:
        raise CstorchLayoutError("no record of parameter names in the checkpoint; pass the model's parameter groups")
    sizes = [len(g["params"]) for g in optim["param_groups"]]
    if sizes != [len(n) for n in names]:
        raise CstorchLayoutError(
            f"optimizer groups hold {sizes} parameters but the model's groups hold {[len(n) for n in names]}; "
            "the checkpoint is for another model or another grouping"
        )
    model = {k: v for k, v in state["model"].items()}
    fallback = adam_steps
    if fallback is None and state.get("global_step") is not None:
        fallback = int(state["global_step"])
    flat: dict[str, torch.Tensor] = {}
    for group, members in zip(optim["param_groups"], names):
        betas = group.get("betas", (0.9, 0.999))
        for index, name in zip(group["params"], members):
            if name not in model:
                raise CstorchLayoutError(f"optimizer names parameter {name!r}, which the model state lacks")
            entry = optim["state"].get(index, optim["state"].get(str(index)))
            if not entry:
                continue  # never stepped: no state, like torch's AdamW before its first step
            missing = [k for k in ADAM_MOMENTS if k not in entry]
            if missing:
                raise CstorchLayoutError(f"optimizer state of {name!r} lacks {missing}; is this an AdamW checkpoint?")
            if "step" in entry:  # a torch-style (Hugging Face) AdamW state
                step = int(float(entry["step"]))
            else:
                step = step_from_powers(float(entry["beta1_power"]), float(entry["beta2_power"]), betas, fallback)
            flat[f"{name}.exp_avg"] = entry["exp_avg"]
            flat[f"{name}.exp_avg_sq"] = entry["exp_avg_sq"]
            flat[f"{name}.step"] = torch.tensor(float(step), dtype=torch.float32)
    return model, flat
