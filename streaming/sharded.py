"""One MemoryX sharded across replicas, SwarmX as reduce-scatter / all-gather on the device (CG-1 on a cluster).

With N replicas (torchrun, one or more nodes) every unit's flat buffer (block i, or the rest) is cut into N
equal ranges, padded to a multiple of N so the collectives see equal pieces:

    unit flat, n elements, padded to N * s         rank r owns [r * s, min((r + 1) * s, n))
    | rank 0 | rank 1 | ... | rank N-1 |pad|        fp32 master, Adam m, v, grad accumulator, stream-dtype copy

Each rank holds only its range of every unit, in the stream dtype too, so its host store is 1/N of a
replicated one (every rank works on every block: the work stays balanced). A parameter may straddle two ranks:
each rank updates its piece of it, which AdamW (elementwise) allows; the step counter of every parameter is kept
on every rank (all units update every step, so they agree).

SwarmX through torch.distributed, on the device's group (NCCL on GPUs; gloo on CPU, whose reduce_scatter_tensor
and all_gather_into_tensor exist in torch 2.13, so no fallback is needed):
  - gradients: each micro-batch's (batch_major) or step's (layer_major) block gradient is reduce-scattered on
    the device in fp32 as it exists; only the rank's 1/N crosses to the host, where it is added to its
    accumulator. The sum over replicas is divided by N once the last micro-batch has landed.
  - weights: a block load copies the rank's 1/N of the stream-dtype weights to the device and all-gathers the
    block into the slot, so each GPU's link carries 1/N of the weights and the rest rides NVLink.
  - clipping: the global norm is the all-reduce of per-rank squared norms (fp64 sum), which sums in another
    order than one process's norm of per-parameter norms: equal to fp32 rounding, not bitwise.
The trainer never builds it for WORLD_SIZE 1: one process keeps the replicated HostStore (today's path, exact).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from crystal.streaming.backends.base import ADAM_STATE_KEYS, check_adam_state_keys
from crystal.streaming.optimizer import HostAdamW
from crystal.streaming.store import HostStore, Layout, Unit, _alloc, can_pin

# torch 2.13 calls the *_tensor names deprecated in favour of *_single; older releases have only the former
all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def shard_size(numel: int, world: int) -> int:
    """Elements per rank of a unit of `numel` (the last rank's range may be shorter; the padding is zeros)."""
    return -(-numel // world)


def shard_range(numel: int, world: int, rank: int) -> tuple[int, int]:
    """[lo, hi) of the unit's flat buffer that `rank` owns."""
    s = shard_size(numel, world)
    return min(rank * s, numel), min((rank + 1) * s, numel)


def unit_key(index: int | None) -> str:
    """A unit's name in sharded checkpoints."""
    return "rest" if index is None else f"block.{index}"


class ShardUnit(Unit):
    """This rank's range of one unit. The lists the optimizer walks (params, grads, exp_avgs, exp_avg_sqs) hold one
    view per *piece*: the part of a parameter inside the range; piece_slots says whose. Every buffer is s elements
    long (the padded share), so it is what an all-gather sends; only the first `own` are real."""

    def __init__(self, index: int | None, layout: Layout, rank: int, world: int, pin: bool,
                 shadow_dtype: torch.dtype | None, group: Any) -> None:  # fmt: skip
        self.index, self.layout, self.world, self.group = index, layout, world, group
        n = layout.numel
        self.size = shard_size(n, world)
        self.device_numel = self.size * world
        self.lo, self.hi = shard_range(n, world, rank)
        self.own = self.hi - self.lo
        self.master = _alloc(self.size, torch.float32, pin and shadow_dtype is None)
        self.exp_avg = _alloc(self.size, torch.float32, False)
        self.exp_avg_sq = _alloc(self.size, torch.float32, False)
        self.grad = _alloc(self.size, torch.float32, False)
        self.shadow = _alloc(self.size, shadow_dtype, pin) if shadow_dtype is not None else None
        self.grad_ready = False
        self.steps = [torch.zeros((), dtype=torch.float32) for _ in layout.slots]
        # pieces: (slot k, start within the parameter's flat, start within the shard, length)
        self.pieces: list[tuple[int, int, int, int]] = []
        for k, s in enumerate(layout.slots):
            a, b = max(s.offset, self.lo), min(s.offset + s.numel, self.hi)
            if a < b:
                self.pieces.append((k, a - s.offset, a - self.lo, b - a))
        self.piece_slots = [k for k, _, _, _ in self.pieces]
        self.piece_steps = [self.steps[k] for k in self.piece_slots]

        def views(flat: torch.Tensor) -> list[torch.Tensor]:
            return [flat[at : at + length] for _, _, at, length in self.pieces]

        self.params, self.grads = views(self.master), views(self.grad)
        self.exp_avgs, self.exp_avg_sqs = views(self.exp_avg), views(self.exp_avg_sq)
        self._pad: dict[torch.device, torch.Tensor] = {}
        self.gather_in: torch.Tensor | None = None  # set by the store: the device buffer a load sends from

    @property
    def nbytes(self) -> int:
        return self.master.nbytes * 4 + (self.shadow.nbytes if self.shadow is not None else 0)

    def refresh_shadow(self) -> None:
        if self.shadow is not None:
            self.shadow[: self.own].copy_(self.master[: self.own])

    def upload(self, dst: torch.Tensor, non_blocking: bool = False) -> int:
        """Fill `dst` (device_numel elements on the device) with the whole unit: this rank's share crosses the
        link, the replicas' shares arrive by all-gather on the current stream. Returns the host bytes sent."""
        src = self.stream_source()
        if dst.is_cuda:
            sent = self.gather_in[: self.size]
            sent.copy_(src, non_blocking=non_blocking)  # on the caller's (copy) stream: the NCCL gather waits for it
        else:
            sent = src
        all_gather(dst, sent, group=self.group)
        return src.nbytes

    def device_gradient(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The unit's per-parameter device gradients as one fp32 flat buffer padded to device_numel (what a
        reduce-scatter takes)."""
        dev = grads[0].device
        pad = self._pad.get(dev)
        if pad is None:
            pad = self._pad[dev] = torch.zeros(self.device_numel - self.layout.numel, device=dev)
        return torch.cat([*(g.reshape(-1).float() for g in grads), pad])

    @torch.no_grad()
    def accumulate(self, shard: torch.Tensor) -> None:  # type: ignore[override]
        """Add one reduced gradient share (this rank's `own` elements, any float dtype: widened in the kernel)."""
        if self.grad_ready:
            self.grad[: self.own].add_(shard[: self.own])
        else:
            self.grad[: self.own].copy_(shard[: self.own])
            self.grad_ready = True

    def average(self) -> None:
        """The reduce-scatters summed over replicas; the gradient of the mean loss over replicas is that sum / N."""
        self.grad[: self.own].div_(self.world)


class ShardedStore(HostStore):
    """Every unit's 1/N share on this rank (see the module docstring). The model's host parameters become views of
    a shared zero scalar: their shapes stay (the executor clones block 0 as its slot template), their memory goes."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, rank: int, world: int, group: Any = None,
                 pin: bool = False, stream_dtype: torch.dtype = torch.float32,
                 host_group: Any = None) -> None:  # fmt: skip
        block_ids = {id(p) for p in blocks.parameters()}
        prefix = next(n for n, m in model.named_modules() if m is blocks) + "."
        named = dict(model.named_parameters())
        if any(p.device.type != "cpu" for p in named.values()):
            raise ValueError("the streaming store takes a model built on the host (cpu); build it with device='cpu'")
        self.pinned = pin = pin and can_pin()
        # group: the device collectives' (NCCL on GPUs); host_group: gloo, for host tensors (state_dict)
        self.rank, self.world, self.group, self.host_group = rank, world, group, host_group
        shadow = stream_dtype if stream_dtype != torch.float32 else None
        self.block_layout = Layout(list(blocks[0].named_parameters()))
        self.blocks = []
        for i, block in enumerate(blocks):
            layout = Layout(list(block.named_parameters()), prefix=f"{prefix}{i}.")
            unit = ShardUnit(i, layout, rank, world, pin, shadow, group)
            self.blocks.append(self._adopt_share(unit, list(block.parameters())))
        rest = [(n, p) for n, p in named.items() if id(p) not in block_ids]
        self.rest = self._adopt_share(
            ShardUnit(None, Layout(rest), rank, world, pin, None, group), [p for _, p in rest]
        )
        self.units = [self.rest, *self.blocks]
        self.by_name = {s.full_name: (u, k) for u in self.units for k, s in enumerate(u.layout.slots)}
        self._gather_in: dict[Any, torch.Tensor] = {}

    @staticmethod
    def _adopt_share(unit: ShardUnit, params: list[nn.Parameter]) -> ShardUnit:
        placeholder = torch.zeros((), dtype=torch.float32)
        with torch.no_grad():
            for k, start, at, length in unit.pieces:
                unit.master[at : at + length].copy_(params[k].detach().reshape(-1)[start : start + length])
            for p in params:
                p.data = placeholder.expand(p.shape)
        unit.refresh_shadow()
        return unit

    def attach_device(self, device: torch.device) -> None:
        """One device send buffer per kind of unit (blocks load on the copy stream, the rest on the compute
        stream: separate buffers, so neither waits for the other's gather)."""
        if device.type != "cuda":
            return
        for unit in self.units:
            dtype = unit.stream_source().dtype
            key = (unit.index is None, dtype)
            if key not in self._gather_in:
                self._gather_in[key] = torch.empty(unit.size, dtype=dtype, device=device)
            unit.gather_in = self._gather_in[key]

    @property
    def nbytes(self) -> int:
        return sum(u.nbytes for u in self.units)

    def ranges(self) -> dict[str, Any]:
        """This rank's share, for the start-up report."""
        block, rest = self.blocks[0], self.rest
        return {"rank": self.rank, "world": self.world, "block_range": [block.lo, block.hi],
                "block_numel": block.layout.numel, "rest_range": [rest.lo, rest.hi],
                "rest_numel": rest.layout.numel}  # fmt: skip

    # -- checkpoints -----------------------------------------------------------------------------------

    def shard_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's share of every unit as flat fp32 views (no copy): <unit>.master / .exp_avg / .exp_avg_sq."""
        out = {}
        for u in self.units:
            for key, flat in (("master", u.master), ("exp_avg", u.exp_avg), ("exp_avg_sq", u.exp_avg_sq)):
                out[f"{unit_key(u.index)}.{key}"] = flat[: u.own]
        return out

    def shard_layout(self) -> dict[str, Any]:
        """What a reader needs to turn the shard files back into named tensors at any world size."""
        units = {}
        for u in self.units:
            params = [[s.full_name, s.offset, list(s.shape), float(u.steps[k])] for k, s in enumerate(u.layout.slots)]
            units[unit_key(u.index)] = {"numel": u.layout.numel, "params": params}
        return {"world": self.world, "units": units}

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """The whole model's named tensors, all-gathered (a full copy: for tests and small models; checkpoints
        write shard_tensors() instead)."""
        model, optim = {}, {}
        for u in self.units:
            full = {}
            for key, flat in (("master", u.master), ("exp_avg", u.exp_avg), ("exp_avg_sq", u.exp_avg_sq)):
                out = torch.empty(u.device_numel)
                all_gather(out, flat, group=self.host_group)
                full[key] = out
            for k, s in enumerate(u.layout.slots):
                model[s.full_name] = full["master"][s.offset : s.offset + s.numel].view(s.shape)
                if float(u.steps[k]) > 0:
                    optim[f"{s.full_name}.exp_avg"] = full["exp_avg"][s.offset : s.offset + s.numel].view(s.shape)
                    optim[f"{s.full_name}.exp_avg_sq"] = full["exp_avg_sq"][s.offset : s.offset + s.numel].view(s.shape)
                    optim[f"{s.full_name}.step"] = u.steps[k].clone()
        return {"model": model, "optimizer": optim}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any], load_optimizer: bool = True) -> None:
        """Named tensors of any layout (a replicated or resident checkpoint, or a sharded one written at any world
        size): each rank reads only its pieces when the mapping can read a flat range (read_flat)."""
        weights = state["model"]
        missing, unexpected = sorted(set(self.by_name) - set(weights)), sorted(set(weights) - set(self.by_name))
        if missing or unexpected:
            raise ValueError(
                f"checkpoint weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        optim = state.get("optimizer", {}) if load_optimizer else {}
        check_adam_state_keys(self.by_name, optim)
        for u in self.units:
            names = [s.full_name for s in u.layout.slots]
            for k, start, at, length in u.pieces:
                u.master[at : at + length].copy_(_read_flat(weights, names[k], start, length))
                for key, flat in (("exp_avg", u.exp_avg), ("exp_avg_sq", u.exp_avg_sq)):
                    if optim:
                        flat[at : at + length].copy_(_read_flat(optim, f"{names[k]}.{key}", start, length))
                    else:
                        flat[at : at + length].zero_()
            for k, name in enumerate(names):
                if optim:
                    u.steps[k].copy_(optim[f"{name}.{ADAM_STATE_KEYS[2]}"])
                else:
                    u.steps[k].zero_()
            u.refresh_shadow()
            u.zero_grad()


def _read_flat(mapping: Any, key: str, start: int, length: int) -> torch.Tensor:
    reader = getattr(mapping, "read_flat", None)
    if reader is not None:
        return reader(key, start, start + length)
    return mapping[key].reshape(-1)[start : start + length]


class ShardedAdamW(HostAdamW):
    """HostAdamW over pieces; the global norm comes from the all-reduce of every rank's squared norms."""

    @torch.no_grad()
    def gradient_final(self, unit: Unit) -> None:
        norms = torch._foreach_norm(unit.grads, 2.0) if unit.grads else []
        self.norms[id(unit)] = [sum((n.double() ** 2 for n in norms), torch.zeros((), dtype=torch.float64))]

    def local_square_norm(self) -> torch.Tensor:
        missing = [u.name for u in self.store.units if id(u) not in self.norms]
        if missing:
            raise RuntimeError(f"gradients never became final for {missing[:3]}")
        return sum((self.norms[id(u)][0] for u in self.store.units), torch.zeros((), dtype=torch.float64))

    def clip_from_square(self, square: float) -> tuple[torch.Tensor, torch.Tensor]:
        total = torch.tensor(square, dtype=torch.float64).sqrt().float()
        return total, self.clip_of(total)


class Collectives:
    """Host-side wall time spent issuing and waiting for collectives this step (on GPUs the NCCL kernels run on
    their own stream: their device time is in the trace's reduce lane, not here)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def timed(self, fn, *args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t
