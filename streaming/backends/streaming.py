"""The streaming engine: host store + executor + host AdamW (+ SwarmX), behind the same interface as the
resident engine, so the trainer, checkpoints and metrics do not know which one runs."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch
from crystal.streaming.backends.base import AdamWSettings, ParamGroupSpec, StepResult, StreamableModel
from crystal.streaming.executor import Executor, HostWorker
from crystal.streaming.optimizer import HostAdamW
from crystal.streaming.sharded import Collectives, ShardedAdamW, ShardedStore, ShardUnit, reduce_scatter
from crystal.streaming.store import HostStore, Unit, can_pin, check_host_memory, plan_host_memory, unit_numels
from crystal.streaming.swarm import Swarm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_link_dtype(setting: str, device: torch.device, autocast_dtype: torch.dtype | None) -> torch.dtype:
    """stream_dtype / grad_dtype. auto: bf16 on the link (weights in, gradients out; gradients are summed in
    fp32 on the host) when a GPU computes in bf16 anyway, else fp32 (a CPU keeps streamed == resident bitwise)."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" and autocast_dtype == torch.bfloat16 else torch.float32
    return DTYPES[setting]


def resolve_auto(setting: str, device: torch.device) -> bool:
    """overlap_optimizer / fused_clip: auto is on with CUDA, off on CPU."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def engine_host_plan(
    numels: tuple[int, int, int],
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    *,
    stream_dtype: str = "auto",
    grad_dtype: str = "auto",
    pin_memory: bool = True,
    staging_buffers: int = 4,
    world: int = 1,
) -> dict[str, int]:
    """The host memory StreamingEngine allocates with these settings (plan_host_memory's items) for a model of
    `numels` = (parameters outside the blocks, of one block, blocks), as store.unit_numels counts them: the
    trainer checks it before building anything, the engine again before allocating. `world` > 1: one rank's
    share of a sharded store (every unit's 1/N, padded; staging buffers as large as a share)."""
    cuda = device.type == "cuda"
    if world > 1:
        rest, block, depth = numels
        numels = (-(-rest // world), -(-block // world), depth)
    return plan_host_memory(
        *numels, stream_dtype=resolve_link_dtype(stream_dtype, device, autocast_dtype),
        grad_dtype=resolve_link_dtype(grad_dtype, device, autocast_dtype), pinned=pin_memory and cuda and can_pin(),
        staging_buffers=staging_buffers if cuda else 0,
    )  # fmt: skip


class StreamingEngine:
    def __init__(
        self,
        adapter: StreamableModel,
        groups: list[ParamGroupSpec],
        settings: AdamWSettings,
        device: torch.device,
        autocast_dtype: torch.dtype | None = None,
        *,
        schedule: str = "batch_major",
        prefetch: int = 1,
        recompute: bool = True,
        stream_dtype: str = "auto",
        grad_dtype: str = "auto",
        pin_memory: bool = True,
        staging_buffers: int = 4,
        overlap_optimizer: str = "auto",
        fused_clip: str = "auto",
        host_threads: int = 0,
        trace: bool = False,
        swarm: Swarm | None = None,
        check_memory: bool = True,
        shard_store: bool = True,
    ) -> None:
        self.adapter, self.device, self.swarm = adapter, device, swarm
        self.sharded = swarm is not None and shard_store  # one replica: the replicated store, today's path exactly
        world = swarm.world if self.sharded else 1
        cuda = device.type == "cuda"
        weights_dtype = resolve_link_dtype(stream_dtype, device, autocast_dtype)
        if weights_dtype != torch.float32 and autocast_dtype != weights_dtype:
            raise ValueError(
                f"backend.streaming.stream_dtype={stream_dtype} sends bf16 weights, which needs bf16 compute: "
                "set train.precision=bf16 or backend.streaming.stream_dtype=fp32"
            )
        self.grad_dtype = resolve_link_dtype(grad_dtype, device, autocast_dtype)
        self.host_plan = engine_host_plan(unit_numels(adapter.model, adapter.blocks), device, autocast_dtype,
                                          stream_dtype=stream_dtype, grad_dtype=grad_dtype, pin_memory=pin_memory,
                                          staging_buffers=staging_buffers, world=world)  # fmt: skip
        if check_memory:  # the model's host weights are freed as the store takes them over
            held = sum(p.numel() * p.element_size() for p in adapter.model.parameters() if p.device.type == "cpu")
            check_host_memory(self.host_plan, already_held=held)
        if self.sharded:
            self.store = ShardedStore(adapter.model, adapter.blocks, swarm.rank, swarm.world, swarm.device_group,
                                      pin=pin_memory and cuda, stream_dtype=weights_dtype,
                                      host_group=swarm.group)  # fmt: skip
            self.store.attach_device(device)
        else:
            self.store = HostStore(adapter.model, adapter.blocks, pin=pin_memory and cuda, stream_dtype=weights_dtype)
        adamw = ShardedAdamW if self.sharded else HostAdamW
        self.optimizer = adamw(self.store, groups, settings, fused_clip=resolve_auto(fused_clip, device))
        self.executor = Executor(
            adapter, self.store, device, schedule=schedule, prefetch=prefetch, compute_dtype=weights_dtype,
            autocast_dtype=autocast_dtype, recompute=recompute, trace=trace,
        )  # fmt: skip
        self.overlap = resolve_auto(overlap_optimizer, device)
        self.worker = HostWorker(threaded=cuda, threads=host_threads)
        self.executor.before_load = self._wait_update
        self.updates: dict[int, Future] = {}  # id(unit) -> its pending update of the last step
        self._holds: list[Callable[[], None]] = []  # readers of the store's tensors to wait for (hold_state)
        self.landed: list[Future] = []  # this step's gradient arrivals on the host
        # Gradients leave the device through pinned staging buffers; a copy into one waits until the host has
        # summed what it held, so there are enough to cover the host's work on one block (issue 15's estimate:
        # 50-100 ms of host sum + norm per 7B block against ~40 ms of GPU backward).
        largest = max(self.store.rest.device_numel, self.store.blocks[0].device_numel) // world
        self.staging = [torch.empty(largest, dtype=self.grad_dtype, pin_memory=self.store.pinned)
                        for _ in range(staging_buffers)] if cuda else []  # fmt: skip
        self.staging_busy: list[Future | None] = [None] * len(self.staging)
        self.staging_next = 0
        self.steps = 0
        self.collectives = Collectives()
        self.scattering: deque = deque()  # CPU: reduce-scatters in flight, landed in order
        self.d2h_bytes = 0
        self.last_step_stats: dict[str, float] = {}
        self.last_trace: list[dict[str, Any]] = []
        self.device_stale = True  # the store holds weights the device buffers and embedding copy do not

    def _sync_device(self) -> None:
        """After the store changed (an update, a load): forget the blocks in the device buffers and copy the
        embedding/final norm again (the copy waits for their update; blocks wait for theirs as they load)."""
        if self.device_stale:
            self.executor.slots.invalidate()
            self.executor.refresh_rest()
            self.device_stale = False

    # -- host side: gradients land, become final, get reduced; updates run -----------------------------

    def _wait_update(self, unit: Unit) -> None:
        pending = self.updates.pop(id(unit), None)
        if pending is not None:
            pending.result()

    def flush(self) -> None:
        """Every pending update done and on the device (before evaluation, checkpoints, loads)."""
        for unit in self.store.units:
            self._wait_update(unit)

    def hold_state(self, until: Callable[[], None]) -> None:
        """The tensors state_dict() handed out are being read elsewhere (a checkpoint written straight from the
        store, in another thread): the next change to the store (an update, a load) first calls `until`, which
        returns once they have been read. Until then training goes on: a forward and backward only read them."""
        self._holds.append(until)

    def _release_holds(self) -> None:
        holds, self._holds = self._holds, []
        for until in holds:
            until()

    def _land(self, unit: Unit, grads: list[torch.Tensor], final: bool) -> None:
        with self.executor.tracer.span("optimizer", f"accumulate {unit.name}", unit.index):
            unit.accumulate(grads)
        if final and self.sharded:
            unit.average()
            self.optimizer.gradient_final(unit)
        elif final and self.swarm is not None:
            with self.executor.tracer.span("reduce", f"all-reduce {unit.name}", unit.index):
                self.swarm.reduce_async(unit)
        elif final:
            self.optimizer.gradient_final(unit)

    def _on_grad(self, unit: Unit, grads: list[torch.Tensor], final: bool) -> None:
        """A unit's gradients exist on the device: send them to the host store."""
        if self.sharded:
            self._scatter(unit, grads, final)
            return
        if not self.staging:  # the device is the host: nothing to copy
            if self.grad_dtype != torch.float32:
                grads = [g.to(self.grad_dtype) for g in grads]
            self.d2h_bytes += sum(g.numel() for g in grads) * self.grad_dtype.itemsize
            self.landed.append(self.worker.submit(lambda: self._land(unit, grads, final)))
            return
        flat = torch.cat([g.reshape(-1).to(self.grad_dtype) for g in grads])  # one transfer per block
        self.d2h_bytes += flat.nbytes
        k = self.staging_next
        self.staging_next = (k + 1) % len(self.staging)
        if self.staging_busy[k] is not None:
            self.staging_busy[k].result()  # the host has not yet consumed this staging buffer
        stage = self.staging[k][: flat.numel()]
        stream = self.executor.grad_stream
        stream.wait_stream(self.executor.compute_stream)
        with torch.cuda.stream(stream), self.executor.tracer.span("d2h", f"grads {unit.name}", unit.index, stream):
            stage.copy_(flat, non_blocking=True)
        flat.record_stream(stream)
        copied = torch.cuda.Event()
        copied.record(stream)

        def land() -> None:
            copied.synchronize()
            self._land(unit, unit.layout.views(stage), final)

        self.staging_busy[k] = self.worker.submit(land)
        self.landed.append(self.staging_busy[k])

    def _scatter(self, unit: ShardUnit, grads: list[torch.Tensor], final: bool) -> None:
        """SwarmX on the device: reduce-scatter the unit's gradient (fp32, summed over replicas) and send only this
        rank's share to the host. On CUDA the collective is queued on the gradient stream behind the backward that
        made it, then the share's D2H copy; the host lands it when the copy's event fires. On CPU (gloo) it runs
        asynchronously while the next block's backward computes, and lands before the one after is started."""
        group, tracer = self.store.group, self.executor.tracer
        if not self.staging:
            send = unit.device_gradient(grads)
            out = torch.empty(unit.size, dtype=torch.float32, device=send.device)
            with tracer.span("reduce", f"reduce-scatter {unit.name}", unit.index):
                work = self.collectives.timed(reduce_scatter, out, send, group=group, async_op=True)
            self.scattering.append((unit, work, out, final))
            while len(self.scattering) > 1:
                self._land_scattered()
            return
        stream = self.executor.grad_stream
        k = self.staging_next
        self.staging_next = (k + 1) % len(self.staging)
        if self.staging_busy[k] is not None:
            self.staging_busy[k].result()
        stage = self.staging[k][: unit.size]
        stream.wait_stream(self.executor.compute_stream)
        with torch.cuda.stream(stream), tracer.span("reduce", f"reduce-scatter {unit.name}", unit.index, stream):
            send = unit.device_gradient(grads)
            out = torch.empty(unit.size, dtype=torch.float32, device=send.device)
            self.collectives.timed(reduce_scatter, out, send, group=group)  # ordered on this stream
            stage.copy_(out.to(self.grad_dtype), non_blocking=True)
        for g in grads:  # made on the compute stream, read on this one: not reused before the gather is done
            g.record_stream(stream)
        self.d2h_bytes += stage.nbytes
        copied = torch.cuda.Event()
        copied.record(stream)

        def land() -> None:
            copied.synchronize()
            self._land(unit, stage, final)

        self.staging_busy[k] = self.worker.submit(land)
        self.landed.append(self.staging_busy[k])

    def _land_scattered(self) -> None:
        unit, work, out, final = self.scattering.popleft()
        self.collectives.timed(work.wait)
        self.d2h_bytes += unit.own * self.grad_dtype.itemsize
        self.landed.append(self.worker.submit(lambda: self._land(unit, out.to(self.grad_dtype), final)))

    def _finish_gradients(self) -> None:
        while self.scattering:
            self._land_scattered()
        for f in self.landed:
            f.result()
        self.landed = []
        if self.swarm is not None and not self.sharded:

            def reduce() -> None:
                for unit in self.swarm.finish():
                    self.optimizer.gradient_final(unit)

            self.worker.submit(reduce).result()

    # -- the engine interface --------------------------------------------------------------------------

    def train_step(self, micro_batches: list[Any], lr: float) -> StepResult:
        self.executor.tracer.begin_step(self.steps, self.executor.compute_stream)
        self.collectives.seconds, self.d2h_bytes, h2d_before = 0.0, 0, self.executor.slots.h2d_bytes
        self._sync_device()
        self.optimizer.start_step()
        loss, tokens = self.executor.forward_backward(micro_batches, self._on_grad)
        self._finish_gradients()
        loss_value = loss.item()
        if self.sharded:  # one all-reduce: the loss, the tokens and every rank's squared gradient norm
            local = torch.stack([torch.tensor(loss_value, dtype=torch.float64),
                                 torch.tensor(float(tokens), dtype=torch.float64),
                                 self.optimizer.local_square_norm()])  # fmt: skip
            summed = self.collectives.timed(self.swarm.sum_scalars, local)
            loss_value, tokens = float(summed[0]) / self.swarm.world, int(summed[1])
            total, clip = self.optimizer.clip_from_square(float(summed[2]))
        elif self.swarm is not None:
            summed = self.swarm.sum_scalars(torch.tensor([loss_value, float(tokens)]))
            loss_value, tokens = float(summed[0]) / self.swarm.world, int(summed[1])
            total, clip = self.optimizer.clip_factor()
        else:
            total, clip = self.optimizer.clip_factor()
        self.last_step_stats = {"collective_s": round(self.collectives.seconds, 6), "d2h_bytes": self.d2h_bytes,
                                "h2d_bytes": self.executor.slots.h2d_bytes - h2d_before}  # fmt: skip
        norm_value = total.item()
        self.steps += 1
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            self.optimizer.discard()
            self.last_trace = self.executor.tracer.end_step()
            return StepResult(loss_value, norm_value, True, tokens)
        self._release_holds()  # a checkpoint still reading the store: the update must not change it under it
        for unit in self.store.units:  # rest first, then blocks in the order the next forward needs them
            self.updates[id(unit)] = self.worker.submit(lambda u=unit: self._timed_update(u, lr, clip))
        self.device_stale = True
        if not self.overlap:
            self.flush()
        self.last_trace = self.executor.tracer.end_step()
        return StepResult(loss_value, norm_value, False, tokens)

    def _timed_update(self, unit: Unit, lr: float, clip: torch.Tensor) -> None:
        with self.executor.tracer.span("optimizer", f"update {unit.name}", unit.index):
            self.optimizer.update(unit, lr, clip)

    @torch.no_grad()
    def eval_loss(self, batch: Any) -> float:
        self.flush()
        self._sync_device()
        self.adapter.model.eval()
        try:
            return self.executor.forward_loss(batch).item()
        finally:
            self.adapter.model.train()

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """The store's own tensors (views, no copy): they stay as they are until the next update, and longer
        while hold_state() says something reads them."""
        self.flush()
        return self.store.state_dict()

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]], load_optimizer: bool = True) -> None:
        self.flush()
        self._release_holds()
        self.store.load_state_dict(state, load_optimizer)
        self.device_stale = True

    def shard_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Sharded store: (this rank's flat share of every unit, views with no copy; the layout a reader needs).
        They stay unchanged until the next update, and longer while hold_state() says something reads them."""
        self.flush()
        return self.store.shard_tensors(), self.store.shard_layout()

    def host_report(self) -> dict[str, Any]:
        """This rank's host bytes by what holds them, and (sharded) its share of each unit."""
        pinned = [u.stream_source() for u in self.store.units if self.store.pinned] + self.staging
        out = {"store_bytes": self.store.nbytes, "pinned_bytes": sum(t.nbytes for t in pinned),
               "staging_bytes": sum(t.nbytes for t in self.staging),
               "plan_bytes": sum(self.host_plan.values())}  # fmt: skip
        if self.sharded:
            out.update(self.store.ranges())
        return out

    def stats(self) -> dict[str, Any]:
        """Device-side accounting: block buffers held, copies made, bytes."""
        slots = self.executor.slots
        out = {"device_block_buffers": slots.max_slots, "block_loads": slots.loads,
               "device_buffer_bytes": slots.nbytes, "host_store_bytes": self.store.nbytes,
               "host_plan_bytes": sum(self.host_plan.values())}  # fmt: skip
        if self.device.type == "cuda":
            out["device_peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return out

    def close(self) -> None:
        self.flush()
        self.worker.close()
