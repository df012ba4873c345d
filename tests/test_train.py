"""The training loop end to end on CPU: resume equivalence, CLI, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crystal.checkpoint import CheckpointError, find_latest, load_checkpoint
from crystal.metrics import read_metrics
from crystal.trainer import Trainer
from tests.conftest import FAST_DATA

REPO = Path(__file__).resolve().parent.parent
SMALL = ["model.n_layer=2", "train.seq_len=64", "train.micro_batch=4", "train.global_batch=8", "train.eval_every=1000",
         "train.log_every=1", "optim.warmup_steps=2"]  # fmt: skip


def run_trainer(cfg) -> Trainer:
    trainer = Trainer(cfg, log=lambda *_: None)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl", "train")}


def test_resume_continues_exactly_like_an_uninterrupted_run(fast_config):
    full = run_trainer(fast_config(*SMALL, "train.steps=6", "train.ckpt_every=3", "train.run_name=full"))
    # the first process stops after 3 of 6 steps (the LR schedule still spans 6)
    part = run_trainer(fast_config(*SMALL, "train.steps=6", "train.stop_after=3", "train.ckpt_every=3",
                                   "train.run_name=part"))  # fmt: skip
    resumed = run_trainer(fast_config(*SMALL, "train.steps=6", "train.ckpt_every=3", "train.run_name=part",
                                      "train.resume=latest"))  # fmt: skip
    assert resumed.step == 6
    a, b = train_losses(full.run_dir), train_losses(part.run_dir)
    assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)]  # bitwise equal floats
    ca, cb = load_checkpoint(find_latest(full.run_dir)), load_checkpoint(find_latest(part.run_dir))
    for group in ("model", "optimizer"):
        assert ca.tensors[group].keys() == cb.tensors[group].keys()
        for k in ca.tensors[group]:
            assert torch.equal(ca.tensors[group][k], cb.tensors[group][k]), k
    assert ca.meta["loader"] == cb.meta["loader"]


def test_checkpoint_contents(fast_config):
    t = run_trainer(fast_config(*SMALL, "train.steps=2", "train.ckpt_every=2"))
    ckpt = find_latest(t.run_dir)
    assert ckpt.name == "step-00000002"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.safetensors", "trainer.json", "config.yaml",
                                      "data_manifest.json", "chunk.json"}  # fmt: skip
    loaded = load_checkpoint(ckpt)
    assert "wte.weight" in loaded.tensors["model"] and "wte.weight.exp_avg_sq" in loaded.tensors["optimizer"]
    assert loaded.meta["step"] == 2 and loaded.meta["data_fingerprint"] == t.data.fingerprint
    assert loaded.meta["env"]["deterministic"] is True  # the CPU default: bitwise replay
    assert (t.run_dir / "checkpoints" / "latest").read_text().strip() == ckpt.name


def test_deterministic_mode_is_a_setting_off_by_default_on_gpu(fast_config):
    """torch.use_deterministic_algorithms on a GPU fills every torch.empty with NaN (a write per kernel output):
    off there unless asked for; on for CPU, where replay is bitwise. The checkpoint says which ran."""
    from crystal.utils import deterministic_mode

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert deterministic_mode(None, cuda) is False and deterministic_mode(None, cpu) is True
    assert deterministic_mode(True, cuda) is True
    try:
        t = Trainer(fast_config(*SMALL, "train.deterministic=false"), log=lambda *_: None)
        assert not torch.are_deterministic_algorithms_enabled()
        assert t.state_dict()["env"]["deterministic"] is False
    finally:
        torch.use_deterministic_algorithms(True, warn_only=True)  # what every other Trainer here sets


def test_refuses_to_overwrite_a_run_and_refuses_other_models(fast_config):
    t = run_trainer(fast_config(*SMALL, "train.steps=1", "train.ckpt_every=1"))
    with pytest.raises(CheckpointError, match="already holds a run.*train.resume=latest"):
        Trainer(fast_config(*SMALL, "train.steps=1"), log=lambda *_: None)
    with pytest.raises(CheckpointError, match="different model.*n_layer"):
        Trainer(fast_config(*SMALL, "model.n_layer=3", "train.steps=2", "train.resume=latest"), log=lambda *_: None)
    assert find_latest(t.run_dir) is not None  # nothing was lost


def test_corrupt_checkpoint_is_refused_with_the_file_named(fast_config):
    t = run_trainer(fast_config(*SMALL, "train.steps=1", "train.ckpt_every=1"))
    ckpt = find_latest(t.run_dir)
    path = ckpt / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="model.safetensors fails its sha256 check"):
        load_checkpoint(ckpt)


def test_resume_latest_says_which_corrupt_checkpoint_it_skipped(fast_config):
    t = run_trainer(fast_config(*SMALL, "train.steps=2", "train.ckpt_every=1"))
    newest = find_latest(t.run_dir)
    assert newest.name == "step-00000002"
    path = newest / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 1
    path.write_bytes(bytes(raw))
    lines: list[str] = []
    resumed = Trainer(fast_config(*SMALL, "train.steps=3", "train.ckpt_every=1", "train.resume=latest"),
                      log=lines.append)  # fmt: skip
    try:
        assert resumed.step == 1
        resumed.fit()
    finally:
        resumed.close()
    (said,) = [line for line in lines if "skipped" in line]
    assert "step-00000002" in said and "model.safetensors" in said and "at step 1" in said, said
    assert "\n" not in said
    events = [r for r in read_metrics(t.run_dir / "metrics.jsonl", "event")
              if r["event"] == "skipped_invalid_checkpoint"]  # fmt: skip
    assert len(events) == 1 and events[0]["checkpoint"].endswith("step-00000002"), events
    assert "model.safetensors" in events[0]["error"] and events[0]["resumed_from"].endswith("step-00000001")


def test_sources_without_held_out_documents_are_named_not_nan(fast_config, capsys):
    from omegaconf import OmegaConf

    from crystal.train import train

    # a fraction this small holds out no document of the fast slice (documents are picked by hash of their id)
    cfg = fast_config(*SMALL, "train.steps=1", "train.eval_every=1", "train.plots=false", "data.heldout_fraction=1e-7")
    train(OmegaConf.structured(cfg))
    out = capsys.readouterr().out
    said = [line for line in out.splitlines() if "no held-out loss" in line]
    assert said and "nan" not in out, out
    for name in ("python", "english"):
        assert name in said[-1], said
    assert "raise data.heldout_fraction (now 1e-07)" in said[-1] and "(0 of " in said[-1], said


def test_stage_transition_keeps_weights_and_restarts_the_schedule(fast_config):
    s1 = run_trainer(fast_config(*SMALL, "+stage=1", "train.steps=2", "train.ckpt_every=2", "train.run_name=s1"))
    s1_ckpt = find_latest(s1.run_dir)
    s2 = Trainer(fast_config(*SMALL, "+stage=2", "train.steps=1", "train.run_name=s2", f"train.resume={s1_ckpt}"),
                 log=lambda *_: None)  # fmt: skip
    try:
        assert s2.step == 0 and s2.loader.sample_index == 0
        weights = load_checkpoint(s1_ckpt).tensors["model"]
        assert torch.equal(s2.engine.state_dict()["model"]["wte.weight"], weights["wte.weight"])
    finally:
        s2.close()


def cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crystal.train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


@pytest.mark.slow
def test_cli_smoke_run_writes_metrics_and_a_checkpoint(tmp_path):
    out = cli(*FAST_DATA, *SMALL, "train.steps=3", "train.eval_every=3", "+stage=2", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "held-out loss" in out.stdout
    run = tmp_path / "outputs" / "default"
    assert find_latest(run) is not None
    rows = read_metrics(run / "metrics.jsonl")
    assert {r["kind"] for r in rows} >= {"train", "eval", "summary"}
    assert "stage: 2" in (run / "config.yaml").read_text()
    assert (run / "release_manifest.json").is_file() and (run / "plots" / "loss.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,message",
    [
        (["model=crystalcoder_13b"], "crystalcoder_13b"),
        (["train.stpes=3"], "stpes"),
        (["data.tokenizer.path=/nonexistent/tokenizer.model"], "tokenizer /nonexistent/tokenizer.model does not exist"),
        (["train.resume=/nonexistent/ckpt"], "train.resume=/nonexistent/ckpt: no such checkpoint"),
    ],
)
def test_cli_errors_are_one_clear_line(tmp_path, args, message):
    out = cli(*FAST_DATA, *args, cwd=tmp_path, timeout=120)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr
