"""The sharded store (one MemoryX across replicas, SwarmX as reduce-scatter / all-gather) on CPU over gloo.

Process groups are expensive on a 2-core CI machine, so each spawn checks many things: one spawn at 4 ranks and
one at 2 run both schedules with clipping and gradient accumulation, write and read sharded checkpoints, and
(at 2) kill a rank mid-step; the reference runs in this process at world size 1 and on backend=resident.

Tolerance: the replicas sum gradients in another order than one process (per micro-batch over ranks, then over
micro-batches, and the global norm from per-rank squared norms), so results agree to fp32 rounding, not bit for
bit. Adam divides by sqrt(v): an element whose gradient is ~0 can take a step of either sign of up to ~lr, so
nearly every weight must agree to 1e-5 and none may differ by more than 2 lr per step taken.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from crystal.streaming.backends.resident import ResidentEngine
from torch.multiprocessing.spawn import ProcessException

from crystal.checkpoint import AsyncCheckpointer, find_latest, list_checkpoints, load_checkpoint
from crystal.metrics import read_metrics
from tests.conftest import FAST_DATA
from tests.test_streaming import _free_port, batches, make_engine
from tests.test_train import REPO, SMALL, run_trainer, train_losses

LR, STEPS, MICRO = 1e-3, 3, 8  # 8 one-row micro-batches a step: 2 per rank at 4 ranks (gradient accumulation)
SCHEDULES = ("batch_major", "layer_major")
SAVED_AT = 2  # the 4-rank batch-major run writes a sharded checkpoint after this many steps


def step_batches(step: int, rank: int = 0, world: int = 1):
    return batches(step, MICRO, rows=1)[rank::world]  # the trainer's split of a step's micro-batches


def train(engine, rank: int, world: int, steps: range) -> list[float]:
    """Loss and grad norm of each step, flat."""
    out = []
    for step in steps:
        r = engine.train_step(step_batches(step, rank, world), LR)
        out += [r.loss, r.grad_norm]
    return out


def save_sharded(engine, run_dir: Path, step: int, rank: int, world: int, writer: AsyncCheckpointer) -> None:
    """What Trainer.save_checkpoint does for a sharded engine (trainer state reduced to the step)."""
    share, layout = engine.shard_state()
    writer.save(run_dir, step, {}, {"step": step}, "", kind="release", copy=False, shard=(rank, world, share),
                extra_files={"shards.json": json.dumps(layout)}, assemble=rank == 0, blocking=True)  # fmt: skip


def _ranks(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from crystal.streaming.swarm import Swarm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    swarm, run_dir, results = Swarm(), Path(out) / "run", {}
    try:
        for schedule in SCHEDULES:
            engine = make_engine("streaming", 2, swarm=swarm, schedule=schedule)
            if world == 4 and schedule == "batch_major":
                steps = train(engine, rank, world, range(SAVED_AT))
                save_sharded(engine, run_dir, SAVED_AT, rank, world, AsyncCheckpointer())
                steps += train(engine, rank, world, range(SAVED_AT, STEPS))
            else:
                steps = train(engine, rank, world, range(STEPS))
            results[schedule] = {"steps": steps, "state": engine.state_dict(), "store_bytes": engine.store.nbytes,
                                 "plan_bytes": sum(engine.host_plan.values()), "stats": engine.last_step_stats,
                                 "report": engine.host_report()}  # fmt: skip
            engine.close()
        if world == 2:  # resume the 4-rank checkpoint at 2 ranks, then lose a rank mid-step
            engine = make_engine("streaming", 2, swarm=swarm)
            engine.load_state_dict(load_checkpoint(run_dir / "checkpoints" / f"step-{SAVED_AT:08d}", lazy=True).tensors)
            results["resumed"] = {"steps": train(engine, rank, world, range(SAVED_AT, STEPS)),
                                  "state": engine.state_dict()}  # fmt: skip
            if rank == 0:
                torch.save(results, Path(out) / f"world{world}.pt")
            dist.barrier()  # saved before anyone dies
            writer = AsyncCheckpointer()
            save_sharded(engine, run_dir, STEPS, rank, world, writer)
            dist.barrier()  # rank 0 has renamed the step-3 checkpoint into place
            if rank == 1:  # dies before its share of the next checkpoint exists; rank 0 is left waiting mid-step
                os._exit(3)
            share, layout = engine.shard_state()
            writer.save(run_dir, STEPS + 1, {}, {"step": STEPS + 1}, "", copy=False, shard=(rank, world, share),
                        extra_files={"shards.json": json.dumps(layout)}, assemble=True)  # fmt: skip
            train(engine, rank, world, range(STEPS, STEPS + 1))  # blocks in a collective: killed there
        elif rank == 0:
            torch.save(results, Path(out) / f"world{world}.pt")
    finally:
        dist.destroy_process_group()


def assert_close_states(state: dict, ref: dict, steps: int) -> None:
    for group in ("model", "optimizer"):
        assert state[group].keys() == ref[group].keys(), group
    for k, v in ref["model"].items():
        diff = (state["model"][k] - v).abs()
        assert (diff > 1e-5).float().mean() < 1e-3 and diff.max() <= 2 * steps * LR, k
    for k, v in ref["optimizer"].items():
        if k.endswith(".step"):
            assert torch.equal(state["optimizer"][k], v), k


def test_sharded_replicas_equal_one_process_and_reshard_their_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", [*sys.path, str(REPO)])  # spawned children import tests.test_sharded
    for world in (4, 2):
        if world == 2:
            with pytest.raises(ProcessException):  # rank 1 exits with 3 mid-step; rank 0 is torn down
                mp.spawn(_ranks, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
        else:
            mp.spawn(_ranks, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    got = {w: torch.load(tmp_path / f"world{w}.pt") for w in (4, 2)}

    for schedule in SCHEDULES:
        single = make_engine("streaming", 2, schedule=schedule)
        ref = train(single, 0, 1, range(STEPS))
        ref_state = single.state_dict()
        for w in (4, 2):
            mine = got[w][schedule]
            assert mine["steps"] == pytest.approx(ref, rel=1e-5)
            assert_close_states(mine["state"], ref_state, STEPS)
            # the engine's own accounting: a quarter of the store per rank, and of the bytes over the link
            assert mine["store_bytes"] <= single.store.nbytes * (0.3 if w == 4 else 0.55), (w, schedule)
            assert mine["plan_bytes"] <= sum(single.host_plan.values()) * (0.3 if w == 4 else 0.55)
            for key in ("h2d_bytes", "d2h_bytes"):
                assert mine["stats"][key] <= single.last_step_stats[key] / w * 1.01, (key, w)
            assert mine["stats"]["collective_s"] > 0 and mine["report"]["world"] == w
        assert single.last_step_stats["collective_s"] == 0
        if schedule == "batch_major":
            ref_rest = (ref, ref_state)
        single.close()

    # saved at 4 ranks after 2 steps; resumed at 2 ranks, at 1 and on backend=resident, step 3 continues the run
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / f"step-{SAVED_AT:08d}")
    resumed = got[2]["resumed"]
    assert resumed["steps"] == pytest.approx(ref_rest[0][2 * SAVED_AT :], rel=1e-5)
    assert_close_states(resumed["state"], ref_rest[1], STEPS)
    for kind in ("streaming", "resident"):
        engine = make_engine(kind, 2)
        engine.load_state_dict(ckpt.tensors)
        assert train(engine, 0, 1, range(SAVED_AT, STEPS)) == pytest.approx(ref_rest[0][2 * SAVED_AT :], rel=1e-5)
        assert_close_states(engine.state_dict(), ref_rest[1], STEPS)
        if isinstance(engine, ResidentEngine):
            continue
        engine.close()

    # rank 1 died after the step-3 checkpoint and before its share of step 4: step 3 is the latest, and loads
    latest = find_latest(tmp_path / "run")
    assert latest.name == f"step-{STEPS:08d}" and [p.name for p in list_checkpoints(tmp_path / "run")] == [
        f"step-{SAVED_AT:08d}", f"step-{STEPS:08d}"]  # fmt: skip
    engine = make_engine("streaming", 2)
    engine.load_state_dict(load_checkpoint(latest).tensors)
    assert_close_states(engine.state_dict(), ref_rest[1], STEPS)
    assert sorted(p.name for p in latest.iterdir() if p.name.startswith("shard-")) == [
        "shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors"]  # fmt: skip


def docs_command() -> list[str]:
    """The 4-rank CPU command docs/cluster.md gives (the test runs exactly it, plus small-run settings)."""
    line = next(ln.strip() for ln in (REPO / "docs" / "cluster.md").read_text().splitlines()
                if ln.strip().startswith("torchrun --nproc_per_node=4"))  # fmt: skip
    assert line == "torchrun --nproc_per_node=4 -m crystal.train backend=streaming train.device=cpu"
    return shlex.split(line)


def test_torchrun_four_sharded_replicas_end_to_end_and_resume_on_one(fast_config, tmp_path):
    """The docs' command on 4 CPU ranks: its losses are a one-process run's, every rank reports its host bytes and
    share, step rows carry collective time and link bytes, the checkpoint is 4 shard files; a one-process run
    resumes it (world size change recorded) and continues."""
    args = [*FAST_DATA, *SMALL, "train.micro_batch=2", "train.steps=2", "train.ckpt_every=2", "train.plots=false",
            f"train.out_dir={tmp_path}"]  # fmt: skip
    cmd = docs_command()
    launch = [sys.executable, "-m", "torch.distributed.run", *cmd[1:2], "--master_port", str(_free_port()), *cmd[2:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launch, *args, "train.run_name=dp"], env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    for r in range(4):
        assert f"[rank {r}/4] host memory" in done.stdout + done.stderr
    rows = read_metrics(tmp_path / "dp" / "metrics.jsonl")
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert all(r["collective_s"] > 0 and r["d2h_bytes"] > 0 for r in train_rows)
    assert train_rows[-1]["h2d_bytes"] > 0  # step 1 finds both blocks still in the slots from the first evaluation
    (report,) = [r for r in rows if r.get("event") == "host_memory"]
    assert [r["rank"] for r in report["ranks"]] == [0, 1, 2, 3]
    latest = find_latest(tmp_path / "dp")
    assert latest.name == "step-00000002" and (latest / "shards.json").is_file()
    assert len(list(latest.glob("shard-*-of-00004.safetensors"))) == 4

    single = run_trainer(fast_config(*args, "backend=streaming", "train.run_name=single"))
    assert [r["loss"] for r in train_rows] == pytest.approx(list(train_losses(single.run_dir).values()), rel=1e-5)

    one = run_trainer(fast_config(*args, "backend=streaming", "train.steps=3", "train.run_name=one",
                                  f"train.resume={tmp_path / 'dp'}"))  # fmt: skip
    rows = read_metrics(one.run_dir / "metrics.jsonl")
    (changed,) = [r for r in rows if r.get("event") == "world_size_changed"]
    assert changed["was"] == 4 and changed["now"] == 1 and changed["sharded"]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [3]


def test_the_cluster_model_divides_host_memory_and_link_bytes_by_the_shards(capsys):
    from crystal.streaming.sim.cli import main
    from crystal.streaming.sim.cluster import streaming_row, table
    from crystal.streaming.sim.profile import load_profile
    from crystal.streaming.sim.shapes import load_shape

    shape, prof = load_shape("crystalcoder_7b"), load_profile("h100")
    for n, b in ((8, 4), (64, 3)):
        rep, shard = (streaming_row(shape, prof, n, b, "batch_major", sharded, 2048) for sharded in (False, True))
        assert shard.host_gb_per_node == pytest.approx(rep.host_gb_per_node / n)
        assert shard.pcie_gb_per_gpu == pytest.approx(rep.pcie_gb_per_gpu / n)
        # one node: the host's work on full gradients bounds the replicated store; across nodes, gathering every
        # block for every micro-batch over InfiniBand bounds the sharded one (layer_major gathers once a step)
        assert (shard.tokens_s > rep.tokens_s) == (n == 8) and shard.bound == ("compute" if n == 8 else
                                                                              "device collectives")  # fmt: skip
    assert rep.host_gb_per_node > 900 and "| streaming, sharded store | 64 |" in table([shard], markdown=True)
    assert main(["cluster", "model=tiny", "sizes=8"]) == 0  # the docs' command, on a model small enough to be quick
    printed = capsys.readouterr().out
    assert all(layout in printed for layout in ("replicated store", "sharded store", "FSDP (ZeRO-3)", "CPU offload"))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_gpu_sharded_store_over_nccl_tracks_the_replicated_store(tmp_path):
    """The CUDA path on one GPU (bench/run_gpu.sh): a one-rank NCCL group with the sharded store (pinned shares,
    all-gather on the copy stream, reduce-scatter on the gradient stream, host worker landing shares) steps as
    the replicated store does, to fp32 rounding."""
    import torch.distributed as dist
    from crystal.streaming.swarm import Swarm

    from tests.test_streaming import gpu_engine

    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/group", rank=0, world_size=1)
    swarm, engines = None, []
    try:
        swarm = Swarm()
        for schedule in SCHEDULES:  # one process group for both: NCCL's start-up is the slow part
            sharded = gpu_engine("streaming", 4, swarm=swarm, schedule=schedule, overlap_optimizer="on")
            plain = gpu_engine("streaming", 4, schedule=schedule, overlap_optimizer="on")
            engines += [sharded, plain]
            assert sharded.sharded and sharded.store.pinned
            for step in range(3):
                a, b = (e.train_step(batches(step, 2), LR) for e in (sharded, plain))
                assert (a.loss, a.grad_norm) == pytest.approx((b.loss, b.grad_norm), rel=1e-5), schedule
            for key in ("h2d_bytes", "d2h_bytes"):  # one rank: its share is everything
                assert sharded.last_step_stats[key] == plain.last_step_stats[key], (schedule, key)
            assert_close_states(sharded.state_dict(), plain.state_dict(), 3)
    finally:
        for e in engines:
            e.close()
        dist.destroy_process_group()


def _nccl_ranks(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from crystal.streaming.swarm import Swarm

    from tests.test_streaming import gpu_engine

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        engine = gpu_engine("streaming", 4, swarm=Swarm(), overlap_optimizer="on")
        steps = train(engine, rank, world, range(STEPS))
        state = engine.state_dict()
        engine.close()
        if rank == 0:
            torch.save({"steps": steps, "state": state}, Path(out) / "nccl.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_gpus_sharded_store_over_nccl_equals_one_gpu(tmp_path, monkeypatch):
    """2 GPUs over NCCL (reduce-scatter and all-gather on the device) against one GPU with the whole batch."""
    from tests.test_streaming import gpu_engine

    monkeypatch.setattr(sys, "path", [*sys.path, str(REPO)])
    mp.spawn(_nccl_ranks, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "nccl.pt")
    one = gpu_engine("streaming", 4, overlap_optimizer="on")
    assert got["steps"] == pytest.approx(train(one, 0, 1, range(STEPS)), rel=1e-5)
    assert_close_states(got["state"], one.state_dict(), STEPS)
    one.close()
