"""The host store (the MemoryX role): fp32 master weights, AdamW moments and gradient accumulators of every
block, plus the non-block parameters (embeddings, final norm), in host memory.

Each unit (block i, or "rest" for everything outside the blocks) keeps its tensors as one flat buffer so a
block crosses the link in one copy; parameters are views into it. The model's own host parameters become
views of the master buffers, so the module, the store and a checkpoint always agree.
"""

from __future__ import annotations

import gc
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
from crystal.streaming.backends.base import ADAM_STATE_KEYS, check_adam_state_keys

GIB = 1 << 30


class HostMemoryError(ValueError):
    """The host cannot hold the store (a ValueError, so the trainer reports it as one line)."""


def host_memory_available() -> int:
    """Bytes the kernel says can still be allocated without swapping (MemAvailable), or free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def pinned_size(nbytes: int) -> int:
    """What one pinned allocation of `nbytes` really takes: torch's caching host allocator rounds every request
    up to a power of two (at 7B a 403 MB bf16 block shadow holds 512 MiB)."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0


def plan_host_memory(
    rest_numel: int,
    block_numel: int,
    n_blocks: int,
    *,
    stream_dtype: torch.dtype = torch.float32,
    grad_dtype: torch.dtype = torch.float32,
    pinned: bool = False,
    staging_buffers: int = 0,
) -> dict[str, int]:
    """Bytes of host memory a streaming engine allocates, by what holds them (their sum is what
    check_host_memory checks). Per parameter: fp32 master, Adam m, v and gradient accumulator; per block
    parameter a shadow in `stream_dtype` when that is not fp32 (the link then carries 2 bytes per weight and the
    cast is done once per update, on the host). Pinned (when `pinned`): what the device copies from (a block's
    shadow, else its master; the rest's master) and the `staging_buffers` gradient buffers, each as large as
    the largest unit in `grad_dtype`; each pinned allocation is rounded up as torch's host allocator does.
    Checkpoints are written from the store's own tensors: no buffers of their own."""
    params = rest_numel + n_blocks * block_numel
    shadow = torch.empty((), dtype=stream_dtype).element_size() if stream_dtype != torch.float32 else 0
    staging = max(rest_numel, block_numel) * torch.empty((), dtype=grad_dtype).element_size()
    pinned_allocs = [rest_numel * 4] + [block_numel * (shadow or 4)] * n_blocks + [staging] * staging_buffers
    return {
        "fp32 master": params * 4,
        "Adam m": params * 4,
        "Adam v": params * 4,
        "fp32 grad accumulators": params * 4,
        "block shadow (stream dtype)": n_blocks * block_numel * shadow,
        "gradient staging buffers": staging_buffers * staging,
        "pinned rounding": sum(pinned_size(b) - b for b in pinned_allocs) if pinned else 0,
        "checkpoint buffers": 0,
    }


def unit_numels(model: nn.Module, blocks: nn.ModuleList) -> tuple[int, int, int]:
    """(parameters outside the blocks, parameters of one block, blocks) as the store lays them out; a model on
    the meta device will do, so a plan costs no memory."""
    block_ids = {id(p) for p in blocks.parameters()}
    rest = sum(p.numel() for p in model.parameters() if id(p) not in block_ids)  # tied weights count once
    return rest, sum(p.numel() for p in blocks[0].parameters()), len(blocks)


def release_cached_pinned_memory() -> None:
    """Hand back pinned blocks torch's host allocator keeps cached after their tensors died (an earlier engine's
    store in this process): MemAvailable does not count them, and a new store of other sizes cannot reuse
    them. The collect frees an engine left in a reference cycle first."""
    empty = getattr(torch._C, "_host_emptyCache", None)
    if empty is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        gc.collect()
        empty()


def check_host_memory(plan: dict[str, int], already_held: int = 0, available: int | None = None) -> int:
    """Refuse, before allocating, a store the host cannot hold. `plan`: plan_host_memory's bytes;
    `already_held`: bytes of the model that the store will take over (its fp32 host weights, freed as the store
    adopts them); `available`: the host's free bytes (default: what the kernel says now, after pinned memory
    cached from an earlier engine is handed back). Returns the bytes needed."""
    needed = sum(plan.values())
    if available is None:
        release_cached_pinned_memory()
        available = host_memory_available()
    available += already_held
    if needed > available:
        largest = ", ".join(f"{k} {v / GIB:.1f}" for k, v in sorted(plan.items(), key=lambda kv: -kv[1])[:3])
        raise HostMemoryError(
            f"backend=streaming needs {needed / GIB:.1f} GiB of host memory ({largest} GiB, ...) but "
            f"{available / GIB:.1f} GiB is available; use a smaller model or a host with more RAM"
        )
    return needed


@dataclass
class Slot:
    """Where one parameter lives in its unit's flat buffers."""

    name: str  # relative to the unit (e.g. "attn.c_attn.weight")
    full_name: str  # in the whole model (e.g. "blocks.3.attn.c_attn.weight")
    offset: int
    shape: torch.Size

    @property
    def numel(self) -> int:
        return self.shape.numel()


class Layout:
    """The order and offsets of a module's parameters in a flat buffer (identical for identical blocks)."""

    def __init__(self, named: list[tuple[str, torch.Tensor]], prefix: str = "") -> None:
        self.slots: list[Slot] = []
        offset = 0
        for name, p in named:
            self.slots.append(Slot(name, prefix + name, offset, p.shape))
            offset += p.numel()
        self.numel = offset

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[s.offset : s.offset + s.numel].view(s.shape) for s in self.slots]


def _alloc(numel: int, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    return torch.zeros(numel, dtype=dtype, pin_memory=pin)


class Unit:
    """One block (or the rest of the model) in the store: master, moments, grad accumulator, Adam steps."""

    def __init__(self, index: int | None, layout: Layout, pin: bool, shadow_dtype: torch.dtype | None) -> None:
        self.index, self.layout = index, layout
        n = layout.numel
        self.master = _alloc(n, torch.float32, pin and shadow_dtype is None)  # what the device copies from
        self.exp_avg = _alloc(n, torch.float32, False)
        self.exp_avg_sq = _alloc(n, torch.float32, False)
        self.grad = _alloc(n, torch.float32, False)  # gradients arrive through pinned staging buffers
        self.grad_ready = False  # False: the next gradient overwrites the accumulator instead of adding
        # One step counter per parameter, as torch's AdamW keeps them (so checkpoints interchange).
        self.steps = [torch.zeros((), dtype=torch.float32) for _ in layout.slots]
        self.shadow = _alloc(n, shadow_dtype, pin) if shadow_dtype is not None else None
        self.params, self.grads = layout.views(self.master), layout.views(self.grad)
        self.exp_avgs, self.exp_avg_sqs = layout.views(self.exp_avg), layout.views(self.exp_avg_sq)
        # What the optimizer walks: here every parameter whole; a sharded unit (sharded.py) has pieces of them.
        self.piece_slots, self.piece_steps = list(range(len(layout.slots))), self.steps
        self.device_numel = n  # elements of the device buffer the unit is loaded into

    @property
    def name(self) -> str:
        return "rest" if self.index is None else f"block {self.index}"

    def stream_source(self) -> torch.Tensor:
        """The flat tensor the device copies from: the half-precision shadow when there is one."""
        return self.master if self.shadow is None else self.shadow

    def refresh_shadow(self) -> None:
        if self.shadow is not None:
            self.shadow.copy_(self.master)

    def upload(self, dst: torch.Tensor, non_blocking: bool = False) -> int:
        """Copy the unit into its device buffer (on the current stream); returns the host bytes sent."""
        src = self.stream_source()
        dst.copy_(src, non_blocking=non_blocking)
        return src.nbytes

    @torch.no_grad()
    def accumulate(self, grads: list[torch.Tensor]) -> None:
        """Add one micro-batch's per-parameter gradients (on the host). The first is copied, later ones added,
        which is exactly what autograd does to .grad, so the sums match a resident run bit for bit. bf16
        gradients (from the link) are widened inside the copy/add kernels, exactly, with no fp32 temporary."""
        if self.grad_ready:
            torch._foreach_add_(self.grads, grads)
        else:
            torch._foreach_copy_(self.grads, grads)
            self.grad_ready = True

    def zero_grad(self) -> None:
        self.grad_ready = False


class HostStore:
    """Every unit of the model: blocks 0..L-1 and "rest". Takes over the model's host parameters."""

    def __init__(
        self,
        model: nn.Module,
        blocks: nn.ModuleList,
        pin: bool = False,
        stream_dtype: torch.dtype = torch.float32,
    ) -> None:
        block_ids = {id(p) for p in blocks.parameters()}
        prefix = next(n for n, m in model.named_modules() if m is blocks) + "."
        named = dict(model.named_parameters())
        if any(p.device.type != "cpu" for p in named.values()):
            raise ValueError("the streaming store takes a model built on the host (cpu); build it with device='cpu'")
        if pin and not can_pin():
            warnings.warn("pinned host memory is not available here; the store uses pageable memory", stacklevel=2)
            pin = False
        self.pinned = pin
        shadow = stream_dtype if stream_dtype != torch.float32 else None
        self.block_layout = Layout(list(blocks[0].named_parameters()))
        self.blocks: list[Unit] = []
        for i, block in enumerate(blocks):
            layout = Layout(list(block.named_parameters()), prefix=f"{prefix}{i}.")
            if [s.shape for s in layout.slots] != [s.shape for s in self.block_layout.slots]:
                raise ValueError(f"block {i} differs from block 0: the executor streams a stack of identical blocks")
            self.blocks.append(self._adopt(Unit(i, layout, pin, shadow), list(block.parameters())))
        rest = [(n, p) for n, p in named.items() if id(p) not in block_ids]
        # the rest stays on the device: no shadow needed
        self.rest = self._adopt(Unit(None, Layout(rest), pin, None), [p for _, p in rest])
        self.units = [self.rest, *self.blocks]
        self.by_name = {s.full_name: (u, k) for u in self.units for k, s in enumerate(u.layout.slots)}

    @staticmethod
    def _adopt(unit: Unit, params: list[nn.Parameter]) -> Unit:
        with torch.no_grad():
            for view, p in zip(unit.params, params, strict=True):
                view.copy_(p.detach())
                p.data = view  # the model's host parameters now are the master weights
        unit.refresh_shadow()
        return unit

    @property
    def num_params(self) -> int:
        return sum(u.layout.numel for u in self.units)

    @property
    def nbytes(self) -> int:
        per_unit = (u.master.nbytes * 4 + (u.shadow.nbytes if u.shadow is not None else 0) for u in self.units)
        return sum(per_unit)

    # -- checkpoints: the same flat {name: tensor} dicts as the resident engine ---------------------

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """Views of the store's own tensors, as a module's state_dict returns its parameters: no copy (at 7B a
        copy is 79 GB of host memory). They change with the next update: copy them, or write them before it."""
        model, optim = {}, {}
        for u in self.units:
            for k, s in enumerate(u.layout.slots):
                model[s.full_name] = u.params[k]
                if float(u.steps[k]) > 0:  # torch's AdamW has no state for a parameter never updated
                    optim[f"{s.full_name}.exp_avg"] = u.exp_avgs[k]
                    optim[f"{s.full_name}.exp_avg_sq"] = u.exp_avg_sqs[k]
                    optim[f"{s.full_name}.step"] = u.steps[k]
        return {"model": model, "optimizer": optim}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]], load_optimizer: bool = True) -> None:
        weights = state["model"]
        missing, unexpected = sorted(set(self.by_name) - set(weights)), sorted(set(weights) - set(self.by_name))
        if missing or unexpected:
            raise ValueError(
                f"checkpoint weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        for name, (u, k) in self.by_name.items():
            u.params[k].copy_(weights[name])
        optim = state.get("optimizer", {}) if load_optimizer else {}
        check_adam_state_keys(self.by_name, optim)
        for name, (u, k) in self.by_name.items():
            for key, t in zip(ADAM_STATE_KEYS, (u.exp_avgs[k], u.exp_avg_sqs[k], u.steps[k]), strict=True):
                if optim:
                    t.copy_(optim[f"{name}.{key}"])
                else:  # no optimizer state: a fresh AdamW (e.g. a new stage)
                    t.zero_()
        for u in self.units:
            u.refresh_shadow()
            u.zero_grad()


def can_pin() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        torch.empty(1).pin_memory()
        return True
    except RuntimeError:
        return False
