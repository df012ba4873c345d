"""SwarmX: data parallel across replicas with torch.distributed (launched by torchrun).

Every replica streams from its own host store and runs the same schedule on its share of the step's
micro-batches. As each block's gradient becomes final on the host it is all-reduced asynchronously, so
the reduction overlaps the backward of the blocks still to come; the optimizer waits for it only when it
needs the global gradient norm. Every replica then applies the same update to the same weights, so the
replicas stay identical without broadcasting weights.

The gradients live in host memory, so they are reduced over gloo (a gloo group is made beside NCCL when
the default group is NCCL). No home-made transport.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from crystal.streaming.store import Unit


def init_from_env() -> Swarm | None:
    """A Swarm when launched by torchrun with WORLD_SIZE > 1, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return Swarm()


class Swarm:
    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("SwarmX needs torch.distributed initialised (launch with torchrun)")
        if group is None and dist.get_backend() != "gloo":
            group = dist.new_group(backend="gloo")  # host tensors
        self.group = group
        # Device tensors (the sharded store's reduce-scatter / all-gather): the default group, NCCL under torchrun
        # on GPUs; gloo on CPU, where it is the same as `group`.
        self.device_group = None if dist.get_backend() != "gloo" else group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
        self._inflight: list[tuple[Unit, dist.Work]] = []

    def reduce_async(self, unit: Unit) -> None:
        """Start summing the unit's final gradient over replicas; overlaps whatever runs next."""
        work = dist.all_reduce(unit.grad, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        self._inflight.append((unit, work))

    def finish(self) -> list[Unit]:
        """Wait for every reduction of this step; gradients become the mean over replicas."""
        done = []
        for unit, work in self._inflight:
            work.wait()
            unit.grad.div_(self.world)
            done.append(unit)
        self._inflight = []
        return done

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def sum_scalars(self, values: torch.Tensor) -> torch.Tensor:
        out = values.detach().to("cpu", torch.float64)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out
