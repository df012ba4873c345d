"""The Cerebras lane: backend=cerebras on cerebras-pytorch's CPU backend, against backend=resident.

Runs only where cerebras-pytorch is installed (its own venv; `.ci/run` builds it when python3.11 exists):

    .venv-cerebras/bin/python -m pytest tests/test_cerebras_lane.py -s

Checks that the tiny model trains 20 steps with backend=cerebras like backend=resident, that cstorch's own
AdamW differs from torch's by its update equation and nothing else (reproduced in plain torch), that a
checkpoint moves cerebras -> main environment -> cerebras as one run with the moves recorded, that
cstorch's own checkpoint files round-trip, that a non-finite step is undone inside the compiled step, and
that CSX without a cluster fails clearly.

The main environment is found through CRYSTAL_MAIN_PYTHON (default: .venv/bin/python of this checkout,
which `.ci/run` creates); tests that need it skip when it is absent. The summary (losses per step side by
side, the machine, wall times) is printed and written to docs/cerebras_lane_results.md, or to
$CRYSTAL_LANE_OUT/cerebras_lane_results.md when that is set.

Tolerances (relative loss differences, largest over the steps compared):

- TOL_UPDATE: one cstorch AdamW update against its plain-torch transcription. Same operations in the same
  order, so equal up to how the backend schedules them; measured bitwise equal.
- TOL_SAME_EQUATION: the same AdamW equation run by two engines (cstorch's compiled step vs the resident
  engine's fused AdamW; torch 2.4 vs the main environment's torch). Only fp32 rounding differs (the LR is
  an fp32 tensor in cstorch's graph, reductions are ordered differently), and training amplifies it, most
  at a loss spike: measured up to 1.1e-6. A different equation moves the losses by 4.9e-4 to 4.2e-3 on the
  machines measured so far (cstorch's eps placement, below), so 1e-5 sits between the two with a margin of
  about 10x and 50x: it tells "same computation" from "different computation" on any of them.
- TOL_BF16: bf16 autocast turns the fp32-level differences into flipped bf16 roundings; measured 3.7e-5
  to 7.1e-5.

How cstorch's AdamW differs from torch's (cerebras/pytorch/optim/AdamBase.py in cerebras-pytorch 2.10.0):
it computes m / (sqrt(v) + eps) * sqrt(1 - beta2^t) / (1 - beta1^t), i.e. torch's update with eps replaced
by eps / sqrt(1 - beta2^t) (4.5x at t = 1, 1.25x at t = 20 for beta2 = 0.95). Bias correction keeps fp32
running products beta^t instead of a step count; decoupled weight decay is the same (lr * wd * p, taken
from the weights before the update); moments are kept in the parameters' dtype (fp32 here), as torch does.
test_cstorch_adamw_update_is_torchs_with_a_step_dependent_eps pins each of these.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from crystal.streaming.backends.cerebras import cstorch_available
from crystal.streaming.backends.cerebras_state import powers_for_step

from crystal.checkpoint import find_latest, load_checkpoint
from crystal.metrics import read_metrics
from crystal.trainer import Trainer
from crystal.utils import git_commit
from tests.conftest import FAST_DATA, compose_config

if not cstorch_available():
    pytest.skip(
        "cerebras-pytorch is not installed in this environment; the Cerebras lane runs in its own venv: "
        "python3.11 -m venv .venv-cerebras && .venv-cerebras/bin/pip install -e '.[cerebras,dev]' && "
        ".venv-cerebras/bin/python -m pytest tests/test_cerebras_lane.py",
        allow_module_level=True,
    )
pytestmark = pytest.mark.cerebras

REPO = Path(__file__).resolve().parent.parent
STEPS = 20
# Two micro-batches per step, so gradient accumulation inside the traced step is exercised. One eval batch
# per source: evaluation is not what the lane compares, and it would cost a third of each run. Checkpoints
# every 5 steps, so that resumes and moves start late and cost few steps.
LANE = [*FAST_DATA, "model.n_layer=2", "train.seq_len=64", "train.micro_batch=4", "train.global_batch=8",
        "train.log_every=1", "train.eval_every=10", "train.eval_batches=1", "train.ckpt_every=10",
        "train.ckpt_keep_every=5", f"train.steps={STEPS}"]  # fmt: skip
T0 = time.perf_counter()
TOL_UPDATE = 1e-6
TOL_SAME_EQUATION = 1e-5
TOL_BF16 = 1e-3


class CstorchEquationAdamW(torch.optim.Optimizer):
    """cstorch.optim.AdamW's step (AdamBase.step, cerebras-pytorch 2.10.0) transcribed to plain torch, keeping
    torch AdamW's state layout (step, exp_avg, exp_avg_sq) so the resident engine can run it. The bias
    powers are cstorch's fp32 running products, replayed from the step count."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=None) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                beta1_power, beta2_power = powers_for_step(int(state["step"]), (beta1, beta2))
                state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1.0 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
                update = state["exp_avg"] / state["exp_avg_sq"].sqrt().add_(group["eps"])  # eps before correction
                one = torch.tensor(1.0, dtype=torch.float32)
                update *= torch.sqrt(one - beta2_power) / (one - beta1_power)
                update.add_(p * group["weight_decay"])
                update *= torch.tensor(group["lr"], dtype=torch.float32)  # cstorch's LR is an fp32 tensor
                p.sub_(update)
                state["step"] += 1


VARIANTS = {
    "resident": ["backend=resident"],
    "cerebras": ["backend=cerebras"],  # adamw=auto: torch's equation on the CPU target
    "cerebras_cstorch_adamw": ["backend=cerebras", "backend.cerebras.adamw=cstorch"],
    # the resident engine with cstorch's equation in plain torch (CstorchEquationAdamW)
    "resident_cstorch_equation": ["backend=resident"],
}


def main_python() -> Path | None:
    path = Path(os.environ.get("CRYSTAL_MAIN_PYTHON") or REPO / ".venv" / "bin" / "python")
    return path if path.exists() else None


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl", "train")}


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def rel_diff(a: dict[int, float], b: dict[int, float], steps) -> float:
    return max(rel(a[s], b[s]) for s in steps)


def train(out_dir: Path, run_name: str, *overrides: str, optimizer=None) -> tuple[Trainer, float]:
    cfg = compose_config([*LANE, f"train.out_dir={out_dir}", f"train.run_name={run_name}", *overrides])
    with pytest.MonkeyPatch.context() as patch:
        if optimizer is not None:  # the resident engine builds torch.optim.AdamW when constructed
            patch.setattr(torch.optim, "AdamW", optimizer)
        trainer = Trainer(cfg, log=lambda *_: None)
    t0 = time.perf_counter()
    try:
        trainer.fit()
    finally:
        trainer.close()
        if hasattr(trainer.engine, "close"):
            trainer.engine.close()
    return trainer, time.perf_counter() - t0


def main_env_train(out_dir: Path, run_name: str, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [str(main_python()), "-m", "crystal.train", *LANE, f"train.out_dir={out_dir}", f"train.run_name={run_name}",
           *overrides]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def main_env_torch() -> str:
    if main_python() is None:
        return "absent"
    cmd = [str(main_python()), "-c", "import torch; print(torch.__version__)"]
    return "torch " + subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout.strip()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        mem_kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
        cpu += f", {mem_kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()} ({platform.machine()})"


@pytest.fixture(scope="module")
def lane_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cerebras_lane")


@pytest.fixture(scope="module")
def runs(lane_dir):
    """The four 20-step runs on the same data and seed, in this process (one cstorch CPU backend)."""
    out = {}
    for name, overrides in VARIANTS.items():
        optimizer = CstorchEquationAdamW if name == "resident_cstorch_equation" else None
        trainer, wall = train(lane_dir, name, *overrides, optimizer=optimizer)
        out[name] = {"dir": trainer.run_dir, "wall_s": wall, "loss": losses(trainer.run_dir), "step": trainer.step}
    return out


@pytest.fixture(scope="module")
def summary():
    """Sections of the results page, filled in by the tests; written when the module ends."""
    import cerebras.pytorch as cstorch

    sections: dict[str, list[str]] = {}
    yield sections
    head = [
        "# Cerebras lane results",
        "",
        "Written by `tests/test_cerebras_lane.py` from its last run (docs/cerebras.md says how to run it); do not",
        "edit by hand. Relative differences are |a - b| / |b| of the training loss at each step.",
        "",
        f"- machine: {machine()}",
        f"- software: Python {platform.python_version()}, torch {torch.__version__}, cerebras-pytorch "
        f"{cstorch.__version__} (CPU backend); main environment: {main_env_torch()}",
        f"- run: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}, commit {git_commit()}, "
        f"lane {time.perf_counter() - T0:.0f} s (other users on the machine make timings noisy)",
        "- model: tiny CrystalCoder, 2 layers; 2 micro-batches x 4 x 64 tokens per step; seed 1",
    ]
    text = "\n".join(head + [line for part in sections.values() for line in ["", *part]]) + "\n"
    print("\n" + text)
    out = Path(os.environ["CRYSTAL_LANE_OUT"]) if os.environ.get("CRYSTAL_LANE_OUT") else REPO / "docs"
    out.mkdir(parents=True, exist_ok=True)
    (out / "cerebras_lane_results.md").write_text(text)


def test_cstorch_adamw_update_is_torchs_with_a_step_dependent_eps(tmp_path):
    """cstorch.optim.AdamW against its plain-torch transcription, and against torch.optim.AdamW with eps and
    with eps / sqrt(1 - beta2^t): gradients of ordinary size, of eps's size and far below it, with and without
    weight decay, 30 updates. In float64, so that what differs is the equation, not fp32 rounding of the
    weights; the error is the largest difference in how far each parameter moved, relative to how far it
    moved."""
    import cerebras.pytorch as cstorch

    if cstorch.current_backend(raise_exception=False, raise_warning=False) is None:
        cstorch.backend("CPU", artifact_dir=str(tmp_path))
    torch.manual_seed(0)
    betas, eps, lr = (0.9, 0.95), 1e-9, 3e-3
    shapes, scales, decays = [(64, 32), (96,), (96,)], [1e-2, 1e-9, 1e-12], [0.1, 0.0, 0.0]
    init = [torch.randn(s, dtype=torch.float64) for s in shapes]

    def build(cls, **kw):
        params = [torch.nn.Parameter(x.clone()) for x in init]
        groups = [{"params": [p], "weight_decay": wd} for p, wd in zip(params, decays)]
        return params, cls(groups, lr=lr, betas=betas, eps=eps, **kw)

    cs_params, cs_opt = build(cstorch.optim.AdamW, correct_bias=True)
    opts = {"transcribed": build(CstorchEquationAdamW), "torch": build(torch.optim.AdamW, foreach=False),
            "torch, eps_t": build(torch.optim.AdamW, foreach=False)}  # fmt: skip
    worst, first = dict.fromkeys(opts, 0.0), {}
    for t in range(1, 31):
        grads = [torch.randn(s, dtype=torch.float64) * scale for s, scale in zip(shapes, scales)]
        for group in opts["torch, eps_t"][1].param_groups:
            group["eps"] = eps / math.sqrt(1 - betas[1] ** t)
        for params, opt in [(cs_params, cs_opt), *opts.values()]:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
        for name, (params, _) in opts.items():
            moved = [(a.detach() - x, b.detach() - x) for a, b, x in zip(params, cs_params, init)]
            err = max(float((da - db).abs().max() / db.abs().max()) for da, db in moved)
            worst[name] = max(worst[name], err)
            first.setdefault(name, err)
    state = cs_opt.state[cs_params[0]]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float64  # moments in the params' dtype
    assert state["beta2_power"].dtype == torch.float32  # bias powers: fp32 running products ...
    assert torch.equal(state["beta2_power"], powers_for_step(30, betas)[1])  # ... which powers_for_step replays
    assert worst["transcribed"] < TOL_UPDATE
    # The whole difference from torch is where eps sits: with eps / sqrt(1 - beta2^t) torch's AdamW gives
    # cstorch's update (its bias correction in float64 instead of fp32 powers, decay applied in another order)
    assert worst["torch, eps_t"] < TOL_UPDATE
    # ... and with plain eps it is far off from the first update on, through the eps-sized gradients.
    assert first["torch"] > 1000 * TOL_UPDATE


def test_cerebras_trains_20_steps_like_resident(runs):
    res, cs = runs["resident"], runs["cerebras"]
    steps = range(1, STEPS + 1)
    assert res["step"] == cs["step"] == STEPS and set(cs["loss"]) == set(steps)
    assert res["loss"][1] == cs["loss"][1]  # same data, init and first forward: identical before any update
    assert rel_diff(cs["loss"], res["loss"], steps) < TOL_SAME_EQUATION
    assert cs["loss"][STEPS] < 0.5 * cs["loss"][1]  # it trains


def test_cstorch_adamw_differs_from_resident_by_its_equation_alone(runs, summary):
    """cstorch's own AdamW equals the resident engine running cstorch's equation in plain torch, while both
    differ from torch's equation by far more than rounding: the equation is the whole difference."""
    res, cs, cs_own, res_cs = (runs[k]["loss"] for k in VARIANTS)
    steps = range(1, STEPS + 1)
    d_default, d_own, d_explained = (
        rel_diff(cs, res, steps),
        rel_diff(cs_own, res, steps),
        rel_diff(cs_own, res_cs, steps),
    )
    summary["fp32"] = [
        "## fp32: both AdamW equations against resident, 20 steps",
        "",
        "Columns: `resident` (torch's AdamW, fused); `cerebras` (default `adamw=auto`, i.e. torch's equation on",
        "the CPU target); `cerebras adamw=cstorch` (cstorch.optim.AdamW); `resident + cstorch eq.` (the resident",
        "engine running cstorch's equation transcribed to plain torch), compared with `cerebras adamw=cstorch`.",
        "",
        "| step | resident | cerebras | rel. diff | cerebras adamw=cstorch | rel. diff | resident + cstorch eq. "
        "| rel. diff to cstorch |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    summary["fp32"] += [
        f"| {s} | {res[s]:.6f} | {cs[s]:.6f} | {rel(cs[s], res[s]):.1e} | {cs_own[s]:.6f} "
        f"| {rel(cs_own[s], res[s]):.1e} | {res_cs[s]:.6f} | {rel(res_cs[s], cs_own[s]):.1e} |"
        for s in steps
    ]
    summary["fp32"] += [
        "",
        f"- cerebras (torch's equation) vs resident: max **{d_default:.1e}** (tolerance {TOL_SAME_EQUATION:.0e})",
        f"- cerebras adamw=cstorch vs resident + cstorch's equation: max **{d_explained:.1e}** (tolerance "
        f"{TOL_SAME_EQUATION:.0e})",
        f"- cerebras adamw=cstorch vs resident (torch's equation): max **{d_own:.1e}**, the effect of the equation "
        f"(asserted above {TOL_SAME_EQUATION:.0e}, so the lane tells the equations apart)",
        "- wall time of fit() for 20 steps with 3 evals and 5 checkpoints: "
        + ", ".join(f"{k} {v['wall_s']:.1f} s" for k, v in runs.items()),
    ]
    assert cs_own[1] == res[1]
    assert d_explained < TOL_SAME_EQUATION
    assert d_own > TOL_SAME_EQUATION


def copy_run(src: Path, dst: Path) -> Path:
    """A run directory as another process would find it; cstorch's logs (with a symlink) stay behind."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("cerebras"))
    return dst


def test_resume_on_cerebras_continues_exactly(runs, lane_dir):
    full = runs["cerebras"]
    copy = copy_run(full["dir"], lane_dir / "cs_resumed")
    resumed, _ = train(lane_dir, "cs_resumed", *VARIANTS["cerebras"],
                       f"train.resume={copy / 'checkpoints' / 'step-00000015'}")  # fmt: skip
    assert resumed.step == STEPS
    part = losses(resumed.run_dir)
    assert [part[s] for s in range(1, STEPS + 1)] == [full["loss"][s] for s in range(1, STEPS + 1)]  # bitwise
    a, b = load_checkpoint(find_latest(full["dir"])), load_checkpoint(find_latest(resumed.run_dir))
    for group in ("model", "optimizer"):
        for k in a.tensors[group]:
            assert torch.equal(a.tensors[group][k], b.tensors[group][k]), k
    assert a.tensors["optimizer"]["wte.weight.step"].item() == STEPS


def test_a_checkpoint_moves_cerebras_main_cerebras_as_one_run(runs, lane_dir, summary):
    """Steps 1-15 on cerebras (here), 16-18 on resident in the main environment (its own torch), 19-20 on
    cerebras again: the same losses as the uninterrupted cerebras run, both moves recorded as events."""
    if main_python() is None:
        pytest.skip("no main environment: set CRYSTAL_MAIN_PYTHON or create .venv (the README's test command)")
    moved = copy_run(runs["cerebras"]["dir"], lane_dir / "moved")
    main_env_train(lane_dir, "moved", "backend=resident", f"train.resume={moved / 'checkpoints' / 'step-00000015'}",
                   "train.stop_after=18")  # fmt: skip
    assert max(losses(moved)) == 18
    back, _ = train(lane_dir, "moved", *VARIANTS["cerebras"], "train.resume=latest")
    assert back.step == STEPS
    continued, reference = losses(moved), runs["cerebras"]["loss"]
    diff = rel_diff(continued, reference, range(16, STEPS + 1))
    events = [r for r in read_metrics(moved / "metrics.jsonl", "event") if r["event"] == "backend_changed"]
    assert [(r["step"], r["from"], r["to"], r["adamw"]) for r in events] == [
        (15, "cerebras", "resident", ["torch", "torch"]),
        (18, "resident", "cerebras", ["torch", "torch"]),
    ]
    summary["moves"] = [
        "## A checkpoint moves cerebras -> main environment -> cerebras",
        "",
        f"Steps 1-15 on `cerebras`, 16-18 on `resident` in the main environment ({main_env_torch()}), 19-20 on "
        "`cerebras` again; both moves are `backend_changed` events in metrics.jsonl.",
        "",
        "| step | where | moved run | uninterrupted cerebras | rel. diff |",
        "|---:|---|---:|---:|---:|",
        *(
            f"| {s} | {'main env.' if s <= 18 else 'cerebras'} | {continued[s]:.6f} | {reference[s]:.6f} "
            f"| {rel(continued[s], reference[s]):.1e} |"
            for s in range(16, STEPS + 1)
        ),
        "",
        f"- max **{diff:.1e}** (tolerance {TOL_SAME_EQUATION:.0e}: same equation, two torch builds)",
    ]
    assert diff < TOL_SAME_EQUATION


def test_cstorch_checkpoint_files_round_trip(runs, lane_dir):
    import cerebras.pytorch as cstorch
    from crystal.streaming.backends.cerebras_state import cstorch_to_flat

    from crystal.cerebras import HDF5_MAGIC
    from crystal.cerebras import main as bridge

    src = find_latest(runs["cerebras"]["dir"])
    mdl = lane_dir / "cerebras_step20.mdl"
    assert bridge(["export", str(runs["cerebras"]["dir"]), str(mdl)]) == 0
    assert mdl.read_bytes()[:8] == HDF5_MAGIC  # cstorch.save's own format, not a torch pickle
    assert bridge(["import", str(mdl), str(lane_dir / "imported")]) == 0
    a, b = load_checkpoint(src), load_checkpoint(find_latest(lane_dir / "imported"))
    assert a.meta == b.meta
    for group in ("model", "optimizer"):
        assert a.tensors[group].keys() == b.tensors[group].keys()
        for k in a.tensors[group]:
            assert torch.equal(a.tensors[group][k], b.tensors[group][k]), k

    # The live engine's own cstorch state (optimizer.state_dict() with beta powers, as Model Zoo saves it)
    # survives cstorch.save/load and reads back as the same flat state.
    cfg = compose_config([*LANE, "backend=cerebras", f"train.out_dir={lane_dir}", "train.run_name=native",
                          f"train.resume={src}"])  # fmt: skip
    trainer = Trainer(cfg, log=lambda *_: None)
    try:
        engine = trainer.engine
        native = engine.cstorch_state_dict()
        powers = native["optimizer"]["state"][0]
        assert [float(x) for x in powers_for_step(STEPS, (0.9, 0.95))] == [
            float(powers["beta1_power"]),
            float(powers["beta2_power"]),
        ]
        cstorch.save(native, str(lane_dir / "native.mdl"))
        model, optim = cstorch_to_flat(cstorch.load(str(lane_dir / "native.mdl")), engine.groups)
        for k, v in a.tensors["model"].items():
            assert torch.equal(model[k].detach(), v), k
        for k, v in a.tensors["optimizer"].items():
            assert torch.equal(optim[k].detach(), v), k
    finally:
        trainer.close()


def test_nonfinite_step_is_undone_inside_the_compiled_step(lane_dir):
    cfg = compose_config([*LANE, "backend=cerebras", f"train.out_dir={lane_dir}", "train.run_name=nan"])
    trainer = Trainer(cfg, log=lambda *_: None)
    try:
        engine = trainer.engine
        assert not engine.train_step(trainer.loader.next_step(), trainer.lr(0)).skipped
        before = {g: {k: v.clone() for k, v in t.items()} for g, t in engine.state_dict().items()}
        hook = engine.model.register_forward_hook(lambda module, args, out: out * float("nan"))
        result = engine.train_step(trainer.loader.next_step(), trainer.lr(1))
        hook.remove()
        assert result.skipped
        after = engine.state_dict()
        for group in before:
            for k in before[group]:
                assert torch.equal(before[group][k], after[group][k]), k
        assert not engine.train_step(trainer.loader.next_step(), trainer.lr(2)).skipped
        assert engine.state_dict()["optimizer"]["wte.weight.step"].item() == 2  # the skipped step did not count
    finally:
        trainer.close()
        engine.close()


def test_a_moved_cursor_opens_a_new_run_there(lane_dir):
    """A rollback or a skipped data window moves the trainer's cursor: cstorch's input function must follow."""
    cfg = compose_config([*LANE, "backend=cerebras", f"train.out_dir={lane_dir}", "train.run_name=jump"])
    trainer = Trainer(cfg, log=lambda *_: None)
    engine = trainer.engine
    try:
        for step in (0, 1, 5, 6, 2):  # forward past a window, then back
            # train_step checks that cstorch's stream yields exactly these micro-batches and this LR
            assert not engine.train_step(trainer.loader.step_batches(step), trainer.lr(step)).skipped
            assert engine.step == step + 1
    finally:
        trainer.close()
        engine.close()


def test_csx_without_a_cluster_fails_clearly(tmp_path):
    cmd = [sys.executable, "-m", "crystal.train", "backend=cerebras", "backend.cerebras.target=CSX", "train.steps=1"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "backend.cerebras.target=CSX needs backend.cerebras.mgmt_address" in out.stderr


def test_bf16_mixed_precision_follows_resident(lane_dir, summary):
    """cstorch.amp on CPU (bf16 autocast) against torch.autocast in the resident engine; last, because
    cstorch's half dtype is process-wide."""
    runs = {}
    for name, backend in (("resident_bf16", "backend=resident"), ("cerebras_bf16", "backend=cerebras")):
        trainer, _ = train(lane_dir, name, backend, "train.precision=bf16", "train.steps=5")
        runs[name] = losses(trainer.run_dir)
    res, cs = runs["resident_bf16"], runs["cerebras_bf16"]
    diff = rel_diff(cs, res, range(1, 6))
    summary["bf16"] = [
        "## bf16 autocast, 5 steps",
        "",
        "| step | resident bf16 | cerebras bf16 | rel. diff |",
        "|---:|---:|---:|---:|",
        *(f"| {s} | {res[s]:.6f} | {cs[s]:.6f} | {rel(cs[s], res[s]):.1e} |" for s in range(1, 6)),
        "",
        f"- max **{diff:.1e}** (tolerance {TOL_BF16:.0e})",
    ]
    assert cs[1] == res[1]
    assert diff < TOL_BF16
