"""Faults (skip, rollback + window exclusion, replay), metrics (rows, plots, TensorBoard) and the release
(build, verify, tamper detection), all on one small run that meets a NaN, a NaN streak and a loss spike."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from crystal.checkpoint import find_latest, list_checkpoints, load_checkpoint
from crystal.errors import TrainingError
from crystal.metrics import MetricsLogger, read_metrics
from crystal.trainer import Trainer
from tests.conftest import FAST_DATA, compose_config

TINY = ["model.n_layer=1", "train.seq_len=32", "train.micro_batch=2", "train.global_batch=4", "train.eval_every=1000",
        "train.eval_batches=1", "optim.warmup_steps=2", "train.plots=false"]  # fmt: skip
# Batch 4, so step n (1-based) reads samples [4(n-1), 4n) until something is excluded.
#   step 2: NaN -> skipped and counted (one is not enough to roll back)
#   steps 4, 5: NaN twice in a row (max_nonfinite=2) -> back to step 3, samples [12, 20) excluded
#   raw step 8's samples [28, 32) get a x1000 loss: after the first exclusion step 6 reads them -> spike
#   -> back to step 5, samples [28, 32) excluded
FAULTY = [*TINY, "train.steps=8", "train.ckpt_every=3", "train.ckpt_keep_every=1", "train.ckpt_keep_last=2",
          "train.debug_nan_steps=[2,4,5]", "train.debug_spike_steps=[8]", "train.max_nonfinite=2",
          "train.spike_factor=2.0", "train.spike_window=3"]  # fmt: skip


def run(out: Path, *overrides: str) -> Trainer:
    trainer = Trainer(compose_config([*FAST_DATA, f"train.out_dir={out}", *overrides]), log=lambda *_: None)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer


def tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory) -> Path:
    return run(tmp_path_factory.mktemp("faulty"), *FAULTY, "train.run_name=faulty").run_dir


@pytest.fixture(scope="module")
def release_dir(faulty_run, tmp_path_factory) -> Path:
    from crystal.release import build

    out = tmp_path_factory.mktemp("release") / "rel"
    build(faulty_run, out, log=lambda *_: None)
    return out


# -- faults ------------------------------------------------------------------------------------


def test_a_nonfinite_step_is_skipped_and_counted(faulty_run):
    rows = {r["step"]: r for r in read_metrics(faulty_run / "metrics.jsonl", "train")}
    assert rows[2]["skipped"] is True and rows[2]["loss"] == "nan"
    assert not any(rows[s]["skipped"] for s in (1, 3, 4, 5, 6, 7, 8))
    meta = load_checkpoint(find_latest(faulty_run)).meta
    assert meta["skipped_steps"] == 1 and meta["step"] == 8


def test_a_nan_streak_and_a_spike_roll_back_and_exclude_their_window(faulty_run):
    events = [r for r in read_metrics(faulty_run / "metrics.jsonl", "event") if r["event"] == "rollback"]
    assert [(e["reason"].split(" ")[0:2], e["to_checkpoint"], e["excluded_samples"]) for e in events] == [
        (["2", "non-finite"], "step-00000003", [12, 20]),
        (["loss", "spike"], "step-00000005", [28, 32]),
    ]
    meta = load_checkpoint(find_latest(faulty_run)).meta
    assert meta["rollbacks"] == 2
    assert meta["loader"]["excluded"] == [[12, 20], [28, 32]]  # in the checkpoint: every later resume skips them
    assert [w["samples"] for w in meta["skipped_windows"]] == [[12, 20], [28, 32]]
    train = read_metrics(faulty_run / "metrics.jsonl", "train")
    assert [r["step"] for r in train] == list(range(1, 9))  # one consistent history
    assert [r["step"] for r in train if r["rolled_back"]] == [4, 6]
    assert [r["samples"] for r in train[3:6]] == [[20, 24], [24, 28], [32, 36]]
    replaced = read_metrics(faulty_run / "metrics.replaced.jsonl", "train")
    assert [r["step"] for r in replaced if r.get("fault")] == [5, 6]  # the offending rows are kept aside
    assert (faulty_run / "checkpoints" / "rolled-back-1").is_dir()


def test_a_replay_of_a_rolled_back_run_is_identical(faulty_run, tmp_path):
    again = run(tmp_path, *FAULTY, "train.run_name=again").run_dir
    a, b = load_checkpoint(find_latest(faulty_run)), load_checkpoint(find_latest(again))
    assert tensors_equal(a.tensors["model"], b.tensors["model"])
    assert tensors_equal(a.tensors["optimizer"], b.tensors["optimizer"])
    assert a.meta["loader"] == b.meta["loader"]
    losses = lambda d: [r["loss"] for r in read_metrics(d / "metrics.jsonl", "train")]
    assert losses(faulty_run) == losses(again)


def test_too_many_rollbacks_stop_with_a_clear_error(tmp_path):
    with pytest.raises(TrainingError, match="after 0 rollbacks .*train.max_rollbacks.*lower optim.lr"):
        run(tmp_path, *TINY, "train.steps=3", "train.debug_nan_steps=[1,2]", "train.max_nonfinite=2",
            "train.max_rollbacks=0")  # fmt: skip


# -- metrics -----------------------------------------------------------------------------------


def test_metrics_rows_per_step_and_per_checkpoint(faulty_run):
    rows = read_metrics(faulty_run / "metrics.jsonl")
    for r in (r for r in rows if r["kind"] == "train"):
        assert set(r) >= {"step", "tokens", "loss", "lr", "grad_norm", "tok_s", "mfu", "chunk", "skipped",
                          "rolled_back", "samples"}  # fmt: skip
    assert [r["chunk"] for r in rows if r["kind"] == "train"] == [0, 0, 0, 1, 1, 1, 2, 2]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [(r["checkpoint"], r["chunk"]) for r in evals] == [
        ("step-00000000", None), ("step-00000003", 0), ("step-00000006", 1), ("step-00000008", 2)
    ]  # fmt: skip
    sources = set(json.loads((faulty_run / "data_manifest.json").read_text())["sources"])
    assert all("heldout" in r and len(sources & set(r)) >= 2 for r in evals)  # per source (those with held-out text)


def test_plot_draws_every_png(faulty_run, tmp_path, capsys):
    from crystal.metrics import main

    assert main(["plot", str(faulty_run), "--out", str(tmp_path)]) == 0
    names = {p.name for p in tmp_path.glob("*.png")}
    assert names == {"loss.png", "loss_per_source.png", "lr.png", "grad_norm.png", "throughput.png", "overview.png"}
    assert all(p.stat().st_size > 5000 for p in tmp_path.glob("*.png"))
    assert main(["plot", str(tmp_path / "nope")]) == 1
    assert "metrics.jsonl does not exist" in capsys.readouterr().err


def test_tensorboard_gets_the_same_scalars_when_installed(tmp_path, monkeypatch):
    scalars = []

    class FakeWriter:
        def __init__(self, logdir, purge_step=None):
            self.logdir = logdir

        def add_scalar(self, tag, value, global_step):
            scalars.append((tag, value, global_step))

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    log = MetricsLogger(tmp_path / "metrics.jsonl", tmp_path / "tb")
    log.log("train", step=3, loss=2.5, skipped=False, samples=[0, 4])
    log.log("event", event="rollback", step=3)
    log.close()
    assert scalars == [("train/loss", 2.5, 3)]


def test_a_row_cut_short_by_a_kill_is_ignored(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1}\n{"kind": "tra')
    assert read_metrics(path) == [{"kind": "train", "step": 1}]


# -- release -----------------------------------------------------------------------------------


def test_release_layout_ties_chunks_checkpoints_and_metrics(release_dir, faulty_run):
    manifest = json.loads((release_dir / "manifest.json").read_text())
    assert [c["chunk"] for c in manifest["chunks"]] == [0, 1, 2]
    assert sorted(manifest["checkpoints"]) == ["ckpt_000", "ckpt_001", "ckpt_002", "init"]
    c1 = manifest["chunks"][1]
    assert c1["start_checkpoint"] == "checkpoints/ckpt_000" and c1["checkpoint"] == "checkpoints/ckpt_001"
    assert c1["steps"] == [3, 6] and c1["sample_range"] == [12, 36] and c1["excluded"] == [[12, 20], [28, 32]]
    lines = (release_dir / "data" / "train_001.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["sample_index"] for r in rows] == [*range(20, 28), *range(32, 36)]  # exactly what steps 4-6 read
    sources = set(json.loads((release_dir / "tokenizer" / "data_manifest.json").read_text())["sources"])
    assert all(len(r["token_ids"]) == 33 and r["source"] in sources and r["doc_ids"] for r in rows)
    record = json.loads((release_dir / "data" / "train_001.record.json").read_text())
    trained = json.loads((faulty_run / "checkpoints" / "step-00000006" / "chunk.json").read_text())
    assert record["tokens_sha256"] == trained["tokens_sha256"]  # regenerated from the recipe == what was trained
    assert record["num_tokens"] == sum(record["tokens_per_source"].values()) == 12 * 32
    for rel, digest in manifest["files"].items():
        assert (release_dir / rel).is_file() and len(digest) == 64
    for name in ("configs/stage-0.yaml", "tokenizer/tokenizer.model", "metrics/metrics.jsonl"):
        assert name in manifest["files"]


def test_the_run_directory_describes_its_release(faulty_run):
    from crystal.release import describe_run

    desc = describe_run(faulty_run)
    assert [(c["chunk"], c["checkpoint"], c["steps"]) for c in desc["chunks"]] == [
        (0, "step-00000003", [0, 3]), (1, "step-00000006", [3, 6]), (2, "step-00000008", [6, 8])
    ]  # fmt: skip
    assert desc["init_checkpoint"] == "step-00000000" and desc["started_from"] is None
    assert [w["samples"] for w in desc["rollbacks"]] == [[12, 20], [28, 32]] and desc["skipped_steps"] == 1


def test_verify_replays_every_chunk_bitwise(release_dir):
    from crystal.release import verify

    lines = []
    verdicts = verify(release_dir, log=lines.append)
    assert [v.chunk for v in verdicts] == [0, 1, 2] and all(v.ok for v in verdicts), lines
    assert all(v.tensors_equal == v.tensors_total > 0 for v in verdicts)
    assert [v.losses_equal for v in verdicts] == [3, 3, 2]  # the skipped step's NaN included
    assert "bitwise equal" in lines[1]


@pytest.mark.parametrize("target", ["data/train_001.jsonl", "checkpoints/ckpt_001/optimizer.safetensors",
                                    "checkpoints/ckpt_000/model.safetensors", "metrics/metrics.jsonl"])  # fmt: skip
def test_verify_names_an_altered_file(release_dir, tmp_path, target):
    from crystal.release import ReleaseError, verify_chunk

    copy = tmp_path / "rel"
    shutil.copytree(release_dir, copy)
    path = copy / target
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(ReleaseError, match=f"{path} was altered"):
        verify_chunk(copy, 1, log=lambda *_: None)


def test_verify_catches_altered_data_even_with_a_matching_manifest(release_dir, tmp_path, capsys):
    from crystal.release import main
    from crystal.tokenizer import file_sha256

    copy = tmp_path / "rel"
    shutil.copytree(release_dir, copy)
    path = copy / "data" / "train_002.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["token_ids"][5] = (rows[0]["token_ids"][5] + 1) % 500
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["data/train_002.jsonl"] = file_sha256(path)  # a forger who also rewrites the manifest
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(copy), "--chunk", "2"]) == 1
    out = capsys.readouterr()
    assert "MISMATCH" in out.out and "do not reproduce their checkpoints" in out.err
    assert main(["verify", str(copy), "--chunk", "7"]) == 1
    assert "has no chunk 7" in capsys.readouterr().err


def test_release_needs_checkpoints(tmp_path):
    from crystal.release import ReleaseError, build

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ReleaseError, match="0 release checkpoint"):
        build(tmp_path / "run", tmp_path / "out")
    assert list_checkpoints(tmp_path / "run") == []
