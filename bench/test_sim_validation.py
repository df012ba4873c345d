"""Simulator vs measurement on this CPU (issue 8): the streaming executor's step time, measured through
crystal's trainer, against crystal.streaming.sim's prediction with a cpu profile calibrated on the spot.

    pytest bench/test_sim_validation.py -s            calibrates (~10 s), then tiny and small models
    CRYSTAL_SIM_PROFILE=conf/cluster/cpu.yaml pytest  use a saved profile instead of calibrating

Rows go to bench/results/sim_validation.csv: impl "measured" (ms per step, median of the steps after a
warm-up) and impl "predicted" (ms, with rate = predicted / measured). backend=streaming is the
target (within 15%); backend=resident runs the same comparison against the simulator's `resident`
schedule, a check of the compute model alone. Calibrating in the same process right before measuring
matters on a shared machine: both then see the same load.

Threads: CRYSTAL_SIM_THREADS (default 1) for both the calibration and the measured steps. On the shared
2-core machine a 2-thread torch op stalls ~8 ms whenever another process holds the second core (a
64^3 matmul measured 0.2 ms alone and 8 ms under load), which swamps what is being compared; one
thread measures the model, not the neighbours.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import statistics
from pathlib import Path

import pytest
import torch

from bench.conftest import record

REPO = Path(__file__).resolve().parent.parent
SEQ = 256
STEPS = 4  # the first is a warm-up
# (model, depths, batch sizes): tiny and small at several depths and two batch sizes, seq 256
CONFIGS = [("tiny", n, b) for n in (2, 4, 8) for b in (4, 8)] + [("small", n, b) for n in (2, 4) for b in (2, 4)]


def streaming_available() -> str | None:
    """None when backend=streaming can run here, else why not."""
    if importlib.util.find_spec("crystal.streaming.executor") is None:
        return "streaming/executor.py is not in this checkout"
    if not (REPO / "conf" / "backend" / "streaming.yaml").exists():
        return "conf/backend/streaming.yaml is not in this checkout"
    return None


@pytest.fixture(scope="module")
def cpu_profile(tmp_path_factory):
    from crystal.streaming.sim.calibrate import calibrate
    from crystal.streaming.sim.profile import load_profile

    torch.set_num_threads(int(os.environ.get("CRYSTAL_SIM_THREADS", "1")))
    saved = os.environ.get("CRYSTAL_SIM_PROFILE")
    path = Path(saved) if saved else calibrate(tmp_path_factory.mktemp("sim") / "cpu.yaml", budget_s=10.0)
    return load_profile(path)


def measure(backend: str, model: str, n_layer: int, batch: int, out_dir: Path):
    """Median seconds per training step after a warm-up, and the trainer's config."""
    from crystal.trainer import Trainer
    from tests.conftest import FAST_DATA, compose_config

    cfg = compose_config([*FAST_DATA, f"model={model}", f"model.n_layer={n_layer}", f"backend={backend}",
                          f"train.seq_len={SEQ}", f"train.micro_batch={batch}", f"train.global_batch={batch}",
                          f"train.steps={STEPS}", "train.eval_every=1000", "train.ckpt_every=1000",
                          f"train.out_dir={out_dir}"])  # fmt: skip
    trainer = Trainer(cfg, log=lambda *_: None)
    try:
        rates = [trainer.train_step()["tok_s"] for _ in range(STEPS)][1:]
    finally:
        trainer.close()
    return statistics.median(batch * SEQ / r for r in rates), cfg


def predict(cfg, profile, schedule_default: str) -> float:
    from crystal.streaming.sim.shapes import shape_from_dict
    from crystal.streaming.sim.timing import simulate

    shape = shape_from_dict(dataclasses.asdict(cfg.model), cfg.model.name)
    knobs = getattr(cfg.backend, "streaming", None)  # mirror the executor's settings when it has them
    run = dataclasses.replace(profile.run, batch=cfg.train.micro_batch, seq=SEQ, micro_batches=1, replicas=1,
                              schedule=schedule_default)  # fmt: skip
    if schedule_default == "resident":
        run = dataclasses.replace(run, recompute=False)
    elif knobs is not None:
        changes = {k: getattr(knobs, k) for k in ("schedule", "prefetch", "recompute", "stream_dtype", "grad_dtype")
                   if hasattr(knobs, k)}  # fmt: skip
        for k in ("stream_dtype", "grad_dtype"):  # "auto" = the compute dtype (fp32 on this CPU)
            if changes.get(k) == "auto":
                changes[k] = "fp32" if profile.device.compute_dtype == "fp32" else "bf16"
        run = dataclasses.replace(run, **changes)
    return simulate(shape, profile, run).step_s


@pytest.mark.parametrize(("model", "n_layer", "batch"), CONFIGS)
@pytest.mark.parametrize("backend", ["streaming", "resident"])
def test_sim_predicts_cpu_step(backend, model, n_layer, batch, cpu_profile, tmp_path):
    if backend == "streaming" and (why := streaming_available()):
        pytest.skip(f"backend=streaming unavailable: {why}; the lead runs this after merging the executor")
    measured, cfg = measure(backend, model, n_layer, batch, tmp_path)
    predicted = predict(cfg, cpu_profile, "batch_major" if backend == "streaming" else "resident")
    ratio = predicted / measured
    shape = f"{model} L{n_layer} b{batch} s{SEQ}"
    record("sim_validation", op=f"step {backend}", shape=shape, dtype="fp32", impl="measured", ms=measured * 1e3)
    record("sim_validation", op=f"step {backend}", shape=shape, dtype="fp32", impl="predicted", ms=predicted * 1e3,
           rate=ratio, unit="predicted/measured")  # fmt: skip
    if backend == "streaming":
        assert 0.85 <= ratio <= 1.15, f"{shape}: predicted {predicted:.3f} s vs measured {measured:.3f} s"
