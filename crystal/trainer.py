"""The trainer: wires config -> data -> model -> engine -> metrics/checkpoints, and runs the loop.

Stateful parts each round-trip through state_dict/load_state_dict: the engine (model + optimizer),
the loader (next sample index, excluded windows, what the order depends on), the metrics file (its
cursor), the RNGs, the fault monitor and the trainer's own counters. A checkpoint is all of them.

Faults: a non-finite loss or gradient skips the update (the engine does it) and is counted; a loss
spike (train.spike_factor x the running mean) or train.max_nonfinite non-finite steps in a row roll
back to the last checkpoint before the offending data and exclude that data window from then on.
The exclusion lives in the loader state, so the run stays a pure function of its config: a replay
meets the same spike, rolls back the same way and ends with the same weights.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from crystal.checkpoint import (
    KEEP,
    RELEASE,
    AsyncCheckpointer,
    CheckpointError,
    check_output_dir,
    list_checkpoints,
    load_checkpoint,
    load_meta,
    move_aside,
    remove_leftovers,
    resolve_resume,
    step_dir_name,
    step_of,
    verify_checkpoint,
)
from crystal.config import Config, OptimConfig, TrainConfig, config_to_dict
from crystal.data.loader import Batch, DataLoader
from crystal.data.prepare import PreparedData, prepare_data
from crystal.errors import TrainingError
from crystal.metrics import MetricsLogger, NullMetrics
from crystal.model import CrystalCoder, build_model, group_settings, param_group_of
from crystal.streaming.backends.base import AdamWSettings, ParamGroupSpec
from crystal.utils import (
    autocast_dtype,
    deterministic_mode,
    device_name,
    device_peak_flops,
    git_commit,
    resolve_device,
    rng_state,
    seconds_since_launch,
    set_determinism,
    set_rng_state,
)


class CrystalAdapter:
    """Tells the generic engines in streaming/ how to run CrystalCoder on a crystal Batch.

    `poison` (test hook, train.debug_*_steps) maps sample indices to a loss factor: NaN makes the step
    non-finite, 1000 makes it a spike. Keyed by sample, not step, so excluding the window removes it."""

    def __init__(self, model: CrystalCoder, doc_masking: bool, poison: dict[int, float] | None = None) -> None:
        self.model, self.blocks, self.doc_masking = model, model.blocks, doc_masking
        self.poison = poison or {}

    def block_args(self, batch: Batch) -> tuple:
        if self.doc_masking:
            return batch.positions, batch.doc_ids
        return torch.arange(batch.input_ids.shape[1], device=batch.input_ids.device), None

    def embed(self, batch: Batch) -> torch.Tensor:
        return self.model.embed(batch.input_ids)

    def _poisoned(self, loss: torch.Tensor, batch: Batch) -> torch.Tensor:
        for i in batch.sample_index if self.poison else ():
            if int(i) in self.poison:
                loss = loss * self.poison[int(i)]
        return loss

    def head_loss(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self._poisoned(self.model.head_loss(x, batch.targets), batch)

    def loss(self, batch: Batch) -> torch.Tensor:
        return self._poisoned(self.model(batch.input_ids, batch.targets, *self.block_args(batch)), batch)

    def to_device(self, batch: Batch, device: torch.device) -> Batch:
        return batch.to(device)

    def num_tokens(self, batch: Batch) -> int:
        return batch.num_tokens


def debug_poison(t: TrainConfig) -> dict[int, float]:
    """train.debug_nan_steps / debug_spike_steps -> {sample index: loss factor}. Step n (1-based) names the
    samples it reads in the order without exclusions: [(n-1) G, n G)."""
    out: dict[int, float] = {}
    for steps, factor in ((t.debug_spike_steps, 1000.0), (t.debug_nan_steps, math.nan)):
        for n in steps:
            out.update(dict.fromkeys(range((n - 1) * t.global_batch, n * t.global_batch), factor))
    return out


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """LR of update `step` (0-based): linear warmup to optim.lr, then linear decay to optim.final_lr over
    optim.decay_steps (default: the rest of the run), flat after. CrystalCoder stage 1 decays over
    294,337 steps but stops at 79,721, where the LR is 0.0087869."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    horizon = optim.decay_steps if optim.decay_steps is not None else max(1, total_steps - optim.warmup_steps)
    frac = min(1.0, (step - optim.warmup_steps) / max(1, horizon))
    return optim.lr + (optim.final_lr - optim.lr) * frac


def param_group_specs(model: CrystalCoder, weight_decay: float) -> list[ParamGroupSpec]:
    settings = group_settings(model.cfg, weight_decay)
    members: dict[str, list[str]] = {g: [] for g in settings}
    for name, p in model.named_parameters():
        members[param_group_of(name, p)].append(name)
    return [ParamGroupSpec(g, names, **settings[g]) for g, names in members.items()]


def build_engine(cfg: Config, adapter: CrystalAdapter, device: torch.device, amp: torch.dtype | None, swarm=None):
    groups = param_group_specs(adapter.model, cfg.optim.weight_decay)
    settings = AdamWSettings(tuple(cfg.optim.betas), cfg.optim.eps, cfg.optim.grad_clip)
    name = cfg.backend.name
    if name == "resident":
        from crystal.streaming.backends.resident import ResidentEngine

        return ResidentEngine(adapter, groups, settings, device, amp)
    if name == "streaming":
        from dataclasses import asdict

        from crystal.streaming.backends.streaming import StreamingEngine

        return StreamingEngine(adapter, groups, settings, device, amp, swarm=swarm,
                               **asdict(cfg.backend.streaming))  # fmt: skip
    if name == "fsdp":  # FSDP2 over the torchrun job's ranks (the trainer has joined the process group)
        from dataclasses import asdict

        from crystal.streaming.backends.fsdp import FSDPEngine

        return FSDPEngine(adapter, groups, settings, device, amp, **asdict(cfg.backend.fsdp))
    if name == "cerebras":  # cerebras-pytorch, in its own venv (crystal/cerebras.py)
        from crystal.cerebras import build_cerebras_engine

        return build_cerebras_engine(cfg, adapter, groups, settings, amp)
    raise ValueError(f"backend.name={name!r} is not available; known backends: resident, streaming, fsdp, cerebras")


def unigram_entropy(data: PreparedData, weights: dict[str, float]) -> float:
    """Entropy (nats) of the mixture's unigram token distribution: the loss of a model that ignores context."""
    total_w = sum(weights.values())
    p = np.zeros(data.tokenizer.vocab_size)
    for name, shard in data.shards.items():
        w = weights.get(name, 0.0) / total_w
        if w > 0:
            counts = np.bincount(np.asarray(shard.train.tokens), minlength=len(p)).astype(np.float64)
            p += w * counts / counts.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


# Settings a resume may change freely: where and how a run is observed, stored and stopped, not what it computes.
OPERATIONAL_KEYS = {
    "train.resume", "train.stop_after", "train.progress", "train.plots", "train.tensorboard", "train.out_dir",
    "train.run_name", "train.device", "train.eval_every", "train.eval_batches", "train.log_every",
    "train.ckpt_every", "train.ckpt_keep_every", "train.ckpt_keep_last", "train.peak_tflops", "train.max_rollbacks",
    "train.allow_config_change", "train.deterministic", "data.num_workers", "data.cache_dir", "data.verify",
    "data.part_mb", "data.allow_data_change", "model.ops", "model.name", "backend.name",
}  # fmt: skip


def config_from_yaml(text: str) -> Config:
    """A checkpoint's config.yaml -> Config (validated like any config)."""
    from crystal.config import to_dataclass

    return to_dataclass(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text)))


def config_changes(old: Config, new: Config) -> list[str]:
    """Dotted keys whose values differ and that change what training computes. train.steps is not among
    them: extending a finished run resumes from its last (release) checkpoint, so no data chunk spans
    two schedules; the trainer records the change as an event."""

    def flat(d: dict, prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k not in ("mixture", "aliases") else
                       {f"{prefix}{k}": v})  # fmt: skip
        return out

    a, b = flat(config_to_dict(old)), flat(config_to_dict(new))
    ignore = {*OPERATIONAL_KEYS, "train.steps"}
    # Backend settings count only through backend_computation: those of a backend the run does not use
    # compute nothing, and a switch of backend is recorded as an event (backend_switch), not refused.
    ignore |= {k for k in set(a) | set(b) if k.startswith("backend.")}
    if getattr(new.data, "allow_data_change", False):  # the loader accepts and records data changes itself
        ignore |= {k for k in set(a) | set(b) if k.startswith("data.")}
    changed = {k for k in set(a) | set(b) if k not in ignore and a.get(k) != b.get(k)}
    if old.backend.name == new.backend.name:
        was, now = backend_computation(old), backend_computation(new)
        changed |= {k for k in set(was) | set(now) if was.get(k) != now.get(k)}
    return sorted(changed)


def backend_computation(cfg: Config) -> dict[str, Any]:
    """The settings of the backend in use that change what a step computes, by config key, resolved (adamw=auto
    -> the equation its target runs). resident and streaming have none: how blocks are streamed never changes
    the result (streamed steps equal resident ones bit for bit). fsdp's dtypes round what it computes (its
    sharding, checkpointing and sync settings only reorder sums, like a world size). Cerebras targets and cluster
    settings are where the run executes, like train.device."""
    if cfg.backend.name == "fsdp":  # param_dtype auto follows train.precision, itself compared
        return {"backend.fsdp.param_dtype": cfg.backend.fsdp.param_dtype,
                "backend.fsdp.reduce_dtype": cfg.backend.fsdp.reduce_dtype}  # fmt: skip
    if cfg.backend.name != "cerebras":
        return {}
    c = cfg.backend.cerebras
    return {
        "backend.cerebras.adamw": c.adamw_equation,
        "backend.cerebras.skip_nonfinite": c.skip_nonfinite,
        "backend.cerebras.half_dtype": c.half_dtype if cfg.train.precision == "bf16" else None,
    }


def adamw_equation(cfg: Config) -> str:
    """Which AdamW update equation the run's backend applies: torch's, or cstorch's (eps before bias correction)."""
    return cfg.backend.cerebras.adamw_equation if cfg.backend.name == "cerebras" else "torch"


def backend_switch(old: Config, new: Config, checkpoint: Path) -> dict[str, Any] | None:
    """The event row for a resume on another backend (checkpoints interchange between all of them), or None.
    It names both backends and their computation settings, and whether the AdamW equation changes with them
    (then the continued run differs from an uninterrupted one by more than fp32 rounding)."""
    if old.backend.name == new.backend.name:
        return None
    return {"event": "backend_changed", "checkpoint": str(checkpoint), "from": old.backend.name,
            "to": new.backend.name, "from_settings": backend_computation(old), "to_settings": backend_computation(new),
            "adamw": [adamw_equation(old), adamw_equation(new)]}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Faults


@dataclass
class Fault:
    reason: str
    samples: tuple[int, int]  # [start, end) sample window to exclude
    steps: tuple[int, int]  # first and last offending step (1-based)


class FaultMonitor:
    """Watches each step's loss: a spike over the running mean, or K non-finite steps in a row, is a Fault."""

    def __init__(self, spike_factor: float, window: int, max_nonfinite: int) -> None:
        self.spike_factor, self.window, self.max_nonfinite = spike_factor, window, max_nonfinite
        self.recent: list[float] = []  # last `window` finite losses
        self.bad_run: list[int] = []  # [first step, first sample, count] of the current non-finite run

    def observe(self, step: int, loss: float, skipped: bool, samples: tuple[int, int]) -> Fault | None:
        if skipped:
            if not self.bad_run:
                self.bad_run = [step, samples[0], 0]
            self.bad_run[2] += 1
            if self.bad_run[2] >= self.max_nonfinite:
                first_step, first_sample, n = self.bad_run
                return Fault(f"{n} non-finite steps in a row", (first_sample, samples[1]), (first_step, step))
            return None
        self.bad_run = []
        if self.spike_factor and len(self.recent) >= self.window:
            mean = sum(self.recent) / len(self.recent)
            if loss > self.spike_factor * mean:
                why = f"loss spike {loss:.4g} > {self.spike_factor:g} x running mean {mean:.4g}"
                return Fault(why, samples, (step, step))
        self.recent = [*self.recent, loss][-self.window :]
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent), "bad_run": list(self.bad_run)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent, self.bad_run = list(state.get("recent", [])), list(state.get("bad_run", []))


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part, None)
    return obj


# ----------------------------------------------------------------------------------------------
# Trainer


class Trainer:
    def __init__(self, cfg: Config, config_yaml: str | None = None, log=print) -> None:
        self.cfg, self.log = cfg, log
        t = cfg.train
        self.config_yaml = config_yaml or OmegaConf.to_yaml(OmegaConf.structured(cfg))
        self.run_dir = Path(t.out_dir) / t.run_name
        self.swarm = self._join_swarm()
        self.rank, self.world = (self.swarm.rank, self.swarm.world) if self.swarm else (0, 1)
        self.writer = self.rank == 0  # rank 0 writes the run's files; replicas compute the same steps
        if not self.writer:
            self.log = lambda *_, **__: None
        self.device = resolve_device(t.device) if not self.swarm or t.device != "auto" else self.swarm.device
        self.amp = autocast_dtype(t.precision, self.device)
        self.seq_len = t.seq_len or cfg.model.max_seq_len
        if self.seq_len > cfg.model.max_seq_len:
            raise ValueError(f"train.seq_len={self.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
        if cfg.backend.name == "streaming":  # refuse before touching disk or allocating
            self._check_host_memory()
        if self.writer:
            self._check_run_dir()
        # The CPU peak probe draws random matrices: done before seeding so it never shifts the RNG streams.
        self.peak_flops = (
            (t.peak_tflops * 1e12) if t.peak_tflops else device_peak_flops(self.device.type, device_name(self.device))
        )
        self.deterministic = deterministic_mode(t.deterministic, self.device)
        set_determinism(t.seed, self.deterministic)

        if self.swarm and not self.writer:  # rank 0 prepares the data cache, the replicas then read it
            self.swarm.barrier()
        self.data = prepare_data(cfg.data, cfg.model.vocab_size, log=self.log)
        if self.swarm and self.writer:
            self.swarm.barrier()
        self.loader = DataLoader(
            self.data, self.seq_len, t.global_batch, t.micro_batch, t.seed, mixture=cfg.data.source_mixture()
        )
        model = build_model(cfg.model, device="cpu", seed=t.seed)
        self.adapter = CrystalAdapter(model, t.doc_masking, debug_poison(t))
        self.engine = build_engine(cfg, self.adapter, self.device, self.amp, self.swarm)
        self._report_host_memory()
        self.metrics = (
            MetricsLogger(self.run_dir / "metrics.jsonl", self.run_dir / "tb" if t.tensorboard else None)
            if self.writer else NullMetrics()
        )  # fmt: skip
        self.checkpointer = AsyncCheckpointer(keep_last=t.ckpt_keep_last)
        self.monitor = FaultMonitor(t.spike_factor, t.spike_window, t.max_nonfinite)
        self.step = 0  # optimizer updates done (including skipped ones)
        self.tokens = 0
        self.skipped_steps = 0
        self.rollbacks = 0
        self.skipped_windows: list[dict[str, Any]] = []  # every window excluded by a rollback, with why
        self.chunk = 0  # data chunk the next step belongs to (chunk k ends at release checkpoint k)
        self.chunk_start = (0, 0)  # (loader sample index, step) where that chunk begins
        self._rolled_back = False  # the next metrics row says a rollback just happened
        self.flops_per_token = cfg.model.flops_per_token(self.seq_len)
        self._data_manifest = json.dumps({**self.data.manifest, "fingerprint": self.data.fingerprint}, indent=1,
                                         sort_keys=True)  # fmt: skip
        self.no_heldout = self._sources_without_heldout()
        if self.no_heldout and t.eval_batches:
            self.log(self.no_heldout)
        if t.resume:
            self.resume(t.resume)
        if getattr(self, "_host_report", None):
            self.metrics.log("event", event="host_memory", step=self.step, ranks=self._host_report)
        if self.writer:
            self._write_run_files()  # after the resume checks: a refused resume leaves the run's files as they were
        self._fresh = not list_checkpoints(self.run_dir)  # decided by every replica before rank 0 writes one
        if self.swarm:
            self.swarm.barrier()

    def _check_host_memory(self) -> None:
        """The figure the streaming engine checks again before it allocates: its plan for this model and these
        settings, from the shapes of a one-block model on the meta device."""
        from dataclasses import replace

        from crystal.streaming.backends.streaming import engine_host_plan
        from crystal.streaming.store import check_host_memory, unit_numels

        s, m = self.cfg.backend.streaming, self.cfg.model
        one = build_model(replace(m, n_layer=1), device="meta")  # the blocks are identical: depth is a count
        rest, block, _ = unit_numels(one, one.blocks)
        self.host_plan = engine_host_plan((rest, block, m.n_layer), self.device, self.amp, stream_dtype=s.stream_dtype,
                                          grad_dtype=s.grad_dtype, pin_memory=s.pin_memory,
                                          staging_buffers=s.staging_buffers,
                                          world=self.world if s.shard_store else 1)  # fmt: skip
        # The ranks on this host allocate at once, each after its own check: the host must hold all of them.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if self.swarm else 1
        check_host_memory({f"{k} x {local} ranks" if local > 1 else k: v * local for k, v in self.host_plan.items()})

    def _report_host_memory(self) -> None:
        """Streaming: every rank prints its host bytes (store, pinned, staging) and its share of the store; rank 0
        logs all ranks' as one event."""
        report = getattr(self.engine, "host_report", None)
        if report is None:
            return
        mine = report()
        gib = {k: f"{v / 2**30:.3f} GiB" for k, v in mine.items() if k.endswith("_bytes")}
        line = f"[rank {self.rank}/{self.world}] host memory {gib}; share {mine.get('block_range', 'whole store')}"
        (self.log if self.writer else lambda m: print(m, flush=True))(line)
        ranks = [mine]
        if self.swarm:
            ranks = [None] * self.world
            import torch.distributed as dist

            dist.all_gather_object(ranks, mine, group=self.swarm.group)
        self._host_report = ranks  # logged once the metrics file exists

    def _join_swarm(self):
        """Under torchrun with WORLD_SIZE > 1: SwarmX data parallel (backend=streaming) or FSDP (backend=fsdp).
        The Swarm is the trainer's handle on the ranks (rank, world, barrier) for both."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if self.cfg.backend.name == "fsdp":
            return self._join_fsdp(world)
        if world <= 1:
            return None
        if self.cfg.backend.name != "streaming":
            raise ValueError(
                f"torchrun with WORLD_SIZE={world} needs backend=streaming (SwarmX data parallel) or backend=fsdp; "
                f"backend={self.cfg.backend.name} runs on one device"
            )
        self._check_batch_shares(world, "replicas")
        from crystal.streaming.swarm import init_from_env

        return init_from_env()

    def _check_batch_shares(self, world: int, what: str) -> None:
        per_step = self.cfg.train.global_batch // self.cfg.train.micro_batch
        if per_step % world:
            raise ValueError(
                f"train.global_batch / train.micro_batch = {per_step} micro-batches per step cannot be shared by "
                f"{world} {what}; make it a multiple of {world}"
            )

    def _join_fsdp(self, world: int):
        """backend=fsdp runs under torchrun only, at any world size (1 included: the same engine and checkpoints
        on one rank). Without torchrun there is no process group to shard over: one line says what to run."""
        if "WORLD_SIZE" not in os.environ or "MASTER_ADDR" not in os.environ:
            raise ValueError(
                "backend=fsdp shards the model over the ranks of a torchrun job, and this process was not started by "
                "torchrun; launch `torchrun --nproc_per_node=<GPUs> -m crystal.train backend=fsdp ...`, or use "
                "backend=resident on one device"
            )
        self._check_batch_shares(world, "ranks")
        replicate = self.cfg.backend.fsdp.dp_replicate
        if world % replicate:
            raise ValueError(
                f"backend.fsdp.dp_replicate={replicate} does not divide the {world} ranks; use a divisor of {world} "
                f"(usually the number of nodes)"
            )
        from crystal.streaming.backends.fsdp import init_process_group
        from crystal.streaming.swarm import Swarm

        init_process_group(resolve_device(self.cfg.train.device).type)
        return Swarm()

    # -- run directory ----------------------------------------------------------------------------

    def _check_run_dir(self) -> None:
        """Never train over an existing run by accident: resume it or name a new one. Fail before training if
        the directory cannot be written or the disk cannot hold checkpoints."""
        check_output_dir(self.run_dir, self.cfg.model.num_params() * 4 * 3 + (1 << 20))
        remove_leftovers(self.run_dir)  # partial writes of a killed process
        existing = list_checkpoints(self.run_dir)
        if existing and not self.cfg.train.resume:
            raise CheckpointError(
                f"{self.run_dir} already holds a run (last checkpoint {existing[-1].name}); pass train.resume=latest "
                f"to continue it or train.run_name=<new name> to start another"
            )
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.exists() and not existing:  # a run that died before its first checkpoint: keep its rows aside
            metrics.rename(self.run_dir / f"metrics.{int(time.time())}.abandoned.jsonl")

    def _write_run_files(self) -> None:
        (self.run_dir / "config.yaml").write_text(self.config_yaml)
        (self.run_dir / "data_manifest.json").write_text(self._data_manifest)

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything but tensors (those come from the engine)."""
        return {
            "step": self.step,
            "tokens": self.tokens,
            "skipped_steps": self.skipped_steps,
            "rollbacks": self.rollbacks,
            "skipped_windows": self.skipped_windows,
            "stage": self.cfg.train.stage,
            "chunk": self.chunk,
            "chunk_start": list(self.chunk_start),
            "loader": self.loader.state_dict(),
            "metrics": self.metrics.state_dict(),
            "faults": self.monitor.state_dict(),
            "rng": rng_state(),
            "model_config": config_to_dict(self.cfg)["model"],
            "data_fingerprint": self.data.fingerprint,
            "tokenizer_sha256": self.data.tokenizer.sha256,
            "git_commit": git_commit(),
            "world_size": self.world,
            "env": {
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
                "device": device_name(self.device),
                "deterministic": self.deterministic,
            },  # fmt: skip
        }

    def load_state_dict(self, meta: dict[str, Any]) -> None:
        """Counters, loader, metrics (rewound), RNGs and fault monitor from a checkpoint of this stage."""
        self.loader.load_state_dict(meta["loader"], allow_data_change=False)
        self.metrics.load_state_dict(meta["metrics"], step=meta["step"])
        set_rng_state(meta["rng"])
        self.step, self.tokens = meta["step"], meta["tokens"]
        self.skipped_steps = meta.get("skipped_steps", 0)
        self.rollbacks = meta.get("rollbacks", 0)
        self.skipped_windows = list(meta.get("skipped_windows", []))
        self.chunk, self.chunk_start = meta.get("chunk", 0), tuple(meta.get("chunk_start", (0, 0)))
        self.monitor.load_state_dict(meta.get("faults", {}))

    def save_checkpoint(self, kind: str = RELEASE, blocking: bool = False) -> None:
        """Snapshot now (the only stall), write in the background. A release checkpoint ends the current data
        chunk: it carries the chunk's record, and the next step starts chunk + 1."""
        extra: dict[str, Any] = {"data_manifest.json": self._data_manifest}
        ends_chunk = self._ending_chunk() if kind == RELEASE else None
        if ends_chunk is not None:
            extra["chunk.json"] = self._chunk_record_fn(ends_chunk)
            self.chunk, self.chunk_start = self.chunk + 1, (self.loader.sample_index, self.step)
        self.metrics.log("checkpoint", step=self.step, tokens=self.tokens, checkpoint=step_dir_name(self.step),
                         ckpt_kind=kind, ends_chunk=ends_chunk)  # fmt: skip
        meta = {**self.state_dict(), "ends_chunk": ends_chunk}
        sharded = getattr(self.engine, "sharded", False)  # every rank writes its share, rank 0 the checkpoint
        # fsdp gathers its state with every rank taking part; rank 0 receives fresh host copies and writes them.
        collective = getattr(self.engine, "collective_state", False)
        if self.writer or sharded or collective:  # replicated replicas hold the same state: rank 0 alone writes it
            # An engine whose state dict is its own host tensors (streaming: the 7B store is 110 GiB, no room for
            # a copy) holds them unchanged until the background write has read them, instead of a snapshot.
            hold = getattr(self.engine, "hold_state", None)
            if sharded:
                share, layout = self.engine.shard_state()
                tensors, shard = {}, (self.rank, self.world, share)
                extra["shards.json"] = json.dumps(layout, indent=0)
            else:
                tensors, shard = self.engine.state_dict(), None
            copy = hold is None and not getattr(self.engine, "state_dict_is_copy", False)
            if self.writer or sharded:
                self.checkpointer.save(self.run_dir, self.step, tensors, meta, self.config_yaml, blocking=blocking,
                                       kind=kind, extra_files=extra, copy=copy, shard=shard,
                                       assemble=self.writer)  # fmt: skip
            if hold is not None:
                hold(self.checkpointer.join)

    def _ending_chunk(self) -> int | None:
        """The chunk a release checkpoint now would end; None when no step ran since the last one."""
        return self.chunk if self.step > self.chunk_start[1] else None

    def _chunk_record_fn(self, chunk: int):
        """The chunk record, computed later in the writer thread from values frozen now."""
        from crystal.release import chunk_record

        (start, first_step), end, excluded = self.chunk_start, self.loader.sample_index, list(self.loader.excluded)
        steps, loader = [first_step, self.step], self.loader
        return lambda: json.dumps(chunk_record(loader, chunk, start, end, excluded, steps), indent=1, sort_keys=True)

    def _load_checkpoint(self, path: Path):
        # The streaming store copies a checkpoint in tensor by tensor: read each from disk as it is asked for, as
        # a whole second copy of the 7B state (79 GB) does not fit beside the store on a 128 GB host.
        return load_checkpoint(path, lazy=self.cfg.backend.name == "streaming")

    def resume(self, resume: str) -> None:
        skipped: list[tuple[Path, CheckpointError]] = []
        path = resolve_resume(resume, self.run_dir, skipped)
        if path is None:
            self.log(f"train.resume={resume}: {self.run_dir} has no valid checkpoint yet; starting from scratch")
            return
        ckpt = self._load_checkpoint(path)
        meta = ckpt.meta
        for bad, error in skipped:  # the fallback stays, but never silently
            self.log(f"train.resume={resume}: skipped {bad.name} ({error}); resuming from {path.name} at step "
                     f"{meta['step']}")  # fmt: skip
        same_stage = meta.get("stage", 0) == self.cfg.train.stage
        self._check_compatible(meta, path, same_stage)
        own = path.resolve().parent.parent == self.run_dir.resolve()
        if not own and list_checkpoints(self.run_dir):
            raise CheckpointError(
                f"{self.run_dir} already holds checkpoints of its own; continue it with train.resume=latest, or start "
                f"from {path} under a new train.run_name"
            )
        events = self._check_config_unchanged(ckpt.config_yaml, path) if same_stage else []
        events += [{"event": "skipped_invalid_checkpoint", "checkpoint": str(bad), "error": str(error),
                    "resumed_from": str(path)} for bad, error in skipped]  # fmt: skip
        if meta.get("world_size", 1) != self.world:  # the store is resharded as it loads, fsdp cuts its shards
            events.append({"event": "world_size_changed", "checkpoint": str(path), "was": meta.get("world_size", 1),
                           "now": self.world, "sharded": (path / "shards.json").is_file()})  # fmt: skip
            self.log(f"resuming {path} (saved by {meta.get('world_size', 1)} ranks) on {self.world} ranks")
        self.engine.load_state_dict(ckpt.tensors)
        if not same_stage:
            # Stage transition (CrystalCoder 1 -> 2 -> 3): weights and Adam moments carry over; the step
            # count, LR schedule and data order start afresh with the new stage's mixture.
            self.metrics.log("event", event="stage_transition", from_checkpoint=str(path), step=0,
                             from_stage=meta.get("stage", 0), to_stage=self.cfg.train.stage)  # fmt: skip
            self.log(f"stage {meta.get('stage', 0)} -> {self.cfg.train.stage}: starting from weights of {path}")
            for row in events:
                self.metrics.log("event", step=0, **row)
            return
        if own:
            # an older one was named; rank 0 alone moves the run's files (the ranks would race on the same renames)
            newer = move_aside(self.run_dir, meta["step"], f"superseded-at-{meta['step']}") if self.writer else []
            self.load_state_dict(meta)
            if newer:
                self.metrics.log("event", event="resumed_from_older", step=self.step, checkpoint=path.name,
                                 moved_aside=[str(p) for p in newer])  # fmt: skip
        else:  # a fork: another run's state, this run's (empty) metrics file
            self.loader.load_state_dict(meta["loader"], allow_data_change=False)
            set_rng_state(meta["rng"])
            self.step, self.tokens = meta["step"], meta["tokens"]
            self.chunk, self.chunk_start = meta.get("chunk", 0), tuple(meta.get("chunk_start", (0, 0)))
            self.metrics.log("event", event="forked", from_checkpoint=str(path), step=self.step)
        for row in events:
            self.metrics.log("event", step=self.step, **row)
        self.log(f"resumed from {path} at step {self.step}")

    def _check_config_unchanged(self, saved_yaml: str, path: Path) -> list[dict[str, Any]]:
        """A resume continues the same computation: refuse changed settings unless train.allow_config_change.
        Returns the event rows to log once the metrics file is rewound (a changed train.steps, allowed ones)."""
        saved = config_from_yaml(saved_yaml)
        events = []
        if saved.train.steps != self.cfg.train.steps:
            events.append({"event": "steps_changed", "checkpoint": str(path), "was": saved.train.steps,
                           "now": self.cfg.train.steps})  # fmt: skip
        switch = backend_switch(saved, self.cfg, path)
        if switch:
            events.append(switch)
            eq_from, eq_to = switch["adamw"]
            note = f"; the AdamW equation changes ({eq_from} -> {eq_to})" if eq_from != eq_to else ""
            self.log(f"resuming {path} (backend={switch['from']}) on backend={switch['to']}{note}")
        changed = config_changes(saved, self.cfg)
        if not changed:
            return events

        def value(cfg: Config, key: str) -> Any:  # resolved where the backend resolves it (adamw=auto)
            return backend_computation(cfg).get(key, _get(cfg, key))

        detail = ", ".join(f"{k}: {value(saved, k)!r} -> {value(self.cfg, k)!r}" for k in changed[:4])
        if not self.cfg.train.allow_config_change:
            raise CheckpointError(
                f"resuming {path} with changed settings ({detail}); the run would no longer be one reproducible "
                f"computation. Restore them, start a new train.run_name, or pass train.allow_config_change=true"
            )
        self.log(f"warning: resuming {path} with changed settings: {detail}")
        return [*events, {"event": "config_changed", "checkpoint": str(path), "changed": changed, "detail": detail}]

    def _check_compatible(self, meta: dict[str, Any], path: Path, same_stage: bool) -> None:
        """One line naming what differs: model config, tokenizer, or (same stage) the data fingerprint."""
        saved, mine = meta["model_config"], config_to_dict(self.cfg)["model"]
        ignore = {"ops", "name"}  # implementation choice and label, not the function
        diff = [k for k in sorted(set(saved) | set(mine)) if k not in ignore and saved.get(k) != mine.get(k)]
        if diff:
            detail = ", ".join(f"model.{k}: checkpoint {saved.get(k)!r} vs run {mine.get(k)!r}" for k in diff[:4])
            raise CheckpointError(f"checkpoint {path} is for a different model ({detail}); use a matching model config")
        if meta.get("tokenizer_sha256") not in (None, self.data.tokenizer.sha256):
            raise CheckpointError(
                f"checkpoint {path} was trained with tokenizer sha256 {meta['tokenizer_sha256'][:12]}, this run's "
                f"tokenizer is {self.data.tokenizer.sha256[:12]}; use the same data.tokenizer settings"
            )
        allowed = getattr(self.cfg.data, "allow_data_change", False)  # then the loader records the change
        if same_stage and not allowed and meta.get("data_fingerprint") not in (None, self.data.fingerprint):
            raise CheckpointError(
                f"checkpoint {path} was trained on data fingerprint {meta['data_fingerprint'][:12]}, this run's data "
                f"is {self.data.fingerprint[:12]} (different sources, shards or tokenizer); restore that data or "
                f"start a new run with train.run_name=<name>"
            )

    # -- loop -------------------------------------------------------------------------------------

    def lr(self, step: int) -> float:
        return lr_at(step, self.cfg.optim, self.cfg.train.steps)

    def train_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        first_sample = self.loader.next_samples(1)[0]
        batches = self.loader.next_step()[self.rank :: self.world]  # this replica's share of the step
        lr = self.lr(self.step)
        result = self.engine.train_step(batches, lr)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        self.step += 1
        self.tokens += result.tokens
        self.skipped_steps += int(result.skipped)
        tok_s = result.tokens / dt
        return {
            "step": self.step, "tokens": self.tokens, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
            "tok_s": tok_s, "mfu": tok_s * self.flops_per_token / (self.peak_flops * self.world), "chunk": self.chunk,
            "skipped": result.skipped, "rolled_back": self._rolled_back,
            "samples": [first_sample, self.loader.sample_index], "step_s": dt,
            **getattr(self.engine, "last_step_stats", {}),  # streaming: collective time, host<->device bytes
        }  # fmt: skip

    def _sources_without_heldout(self) -> str:
        """'' when every source has a held-out window to evaluate; else one line naming those without and why."""
        lacking = []
        for name, split in zip(self.loader.names, self.loader.heldout, strict=True):
            if split.num_windows == 0:
                counts = self.data.shards[name].manifest["counts"]
                docs = counts["train"]["documents"] + counts["heldout"]["documents"]
                lacking.append(f"{name} ({counts['heldout']['documents']} of {docs} documents held out, "
                               f"{counts['heldout']['tokens']} tokens)")  # fmt: skip
        if not lacking:
            return ""
        return (
            f"no held-out loss for {', '.join(lacking)}: a source needs at least one {self.seq_len + 1}-token "
            f"held-out window; raise data.heldout_fraction (now {self.cfg.data.heldout_fraction}) or add data"
        )

    def evaluate(self) -> dict[str, float]:
        """Held-out loss per source and their mixture-weighted mean ("heldout")."""
        out = {}
        for name in self.loader.names:
            batches = self.loader.heldout_batches(name, self.cfg.train.eval_batches)
            if batches:
                out[name] = float(np.mean([self.engine.eval_loss(b) for b in batches]))
        weights = {n: w for n, w in self.loader.mixture_weights.items() if n in out and w > 0}
        if weights:
            out["heldout"] = sum(out[n] * w for n, w in weights.items()) / sum(weights.values())
        return out

    def rollback(self, fault: Fault) -> Path:
        """Back to the newest checkpoint before the offending samples; exclude them from now on."""
        t = self.cfg.train
        self.checkpointer.wait()
        if self.swarm:  # every replica reads the checkpoint rank 0 has finished writing
            self.swarm.barrier()
        if self.rollbacks >= t.max_rollbacks:
            raise TrainingError(
                f"{fault.reason} at step {fault.steps[1]} after {self.rollbacks} rollbacks (train.max_rollbacks); "
                f"the run keeps diverging: lower optim.lr, raise optim.warmup_steps, or inspect the data in "
                f"{self.run_dir}/metrics.jsonl"
            )
        target = None
        for p in reversed(list_checkpoints(self.run_dir)):
            if step_of(p) < fault.steps[0] and load_meta(p)["loader"]["sample_index"] <= fault.samples[0]:
                try:
                    verify_checkpoint(p)
                    target = p
                    break
                except CheckpointError:
                    continue
        if target is None:
            raise TrainingError(f"{fault.reason} at step {fault.steps[1]} but {self.run_dir} has no checkpoint "
                                f"before it to roll back to")  # fmt: skip
        excluded = list(self.loader.excluded)
        window = {"samples": list(fault.samples), "steps": list(fault.steps), "reason": fault.reason,
                  "rollback": self.rollbacks + 1, "to_step": step_of(target)}  # fmt: skip
        windows, rollbacks = [*self.skipped_windows, window], self.rollbacks + 1
        from_step, from_tokens = self.step, self.tokens
        if self.swarm:  # every rank has chosen its target before rank 0 moves the newer checkpoints aside
            self.swarm.barrier()
        moved = move_aside(self.run_dir, step_of(target), f"rolled-back-{rollbacks}") if self.writer else []
        ckpt = self._load_checkpoint(target)
        self.engine.load_state_dict(ckpt.tensors)
        self.load_state_dict(ckpt.meta)
        for a, b in [*excluded, fault.samples]:
            self.loader.exclude(a, b)
        self.rollbacks, self.skipped_windows = rollbacks, windows
        self.metrics.log("event", event="rollback", reason=fault.reason, step=self.step, tokens=self.tokens,
                         from_step=from_step, from_tokens=from_tokens, to_checkpoint=target.name,
                         excluded_samples=list(fault.samples), offending_steps=list(fault.steps),
                         moved_aside=[str(p) for p in moved])  # fmt: skip
        self.log(f"{fault.reason} at step {from_step}: rolled back to {target.name}, samples "
                 f"[{fault.samples[0]}, {fault.samples[1]}) excluded from now on")  # fmt: skip
        self._rolled_back = True
        return target

    def fit(self) -> dict[str, Any]:
        t = self.cfg.train
        n_params = sum(p.numel() for p in self.adapter.model.parameters())
        self.log(
            f"training {t.steps} steps of {self.cfg.model.name} ({n_params:,} params) on {device_name(self.device)}; "
            f"run dir {self.run_dir}"
        )
        last: dict[str, Any] = {}
        if self._fresh:  # where this run starts (step 0 or a stage's start) is checkpoint -1
            last["eval"] = self._evaluate_and_log(checkpoint=True)
            self.save_checkpoint(RELEASE)
        end = min(t.steps, t.stop_after or t.steps)  # this process stops at `end`; the schedule runs to t.steps
        bar = tqdm(total=end, initial=self.step, disable=not (t.progress and self.writer), dynamic_ncols=True,
                   desc="train")  # fmt: skip
        first_step_of_process = True
        try:
            while self.step < end:
                self.checkpointer.poll()  # a failed background write stops training here, not later
                row = self.train_step()
                fault = self.monitor.observe(row["step"], row["loss"], row["skipped"], tuple(row["samples"]))
                if fault is not None:
                    self.metrics.log("train", **row, fault=fault.reason)  # the rewind moves it to metrics.replaced
                    self.rollback(fault)
                    bar.n = self.step
                    bar.refresh()
                    continue
                last = row
                if first_step_of_process:  # the README's start-up figure: command -> first optimizer step
                    first_step_of_process = False
                    self.metrics.log("event", event="first_step", step=self.step,
                                     seconds_since_launch=round(seconds_since_launch(), 2))  # fmt: skip
                if self.step % t.log_every == 0 or self.step == t.steps or row["skipped"] or row["rolled_back"]:
                    self.metrics.log("train", **row)
                self._rolled_back = False
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tok_s']:,.0f}", lr=f"{row['lr']:.2e}")
                release = self.step % t.ckpt_every == 0 or self.step == t.steps
                stop = self.step == end and end < t.steps
                if self.step % t.eval_every == 0 or release:
                    last["eval"] = self._evaluate_and_log(checkpoint=release)
                    if self.writer and (last["eval"] or t.eval_batches):
                        shown = " ".join(f"{k} {v:.4f}" for k, v in last["eval"].items())
                        bar.write(f"step {self.step}: {shown or 'no source has a held-out window (said at start)'}")
                if release:
                    self.save_checkpoint(RELEASE)
                elif stop or (t.ckpt_keep_every and self.step % t.ckpt_keep_every == 0):
                    self.save_checkpoint(KEEP)
        finally:
            bar.close()
            self.checkpointer.wait()
            self._write_streaming_trace()
        return last

    def _write_streaming_trace(self) -> None:
        """backend.streaming.trace: the last step's measured timeline, as the simulator writes its predictions
        (<run>/streaming_trace.json for chrome://tracing or ui.perfetto.dev, and a PNG)."""
        events = getattr(self.engine, "last_trace", None)
        if not (self.writer and events and self.cfg.backend.streaming.trace):
            return
        from crystal.streaming.executor import overlap_report
        from crystal.streaming.sim.trace import plot_timeline, write_chrome_trace

        write_chrome_trace(events, self.run_dir / "streaming_trace.json", process_name=f"crystal step {self.step}")
        plot_timeline(events, self.run_dir / "plots" / "streaming_trace.png", title=f"measured step {self.step}")
        report = {k: round(v, 4) for k, v in overlap_report(events).items()}
        self.metrics.log("event", event="streaming_trace", step=self.step, **report)

    def _evaluate_and_log(self, checkpoint: bool) -> dict[str, float]:
        ev = self.evaluate()
        where = {"checkpoint": step_dir_name(self.step), "chunk": self._ending_chunk()} if checkpoint else {}
        self.metrics.log("eval", step=self.step, tokens=self.tokens, **where, **ev)
        return ev

    def close(self) -> None:
        try:
            self.checkpointer.wait()
        finally:
            # Engines holding outside state (a cstorch run, streaming threads) release it here.
            if hasattr(self.engine, "close"):
                self.engine.close()
            self.metrics.close()
