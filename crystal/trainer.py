"""The trainer: wires config -> data -> model -> engine -> metrics/checkpoints, and runs the loop.

Stateful parts each round-trip through state_dict/load_state_dict: the engine (model + optimizer),
the loader (next sample index + what the order depends on), the metrics file (its cursor), the
RNGs, and the trainer's own counters. A checkpoint is all of them together.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from crystal.checkpoint import AsyncCheckpointer, CheckpointError, list_checkpoints, load_checkpoint, resolve_resume
from crystal.config import Config, OptimConfig, config_to_dict
from crystal.data.loader import Batch, DataLoader
from crystal.data.prepare import PreparedData, prepare_data
from crystal.metrics import MetricsLogger
from crystal.model import CrystalCoder, build_model, group_settings, param_group_of
from crystal.utils import (
    autocast_dtype,
    device_name,
    device_peak_flops,
    git_commit,
    resolve_device,
    rng_state,
    set_determinism,
    set_rng_state,
)
from streaming.backends.base import AdamWSettings, ParamGroupSpec


class CrystalAdapter:
    """Tells the generic engines in streaming/ how to run CrystalCoder on a crystal Batch."""

    def __init__(self, model: CrystalCoder, doc_masking: bool) -> None:
        self.model, self.blocks, self.doc_masking = model, model.blocks, doc_masking

    def block_args(self, batch: Batch) -> tuple:
        if self.doc_masking:
            return batch.positions, batch.doc_ids
        return torch.arange(batch.input_ids.shape[1], device=batch.input_ids.device), None

    def embed(self, batch: Batch) -> torch.Tensor:
        return self.model.embed(batch.input_ids)

    def head_loss(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.model.head_loss(x, batch.targets)

    def loss(self, batch: Batch) -> torch.Tensor:
        return self.model(batch.input_ids, batch.targets, *self.block_args(batch))

    def to_device(self, batch: Batch, device: torch.device) -> Batch:
        return batch.to(device)

    def num_tokens(self, batch: Batch) -> int:
        return batch.num_tokens


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


def build_engine(cfg: Config, adapter: CrystalAdapter, device: torch.device, amp: torch.dtype | None):
    groups = param_group_specs(adapter.model, cfg.optim.weight_decay)
    settings = AdamWSettings(tuple(cfg.optim.betas), cfg.optim.eps, cfg.optim.grad_clip)
    name = cfg.backend.name
    if name == "resident":
        from streaming.backends.resident import ResidentEngine

        return ResidentEngine(adapter, groups, settings, device, amp)
    if name == "cerebras":  # cerebras-pytorch, in its own venv (crystal/cerebras.py)
        from crystal.cerebras import build_cerebras_engine

        return build_cerebras_engine(cfg, adapter, groups, settings, amp)
    raise ValueError(f"backend.name={name!r} is not available; known backends: resident, cerebras")


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


class Trainer:
    def __init__(self, cfg: Config, config_yaml: str | None = None, log=print) -> None:
        self.cfg, self.log = cfg, log
        t = cfg.train
        self.config_yaml = config_yaml or OmegaConf.to_yaml(OmegaConf.structured(cfg))
        self.run_dir = Path(t.out_dir) / t.run_name
        self.device = resolve_device(t.device)
        self.amp = autocast_dtype(t.precision, self.device)
        self.seq_len = t.seq_len or cfg.model.max_seq_len
        if self.seq_len > cfg.model.max_seq_len:
            raise ValueError(f"train.seq_len={self.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
        self._check_run_dir()
        set_determinism(t.seed)

        self.data = prepare_data(cfg.data, cfg.model.vocab_size, log=log)
        self.loader = DataLoader(
            self.data, self.seq_len, t.global_batch, t.micro_batch, t.seed, mixture=cfg.data.source_mixture()
        )
        model = build_model(cfg.model, device="cpu", seed=t.seed)
        self.adapter = CrystalAdapter(model, t.doc_masking)
        self.engine = build_engine(cfg, self.adapter, self.device, self.amp)
        self.metrics = MetricsLogger(self.run_dir / "metrics.jsonl")
        self.checkpointer = AsyncCheckpointer()
        self.step = 0  # optimizer updates done (including skipped ones)
        self.tokens = 0
        self.skipped_steps = 0
        self.flops_per_token = cfg.model.flops_per_token(self.seq_len)
        self.peak_flops = (
            (t.peak_tflops * 1e12) if t.peak_tflops else device_peak_flops(self.device.type, device_name(self.device))
        )
        self._write_run_files()
        if t.resume:
            self.resume(t.resume)

    # -- run directory ----------------------------------------------------------------------------

    def _check_run_dir(self) -> None:
        """Never train over an existing run by accident: resume it or name a new one."""
        existing = list_checkpoints(self.run_dir)
        if existing and not self.cfg.train.resume:
            raise CheckpointError(
                f"{self.run_dir} already holds a run (last checkpoint {existing[-1].name}); pass train.resume=latest "
                f"to continue it or train.run_name=<new name> to start another"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.exists() and not existing:  # a run that died before its first checkpoint: keep its rows aside
            metrics.rename(self.run_dir / f"metrics.{int(time.time())}.abandoned.jsonl")

    def _write_run_files(self) -> None:
        (self.run_dir / "config.yaml").write_text(self.config_yaml)
        manifest = {**self.data.manifest, "fingerprint": self.data.fingerprint}
        (self.run_dir / "data_manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything but tensors (those come from the engine)."""
        return {
            "step": self.step,
            "tokens": self.tokens,
            "skipped_steps": self.skipped_steps,
            "stage": self.cfg.train.stage,
            "loader": self.loader.state_dict(),
            "metrics": self.metrics.state_dict(),
            "rng": rng_state(),
            "model_config": config_to_dict(self.cfg)["model"],
            "data_fingerprint": self.data.fingerprint,
            "tokenizer_sha256": self.data.tokenizer.sha256,
            "git_commit": git_commit(),
        }

    def save_checkpoint(self, blocking: bool = False) -> None:
        self.checkpointer.save(
            self.run_dir, self.step, self.engine.state_dict(), self.state_dict(), self.config_yaml, blocking=blocking
        )

    def resume(self, resume: str) -> None:
        path = resolve_resume(resume, self.run_dir)
        ckpt = load_checkpoint(path)
        self._check_model_config(ckpt.meta["model_config"], path)
        same_stage = ckpt.meta.get("stage", 0) == self.cfg.train.stage
        self.engine.load_state_dict(ckpt.tensors)
        if not same_stage:
            # Stage transition (CrystalCoder 1 -> 2 -> 3): weights and Adam moments carry over; the step
            # count, LR schedule and data order start afresh with the new stage's mixture.
            self.metrics.log("event", event="stage_transition", from_checkpoint=str(path), step=0,
                             from_stage=ckpt.meta.get("stage", 0), to_stage=self.cfg.train.stage)  # fmt: skip
            self.log(f"stage {ckpt.meta.get('stage', 0)} -> {self.cfg.train.stage}: starting from weights of {path}")
            return
        self.loader.load_state_dict(ckpt.meta["loader"], allow_data_change=False)
        self.metrics.load_state_dict(ckpt.meta["metrics"])
        set_rng_state(ckpt.meta["rng"])
        self.step, self.tokens = ckpt.meta["step"], ckpt.meta["tokens"]
        self.skipped_steps = ckpt.meta.get("skipped_steps", 0)
        self.log(f"resumed from {path} at step {self.step}")

    def _check_model_config(self, saved: dict[str, Any], path: Path) -> None:
        mine = config_to_dict(self.cfg)["model"]
        ignore = {"ops", "name"}  # implementation choice and label, not the function
        diff = [k for k in sorted(set(saved) | set(mine)) if k not in ignore and saved.get(k) != mine.get(k)]
        if diff:
            detail = ", ".join(f"model.{k}: checkpoint {saved.get(k)!r} vs run {mine.get(k)!r}" for k in diff[:4])
            raise CheckpointError(f"checkpoint {path} is for a different model ({detail}); use a matching model config")

    # -- loop -------------------------------------------------------------------------------------

    def lr(self, step: int) -> float:
        return lr_at(step, self.cfg.optim, self.cfg.train.steps)

    def train_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        first_sample = self.loader.sample_index
        batches = self.loader.next_step()
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
            "tok_s": tok_s, "mfu": tok_s * self.flops_per_token / self.peak_flops, "skipped": result.skipped,
            "samples": [first_sample, self.loader.sample_index], "step_s": dt,
        }  # fmt: skip

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

    def fit(self) -> dict[str, Any]:
        t = self.cfg.train
        n_params = sum(p.numel() for p in self.adapter.model.parameters())
        self.log(
            f"training {t.steps} steps of {self.cfg.model.name} ({n_params:,} params) on {device_name(self.device)}; "
            f"run dir {self.run_dir}"
        )
        bar = tqdm(total=t.steps, initial=self.step, disable=not t.progress, dynamic_ncols=True, desc="train")
        last: dict[str, Any] = {}
        try:
            while self.step < t.steps:
                row = self.train_step()
                last = row
                if self.step % t.log_every == 0 or self.step == t.steps or row["skipped"]:
                    self.metrics.log("train", **row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tok_s']:,.0f}", lr=f"{row['lr']:.2e}")
                if self.step % t.eval_every == 0 or self.step == t.steps:
                    ev = self.evaluate()
                    self.metrics.log("eval", step=self.step, tokens=self.tokens, **ev)
                    last["eval"] = ev
                    bar.write(f"step {self.step}: " + " ".join(f"{k} {v:.4f}" for k, v in ev.items()))
                if self.step % t.ckpt_every == 0 or self.step == t.steps:
                    self.save_checkpoint()
        finally:
            bar.close()
            self.checkpointer.wait()
        return last

    def close(self) -> None:
        self.checkpointer.wait()
        self.metrics.close()
