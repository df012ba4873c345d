"""Checkpoint cost: save time (the training stall vs the background write) for the tiny and small models,
and training throughput with checkpointing on vs off at the default interval.

The stall is the snapshot (one copy of weights + AdamW state off the training tensors); the write
(safetensors, fsync, sha256 manifest, rename) runs in a thread while training goes on.

Throughput: on a shared machine two long runs drift apart for reasons that have nothing to do with
checkpoints, so the comparison is interleaved: pairs of short segments of K steps, one with a save
at its start and one without, in alternating order; the median extra time per save, over the step
time, gives the throughput at any interval. CRYSTAL_BENCH_FULL=1 also times whole default
intervals (train.ckpt_keep_every steps) with and without a save.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

from bench.conftest import bench_data_overrides, record


def _trainer(tmp_path, *overrides: str):
    from crystal.trainer import Trainer
    from tests.conftest import compose_config

    cfg = compose_config([*bench_data_overrides(), "train.progress=false", "train.plots=false",
                          f"train.out_dir={tmp_path}", "train.steps=100000", "train.eval_every=100000",
                          *overrides])  # fmt: skip
    return Trainer(cfg, log=lambda *_: None)


def _engine_with_optimizer_state(model_name: str):
    """A model and its AdamW state after one update (so the moments exist), without any data."""
    from crystal.config import Config, ModelConfig
    from crystal.data.loader import Batch
    from crystal.model import build_model
    from crystal.trainer import CrystalAdapter, build_engine

    cfg = Config(model=ModelConfig.from_name(model_name))
    adapter = CrystalAdapter(build_model(cfg.model, seed=1), doc_masking=False)
    engine = build_engine(cfg, adapter, torch.device("cpu"), None)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, 33), generator=torch.Generator().manual_seed(0))
    z = torch.zeros(1, 32, dtype=torch.int64)
    engine.train_step([Batch(tokens[:, :-1], tokens[:, 1:], z, z.int(), [0], [0], [0])], lr=1e-3)
    return engine


@pytest.mark.parametrize("model_name", ["tiny", "small"])
def test_checkpoint_save_time(model_name, tmp_path):
    from crystal.checkpoint import snapshot, tensor_bytes, write_checkpoint

    engine = _engine_with_optimizer_state(model_name)
    state = engine.state_dict()
    mb = tensor_bytes(state) / 2**20
    n_params = sum(t.numel() for t in state["model"].values())
    stalls, writes, snap = [], [], None
    for rep in range(4):
        t0 = time.perf_counter()
        snap = snapshot(state, into=snap)  # as the trainer does: the buffers of the previous save are reused
        stalls.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        write_checkpoint(tmp_path, rep, snap, {"step": rep}, "x: 1\n")
        writes.append(time.perf_counter() - t0)
    shape = f"{model_name} ({n_params / 1e6:.1f}M params, {mb:.0f} MB)"
    first = stalls.pop(0)  # the first snapshot allocates its buffers (page faults): reported apart
    stall, write = statistics.median(stalls), statistics.median(writes)
    record("checkpoint", op="ckpt_save", shape=shape, dtype="fp32", impl="first snapshot (allocates buffers)",
           ms=first * 1e3, rate=mb / first, unit="MB/s")  # fmt: skip
    record("checkpoint", op="ckpt_save", shape=shape, dtype="fp32", impl="snapshot (training stall)",
           ms=stall * 1e3, rate=mb / stall, unit="MB/s")  # fmt: skip
    record("checkpoint", op="ckpt_save", shape=shape, dtype="fp32", impl="write+fsync+sha256 (background)",
           ms=write * 1e3, rate=mb / write, unit="MB/s")  # fmt: skip


def test_training_throughput_with_checkpointing_on_vs_off(tmp_path):
    from crystal.checkpoint import KEEP

    trainer = _trainer(tmp_path)
    t = trainer.cfg.train
    interval = t.ckpt_keep_every or t.ckpt_every  # the shortest interval the default run saves at
    seg = 4  # steps per segment: long enough for the background write to finish inside it
    pairs = int(os.environ.get("CRYSTAL_BENCH_CKPT_PAIRS", "4"))
    for _ in range(2):
        trainer.train_step()  # warm-up

    def segment(save: bool, steps: int) -> float:
        t0 = time.perf_counter()
        if save:
            trainer.save_checkpoint(KEEP)
        for _ in range(steps):
            trainer.train_step()
        trainer.checkpointer.wait()  # a write still running counts against this segment
        return time.perf_counter() - t0

    on, off, stalls, cpu = [], [], [], []
    for p in range(pairs):
        for save in (True, False) if p % 2 == 0 else (False, True):
            (on if save else off).append(segment(save, seg))
            if save:
                stalls.append(trainer.checkpointer.last_stall_s)
                cpu.append(trainer.checkpointer.last_write_cpu_s)
    step_s = statistics.median(off) / seg
    extra = statistics.median([a - b for a, b in zip(on, off)])
    stall, write_cpu = statistics.median(stalls), statistics.median(cpu)
    # On a machine whose cores training already fills, the writer's CPU time is taken from training:
    # stall + writer CPU per save is an upper bound on the cost that noise cannot shrink.
    bound = (stall + write_cpu) / (interval * step_s)
    tokens = t.global_batch * trainer.seq_len
    off_rate = tokens / step_s
    on_rate = interval * tokens / (interval * step_s + max(0.0, extra))
    shape = f"{trainer.cfg.model.name} B{t.global_batch} S{trainer.seq_len}"
    record("checkpoint", op="train_ckpt", shape=shape, dtype="fp32", impl="checkpointing off", ms=step_s * 1e3,
           rate=off_rate, unit="tok/s")  # fmt: skip
    record("checkpoint", op="train_ckpt", shape=f"{shape} every {interval} steps", dtype="fp32",
           impl="checkpointing on (interleaved)", ms=(interval * step_s + extra) / interval * 1e3, rate=on_rate,
           unit="tok/s")  # fmt: skip
    record("checkpoint", op="train_ckpt", shape=f"{shape} every {interval} steps", dtype="fp32",
           impl="checkpointing on (bound: stall + writer CPU)", ms=(interval * step_s + stall + write_cpu) / interval
           * 1e3, rate=off_rate / (1 + bound), unit="tok/s")  # fmt: skip
    print(f"per save: stall {stall * 1e3:.0f} ms, writer CPU {write_cpu * 1e3:.0f} ms, measured extra "
          f"{extra * 1e3:.0f} ms; step {step_s * 1e3:.0f} ms; throughput on/off at every {interval} steps: "
          f"measured {on_rate / off_rate:.3f}, bound {1 / (1 + bound):.3f}")  # fmt: skip

    if os.environ.get("CRYSTAL_BENCH_FULL"):
        full = {True: [], False: []}
        for p in range(2):
            for save in (True, False) if p % 2 == 0 else (False, True):
                full[save].append(segment(save, interval))
        ratio = sum(full[False]) / sum(full[True])
        record("checkpoint", op="train_ckpt", shape=f"{shape} every {interval} steps", dtype="fp32",
               impl="checkpointing on (whole intervals)", ms=sum(full[True]) / (2 * interval) * 1e3,
               rate=off_rate * ratio, unit="tok/s")  # fmt: skip
        print(f"whole intervals: throughput on/off = {ratio:.3f}")
    trainer.close()
