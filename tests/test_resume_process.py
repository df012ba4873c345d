"""Resume across processes: bitwise continuation (also across a stage boundary) and kill -9 survival.

Both start `python -m crystal.train` in subprocesses (the real entry point, a fresh interpreter), so
nothing carries over in memory between the save and the load."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from crystal.checkpoint import find_latest, load_checkpoint
from crystal.metrics import read_metrics
from crystal.trainer import Trainer
from tests.conftest import FAST_DATA, compose_config

REPO = Path(__file__).resolve().parent.parent
TINY = ["model.n_layer=1", "train.seq_len=32", "train.micro_batch=2", "train.global_batch=4", "train.eval_every=1000",
        "train.eval_batches=1", "optim.warmup_steps=2", "train.plots=false"]  # fmt: skip


def run_here(*overrides: str) -> Path:
    trainer = Trainer(compose_config([*FAST_DATA, *overrides]), log=lambda *_: None)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer.run_dir


def start(*overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "crystal.train", *FAST_DATA, *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


def assert_same_run(a: Path, b: Path) -> None:
    ca, cb = load_checkpoint(find_latest(a)), load_checkpoint(find_latest(b))
    assert ca.meta["step"] == cb.meta["step"]
    for group in ("model", "optimizer"):
        assert ca.tensors[group].keys() == cb.tensors[group].keys()
        for k in ca.tensors[group]:
            assert torch.equal(ca.tensors[group][k], cb.tensors[group][k]), (group, k)
    assert ca.meta["loader"] == cb.meta["loader"]
    losses = lambda d: [(r["step"], r["loss"]) for r in read_metrics(d / "metrics.jsonl", "train")]
    assert losses(a) == losses(b)  # bitwise: floats compared exactly


@pytest.mark.slow
def test_resume_in_a_new_process_is_bitwise_also_across_a_stage_boundary(tmp_path):
    out = f"train.out_dir={tmp_path}"
    s1 = run_here(*TINY, out, "+stage=1", "train.steps=2", "train.ckpt_every=2", "train.run_name=s1")
    stage2 = [*TINY, out, "+stage=2", "train.steps=4", "train.ckpt_every=2"]
    reference = run_here(*stage2, f"train.resume={find_latest(s1)}", "train.run_name=one_go")
    # process 1 loads the stage-1 checkpoint (fresh schedule and data order) and stops after 2 steps ...
    finish(start(*stage2, f"train.resume={find_latest(s1)}", "train.run_name=split", "train.stop_after=2"))
    assert find_latest(tmp_path / "split").name == "step-00000002"
    # ... process 2 picks it up from disk and finishes
    finish(start(*stage2, "train.resume=latest", "train.run_name=split"))
    assert_same_run(reference, tmp_path / "split")
    # the stage-2 release names where it began and carries both stages' configs; its first chunk replays
    from crystal.release import build, verify_chunk

    manifest = build(tmp_path / "split", tmp_path / "release", log=lambda *_: None)
    assert manifest["started_from"]["stage"] == 1 and manifest["started_from"]["same_tensors_as_init"]
    assert {p.name for p in (tmp_path / "release" / "configs").iterdir()} == {"stage-1.yaml", "stage-2.yaml"}
    assert verify_chunk(tmp_path / "release", 0, log=lambda *_: None).ok


def _wait_for(proc: subprocess.Popen, condition, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if condition():
            return True
        time.sleep(0.001)
    raise TimeoutError("training subprocess made no progress")


@pytest.mark.slow
def test_kill_9_during_training_or_a_checkpoint_write_then_resume_latest_finishes_identically(tmp_path):
    rng = random.Random(5)
    args = [*TINY, f"train.out_dir={tmp_path}", "train.steps=10", "train.ckpt_every=5", "train.ckpt_keep_every=1",
            "train.ckpt_keep_last=2", "train.resume=latest"]  # fmt: skip
    reference = run_here(*args, "train.run_name=reference")
    run_dir = tmp_path / "killed"
    ckpts = run_dir / "checkpoints"
    writing = lambda min_step: (
        lambda: any(p.name.endswith(".tmp") and int(p.name[5:13]) >= min_step for p in ckpts.glob("step-*.tmp"))
    )
    newest = lambda: max([int(p.name[5:]) for p in ckpts.glob("step-????????")] or [0])  # complete or not
    kills = []
    for moment in ("write", "step", "write"):
        proc = start(*args, "train.run_name=killed")
        latest = find_latest(run_dir)
        done = int(latest.name[5:]) if latest else 0
        if moment == "write":  # the moment a checkpoint directory is half written
            hit = _wait_for(proc, writing(done + 2))
        else:  # a random moment a few steps after the resume
            target = done + rng.randint(1, 3)
            hit = _wait_for(proc, lambda: newest() >= target)  # noqa: B023 (called before target changes)
            time.sleep(rng.uniform(0.0, 0.2))
        if not hit:
            break
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        kills.append((moment, proc.returncode))
        latest = find_latest(run_dir)
        assert latest is not None and load_checkpoint(latest).meta["step"] >= done  # loadable, nothing lost
    assert len(kills) >= 2 and all(rc == -signal.SIGKILL for _, rc in kills), kills
    finish(start(*args, "train.run_name=killed"))
    assert not list(ckpts.glob("*.tmp"))
    assert_same_run(reference, run_dir)
