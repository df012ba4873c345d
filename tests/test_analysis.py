"""Analysis360 on crystal runs and releases: memorization, KV-cached decoding, per-source / per-chunk loss."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from crystal.analysis import memorization as mem
from crystal.analysis.__main__ import analysis_config
from crystal.analysis.__main__ import main as analysis_main
from crystal.analysis.decode import greedy_decode
from crystal.analysis.timeline import AnalysisError, build_timeline, sample_positions
from crystal.config import ModelConfig
from crystal.metrics import read_metrics
from crystal.model import build_model
from tests.conftest import read_csv, train_run

SMALL = ["model.n_layer=2", "train.seq_len=64", "train.micro_batch=4", "train.global_batch=8",
         "train.eval_every=1000", "optim.warmup_steps=2"]  # fmt: skip
QUICK = ["sequences=6", "loss_sequences=4", "eval_batches=4", "batch_size=8", "progress=false", "device=cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, crystal_cache) -> Path:
    """6 steps of 8 x 64 tokens, a checkpoint every 2 steps: 3 checkpoints, 3 chunks of 16 samples."""
    return train_run(tmp_path_factory.mktemp("analysis_run"), *SMALL, "train.steps=6", "train.ckpt_every=2")


# -- decoding ----------------------------------------------------------------------------------------


def test_kv_cached_greedy_decode_equals_uncached():
    cfg = ModelConfig.from_name("tiny", n_layer=2, vocab_size=300, max_seq_len=64)
    model = build_model(cfg, seed=5)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # break the symmetry of a fresh init so the decoded tokens vary
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    prompts = torch.randint(0, 300, (5, 20), generator=gen)
    cached = greedy_decode(model, prompts, 16)
    assert torch.equal(cached, greedy_decode(model, prompts, 16, use_cache=False))
    assert len(set(cached.flatten().tolist())) > 3
    with pytest.raises(ValueError, match="max_seq_len"):
        greedy_decode(model, prompts, 60)


# -- the memorization score --------------------------------------------------------------------------


def test_memorization_is_near_one_on_overfit_sequences_and_near_zero_on_others():
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", n_layer=1, vocab_size=128, max_seq_len=64)
    model = build_model(cfg, seed=1)
    seen = torch.randint(0, 128, (8, 64))
    unseen = torch.randint(0, 128, (8, 64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):  # overfit: the 8 sequences by heart
        loss = model(seen[:, :-1], seen[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if loss.item() < 0.01:
            break
    counts_seen = mem.match_counts(model, seen, batch_size=4)
    counts_unseen = mem.match_counts(model, unseen, batch_size=4)
    token_match, full_match = mem.scores(counts_seen)
    assert token_match >= 0.95 and full_match >= 0.75, (loss.item(), counts_seen)
    assert mem.scores(counts_unseen)[0] <= 0.1
    assert np.array_equal(counts_seen, mem.match_counts(model, seen, batch_size=3))  # batching changes nothing
    assert mem.scores(np.array([32, 16, 0])) == (pytest.approx(0.5), pytest.approx(1 / 3))


def test_sampling_is_fixed_by_seed_and_chunk():
    a = sample_positions(100, 10, seed=0, chunk=3)
    assert np.array_equal(a, sample_positions(100, 10, seed=0, chunk=3))
    assert not np.array_equal(a, sample_positions(100, 10, seed=0, chunk=4))
    assert len(set(a.tolist())) == 10 and np.all(np.diff(a) > 0)
    assert np.array_equal(sample_positions(5, 10, seed=0, chunk=0), np.arange(5))  # a small chunk: all of it


# -- a run directory ---------------------------------------------------------------------------------


def test_chunk_k_is_what_training_consumed_between_checkpoints(run_dir):
    tl = build_timeline([run_dir])
    assert [c.step for c in tl.checkpoints] == [2, 4, 6]
    assert [c.checkpoint for c in tl.chunks] == [0, 1, 2]
    loader = tl.runs[0].loader()
    chunk1 = tl.chunks[1].reader
    assert chunk1.num_samples == 16
    tokens, sources = chunk1.rows(np.arange(16))
    batch = loader.batch_from_samples(range(16, 32))  # steps 3 and 4 of training
    assert torch.equal(torch.from_numpy(tokens[:, :-1]), batch.input_ids)
    assert set(sources) <= set(loader.names)


def test_memorization_of_a_run_one_cell_per_checkpoint_and_chunk_and_deterministic(run_dir, tmp_path):
    acfg = analysis_config(QUICK)
    tl = build_timeline([run_dir])
    table = mem.memorization(tl, acfg)
    assert table.token_match.shape == (3, 3) and np.isfinite(table.token_match).all()
    again = mem.memorization(tl, acfg)
    assert np.array_equal(table.counts, again.counts) and np.array_equal(table.positions, again.positions)
    # seen = the checkpoint at or after the chunk; steps since = the difference
    assert np.isnan(table.steps_since_seen[0, 1]) and table.steps_since_seen[2, 0] == 4
    files = mem.save_outputs(table, tmp_path, curves=2)
    rows = read_csv(files["csv"])
    assert len(rows) == 9 and len({(r["checkpoint"], r["chunk"]) for r in rows}) == 9
    assert {r["sequences"] for r in rows} == {"6"}
    import matplotlib.image

    for key in ("heatmap", "by_chunk", "histogram", "recency"):
        assert matplotlib.image.imread(files[key]).shape[0] > 100, key


def test_cli_all_writes_every_table_and_figure_and_heldout_matches_training(run_dir, tmp_path, capsys):
    out = tmp_path / "analysis"
    assert analysis_main(["all", str(run_dir), "--out", str(out), *QUICK]) == 0
    names = {p.name for p in out.iterdir()}
    assert names >= {"memorization.csv", "memorization_heatmap.png", "memorization_by_chunk.png",
                     "memorization_histogram.png", "memorization_recency.png", "memorization_sequences.npz",
                     "heldout_loss.csv", "heldout_loss.png", "chunk_loss.csv", "chunk_loss.png"}  # fmt: skip
    heldout = read_csv(out / "heldout_loss.csv")
    last = {r["source"]: float(r["loss"]) for r in heldout if r["step"] == "6"}
    trained = [r for r in read_metrics(run_dir / "metrics.jsonl", "eval") if r["step"] == 6][-1]
    for source in ("python", "english", "heldout"):  # the trainer's own held-out windows and numbers
        assert last[source] == pytest.approx(trained[source], rel=1e-5)
    chunk_rows = read_csv(out / "chunk_loss.csv")
    overall = [r for r in chunk_rows if r["source"] == "all"]
    assert len(overall) == 9
    # training on a chunk lowers its loss: each chunk's loss at its own checkpoint beats the first checkpoint's
    loss = {(int(r["step"]), int(r["chunk"])): float(r["loss"]) for r in overall}
    assert loss[(6, 2)] < loss[(2, 2)]
    assert analysis_main(["memorization", str(tmp_path / "missing")]) == 1
    assert analysis_main(["memorization", str(run_dir), "sequencez=3"]) == 1
    assert "sequencez" in capsys.readouterr().err


# -- a release directory (Amber's chunk layout) ------------------------------------------------------


def write_release(run_dir: Path, out: Path, with_manifest: bool) -> Path:
    """A release as issue 5 lays it out: data/train_{k:03}.jsonl in Amber's layout, checkpoints/ckpt_{k:03}."""
    tl = build_timeline([run_dir])
    chunks = []
    for k, (ref, chunk) in enumerate(zip(tl.checkpoints, tl.chunks)):
        tokens, sources = chunk.reader.rows(np.arange(chunk.reader.num_samples))
        data = out / "data" / f"train_{k:03d}.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        with open(data, "w") as f:
            for t, s in zip(tokens, sources):
                f.write(json.dumps({"token_ids": t.tolist(), "source": s}) + "\n")
        shutil.copytree(ref.path, out / "checkpoints" / f"ckpt_{k:03d}")
        chunks.append({"chunk": k, "data": f"data/train_{k:03d}.jsonl", "checkpoint": f"checkpoints/ckpt_{k:03d}"})
    if with_manifest:
        (out / "manifest.json").write_text(json.dumps({"chunks": chunks}))
    return out


@pytest.mark.parametrize("with_manifest", [True, False])
def test_a_release_gives_the_same_memorization_as_its_run(run_dir, tmp_path, with_manifest):
    release = write_release(run_dir, tmp_path / "release", with_manifest)
    acfg = analysis_config(QUICK)
    from_release = mem.memorization(build_timeline([release]), acfg)
    from_run = mem.memorization(build_timeline([run_dir]), acfg)
    assert np.array_equal(from_release.counts, from_run.counts)
    assert from_release.checkpoints == ["ckpt_000", "ckpt_001", "ckpt_002"]


def test_a_release_without_matching_chunks_is_refused(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "train_000.jsonl").write_text('{"token_ids": [1, 2, 3]}\n')
    with pytest.raises(AnalysisError, match="1 train_.*jsonl chunk files and 0 checkpoints"):
        build_timeline([tmp_path / "r"])


def test_stage_boundaries_across_runs(run_dir, tmp_path):
    stage2 = tmp_path / "s2"
    shutil.copytree(run_dir, stage2)
    for meta_path in stage2.glob("checkpoints/step-*/trainer.json"):
        meta = json.loads(meta_path.read_text())
        meta_path.write_text(json.dumps({**meta, "stage": 2}))
    tl = build_timeline([run_dir, stage2])
    assert [c.global_step for c in tl.checkpoints] == [2, 4, 6, 8, 10, 12]
    assert len(tl.chunks) == 6 and tl.chunks[4].end_global_step == 10
    assert tl.stage_boundaries == [(6, tl.checkpoints[2].global_tokens, 2)]
    assert tl.checkpoints[3].label == "s2/step-00000002"
    assert [c.step for c in tl.select([4]).checkpoints] == [4, 4]
