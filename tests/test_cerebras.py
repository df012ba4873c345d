"""backend=cerebras without cerebras-pytorch: config composition, error messages, the input function cstorch
runs, the LR schedule restated for cstorch, and the checkpoint bridge on synthetic cstorch-layout files.

The Cerebras lane itself (cstorch's CPU backend) is tests/test_cerebras_lane.py, run in its own venv.
Nothing here imports cerebras.pytorch."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from crystal.streaming.backends.cerebras import cstorch_available
from crystal.streaming.backends.cerebras_state import (
    CstorchLayoutError,
    cstorch_to_flat,
    flat_to_cstorch,
    powers_for_step,
    step_from_powers,
)

from crystal.cerebras import (
    HDF5_MAGIC,
    LAYOUT,
    CerebrasBackendError,
    CrystalDataPlan,
    cerebras_settings,
    cstorch_layout_from_checkpoint,
    export_checkpoint,
    import_checkpoint,
    linear_schedule,
    pack_batches,
    step_stream,
)
from crystal.cerebras import main as bridge_cli
from crystal.checkpoint import CheckpointError, find_latest, load_checkpoint
from crystal.config import ModelConfig, config_to_dict, to_dataclass
from crystal.model import build_model
from crystal.trainer import (
    CrystalAdapter,
    Trainer,
    backend_switch,
    build_engine,
    config_changes,
    lr_at,
    param_group_specs,
)
from tests.conftest import compose_config, compose_dict

REPO = Path(__file__).resolve().parent.parent
SMALL = ["model.n_layer=1", "train.seq_len=32", "train.micro_batch=2", "train.global_batch=4", "train.eval_every=1000",
         "train.log_every=1", "optim.warmup_steps=2"]  # fmt: skip
CSX = ["backend=cerebras", "backend.cerebras.target=CSX"]


# -- config and error messages ----------------------------------------------------------------------


def test_backend_cerebras_composes_on_cstorch_cpu_by_default():
    cfg = compose_config(["backend=cerebras"])
    assert cfg.backend.name == "cerebras"
    c = cfg.backend.cerebras
    assert (c.target, c.num_csx, c.half_dtype, c.adamw, c.skip_nonfinite) == ("CPU", 1, "bfloat16", "auto", True)
    assert compose_config(["backend=cerebras", "+stage=1", "model=crystalcoder_7b"]).train.stage == 1


@pytest.mark.parametrize(
    "overrides,message",
    [
        (CSX, "backend.cerebras.target=CSX needs backend.cerebras.mgmt_address"),
        ([*CSX, "backend.cerebras.mgmt_address=mgmt.example"], "must be <host>:<port>"),
        ([*CSX, "backend.cerebras.mgmt_address=mgmt.example:443"], "needs backend.cerebras.credentials_path"),
        (["backend=cerebras", "backend.cerebras.target=TPU"], "target='TPU': use one of CPU, GPU, CSX"),
        (["backend=cerebras", "backend.cerebras.half_dtype=cbfloat16"], "cbfloat16 exists only on CSX"),
        (["backend=cerebras", "backend.cerebras.num_csx=0"], "backend.cerebras.num_csx=0"),
        (["backend=cerebras", "backend.cerebras.adamw=sgd"], "backend.cerebras.adamw='sgd'"),
    ],
)
def test_bad_cerebras_settings_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        to_dataclass(compose_dict(overrides))


def test_a_complete_csx_config_composes_and_checks_the_certificate(tmp_path):
    cert = tmp_path / "tls.crt"
    overrides = [*CSX, "backend.cerebras.mgmt_address=mgmt.example:443", "backend.cerebras.num_csx=16",
                 f"backend.cerebras.credentials_path={cert}", f"train.out_dir={tmp_path}"]  # fmt: skip
    cfg = compose_config(overrides)
    with pytest.raises(FileNotFoundError, match=f"backend.cerebras.credentials_path={cert} does not exist"):
        cerebras_settings(cfg)
    cert.write_text("certificate")
    settings = cerebras_settings(cfg)
    assert settings.target == "CSX" and settings.cluster["num_csx"] == 16
    assert settings.cluster["mgmt_address"] == "mgmt.example:443"
    # The cluster's input workers run crystal's loader: this checkout is on their path and mounted.
    assert str(REPO) in settings.cluster["python_paths"] and str(REPO) in settings.cluster["mount_dirs"]
    assert settings.artifact_dir == str(tmp_path / "default" / "cerebras")


def test_csx_without_a_cluster_fails_in_one_line_from_the_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "crystal.train", *CSX, "train.steps=1"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 1
    assert "backend.cerebras.mgmt_address" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "outputs" / "default" / "checkpoints").exists()


@pytest.mark.skipif(cstorch_available(), reason="cerebras-pytorch is installed here: the lane covers this backend")
def test_without_cstorch_the_backend_says_how_to_get_it(tmp_path):
    cfg = compose_config(["backend=cerebras", "model.n_layer=1", f"train.out_dir={tmp_path}"])
    adapter = CrystalAdapter(build_model(cfg.model, seed=1), doc_masking=False)
    with pytest.raises(CerebrasBackendError, match=r"cerebras-pytorch 2\.10\.0.*\.venv-cerebras"):
        build_engine(cfg, adapter, torch.device("cpu"), None)


# -- what cstorch is handed: schedule and input function ---------------------------------------------


SCHEDULES = [[], ["+stage=1", "scale=full"], ["+stage=3", "scale=full"], ["optim.warmup_steps=0"],
             ["optim.warmup_steps=1", "train.steps=5"]]  # fmt: skip


@pytest.mark.parametrize("overrides", SCHEDULES)
def test_linear_schedule_is_the_trainers(overrides):
    cfg = compose_config(overrides)
    schedule = linear_schedule(cfg.optim, cfg.train.steps)
    for step in sorted({0, 1, 2, cfg.optim.warmup_steps - 1, cfg.optim.warmup_steps, cfg.train.steps // 2,
                        cfg.train.steps - 1, cfg.train.steps + 10}):  # fmt: skip
        if step >= 0:
            assert schedule.lr_at(step) == pytest.approx(lr_at(step, cfg.optim, cfg.train.steps), rel=1e-12)


def test_step_stream_yields_the_trainers_steps(fast_config):
    """cstorch's input function builds its own loader from a config dict (as CSX input workers do) and must
    produce exactly the micro-batches the trainer's loader gives for the same steps."""
    cfg = fast_config(*SMALL, "train.global_batch=8", "train.doc_masking=true")
    trainer = Trainer(cfg, log=lambda *_: None)
    try:
        stream = iter(step_stream(json.loads(json.dumps(config_to_dict(cfg))), start_step=3))
        for step in (3, 4):
            packed = next(stream)
            expected = pack_batches(trainer.loader.step_batches(step), doc_masking=True)
            assert packed.keys() == expected.keys() == {"input_ids", "targets", "positions", "doc_ids"}
            assert packed["input_ids"].shape == (4, 2, 32)  # (micro-batches, sequences, tokens)
            for k in packed:
                assert torch.equal(packed[k], expected[k]), (step, k)
        # What the engine hands cstorch when the trainer's step 3 arrives: a run from step 3 on.
        plan = CrystalDataPlan(cfg, trainer.adapter)
        run = plan.open_run(trainer.loader.step_batches(3))
        assert (run.start_step, run.num_steps, run.input_fn, run.checkpoint_steps) == (3, cfg.train.steps - 3,
                                                                                       step_stream, None)  # fmt: skip
        assert run.input_args[1] == 3 and plan.step_of(trainer.loader.step_batches(7)) == 7
        args = plan.model_inputs(pack_batches(trainer.loader.step_batches(3), doc_masking=True), 1)
        assert len(args) == 4 and args[0].shape == (2, 32)  # input_ids, targets, positions, doc_ids of micro-batch 1
        loss = trainer.adapter.model(*args)
        assert torch.isclose(loss, trainer.adapter.loss(trainer.loader.step_batches(3)[1]))
    finally:
        trainer.close()


# -- checkpoint bridge --------------------------------------------------------------------------------


def tiny_state(steps: float = 7.0):
    model = build_model(ModelConfig.from_name("tiny", n_layer=1), seed=1)
    groups = param_group_specs(model, 0.1)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    optim = {}
    for name, p in model.named_parameters():
        optim[f"{name}.exp_avg"] = torch.randn(p.shape, generator=gen)
        optim[f"{name}.exp_avg_sq"] = torch.rand(p.shape, generator=gen)
        optim[f"{name}.step"] = torch.tensor(steps)
    return weights, optim, groups


def test_flat_state_round_trips_through_a_cstorch_layout_file(tmp_path):
    weights, optim, groups = tiny_state(7.0)
    native = flat_to_cstorch(weights, optim, groups, (0.9, 0.95), 1e-9, global_step=7)
    assert sorted(native) == ["crystal", "global_step", "model", "optimizer"]
    entry = native["optimizer"]["state"][0]
    assert set(entry) == {"exp_avg", "exp_avg_sq", "beta1_power", "beta2_power"}
    assert float(entry["beta1_power"]) == pytest.approx(0.9**8)  # the power cstorch's next update uses
    assert [g["adjust_learning_rate"] for g in native["optimizer"]["param_groups"]] == [g.lr_scale for g in groups]
    torch.save(native, tmp_path / "ckpt.mdl")
    model, flat = cstorch_to_flat(torch.load(tmp_path / "ckpt.mdl", weights_only=True))
    assert model.keys() == weights.keys() and flat.keys() == optim.keys()
    for k in weights:
        assert torch.equal(model[k], weights[k])
    for k in optim:
        assert torch.equal(flat[k], optim[k]), k


def test_reads_an_optimizer_state_laid_out_as_cstorch_writes_it():
    """No crystal record: names come from the model's muP groups; steps from fp32 beta powers that were
    multiplied step by step, as cstorch's AdamW does in the graph."""
    weights, optim, groups = tiny_state()
    betas, t = (0.9, 0.95), 1234
    b1, b2 = torch.tensor(betas[0]), torch.tensor(betas[1])
    p1, p2 = b1.clone(), b2.clone()
    for _ in range(t):
        p1, p2 = p1 * b1, p2 * b2
    names = [n for g in groups for n in g.param_names]
    state, param_groups, i = {}, [], 0
    for g in groups:
        param_groups.append({"params": list(range(i, i + len(g.param_names))), "betas": betas, "lr": torch.tensor(0.1)})
        i += len(g.param_names)
    for index, name in enumerate(names):
        state[index] = {"exp_avg": optim[f"{name}.exp_avg"], "exp_avg_sq": optim[f"{name}.exp_avg_sq"],
                        "beta1_power": p1.clone(), "beta2_power": p2.clone()}  # fmt: skip
    native = {"model": weights, "optimizer": {"state": state, "param_groups": param_groups}, "global_step": t + 3}
    model, flat = cstorch_to_flat(native, groups)
    assert flat[f"{names[5]}.step"].item() == t
    assert torch.equal(flat[f"{names[5]}.exp_avg"], optim[f"{names[5]}.exp_avg"])
    # Long runs: the powers underflow and the step count comes from global_step.
    for entry in state.values():
        entry["beta1_power"], entry["beta2_power"] = torch.tensor(0.0), torch.tensor(0.0)
    assert cstorch_to_flat(native, groups)[1][f"{names[0]}.step"].item() == t + 3
    with pytest.raises(CstorchLayoutError, match="parameters but the model's groups hold"):
        cstorch_to_flat(native, groups[:2] + [groups[2].__class__("x", names[:1], 1.0, 0.0)])
    with pytest.raises(CstorchLayoutError, match="no 'optimizer' entry"):
        cstorch_to_flat({"model": weights}, groups)


@pytest.mark.parametrize("t", [0, 1, 5, 86, 1000, 1700])
def test_step_count_survives_fp32_powers(t):
    p1, p2 = powers_for_step(t, (0.9, 0.95))
    assert step_from_powers(float(p1), float(p2), (0.9, 0.95), fallback=None) == t
    assert float(p2) == pytest.approx(0.95 ** (t + 1), rel=1e-4)  # fp32 products drift slowly from float64
    assert p1.dtype == torch.float32 and not math.isnan(float(p1))


def test_export_import_round_trip_and_resume(fast_config, tmp_path):
    t = Trainer(fast_config(*SMALL, "train.steps=2", "train.ckpt_every=2", "train.run_name=src"), log=lambda *_: None)
    t.fit()
    t.close()
    ckpt = find_latest(t.run_dir)
    native = cstorch_layout_from_checkpoint(ckpt)
    assert native["crystal"]["format"] == LAYOUT and int(native["global_step"]) == 2
    mdl = export_checkpoint(t.run_dir, tmp_path / "run.mdl")
    assert mdl.is_file() and not mdl.with_name("run.mdl.tmp").exists()
    imported = import_checkpoint(mdl, tmp_path / "outputs" / "imported")
    a, b = load_checkpoint(ckpt), load_checkpoint(imported)
    assert a.meta == b.meta and a.config_yaml == b.config_yaml
    for group in ("model", "optimizer"):
        assert a.tensors[group].keys() == b.tensors[group].keys()
        for k in a.tensors[group]:
            assert torch.equal(a.tensors[group][k], b.tensors[group][k]), k
    resumed = Trainer(fast_config(*SMALL, "train.steps=3", "train.run_name=imported", "train.resume=latest"),
                      log=lambda *_: None)  # fmt: skip
    try:
        assert resumed.step == 2
        resumed.fit()
        assert resumed.step == 3
    finally:
        resumed.close()


def test_import_refuses_what_it_cannot_convert(tmp_path):
    weights, optim, groups = tiny_state()
    foreign = flat_to_cstorch(weights, optim, groups, (0.9, 0.95), 1e-9, global_step=7)
    foreign.pop("crystal")
    torch.save(foreign, tmp_path / "foreign.mdl")
    with pytest.raises(CheckpointError, match="was not exported by crystal"):
        import_checkpoint(tmp_path / "foreign.mdl", tmp_path / "run")
    with pytest.raises(CheckpointError, match="does not exist"):
        import_checkpoint(tmp_path / "missing.mdl", tmp_path / "run")
    (tmp_path / "garbage.mdl").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable cstorch checkpoint"):
        import_checkpoint(tmp_path / "garbage.mdl", tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.skipif(cstorch_available(), reason="cerebras-pytorch is installed here and reads HDF5 checkpoints")
def test_hdf5_checkpoints_point_at_the_cerebras_venv(tmp_path):
    (tmp_path / "real.mdl").write_bytes(HDF5_MAGIC + b"\0" * 64)
    with pytest.raises(CheckpointError, match=r"cstorch's HDF5 format.*\.venv-cerebras/bin/python -m crystal.cerebras"):
        import_checkpoint(tmp_path / "real.mdl", tmp_path / "run")


def test_bridge_cli_reports_errors_in_one_line(tmp_path, capsys):
    assert bridge_cli(["import", str(tmp_path / "none.mdl"), str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cstorch checkpoint") and "does not exist" in err and err.count("\n") == 1
    assert bridge_cli([]) == 2 and "usage" in capsys.readouterr().err


def test_adamw_auto_is_torchs_equation_on_cpu_gpu_and_cstorchs_on_csx(tmp_path):
    cluster = [*CSX, "backend.cerebras.mgmt_address=m:1", f"backend.cerebras.credentials_path={tmp_path}"]
    equation = lambda *o: compose_config(["backend=cerebras", *o]).backend.cerebras.adamw_equation  # noqa: E731
    assert compose_config(["backend=cerebras"]).backend.cerebras.adamw == "auto"
    assert equation() == equation("backend.cerebras.target=GPU") == "torch"
    assert compose_config(cluster).backend.cerebras.adamw_equation == "cstorch"
    assert compose_config([*cluster, "backend.cerebras.adamw=torch"]).backend.cerebras.adamw_equation == "torch"
    assert cerebras_settings(compose_config(["backend=cerebras"])).adamw == "torch"  # what the engine is handed


def test_resume_compares_only_what_the_backend_in_use_computes(tmp_path):
    cfg = lambda *o: compose_config(list(o))  # noqa: E731
    cs_torch = cfg("backend=cerebras", "backend.cerebras.adamw=torch")
    cs_cstorch = cfg("backend=cerebras", "backend.cerebras.adamw=cstorch")
    resident = cfg("backend=resident")
    # Another backend's settings compute nothing here: a move is an event, not a change.
    assert config_changes(cs_torch, resident) == config_changes(resident, cs_cstorch) == []
    assert config_changes(resident, cfg("backend=resident", "backend.cerebras.adamw=cstorch")) == []
    assert backend_switch(cs_cstorch, resident, tmp_path)["adamw"] == ["cstorch", "torch"]
    assert backend_switch(resident, cfg("backend=streaming"), tmp_path)["adamw"] == ["torch", "torch"]
    assert backend_switch(resident, resident, tmp_path) is None
    # On the same backend its computation settings are compared, resolved: auto on CPU is torch's equation.
    assert config_changes(cs_torch, cs_cstorch) == ["backend.cerebras.adamw"]
    assert config_changes(cs_torch, cfg("backend=cerebras")) == []
    csx = ["backend.cerebras.target=CSX", "backend.cerebras.mgmt_address=m:1", "backend.cerebras.credentials_path=c"]
    assert config_changes(cfg("backend=cerebras"), cfg("backend=cerebras", *csx)) == ["backend.cerebras.adamw"]
    assert config_changes(cs_cstorch, cfg("backend=cerebras", *csx, "backend.cerebras.num_csx=16")) == []
    assert config_changes(cs_torch, cfg("backend=cerebras", "backend.cerebras.skip_nonfinite=false")) == [
        "backend.cerebras.skip_nonfinite"
    ]
    # The half type matters only under mixed precision.
    assert config_changes(cs_torch, cfg("backend=cerebras", "backend.cerebras.half_dtype=float16")) == []
    bf16 = ["backend=cerebras", "train.precision=bf16"]
    assert config_changes(cfg(*bf16), cfg(*bf16, "backend.cerebras.half_dtype=float16")) == [
        "backend.cerebras.half_dtype"
    ]
