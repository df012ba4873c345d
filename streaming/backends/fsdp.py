"""The FSDP engine: FSDP2 (torch.distributed.fsdp.fully_shard) across the ranks of a torchrun job, for a model
whose weights, gradients and AdamW state fit the GPUs together.

Applied from outside, as torchtitan does: the model code is the single-device one. Each block is one FSDP
unit (its parameters all-gathered just before its forward and again before its backward, its gradients
reduce-scattered as soon as they are final), and the root unit holds the embedding, the final norm and the
(tied) head. Every rank holds 1/N of each parameter, of its gradient and of its AdamW moments, as DTensors:
the optimizer is plain torch AdamW over those shards, with the same muP groups as the resident engine, and
its elementwise update on a shard is the resident update of those elements.

Against backend=resident on the same global batch the step differs only in the order of sums: each rank
accumulates its own micro-batches, the reduce-scatter then adds the ranks' partial sums, and the global norm
is the root of the ranks' summed squares. fp32 rounding of those sums is all that separates the two (the
test's tolerance says how much that is after a few steps).

Checkpoints are the project's flat layout ({name: full tensor}, {<name>.exp_avg|.exp_avg_sq|.step}), so
they interchange with the resident and streaming engines and with any world size: state_dict() gathers one
parameter at a time (an all-gather of that parameter, copied to the host on rank 0 and dropped on the GPUs,
so no GPU ever holds more than one full parameter beyond its shards), and load_state_dict() cuts every
rank's shard out of the full tensor it read, with no communication.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.distributed as dist
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
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def init_process_group(device_type: str) -> None:
    """The default group of a torchrun job: NCCL for GPUs, gloo for a CPU run. Idempotent."""
    if dist.is_initialized():
        return
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")


def resolve_param_dtype(setting: str, autocast_dtype: torch.dtype | None, device: torch.device) -> torch.dtype:
    """backend.fsdp.param_dtype: auto is bf16 on a GPU computing in bf16 (the GPU default), else fp32 -- on a CPU
    bf16 autocast (train.precision=bf16) then runs the matmuls in bf16 as it does for backend=resident. CPU autocast
    does not widen a norm's bf16 weight as CUDA's does, so bf16 weights on a CPU are refused."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" and autocast_dtype == torch.bfloat16 else torch.float32
    if setting == "bf16" and device.type != "cuda":
        raise ValueError(
            "backend.fsdp.param_dtype=bf16 needs a GPU: CPU autocast leaves the norms' bf16 weights unwidened; use "
            "backend.fsdp.param_dtype=auto (fp32 weights, bf16 matmuls under train.precision=bf16)"
        )
    return DTYPES[setting]


def build_mesh(device_type: str, world: int, dp_replicate: int) -> DeviceMesh:
    """1-D mesh (plain FSDP) or, with dp_replicate > 1, HSDP's 2-D mesh (dp_replicate, dp_shard): shards within
    a group of world / dp_replicate ranks (a node), replicas across the groups. torchrun numbers ranks node by
    node, so the shard dimension, the inner one, stays inside a node's NVLink domain."""
    if dp_replicate <= 1:
        return init_device_mesh(device_type, (world,), mesh_dim_names=("dp_shard",))
    if world % dp_replicate:
        raise ValueError(
            f"backend.fsdp.dp_replicate={dp_replicate} does not divide the world size {world}; use a divisor "
            f"(usually the number of nodes)"
        )
    return init_device_mesh(device_type, (dp_replicate, world // dp_replicate),
                            mesh_dim_names=("dp_replicate", "dp_shard"))  # fmt: skip


def checkpoint_forward(block: torch.nn.Module) -> None:
    """Activation checkpointing of one block, from outside: its forward keeps only its inputs and runs again
    in backward. The wrapper sits inside FSDP's hooks (which wrap __call__), so the recompute runs on the
    parameters FSDP's pre-backward hook has already gathered, and parameter names stay the model's own
    (torch's checkpoint_wrapper would insert `_checkpoint_wrapped_module.` into every one)."""
    from torch.utils.checkpoint import checkpoint

    inner = block.forward

    def forward(*args, **kwargs):
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    block.forward = forward


class FSDPEngine:
    """Forward/backward over this rank's micro-batches, global-norm clipping, muP-grouped AdamW on shards."""

    collective_state = True  # state_dict() is a collective: every rank calls it, rank 0 gets the tensors
    state_dict_is_copy = True  # the tensors it returns are fresh host copies (no snapshot needed)

    def __init__(
        self,
        adapter: StreamableModel,
        groups: list[ParamGroupSpec],
        settings: AdamWSettings,
        device: torch.device,
        autocast_dtype: torch.dtype | None = None,
        *,
        param_dtype: str = "auto",
        reduce_dtype: str = "fp32",
        reshard_after_forward: bool = True,
        activation_checkpointing: bool = False,
        dp_replicate: int = 1,
        grad_sync: str = "step",
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("backend=fsdp needs torch.distributed initialised (launch with torchrun)")
        self.adapter, self.settings, self.device, self.autocast_dtype = adapter, settings, device, autocast_dtype
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.sync_every_micro_batch = grad_sync == "micro_batch"
        self.mesh = build_mesh(device.type, self.world, dp_replicate)
        self.param_dtype = resolve_param_dtype(param_dtype, autocast_dtype, device)
        # Blocks compute on param_dtype copies of their weights, but their inputs are not cast (cast_forward_inputs
        # False), and the root (embedding, final norm, tied head: 2% of the 7B) keeps fp32 weights, so the embedding
        # and with it the residual stream stay fp32 as under the resident engine's autocast; autocast still runs
        # the head's matmul in bf16. All gradients are reduced in reduce_dtype.
        policy = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=DTYPES[reduce_dtype],
                                      cast_forward_inputs=False)  # fmt: skip
        root_policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=DTYPES[reduce_dtype],
                                           cast_forward_inputs=False)  # fmt: skip
        model = adapter.model
        for block in adapter.blocks:
            if activation_checkpointing:
                checkpoint_forward(block)
            # The last block's parameters are gathered again at once by the backward that follows its forward:
            # keeping them (as torchtitan does) saves one all-gather per micro-batch.
            last = block is adapter.blocks[len(adapter.blocks) - 1]
            fully_shard(block, mesh=self.mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward
                        and not last)  # fmt: skip
        fully_shard(model, mesh=self.mesh, mp_policy=root_policy, reshard_after_forward=reshard_after_forward)
        self.model: FSDPModule = model  # type: ignore[assignment]
        self.named = dict(model.named_parameters())  # DTensors sharded on dim 0, same names as the model's
        self.names = {p: n for n, p in self.named.items()}
        self.optimizer = build_adamw(groups, self.named, settings, device)  # on the shards: elementwise, as resident
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]

    def _autocast(self):
        """Autocast beside FSDP's bf16 parameters keeps the ops autocast runs in fp32 (norms, softmax, the loss)
        in fp32, as the resident engine's autocast does."""
        return autocast(self.device, self.autocast_dtype)

    def _sum(self, values: list[float]) -> list[float]:
        """Sum scalars over ranks (float64 on the host for gloo, on the device for NCCL)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def train_step(self, micro_batches: list[Any], lr: float) -> StepResult:
        """`micro_batches` is this rank's share of the step (the trainer deals them out rank::world); every rank
        holds the same number. Gradients are reduce-scattered once, after the last micro-batch (grad_sync=step),
        or after each (grad_sync=micro_batch: sharded accumulation, 1/N of the gradient memory)."""
        self.model.train()
        n = len(micro_batches)

        def sync(i: int) -> None:  # grad_sync=step: accumulate full-size gradients, reduce-scatter after the last
            self.model.set_requires_gradient_sync(i == n - 1 or self.sync_every_micro_batch)

        # Each rank's gradients are the mean over its micro-batches; FSDP's reduction averages them over the ranks.
        total, tokens = accumulate_gradients(self.adapter, micro_batches, self.device, self.autocast_dtype, sync)
        loss_sum, tokens_sum = self._sum([total.item(), float(tokens)])
        loss_value, tokens = loss_sum / (n * self.world), int(tokens_sum)
        norm_value = self._clip()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):  # the same verdict on every rank
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(loss_value, norm_value, True, tokens)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_value, norm_value, False, tokens)

    def _clip(self) -> float:
        """Clip to the global norm over every rank's shards (the gradient DTensors' norm is a partial sum; its
        full_tensor() is the all-reduce). Returns the norm before clipping."""
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if self.settings.grad_clip > 0 and math.isfinite(norm.item()):
            torch.nn.utils.clip_grads_with_norm_(self.params, self.settings.grad_clip, norm, foreach=True)
        return norm.item()

    @torch.no_grad()
    def eval_loss(self, batch: Any) -> float:
        """Every rank evaluates the same batch (the forward is a collective)."""
        self.model.eval()
        with self._autocast():
            return self.adapter.loss(self.adapter.to_device(batch, self.device)).item()

    # -- checkpoints: the project's flat layout, gathered and cut per parameter ----------------------

    def _full(self, t: torch.Tensor) -> torch.Tensor | None:
        """One tensor in full on rank 0's host (None elsewhere). All ranks call it in the same order."""
        if isinstance(t, DTensor):
            t = t.full_tensor()  # all-gather of this one tensor
        return t.detach().to("cpu", copy=True) if self.rank == 0 else None

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """{"model": {name: tensor}, "optimizer": {<name>.<key>: tensor}} in full on rank 0 (empty dicts on the
        other ranks). A collective: every rank calls it."""
        model = {name: self._full(p) for name, p in self.named.items()}
        optimizer = {}
        for name, p in self.named.items():  # the same order on every rank (optimizer.state is a dict by object)
            state = self.optimizer.state.get(p, {})
            for key in ADAM_STATE_KEYS:
                if key in state:
                    v = state[key]
                    optimizer[f"{name}.{key}"] = self._full(v if torch.is_tensor(v) else torch.tensor(float(v)))
        if self.rank != 0:
            return {"model": {}, "optimizer": {}}
        return {"model": model, "optimizer": optimizer}

    def _shard(self, full: torch.Tensor, like: DTensor) -> torch.Tensor:
        """This rank's shard of a full tensor, laid out as `like` (no communication: every rank read the file)."""
        full = full.to(self.device, like.dtype)
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]], load_optimizer: bool = True) -> None:
        weights = state["model"]
        missing = sorted(set(self.named) - set(weights))
        unexpected = sorted(set(weights) - set(self.named))
        if missing or unexpected:
            raise ValueError(
                f"checkpoint weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        for name, p in self.named.items():
            p.to_local().copy_(self._shard(weights[name], p))
        if not load_optimizer:
            return
        flat = state.get("optimizer", {})
        check_adam_state_keys(self.named, flat)
        self.optimizer.state.clear()
        for name, p in self.named.items():
            if f"{name}.step" not in flat:
                continue
            moments = {}
            for key in ("exp_avg", "exp_avg_sq"):
                local = self._shard(flat[f"{name}.{key}"], p)
                moments[key] = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                                                  shape=p.shape, stride=p.stride())  # fmt: skip
            # fused AdamW keeps the step count as a plain tensor on the device
            self.optimizer.state[p] = {"step": flat[f"{name}.step"].to(self.device, torch.float32).clone(), **moments}
