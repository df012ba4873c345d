"""The executor: runs a stack of identical blocks one block at a time through at most two device buffers.

    host store (fp32 master, Adam m/v, grads)           device
    block 0 ... block L-1  --H2D (copy stream)-->  slot A | slot B   (two block buffers, double buffering)
                           <--D2H (grad stream)--  flat grads of the block just differentiated

Forward streams blocks 0..L-1 (block i+1 is copied while block i computes) and keeps only block inputs;
backward streams L-1..0 again, recomputes each block's internals, sends its gradients to the host as soon
as they exist, and moves on. The model never knows: it is driven through the StreamableModel protocol.

Schedules (both produce the same gradients): batch-major visits 0..L-1, L-1..0 for every micro-batch;
layer-major visits each layer once per pass and runs every micro-batch through it, so weights cross the
link twice per step instead of twice per micro-batch, at the cost of keeping every micro-batch's block
inputs at once.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
import time
import types
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from crystal.streaming.backends.base import StreamableModel
from crystal.streaming.store import HostStore, Layout, Unit

MAX_SLOTS = 2  # device block buffers, whatever the depth: the point of weight streaming


@dataclass(frozen=True)
class _WeightRef:
    """A weight an autograd graph saved, by block and place in the slot's flat buffer instead of by tensor."""

    block: int
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class Tracer:
    """Per-lane timings of a step (compute, h2d, d2h, optimizer, reduce) as trace events.

    CUDA lanes are timed with CUDA events on their stream (resolved at the end of the step); host lanes with
    perf_counter. Both are relative to the step start, so the timeline lines up to within launch latency.
    The host worker records spans while the launching thread ends the step: a lock guards the lists, and
    end_step hands out a sorted list of its own. A host span still running when the next step begins (an
    overlapped update) lands in that step's timeline, at a negative start."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.cuda, self.enabled = device.type == "cuda", enabled
        self._host: list[tuple] = []  # (lane, name, block, perf_counter start, duration)
        self._pending: list[tuple] = []  # CUDA spans: (lane, name, block, begin event, end event)
        self._lock = threading.Lock()
        self.step, self.t0 = 0, time.perf_counter()

    def begin_step(self, step: int, stream: Any = None) -> None:
        with self._lock:  # spans that ended between steps (an evaluation's copies) belong to no step
            self.step, self._pending, self._host = step, [], []
            self.t0 = time.perf_counter()
        if self.enabled and self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record(stream)

    @contextlib.contextmanager
    def span(self, lane: str, name: str, block: int | None = None, stream: Any = None) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if self.cuda and stream is not None:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record(stream)
            yield
            end.record(stream)
            with self._lock:
                self._pending.append((lane, name, block, begin, end))
            return
        t = time.perf_counter()
        yield
        done = time.perf_counter()
        with self._lock:
            self._host.append((lane, name, block, t, done - t))

    def _event(self, lane: str, name: str, block: int | None, start: float, dur: float) -> dict[str, Any]:
        return {"lane": lane, "name": name, "start_s": start, "dur_s": dur, "block": block, "step": self.step}

    def end_step(self) -> list[dict[str, Any]]:
        with self._lock:
            pending, self._pending = self._pending, []
            host, self._host = self._host, []
        events = [self._event(lane, name, block, t - self.t0, dur) for lane, name, block, t, dur in host]
        for lane, name, block, begin, end in pending:
            end.synchronize()
            start = self.start.elapsed_time(begin) / 1e3
            events.append(self._event(lane, name, block, start, begin.elapsed_time(end) / 1e3))
        return sorted(events, key=lambda e: e["start_s"])


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _measure(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def overlap_report(events: list[dict[str, Any]], step_s: float | None = None) -> dict[str, float]:
    """How well copies hide behind compute in one step's trace: the fraction of the step with a copy lane
    busy while compute runs, and the time exposed at the step boundary (before the first and after the
    last compute of the step)."""

    def lane(*names: str) -> list[tuple[float, float]]:
        return _union([(e["start_s"], e["start_s"] + e["dur_s"]) for e in events if e["lane"] in names])

    compute, copies = lane("compute"), lane("h2d", "d2h")
    end = step_s or max((e["start_s"] + e["dur_s"] for e in events), default=0.0)
    both = _measure(_union([(max(a, c), min(b, d)) for a, b in compute for c, d in copies if min(b, d) > max(a, c)]))
    exposed = (compute[0][0] + max(0.0, end - compute[-1][1])) if compute else end
    return {
        "step_s": end, "compute_s": _measure(compute), "copy_s": _measure(copies),
        "copy_overlap_frac": both / end if end else 0.0, "exposed_boundary_s": exposed,
    }  # fmt: skip


def _clone_module(template: nn.Module) -> nn.Module:
    """A deep copy of a block that shares what cannot be copied (e.g. an ops namespace held as a module)."""
    memo: dict[int, Any] = {}
    for m in template.modules():
        for value in vars(m).values():
            if isinstance(value, types.ModuleType):
                memo[id(value)] = value
    return copy.deepcopy(template, memo)


class DeviceSlots:
    """The device's block buffers: copies of the block module whose parameters are views of one flat tensor,
    so a block arrives in one copy. Never more than MAX_SLOTS of them, whatever the depth."""

    def __init__(self, template: nn.Module, layout: Layout, device: torch.device, dtype: torch.dtype,
                 prefetch: int, copy_stream: Any, compute_stream: Any, numel: int = 0) -> None:  # fmt: skip
        self.device, self.prefetch = device, prefetch
        self.copy_stream, self.compute_stream = copy_stream, compute_stream
        self.modules: list[nn.Module] = []
        self.flats: list[torch.Tensor] = []
        for _ in range(MAX_SLOTS):
            module = _clone_module(template).to(device)  # buffers (e.g. rotary tables) keep their dtype
            flat = torch.zeros(numel or layout.numel, dtype=dtype, device=device)  # numel: a sharded unit's padding
            for p, view in zip(module.parameters(), layout.views(flat), strict=True):
                p.data = view
            self.modules.append(module)
            self.flats.append(flat)
        self.holds: list[int | None] = [None] * MAX_SLOTS  # which block each slot holds
        self.ready: list[Any] = [None] * MAX_SLOTS  # CUDA event: the copy into the slot is done
        self.free: list[Any] = [None] * MAX_SLOTS  # CUDA event: the last compute reading the slot is done
        self.current = 1  # the slot computed on last; the other one is loaded next
        self.loads = 0  # block copies made (H2D traffic in blocks)
        self.h2d_bytes = 0  # host bytes those copies sent (a sharded store sends its 1/N, the gather brings the rest)
        self.cuda = device.type == "cuda"

    @property
    def max_slots(self) -> int:
        return len(self.modules)

    @property
    def nbytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.flats)

    def invalidate(self) -> None:
        """The store changed (an update, a checkpoint load): every slot must be loaded again."""
        self.holds = [None] * MAX_SLOTS

    def _load(self, slot: int, unit: Unit, tracer: Tracer, serial: bool) -> None:
        if not self.cuda:
            with tracer.span("h2d", f"load {unit.index}", unit.index):
                self.h2d_bytes += unit.upload(self.flats[slot])
        else:
            stream = self.copy_stream
            if serial:  # prefetch 0: the copy starts only after everything queued so far has computed
                stream.wait_stream(self.compute_stream)
            elif self.free[slot] is not None:
                stream.wait_event(self.free[slot])
            with torch.cuda.stream(stream), tracer.span("h2d", f"load {unit.index}", unit.index, stream):
                self.h2d_bytes += unit.upload(self.flats[slot], non_blocking=True)
            self.ready[slot] = torch.cuda.Event()
            self.ready[slot].record(stream)
        self.holds[slot] = unit.index
        self.loads += 1

    def acquire(self, unit: Unit, tracer: Tracer, before_load: Callable[[Unit], None]) -> int:
        """The slot holding `unit`'s weights, ready for compute on the compute stream (copied now, after
        `before_load(unit)` has waited for its update, unless a prefetch brought it already)."""
        if unit.index in self.holds:
            slot = self.holds.index(unit.index)
        else:
            slot = 1 - self.current
            before_load(unit)
            self._load(slot, unit, tracer, serial=True)
        if self.cuda and self.ready[slot] is not None:
            self.compute_stream.wait_event(self.ready[slot])
        self.current = slot
        return slot

    def release(self, slot: int, upcoming: Unit | None, tracer: Tracer, before_load: Callable[[Unit], None]) -> None:
        """Everything reading the slot has been queued; a later copy into it must wait for that work. With
        prefetch, `upcoming` then starts copying into the other slot. Only now may the launching thread block
        on `upcoming`'s host update: the compute just queued keeps the device busy meanwhile."""
        if self.cuda:
            self.free[slot] = torch.cuda.Event()
            self.free[slot].record(self.compute_stream)
        if self.prefetch and upcoming is not None and upcoming.index not in self.holds:
            before_load(upcoming)
            self._load(1 - slot, upcoming, tracer, serial=False)


class Executor:
    """Streams blocks through DeviceSlots for forward, backward and evaluation; returns gradients to the
    store (via `on_grad`) as soon as each block's exist. Pure schedule: the engine owns the optimizer."""

    def __init__(
        self,
        adapter: StreamableModel,
        store: HostStore,
        device: torch.device,
        *,
        schedule: str = "batch_major",
        prefetch: int = 1,
        compute_dtype: torch.dtype = torch.float32,
        autocast_dtype: torch.dtype | None = None,
        recompute: bool = True,
        trace: bool = False,
    ) -> None:
        if schedule not in ("batch_major", "layer_major"):
            raise ValueError(f"schedule={schedule!r}: use batch_major or layer_major")
        self.adapter, self.store, self.device, self.schedule = adapter, store, device, schedule
        self.autocast_dtype, self.recompute = autocast_dtype, recompute
        cuda = device.type == "cuda"
        self.compute_stream = torch.cuda.current_stream(device) if cuda else None
        self.copy_stream = torch.cuda.Stream(device) if cuda else None
        self.grad_stream = torch.cuda.Stream(device) if cuda else None
        self.slots = DeviceSlots(adapter.blocks[0], store.block_layout, device, compute_dtype, prefetch,
                                 self.copy_stream, self.compute_stream, store.blocks[0].device_numel)  # fmt: skip
        # The non-block parameters (embedding, final norm) stay on the device; refreshed after each update.
        self.rest_flat = torch.zeros(store.rest.device_numel, dtype=torch.float32, device=device)
        self.rest_params = [p for _, p in self._rest_named()]
        for p, view in zip(self.rest_params, store.rest.layout.views(self.rest_flat), strict=True):
            p.data = view
        self.tracer = Tracer(device, trace)
        self.before_load: Callable[[Unit], None] = lambda unit: None

    def _rest_named(self) -> list[tuple[str, nn.Parameter]]:
        named = dict(self.adapter.model.named_parameters())
        return [(s.full_name, named[s.full_name]) for s in self.store.rest.layout.slots]

    def refresh_rest(self) -> None:
        self.before_load(self.store.rest)
        with torch.no_grad(), self.tracer.span("h2d", "load rest", None, self.compute_stream):
            self.slots.h2d_bytes += self.store.rest.upload(self.rest_flat, non_blocking=True)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # No cast cache: autocast keys it by parameter identity and the two slots reuse the same parameter
        # objects for every block, so a cache that outlived one block would hand block i+2 block i's weights.
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)

    @contextlib.contextmanager
    def _on_device(self, order: list[int], k: int) -> Iterator[nn.Module]:
        """Block order[k] in a slot while the body queues its compute; then the slot is released and
        order[k + 1] prefetched into the other one."""
        blocks = self.store.blocks
        slot = self.slots.acquire(blocks[order[k]], self.tracer, self.before_load)
        yield self.slots.modules[slot]
        upcoming = blocks[order[k + 1]] if k + 1 < len(order) else None
        self.slots.release(slot, upcoming, self.tracer, self.before_load)

    # -- forward only (evaluation) ----------------------------------------------------------------

    @torch.no_grad()
    def forward_loss(self, batch: Any) -> torch.Tensor:
        mb = self.adapter.to_device(batch, self.device)
        args = self.adapter.block_args(mb)
        order = list(range(len(self.store.blocks)))
        with self._autocast():
            h = self.adapter.embed(mb)
            for k in range(len(order)):
                with self._on_device(order, k) as block:
                    h = block(h, *args)
            return self.adapter.head_loss(h, mb)

    # -- one step's forward + backward over the micro-batches -------------------------------------

    def forward_backward(self, micro_batches: list[Any], on_grad: Callable[[Unit, torch.Tensor, bool], None]
                         ) -> tuple[torch.Tensor, int]:  # fmt: skip
        """Mean loss (device scalar) and tokens. `on_grad(unit, grads, final)` receives each unit's
        per-parameter gradients of one micro-batch (batch-major) or of the whole step (layer-major), on the
        device; `final` says no more gradient for that unit comes this step."""
        n = len(micro_batches)
        mbs = [self.adapter.to_device(mb, self.device) for mb in micro_batches]
        tokens = sum(self.adapter.num_tokens(mb) for mb in mbs)
        if self.schedule == "batch_major":
            total = torch.zeros((), device=self.device)
            for i, mb in enumerate(mbs):
                total += self._batch_major(mb, n, on_grad, last=i == n - 1)
            return total / n, tokens
        return self._layer_major(mbs, on_grad), tokens

    def _blocks_forward(self, h: torch.Tensor, args: tuple, order: list[int], inputs: list[Any]) -> torch.Tensor:
        for k in range(len(order)):
            with self._on_device(order, k) as block:
                h, saved = self._block_forward(block, h, args, order[k])
            inputs.append(saved)
        return h

    def _block_forward(self, block: nn.Module, h: torch.Tensor, args: tuple, index: int) -> tuple[torch.Tensor, Any]:
        """(block output, what backward needs): with recompute, the input alone; without, the block's autograd
        graph, whose saved weights are references into the slot (resolved to whichever slot holds the block
        when its backward runs) so the graph does not pin a third buffer."""
        with self.tracer.span("compute", f"fwd {index}", index, self.compute_stream), self._autocast():
            if self.recompute:
                with torch.no_grad():
                    return block(h, *args), h
            x = h.detach().requires_grad_(True)
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                y = block(x, *args)
            return y.detach(), (x, y, list(block.parameters()))

    def _pack(self, t: torch.Tensor) -> Any:
        storage = t.untyped_storage().data_ptr()
        for k, flat in enumerate(self.slots.flats):
            if storage == flat.untyped_storage().data_ptr():
                return _WeightRef(self.slots.holds[k], t.storage_offset(), tuple(t.shape), t.stride())
        return t

    def _unpack(self, saved: Any) -> torch.Tensor:
        if isinstance(saved, _WeightRef):
            flat = self.slots.flats[self.slots.holds.index(saved.block)]
            return flat.as_strided(saved.shape, saved.stride, saved.offset)
        return saved

    def _block_backward(self, block: nn.Module, saved: Any, args: tuple, grad_out: torch.Tensor, index: int
                        ) -> tuple[torch.Tensor, list[torch.Tensor]]:  # fmt: skip
        """Differentiate one block (recomputed from its input, or from its kept graph): (grad of input,
        param grads)."""
        with self.tracer.span("compute", f"bwd {index}", index, self.compute_stream):
            if isinstance(saved, torch.Tensor):
                x = saved.detach().requires_grad_(True)
                params = list(block.parameters())
                with torch.enable_grad(), self._autocast():
                    y = block(x, *args)
            else:  # the forward ran on whichever slot held the block then: those are the graph's leaves
                x, y, params = saved
            grads = torch.autograd.grad(y, [x, *params], grad_out)
        return grads[0], list(grads[1:])

    def _head(self, h: torch.Tensor, mb: Any, n: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
        """Loss of the last block's output, its gradient and the head's gradients for the rest params."""
        h = h.detach().requires_grad_(True)
        with self.tracer.span("compute", "head", None, self.compute_stream):
            with torch.enable_grad(), self._autocast():
                loss = self.adapter.head_loss(h, mb)
            grads = torch.autograd.grad(loss / n, [h, *self.rest_params], allow_unused=True)
        return loss.detach().float(), grads[0], list(grads[1:])

    def _embed_backward(self, embedded: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor | None]:
        with self.tracer.span("compute", "embed bwd", None, self.compute_stream):
            return list(torch.autograd.grad(embedded, self.rest_params, grad, allow_unused=True))

    def _rest_grad(self, head: list[torch.Tensor | None], embed: list[torch.Tensor | None]) -> list[torch.Tensor]:
        # A tied embedding gets a gradient from the head and one from the lookup; autograd would sum the two
        # in its input buffer before touching .grad, and so do we (the order of a two-term sum is exact).
        parts = []
        for p, a, b in zip(self.rest_params, head, embed, strict=True):
            g = a + b if a is not None and b is not None else a if a is not None else b
            parts.append(g if g is not None else torch.zeros_like(p))
        return parts

    def _batch_major(self, mb: Any, n: int, on_grad: Callable, last: bool) -> torch.Tensor:
        args = self.adapter.block_args(mb)
        depth = len(self.store.blocks)
        forward, backward = list(range(depth)), list(reversed(range(depth)))
        with torch.enable_grad(), self._autocast():
            embedded = self.adapter.embed(mb)  # (B, S, C), the graph back to the embedding is kept
        inputs: list[Any] = []
        h = self._blocks_forward(embedded.detach(), args, forward, inputs)
        loss, grad, head_grads = self._head(h, mb, n)
        for k in range(depth):
            i = backward[k]
            with self._on_device(backward, k) as block:
                grad, param_grads = self._block_backward(block, inputs[i], args, grad, i)
            inputs[i] = None  # type: ignore[call-overload]  # free the activation as soon as it is used
            on_grad(self.store.blocks[i], param_grads, last)
        on_grad(self.store.rest, self._rest_grad(head_grads, self._embed_backward(embedded, grad)), last)
        return loss

    def _layer_major(self, mbs: list[Any], on_grad: Callable) -> torch.Tensor:
        n, depth = len(mbs), len(self.store.blocks)
        args = [self.adapter.block_args(mb) for mb in mbs]
        with torch.enable_grad(), self._autocast():
            embedded = [self.adapter.embed(mb) for mb in mbs]
        inputs: list[list[Any]] = [[] for _ in range(depth)]  # [layer][micro-batch]: (B, S, C) input or graph
        hs = [e.detach() for e in embedded]
        forward = list(range(depth))
        for i in forward:
            with self._on_device(forward, i) as block:
                for j in range(n):
                    hs[j], saved = self._block_forward(block, hs[j], args[j], i)
                    inputs[i].append(saved)
        total = torch.zeros((), device=self.device)
        grads, head_grads = [], []
        for j in range(n):
            loss, g, head = self._head(hs[j], mbs[j], n)
            total += loss
            grads.append(g)
            head_grads.append(head)  # kept per micro-batch: summed with its own embedding gradient, as autograd does
        backward = list(reversed(range(depth)))
        for k in range(depth):
            i = backward[k]
            acc = None
            with self._on_device(backward, k) as block:
                for j in range(n):
                    grads[j], param_grads = self._block_backward(block, inputs[i][j], args[j], grads[j], i)
                    if acc is None:  # fp32 whatever the slot dtype: a bf16 running sum errs ~1.6% at 256 micro-batches
                        acc = [g.float() for g in param_grads]
                    else:
                        torch._foreach_add_(acc, param_grads)  # the per-layer sum stays on the device
            inputs[i] = []
            on_grad(self.store.blocks[i], acc, True)  # one gradient transfer per layer per step
        rest_acc = None
        for j in range(n):
            rest = self._rest_grad(head_grads[j], self._embed_backward(embedded[j], grads[j]))
            if rest_acc is None:
                rest_acc = rest
            else:
                torch._foreach_add_(rest_acc, rest)
        on_grad(self.store.rest, rest_acc, True)
        return total / n


def default_host_threads() -> int:
    """Cores for the host worker's kernels: all but two, left to the thread launching GPU work (and the rest
    of the process), which would otherwise wait for a core while the optimizer's OpenMP threads hold them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - 2)


class HostWorker:
    """Runs host-side work (gradient accumulation, norms, updates, reductions) in order on one thread when
    the device is a GPU, so it overlaps the device; inline on CPU, where the device *is* the host's cores.
    `threads`: torch's intra-op threads for that thread's kernels (0: default_host_threads()); torch keeps
    the count per thread with OpenMP, so the launching thread is unaffected."""

    def __init__(self, threaded: bool, threads: int = 0) -> None:
        self.threads = threads or default_host_threads()
        self.pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="host-store", initializer=torch.set_num_threads,
                               initargs=(self.threads,))
            if threaded else None
        )  # fmt: skip

    def submit(self, fn: Callable[[], Any]) -> Future:
        if self.pool is not None:
            return self.pool.submit(fn)
        done: Future = Future()
        done.set_result(fn())
        return done

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
