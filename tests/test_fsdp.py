"""backend=fsdp on CPU over gloo: 2 and 4 ranks equal one resident process on the same global batch (clipping,
accumulation, activation checkpointing, HSDP, the NaN skip), checkpoints interchange with backend=resident both
ways and across world sizes, the docs' torchrun command runs end to end, bad setups get one-line errors.

Tolerance (the reduction order): each rank sums its own micro-batches' gradients, the reduce-scatter adds the
ranks' sums, the global norm adds the ranks' squares. fp32 rounding of those sums changes losses and gradient
norms by ~1e-7 relative (asserted: 1e-5). Adam turns that rounding into a full step of arbitrary sign for an
element whose gradient is ~0 (the attention's key biases, whose exact gradient is zero), so weights are held to:
99.9% of a checkpoint's elements within 1e-5, every element within 2 x lr per step taken.

Spawns are few (one 2-rank and one 4-rank group, two torchrun jobs), and each checks many things."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from crystal.streaming.backends.base import AdamWSettings

from crystal.checkpoint import find_latest, load_checkpoint
from crystal.config import ModelConfig
from crystal.metrics import read_metrics
from crystal.model import build_model
from tests.conftest import FAST_DATA
from tests.test_streaming import CPU, VOCAB, _free_port, batches, make_engine
from tests.test_train import REPO, SMALL, run_trainer, train_losses

pytestmark = pytest.mark.usefixtures("one_thread")

LR, STEPS, MICRO = 1e-3, 3, 8  # 8 one-row micro-batches per step: 4 per rank at 2 ranks, 2 at 4 (accumulation)
DOC_COMMAND = "torchrun --nproc_per_node=2 -m crystal.train backend=fsdp train.device=cpu"


def step_batches(step: int) -> list:
    return batches(step, MICRO, rows=1)


def assert_close_states(got: dict, ref: dict, lr_steps: float) -> None:
    """Equal within the reduction order (module docstring): optimizer moments and steps included."""
    for group in ("model", "optimizer"):
        assert got[group].keys() == ref[group].keys(), group
        far, total = 0, 0
        for k, v in ref[group].items():
            diff = (got[group][k].double() - v.double()).abs()
            assert diff.max() <= 2 * lr_steps, (group, k, diff.max())
            far, total = far + int((diff > 1e-5).sum()), total + diff.numel()
        assert far <= 1e-3 * total, (group, far, total)


def fsdp_engine(**options):
    from crystal.streaming.backends.fsdp import FSDPEngine

    from crystal.trainer import CrystalAdapter, param_group_specs

    model = build_model(ModelConfig.from_name("tiny", n_layer=2, vocab_size=VOCAB), device="cpu", seed=0)
    adapter = CrystalAdapter(model, doc_masking=True)
    settings = AdamWSettings((0.9, 0.95), 1e-9, 0.05)  # clip 0.05: clipping active in every step
    return FSDPEngine(adapter, param_group_specs(model, 0.1), settings, CPU, None, **options), adapter


def _ranks(rank: int, world: int, port: int, out: str) -> None:
    """One process group: training steps vs the resident reference, a NaN on one rank, a resident state loaded
    and continued. At 4 ranks with activation checkpointing, HSDP (2 replicas x 2 shards) and a reduce-scatter
    per micro-batch; at 2 ranks with the default: 4 micro-batches accumulated locally, one reduce-scatter."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        options = (
            {"activation_checkpointing": True, "dp_replicate": 2, "grad_sync": "micro_batch"} if world == 4 else {}
        )
        engine, adapter = fsdp_engine(**options)
        results = [engine.train_step(step_batches(step)[rank::world], LR) for step in range(STEPS)]
        held_out = engine.eval_loss(batches(99, 1)[0])
        trained = engine.state_dict()
        adapter.poison = {0: float("nan")} if rank == world - 1 else {}  # one rank's loss is NaN
        nan = engine.train_step(step_batches(STEPS)[rank::world], LR)
        after_nan = engine.state_dict()
        adapter.poison = {}
        # interchange: the resident engine's state after step 1, continued here for steps 2..STEPS
        again, _ = fsdp_engine(**options)
        again.load_state_dict(torch.load(f"{out}/resident1.pt"))
        for step in range(1, STEPS):
            again.train_step(step_batches(step)[rank::world], LR)
        continued = again.state_dict()
        if rank == 0:
            results = [dataclasses.astuple(r) for r in results]  # (loss, grad_norm, skipped, tokens)
            torch.save({"results": results, "held_out": held_out, "trained": trained, "nan": nan.skipped,
                        "after_nan": after_nan, "continued": continued}, f"{out}/world{world}.pt")  # fmt: skip
        else:
            assert trained == {"model": {}, "optimizer": {}}  # only rank 0 receives the gathered state
    finally:
        dist.destroy_process_group()


def test_fsdp_on_2_and_4_ranks_equals_resident_on_one(tmp_path, monkeypatch):
    # children unpickle _ranks from tests.test_fsdp: they need the checkout on their sys.path. A forkserver that
    # has imported torch, FSDP and this module once forks every rank of both groups (6 spawns would import 6 times).
    monkeypatch.setattr(sys, "path", [*sys.path, str(REPO)])
    multiprocessing.set_forkserver_preload(["tests.test_fsdp", "crystal.streaming.backends.fsdp"])
    resident = make_engine("resident", 2)
    ref = []
    for step in range(STEPS):
        ref.append(resident.train_step(step_batches(step), LR))
        if step == 0:
            torch.save(resident.state_dict(), tmp_path / "resident1.pt")
    ref_held_out, ref_state = resident.eval_loss(batches(99, 1)[0]), resident.state_dict()
    for world in (2, 4):
        mp.start_processes(_ranks, args=(world, _free_port(), str(tmp_path)), nprocs=world, start_method="forkserver")
        got = torch.load(tmp_path / f"world{world}.pt")
        for (loss, norm, skipped, tokens), b in zip(got["results"], ref, strict=True):
            assert loss == pytest.approx(b.loss, rel=1e-5) and norm == pytest.approx(b.grad_norm, rel=1e-5)
            assert tokens == b.tokens and not skipped and b.grad_norm > 0.05  # clipping was active
        assert got["held_out"] == pytest.approx(ref_held_out, rel=1e-5)
        assert_close_states(got["trained"], ref_state, LR * STEPS)
        assert got["nan"]  # the NaN on one rank skips the step on every rank, and changes nothing
        for group in ("model", "optimizer"):
            assert all(torch.equal(got["after_nan"][group][k], v) for k, v in got["trained"][group].items())
        assert_close_states(got["continued"], ref_state, LR * (STEPS - 1))


# -- the trainer: the docs' torchrun command, checkpoints both ways, errors ---------------------------------


def torchrun(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """The docs' command (`torchrun` is torch.distributed.run; a free port for parallel test sessions)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PET_MASTER_PORT": str(_free_port())}
    command = [sys.executable, "-m", "torch.distributed.run", *DOC_COMMAND.split()[1:], *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def events(run_dir: Path, name: str, file: str = "metrics.jsonl") -> list[dict]:
    return [r for r in read_metrics(run_dir / file, "event") if r.get("event") == name]


def test_docs_command_and_checkpoints_interchange_with_resident(fast_config, tmp_path):
    """One run goes resident (steps 1-2) -> the docs' fsdp command on 2 ranks (3-4) -> resident (5-6) and equals the
    uninterrupted resident run; both switches are backend and world size events; release verify replays the fsdp
    chunk on one device. (The LR schedule has its own horizon, so extending train.steps from 4 to 6 keeps it.)"""
    doc = (REPO / "docs" / "backends.md").read_text()
    (line,) = [x.strip() for x in doc.splitlines() if x.strip().startswith(DOC_COMMAND)]
    docs_args = line.split()[len(DOC_COMMAND.split()) :]  # the docs' tiny step counts: 4 steps, checkpoints every 2
    assert "train.steps=4" in docs_args and "train.ckpt_every=2" in docs_args
    # step 3 (the first under fsdp) meets a NaN on one rank's samples: skipped on both ranks, rolled back to step 2
    # (max_nonfinite=1), its samples excluded; the uninterrupted run meets and handles the same NaN on one process
    common = [*FAST_DATA, *SMALL, "optim.decay_steps=8", "train.eval_batches=1", "train.plots=false",
              "train.debug_nan_steps=[3]", "train.max_nonfinite=1", f"train.out_dir={tmp_path}",
              "train.run_name=run"]  # fmt: skip
    run_trainer(fast_config(*docs_args, *common, "train.stop_after=2"))
    torchrun([*docs_args, *common, "train.resume=latest"], tmp_path)
    run_trainer(fast_config(*docs_args, *common, "train.steps=6", "train.resume=latest"))
    whole = run_trainer(fast_config(*docs_args, *common, "train.steps=6", "train.run_name=whole"))
    ref, losses = train_losses(whole.run_dir), train_losses(tmp_path / "run")
    assert sorted(losses) == sorted(ref) == list(range(1, 7))
    assert [losses[s] for s in ref] == pytest.approx([ref[s] for s in ref], rel=1e-5)
    lr = max(r["lr"] for r in read_metrics(whole.run_dir / "metrics.jsonl", "train"))
    state = load_checkpoint(find_latest(tmp_path / "run")).tensors
    assert_close_states(state, load_checkpoint(find_latest(whole.run_dir)).tensors, lr * 6)
    # the rollback to step 2 rewound the rows logged after it, the resume's events among them, to metrics.replaced
    switches, sizes = [], []
    for file in ("metrics.replaced.jsonl", "metrics.jsonl"):
        switches += [(e["from"], e["to"]) for e in events(tmp_path / "run", "backend_changed", file)]
        sizes += [(e["was"], e["now"]) for e in events(tmp_path / "run", "world_size_changed", file)]
    assert switches == [("resident", "fsdp"), ("fsdp", "resident")] and sizes == [(1, 2), (2, 1)]
    (rollback,) = events(tmp_path / "run", "rollback")
    assert rollback["to_checkpoint"] == "step-00000002" and rollback == {
        **events(whole.run_dir, "rollback")[0],
        "moved_aside": rollback["moved_aside"],
    }
    assert not (tmp_path / "run" / "replicas").exists()  # rank 0 alone writes the run
    # the release: chunk 1 (steps 3-4) was trained by fsdp; one device replays it within a stated tolerance
    from crystal.release import ReleaseError, build, verify

    build(tmp_path / "run", tmp_path / "release", log=lambda *_: None)
    with pytest.raises(ReleaseError, match="backend=fsdp on 2 ranks.*--atol"):
        verify(tmp_path / "release", [1], log=lambda *_: None)
    (verdict,) = verify(tmp_path / "release", [1], log=lambda *_: None, atol=2 * lr * 2)
    assert verdict.ok and verdict.losses_total == 2
    (bitwise,) = verify(tmp_path / "release", [2], log=lambda *_: None)  # resident again: bitwise
    assert bitwise.ok


@pytest.mark.parametrize(
    "env,overrides,message",
    [({}, [], "not started by torchrun; launch `torchrun --nproc_per_node=<GPUs> -m crystal.train backend=fsdp"),
     ({"WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1"}, [], "2 micro-batches per step cannot be shared by 3 ranks"),
     ({"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, ["backend.fsdp.dp_replicate=4"], "does not divide the 2 ranks"),
     ({"WORLD_SIZE": "2"}, ["backend=resident"], "WORLD_SIZE=2 needs backend=streaming .* or backend=fsdp")],
)  # fmt: skip
def test_bad_fsdp_setups_get_one_line_errors(fast_config, monkeypatch, env, overrides, message):
    from crystal.trainer import Trainer

    for key in ("WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=message) as e:
        Trainer(fast_config(*SMALL, "backend=fsdp", *overrides), log=lambda *_: None)
    assert "\n" not in str(e.value)


def test_sim_gpu_recommends_fsdp_when_the_model_fits_and_streaming_when_not():
    from crystal.streaming.sim.gpu import Alt, recommend
    from crystal.streaming.sim.profile import load_profile
    from crystal.streaming.sim.shapes import load_shape

    shape, h100 = load_shape("crystalcoder_7b"), load_profile("h100")
    rows = [Alt("weight streaming", 1, "b=4", 450.8, 9_596, 0.41, 29.1, 7.6, True),
            Alt("FSDP (ZeRO-3)", 8, "b=4", 40.2, 107_492, 0.58, 0.2, 58.5, True),
            Alt("weight streaming", 8, "b=4", 57.8, 74_886, 0.40, 5.1, 7.6, True),
            Alt("FSDP (ZeRO-3)", 64, "b=11", 7.2, 598_891, 0.40, 0.1, 19.8, True),
            Alt("weight streaming", 64, "b=1", 6.7, 641_828, 0.43, 0.2, 20.7, True)]  # fmt: skip
    recs = {r.gpus: r for r in recommend(rows, shape, h100)}
    # one H100 cannot hold the 7B's 16 bytes per parameter: the figure comes from the sim's memory model
    assert recs[1].backend == "streaming" and "resident does not fit: needs 1" in recs[1].why
    assert recs[8].backend == "fsdp" and "58.5 GB per GPU" in recs[8].why
    assert recs[64].backend == "streaming" and "641,828 tokens/s vs fsdp 598,891" in recs[64].why


def test_a_resume_refuses_changed_fsdp_dtypes_but_not_its_layout_settings():
    """reduce_dtype / param_dtype round what a step computes; sharding, checkpointing and sync only reorder sums."""
    from crystal.trainer import config_changes
    from tests.conftest import compose_config

    run = compose_config(["backend=fsdp"])
    assert config_changes(run, compose_config(["backend=fsdp", "backend.fsdp.reduce_dtype=bf16"])) == [
        "backend.fsdp.reduce_dtype"
    ]
    layout = ["backend.fsdp.grad_sync=micro_batch", "backend.fsdp.activation_checkpointing=true",
              "backend.fsdp.dp_replicate=2", "backend.fsdp.reshard_after_forward=false"]  # fmt: skip
    assert config_changes(run, compose_config(["backend=fsdp", *layout])) == []
    assert config_changes(run, compose_config(["backend=resident"])) == []  # a switch is an event, not a change


def test_param_dtype_auto_is_bf16_only_on_a_gpu_computing_in_bf16():
    from crystal.streaming.backends.fsdp import resolve_param_dtype

    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    assert resolve_param_dtype("auto", bf16, cuda) == bf16 and resolve_param_dtype("auto", None, cuda) == torch.float32
    assert resolve_param_dtype("auto", bf16, CPU) == torch.float32  # CPU: autocast alone, as resident
    with pytest.raises(ValueError, match="param_dtype=bf16 needs a GPU.*param_dtype=auto"):
        resolve_param_dtype("bf16", bf16, CPU)
