"""Atomic, self-verifying checkpoints.

    <run>/checkpoints/step-00000200/
        model.safetensors       weights (unwrapped names, fp32)
        optimizer.safetensors   AdamW state per parameter name: <name>.exp_avg, <name>.exp_avg_sq, <name>.step
        trainer.json            step, tokens, loader state, RNG states, metrics cursor, stage, fingerprints
        config.yaml             the fully resolved run config
        manifest.json           sha256 + size of every file above, git commit; written last
    <run>/checkpoints/latest    name of the newest complete checkpoint (updated after the rename)

A checkpoint is written into `step-XXXXXXXX.tmp/`, every file fsynced, then renamed; a directory
counts only if its manifest exists and every hash matches, so kill -9 at any moment leaves the
previous checkpoint loadable. Tensors are copied off the training state before the write starts,
so the write can run in a background thread while training goes on.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from crystal.errors import CheckpointError
from crystal.tokenizer import file_sha256
from crystal.utils import git_commit

FORMAT_VERSION = 1
TENSOR_FILES = ("model", "optimizer")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


@dataclass
class Checkpoint:
    path: Path
    tensors: dict[str, dict[str, torch.Tensor]]  # "model" / "optimizer" -> flat name -> tensor
    meta: dict[str, Any]  # trainer.json
    config_yaml: str


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def snapshot(tensors: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """Detached CPU copies, contiguous and unshared (safetensors refuses tensors sharing storage)."""
    return {
        group: {k: v.detach().to("cpu", copy=True).contiguous() for k, v in items.items()}
        for group, items in tensors.items()
    }


def write_checkpoint(
    run_dir: Path,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    meta: dict[str, Any],
    config_yaml: str,
) -> Path:
    """Write one checkpoint atomically; returns its final directory. Tensors should be a snapshot."""
    root = Path(run_dir) / "checkpoints"
    final = root / step_dir_name(step)
    tmp = root / (step_dir_name(step) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for group in TENSOR_FILES:
        save_file(tensors.get(group, {}), str(tmp / f"{group}.safetensors"), metadata={"format": str(FORMAT_VERSION)})
    (tmp / "trainer.json").write_text(json.dumps(meta, sort_keys=True))
    (tmp / "config.yaml").write_text(config_yaml)
    files = {}
    for f in sorted(tmp.iterdir()):
        _fsync_file(f)
        files[f.name] = {"sha256": file_sha256(f), "bytes": f.stat().st_size}
    manifest = {"format": FORMAT_VERSION, "step": step, "git_commit": git_commit(), "files": files}
    with open(tmp / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # a replayed step after a rollback: the new one replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    latest_tmp = root / "latest.tmp"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, root / "latest")
    return final


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check the manifest and every file's hash; raise CheckpointError naming the first problem."""
    path = Path(path)
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise CheckpointError(f"{path} has no manifest.json: incomplete or not a checkpoint; use an earlier one")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mpath} is corrupt ({e}); use an earlier checkpoint") from None
    for name, info in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing; use an earlier checkpoint")
        if f.stat().st_size != info["bytes"] or file_sha256(f) != info["sha256"]:
            raise CheckpointError(
                f"checkpoint file {f} fails its sha256 check (corrupt or truncated); use an earlier checkpoint"
            )
    return manifest


def load_checkpoint(path: str | os.PathLike, verify: bool = True) -> Checkpoint:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if verify:
        verify_checkpoint(path)
    tensors = {g: load_file(str(path / f"{g}.safetensors")) for g in TENSOR_FILES}
    meta = json.loads((path / "trainer.json").read_text())
    return Checkpoint(path, tensors, meta, (path / "config.yaml").read_text())


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories (manifest present), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp") and (p / "manifest.json").is_file()
    )


def find_latest(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; a corrupt newest one is skipped (and reported by the caller)."""
    for p in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(p)
            return p
        except CheckpointError:
            continue
    return None


def resolve_resume(resume: str, run_dir: Path) -> Path:
    """train.resume: 'latest' (this run's newest valid checkpoint), a checkpoint dir, or a run dir."""
    if resume == "latest":
        found = find_latest(run_dir)
        if found is None:
            raise CheckpointError(f"train.resume=latest but {run_dir}/checkpoints holds no complete checkpoint")
        return found
    path = Path(resume)
    if (path / "checkpoints").is_dir():
        found = find_latest(path)
        if found is None:
            raise CheckpointError(f"train.resume={resume}: run directory holds no complete checkpoint")
        return found
    if not path.is_dir():
        raise CheckpointError(f"train.resume={resume}: no such checkpoint directory")
    return path


class AsyncCheckpointer:
    """Writes snapshots in a background thread; a second save waits for the first to finish."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_path: Path | None = None

    def save(self, run_dir: Path, step: int, tensors, meta, config_yaml: str, blocking: bool = False) -> None:
        self.wait()
        snap = snapshot(tensors)

        def work() -> None:
            try:
                self.last_path = write_checkpoint(run_dir, step, snap, meta, config_yaml)
            except BaseException as e:  # surfaced on the next wait()
                self._error = e

        self._thread = threading.Thread(target=work, name=f"checkpoint-{step}", daemon=False)
        self._thread.start()
        if blocking:
            self.wait()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise CheckpointError(f"checkpoint write failed: {err}") from err
