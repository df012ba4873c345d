"""Checkpoints: contents, integrity, compatibility checks, retention, background writes, output-dir failures."""

from __future__ import annotations

import errno
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

import crystal.checkpoint as ckpt_mod
from crystal.checkpoint import (
    AsyncCheckpointer,
    CheckpointError,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    read_manifest,
    write_checkpoint,
)
from crystal.metrics import read_metrics
from crystal.trainer import Trainer

TINY = ["model.n_layer=1", "train.seq_len=32", "train.micro_batch=4", "train.global_batch=4", "train.eval_every=1000",
        "train.eval_batches=1", "optim.warmup_steps=2", "train.plots=false"]  # fmt: skip


def run_trainer(cfg) -> Trainer:
    trainer = Trainer(cfg, log=lambda *_: None)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer


def flip_byte(path: Path, offset: int = -5) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 1
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """Seven steps, release checkpoints every 3, keep checkpoints every step (last 2 kept)."""
    from tests.conftest import FAST_DATA, compose_config

    out = tmp_path_factory.mktemp("ckpt_run")
    cfg = compose_config([*FAST_DATA, *TINY, f"train.out_dir={out}", "train.steps=7", "train.ckpt_every=3",
                          "train.ckpt_keep_every=1", "train.ckpt_keep_last=2"])  # fmt: skip
    return run_trainer(cfg).run_dir


def test_checkpoint_holds_everything_a_resume_and_an_audit_need(small_run):
    ckpt = load_checkpoint(small_run / "checkpoints" / "step-00000006")
    manifest = read_manifest(ckpt.path)
    assert manifest["kind"] == "release" and manifest["git_commit"] and manifest["step"] == 6
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.safetensors", "trainer.json", "config.yaml",
                                      "data_manifest.json", "chunk.json"}  # fmt: skip
    model, optim = ckpt.tensors["model"], ckpt.tensors["optimizer"]
    assert all(t.dtype == torch.float32 for t in model.values())  # the fp32 master weights
    for name in model:
        if name != "lm_head.weight":  # tied to wte: one tensor, one optimizer state
            assert {f"{name}.exp_avg", f"{name}.exp_avg_sq", f"{name}.step"} <= set(optim), name
    meta = ckpt.meta
    assert meta["step"] == 6 and meta["tokens"] == 6 * 4 * 32
    assert meta["loader"]["sample_index"] == 24 and meta["loader"]["excluded"] == []
    assert set(meta["rng"]) >= {"torch_cpu", "numpy", "python"}
    assert meta["metrics"]["cursor"] > 0 and "recent" in meta["faults"]
    assert meta["data_fingerprint"] and meta["tokenizer_sha256"] and meta["git_commit"]
    assert meta["ends_chunk"] == 1 and meta["chunk"] == 2 and meta["chunk_start"] == [24, 6]
    data_manifest = json.loads((ckpt.path / "data_manifest.json").read_text())
    assert data_manifest["fingerprint"] == meta["data_fingerprint"]
    chunk = json.loads((ckpt.path / "chunk.json").read_text())
    assert chunk["chunk"] == 1 and chunk["sample_range"] == [12, 24] and chunk["steps"] == [3, 6]
    assert chunk["num_tokens"] == 3 * 4 * 32 and len(chunk["tokens_sha256"]) == 64
    assert "train:" in ckpt.config_yaml and "n_layer: 1" in ckpt.config_yaml


def test_retention_keeps_release_checkpoints_and_the_last_n(small_run):
    steps = [int(p.name[5:]) for p in list_checkpoints(small_run)]
    # release: 0 (start), 3, 6, 7 (last step); keep-interval ones 1, 2, 4, 5 -> only the newest two survive
    assert steps == [0, 3, 4, 5, 6, 7]
    assert (small_run / "checkpoints" / "latest").read_text().strip() == "step-00000007"
    assert not [p for p in (small_run / "checkpoints").iterdir() if p.name.endswith((".tmp", ".deleting"))]


@pytest.mark.parametrize(
    "name",
    [
        "model.safetensors",
        "optimizer.safetensors",
        "trainer.json",
        "config.yaml",
        "data_manifest.json",
        "chunk.json",
        "manifest.json",
    ],  # fmt: skip
)
def test_a_flipped_byte_in_any_checkpoint_file_is_refused(small_run, tmp_path, name):
    copy = tmp_path / "step-00000003"
    shutil.copytree(small_run / "checkpoints" / "step-00000003", copy)
    flip_byte(copy / name, offset=len((copy / name).read_bytes()) // 2)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(copy)
    assert str(copy) in str(err.value)
    if name != "manifest.json":  # a flip in the manifest shows up as a bad hash of some file, or bad JSON
        assert f"{name} fails its sha256 check" in str(err.value)


def test_resume_refuses_a_checkpoint_from_other_data_naming_the_fingerprints(small_run, fast_config, tmp_path):
    src = load_checkpoint(small_run / "checkpoints" / "step-00000006")
    meta = {**src.meta, "data_fingerprint": "0123456789ab" + "0" * 52}
    forged = write_checkpoint(tmp_path / "other", 6, src.tensors, meta, src.config_yaml)
    cfg = fast_config(*TINY, "train.steps=8", f"train.resume={forged}")
    with pytest.raises(CheckpointError, match=r"trained on data fingerprint 0123456789ab, this run's data is \w{12}"):
        Trainer(cfg, log=lambda *_: None)


def test_background_write_copies_the_state_first_and_a_second_save_waits(tmp_path, monkeypatch):
    real_write, spans = ckpt_mod.write_checkpoint, []

    def slow_write(run_dir, step, tensors, *args):
        start = time.perf_counter()
        time.sleep(0.3)
        out = real_write(run_dir, step, tensors, *args)
        spans.append((start, time.perf_counter()))
        return out

    monkeypatch.setattr(ckpt_mod, "write_checkpoint", slow_write)
    weights = {"model": {"w": torch.zeros(4)}, "optimizer": {}}
    saver = AsyncCheckpointer()
    saver.save(tmp_path, 1, weights, {"step": 1}, "x: 1\n")
    weights["model"]["w"] += 1  # training goes on while the write runs
    saver.save(tmp_path, 2, weights, {"step": 2}, "x: 1\n")
    saver.wait()
    assert spans[0][1] <= spans[1][0]  # never two writes at once
    written = lambda step: load_checkpoint(tmp_path / "checkpoints" / f"step-{step:08d}").tensors["model"]["w"]
    assert torch.equal(written(1), torch.zeros(4)) and torch.equal(written(2), torch.ones(4))


def test_tensors_stream_to_the_bytes_safetensors_writes(tmp_path):
    """The checkpoint writer streams tensors (views of one buffer too, as the streaming store hands them out) and
    writes exactly what safetensors' save_file writes for their copies, so hashes do not depend on the writer."""
    from safetensors.torch import save_file

    flat = torch.arange(20, dtype=torch.float32)
    tensors = {"b.weight": flat[:12].view(3, 4), "a.bias": flat[12:17], "a.bias.step": torch.tensor(3.0),
               "ids": torch.arange(3), "half": torch.randn(3).bfloat16(), "empty": torch.zeros(0)}  # fmt: skip
    ckpt_mod.save_tensors(tensors, tmp_path / "ours.safetensors", metadata={"format": "1"})
    save_file({k: v.clone() for k, v in tensors.items()}, str(tmp_path / "ref.safetensors"), metadata={"format": "1"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    lazy = ckpt_mod.LazyTensors(tmp_path / "ours.safetensors")  # read back one tensor at a time
    assert sorted(lazy) == sorted(tensors) and all(torch.equal(lazy[k], v) for k, v in tensors.items())


def test_unwritable_output_dir_fails_before_training(fast_config, tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the output directory should be")
    with pytest.raises(CheckpointError, match="cannot write to output directory .*train.out_dir"):
        Trainer(fast_config(*TINY, f"train.out_dir={blocker}"), log=lambda *_: None)


def test_full_disk_fails_before_training(fast_config, monkeypatch):
    monkeypatch.setattr(ckpt_mod.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(CheckpointError, match="only 1 MB free under .* need about"):
        Trainer(fast_config(*TINY), log=lambda *_: None)


def test_disk_full_during_a_save_stops_training_with_a_clear_error(fast_config, monkeypatch):
    trainer = Trainer(fast_config(*TINY, "train.steps=8", "train.ckpt_every=2"), log=lambda *_: None)
    real_save, calls = ckpt_mod.save_tensors, []

    def save_tensors(tensors, path, metadata=None):
        calls.append(path)
        if "step-00000002" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt_mod, "save_tensors", save_tensors)
    with pytest.raises(CheckpointError, match=r"step-00000002 failed .*No space left.*the disk is full.*step-00000000"):
        trainer.fit()
    trainer.close()
    assert trainer.step <= 4  # stopped at the next poll or save, not at the end (8)
    assert find_latest(trainer.run_dir).name == "step-00000000"
    assert not list((trainer.run_dir / "checkpoints").glob("*.tmp"))


def test_resuming_from_an_older_checkpoint_sets_the_newer_ones_aside(fast_config):
    cfg = lambda *extra: fast_config(*TINY, "train.steps=3", "train.ckpt_every=1", *extra)
    first = run_trainer(cfg())
    original = load_checkpoint(first.run_dir / "checkpoints" / "step-00000003").tensors
    again = run_trainer(cfg(f"train.resume={first.run_dir / 'checkpoints' / 'step-00000001'}"))
    assert [p.name for p in (again.run_dir / "checkpoints" / "superseded-at-1").iterdir()] != []
    replayed = load_checkpoint(find_latest(again.run_dir)).tensors
    assert all(torch.equal(original["model"][k], replayed["model"][k]) for k in original["model"])


def test_resume_refuses_changed_settings_unless_allowed(small_run, fast_config):
    same = [*TINY, "train.steps=7", "train.ckpt_every=3", "train.ckpt_keep_every=1",
            f"train.resume={small_run / 'checkpoints' / 'step-00000006'}"]  # fmt: skip
    with pytest.raises(CheckpointError, match=r"changed settings \(optim.lr: 0.006 -> 0.001\).*allow_config_change"):
        Trainer(fast_config(*same, "optim.lr=0.001"), log=lambda *_: None)
    trainer = Trainer(fast_config(*same, "optim.lr=0.001", "train.allow_config_change=true"), log=lambda *_: None)
    trainer.close()
    events = [r for r in read_metrics(trainer.run_dir / "metrics.jsonl", "event") if r["event"] == "config_changed"]
    assert events[0]["changed"] == ["optim.lr"]
    Trainer(fast_config(*same, "train.eval_every=5", "train.ckpt_keep_last=9"), log=lambda *_: None).close()
    longer = Trainer(fast_config(*same, "train.steps=9"), log=lambda *_: None)  # extending a run is allowed
    longer.close()
    events = [r for r in read_metrics(longer.run_dir / "metrics.jsonl", "event") if r["event"] == "steps_changed"]
    assert (events[-1]["was"], events[-1]["now"]) == (7, 9)


def test_a_checkpoint_moves_between_backends_and_the_move_is_an_event(small_run, fast_config, tmp_path):
    """Settings of a backend the resumed run does not use are not compared; the switch itself is recorded."""
    from omegaconf import OmegaConf

    source = load_checkpoint(small_run / "checkpoints" / "step-00000006")
    # The same state as a cerebras run with cstorch's own AdamW would have saved it (the main environment cannot
    # run cstorch; tests/test_cerebras_lane.py moves real cerebras checkpoints).
    yaml = OmegaConf.create(source.config_yaml)
    yaml.backend.name, yaml.backend.cerebras.adamw = "cerebras", "cstorch"
    cs = write_checkpoint(tmp_path / "cerebras_run", 6, source.tensors, source.meta, OmegaConf.to_yaml(yaml))
    moves = {"from_cs": (cs, "backend=resident"), "to_streaming": (source.path, "backend=streaming")}
    rows = {}
    for name, (path, backend) in moves.items():
        trainer = Trainer(fast_config(*TINY, "train.steps=7", "train.ckpt_every=3", f"train.run_name={name}", backend,
                                      f"train.resume={path}"), log=lambda *_: None)  # fmt: skip
        trainer.close()
        assert trainer.step == 6
        rows[name] = [r for r in read_metrics(trainer.run_dir / "metrics.jsonl", "event")
                      if r["event"] == "backend_changed"]  # fmt: skip
    (cs_row,), (streaming_row,) = rows["from_cs"], rows["to_streaming"]
    assert (cs_row["from"], cs_row["to"], cs_row["step"]) == ("cerebras", "resident", 6)
    assert cs_row["adamw"] == ["cstorch", "torch"]  # the equation changes with this move, and the event says so
    assert cs_row["from_settings"]["backend.cerebras.adamw"] == "cstorch" and cs_row["to_settings"] == {}
    assert (streaming_row["from"], streaming_row["to"], streaming_row["adamw"]) == (
        "resident",
        "streaming",
        ["torch"] * 2,
    )
