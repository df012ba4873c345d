"""backend=cerebras, crystal's side: config -> cstorch engine, the input function cstorch runs, and the
checkpoint bridge between this project's checkpoint directories and cstorch's checkpoint files.

The engine itself (streaming/backends/cerebras.py) knows nothing of crystal; this module hands it the
model adapter, the muP groups, the schedule and a data plan built from crystal's own loader.

Checkpoint bridge (both directions, lossless: weights, AdamW state, trainer state and config):

    python -m crystal.cerebras export <checkpoint dir | run dir> <file.mdl>   ours -> cstorch
    python -m crystal.cerebras import <file.mdl> <run dir>                   cstorch -> ours

In the Cerebras venv the file is written and read with cstorch.save/cstorch.load (cstorch's HDF5
format, what Cerebras tooling reads); elsewhere export writes the same layout with torch.save (which
cstorch.load also reads), and import reads such torch files but refuses HDF5 ones with a pointer to
the Cerebras venv. A run continues from an imported checkpoint with train.resume=<run dir>.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from crystal.checkpoint import load_checkpoint, resolve_resume, write_checkpoint
from crystal.config import Config, ModelConfig, OptimConfig, config_from_dict, config_to_dict
from crystal.data.loader import Batch, DataLoader
from crystal.data.prepare import cache_root, prepare_data
from crystal.errors import CheckpointError, CrystalError
from crystal.streaming.backends.base import AdamWSettings, ParamGroupSpec
from crystal.streaming.backends.cerebras import (
    VENV_HINT,
    CerebrasRun,
    CerebrasSettings,
    CstorchUnavailable,
    LinearSchedule,
    cstorch_available,
)
from crystal.streaming.backends.cerebras_state import CstorchLayoutError, cstorch_to_flat, flat_to_cstorch
from crystal.utils import REPO_ROOT

LAYOUT = "crystal-cstorch-1"  # the `crystal.format` entry of files this module writes
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


class CerebrasBackendError(CrystalError):
    """backend=cerebras cannot run here as configured."""


# ----------------------------------------------------------------------------------------------
# Config -> engine


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.train.out_dir) / cfg.train.run_name


def cerebras_settings(cfg: Config) -> CerebrasSettings:
    c = cfg.backend.cerebras
    cluster: dict[str, Any] = {}
    if c.target == "CSX":
        c.check_cluster()
        if not Path(c.credentials_path).expanduser().is_file():
            raise FileNotFoundError(
                f"backend.cerebras.credentials_path={c.credentials_path} does not exist; point it at the "
                "cluster's TLS certificate (e.g. /opt/cerebras/certs/tls.crt)"
            )
        # The cluster's input workers run crystal's loader: they need this checkout and the data cache.
        mounts = sorted({*c.mount_dirs, str(REPO_ROOT), str(cache_root(cfg.data).resolve())})
        cluster = {
            "mgmt_address": c.mgmt_address, "credentials_path": str(Path(c.credentials_path).expanduser()),
            "mgmt_namespace": c.mgmt_namespace, "num_csx": c.num_csx, "num_workers_per_csx": c.num_workers_per_csx,
            "mount_dirs": mounts, "python_paths": sorted({*c.python_paths, str(REPO_ROOT)}),
            "job_labels": list(c.job_labels),
        }  # fmt: skip
    return CerebrasSettings(
        target=c.target,
        cluster=cluster,
        artifact_dir=str(Path(c.artifact_dir) if c.artifact_dir else run_dir_of(cfg) / "cerebras"),
        compile_dir=c.compile_dir,
        compile_only=c.compile_only,
        half_dtype=c.half_dtype,
        skip_nonfinite=c.skip_nonfinite,
        adamw=c.adamw_equation,
    )


def linear_schedule(optim: OptimConfig, total_steps: int) -> LinearSchedule:
    """crystal.trainer.lr_at's schedule as numbers cstorch's LinearLR schedulers take."""
    horizon = optim.decay_steps if optim.decay_steps is not None else max(1, total_steps - optim.warmup_steps)
    return LinearSchedule(optim.lr, optim.final_lr, optim.warmup_steps, max(1, horizon))


def pack_batches(micro_batches: list[Batch], doc_masking: bool) -> dict[str, torch.Tensor]:
    """A step's micro-batches as stacked tensors, (A, B, S) each: what cstorch's DataLoader carries."""
    keys = ("input_ids", "targets", "positions", "doc_ids") if doc_masking else ("input_ids", "targets")
    return {k: torch.stack([getattr(mb, k) for mb in micro_batches]) for k in keys}


class StepStream:
    """The project's loader from a given step on, one packed step per item, without end."""

    def __init__(self, loader: DataLoader, doc_masking: bool) -> None:
        self.loader, self.doc_masking = loader, doc_masking

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield pack_batches(self.loader.next_step(), self.doc_masking)


def step_stream(config: dict[str, Any], start_step: int) -> StepStream:
    """cstorch's input function: builds crystal's loader from a plain config dict, positioned at
    `start_step`. Module-level and self-contained because on CSX it runs on the cluster's input workers."""
    cfg = config_from_dict(config)
    t = cfg.train
    data = prepare_data(cfg.data, cfg.model.vocab_size, log=lambda *_: None)
    loader = DataLoader(
        data, t.seq_len or cfg.model.max_seq_len, t.global_batch, t.micro_batch, t.seed,
        mixture=cfg.data.source_mixture(),
    )  # fmt: skip
    loader.sample_index = start_step * t.global_batch
    return StepStream(loader, t.doc_masking)


class CrystalDataPlan:
    """crystal.streaming.backends.cerebras.CerebrasDataPlan for crystal's Batch and loader."""

    def __init__(self, cfg: Config, adapter) -> None:
        self.cfg, self.adapter = cfg, adapter
        config = config_to_dict(cfg)
        # Workers may not share this process's environment: give them the resolved cache directory.
        config["data"]["cache_dir"] = str(cache_root(cfg.data).resolve())
        self.config = config

    def step_of(self, micro_batches: list[Batch]) -> int:
        return int(micro_batches[0].sample_index[0]) // self.cfg.train.global_batch

    def open_run(self, first_micro_batches: list[Batch]) -> CerebrasRun:
        t = self.cfg.train
        start_step = self.step_of(first_micro_batches)
        return CerebrasRun(
            input_fn=step_stream,
            input_args=(self.config, start_step),
            start_step=start_step,
            num_steps=max(1, t.steps - start_step),
            checkpoint_steps=t.ckpt_every if self.cfg.backend.cerebras.target == "CSX" else None,
        )

    def pack(self, micro_batches: list[Batch]) -> dict[str, torch.Tensor]:
        return pack_batches(micro_batches, self.cfg.train.doc_masking)

    def model_inputs(self, packed: dict[str, torch.Tensor], i: int) -> tuple:
        b = Batch(
            input_ids=packed["input_ids"][i], targets=packed["targets"][i],
            positions=packed["positions"][i] if "positions" in packed else None,
            doc_ids=packed["doc_ids"][i] if "doc_ids" in packed else None,
            sample_index=None, source_index=None, window_index=None,
        )  # fmt: skip
        return (b.input_ids, b.targets, *self.adapter.block_args(b))


def build_cerebras_engine(
    cfg: Config, adapter, groups: list[ParamGroupSpec], settings: AdamWSettings, amp: torch.dtype | None
):
    """What crystal.trainer.build_engine calls for backend.name=cerebras."""
    from crystal.streaming.backends.cerebras import CerebrasEngine

    cs = cerebras_settings(cfg)
    try:
        return CerebrasEngine(
            adapter, groups, settings, cs, linear_schedule(cfg.optim, cfg.train.steps), CrystalDataPlan(cfg, adapter),
            autocast_dtype=amp,
        )  # fmt: skip
    except CstorchUnavailable as e:
        raise CerebrasBackendError(str(e)) from None


# ----------------------------------------------------------------------------------------------
# Checkpoint bridge


def _groups_for(meta: dict[str, Any], config_yaml: str) -> tuple[list[ParamGroupSpec], OptimConfig]:
    """The muP groups and optimizer settings of the run a checkpoint came from."""
    from crystal.model import build_model
    from crystal.trainer import param_group_specs

    raw = OmegaConf.to_container(OmegaConf.create(config_yaml), resolve=True) if config_yaml.strip() else {}
    known = set(OptimConfig.__dataclass_fields__)
    optim = OptimConfig(**{k: v for k, v in (raw.get("optim") or {}).items() if k in known})
    model = build_model(ModelConfig(**meta["model_config"]), device="meta")
    return param_group_specs(model, optim.weight_decay), optim


def cstorch_layout_from_checkpoint(path: str | Path) -> dict[str, Any]:
    """One of our checkpoint directories -> a cstorch training state dict (with the `crystal` record)."""
    ckpt = load_checkpoint(path)
    groups, optim = _groups_for(ckpt.meta, ckpt.config_yaml)
    extra = {"format": LAYOUT, "trainer_json": json.dumps(ckpt.meta, sort_keys=True), "config_yaml": ckpt.config_yaml}
    return flat_to_cstorch(
        ckpt.tensors["model"], ckpt.tensors["optimizer"], groups, optim.betas, optim.eps, ckpt.meta["step"], extra
    )


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A materialised, contiguous, plain torch.Tensor (cstorch.load hands out deferred tensor subclasses,
    whose detach() is a plain tensor)."""
    return t.detach().cpu().clone().contiguous()


def checkpoint_from_cstorch_layout(state: dict[str, Any], run_dir: str | Path, source: str = "state") -> Path:
    """A cstorch training state dict written by `export` -> a verified checkpoint under run_dir."""
    record = state.get("crystal")
    if not isinstance(record, dict) or record.get("format") != LAYOUT:
        raise CheckpointError(
            f"{source} was not exported by crystal (no '{LAYOUT}' record), so it lacks the trainer state and "
            "parameter names this project needs; only files written by `python -m crystal.cerebras export` import"
        )
    meta = json.loads(record["trainer_json"])
    groups, _ = _groups_for(meta, record["config_yaml"])
    try:
        model, optimizer = cstorch_to_flat(state, groups)
    except CstorchLayoutError as e:
        raise CheckpointError(f"{source}: {e}") from None
    tensors = {"model": {k: _plain(v) for k, v in model.items()}}
    tensors["optimizer"] = {k: _plain(v) for k, v in optimizer.items()}
    return write_checkpoint(Path(run_dir), int(meta["step"]), tensors, meta, record["config_yaml"])


def _save(state: dict[str, Any], path: Path) -> None:
    if cstorch_available():
        import cerebras.pytorch as cstorch

        cstorch.save(state, str(path))
    else:
        torch.save(state, path)


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"cstorch checkpoint {path} does not exist")
    if cstorch_available():
        import cerebras.pytorch as cstorch

        try:
            return cstorch.load(str(path), map_location="cpu")
        except Exception as e:  # cstorch raises ValueError, RuntimeError, pickle errors, ... for bad files
            raise CheckpointError(f"{path} is not a readable cstorch checkpoint ({type(e).__name__}: {e})") from None
    with open(path, "rb") as f:
        if f.read(8) == HDF5_MAGIC:
            raise CheckpointError(
                f"{path} is in cstorch's HDF5 format, which needs cerebras-pytorch to read; convert it in the "
                f"Cerebras venv ({VENV_HINT}): .venv-cerebras/bin/python -m crystal.cerebras import {path} <run dir>"
            )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a file that is not a checkpoint
        raise CheckpointError(f"{path} is not a readable cstorch checkpoint ({type(e).__name__}: {e})") from None


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Our checkpoint (a checkpoint dir, or a run dir: its latest) -> a cstorch checkpoint file."""
    path = resolve_resume(str(checkpoint), Path(checkpoint))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    _save(cstorch_layout_from_checkpoint(path), tmp)
    tmp.replace(out)  # never leave a half-written file under the final name
    return out


def import_checkpoint(path: str | Path, run_dir: str | Path) -> Path:
    """A cstorch checkpoint file written by export -> a checkpoint directory under run_dir."""
    path = Path(path)
    return checkpoint_from_cstorch_layout(_load(path), run_dir, source=str(path))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = (
        "usage: python -m crystal.cerebras export <checkpoint dir | run dir> <file.mdl>\n"
        "       python -m crystal.cerebras import <file.mdl> <run dir>"
    )
    if len(argv) != 3 or argv[0] not in ("export", "import"):
        print(usage, file=sys.stderr)
        return 2
    from crystal.errors import USER_ERRORS

    try:
        if argv[0] == "export":
            out = export_checkpoint(argv[1], argv[2])
            print(f"wrote cstorch checkpoint {out}")
        else:
            out = import_checkpoint(argv[1], argv[2])
            print(f"wrote checkpoint {out}; continue with train.resume={Path(argv[2])}")
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
