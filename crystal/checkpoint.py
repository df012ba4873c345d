"""Atomic, self-verifying checkpoints, their retention, and the output-directory checks.

    <run>/checkpoints/step-00000200/
        model.safetensors       weights, fp32 (the master copy: compute may autocast to bf16), unwrapped names
        optimizer.safetensors   AdamW state per parameter name: <name>.exp_avg, <name>.exp_avg_sq, <name>.step
        trainer.json            step, tokens, loader state (sample index, excluded windows), every RNG state,
                                metrics cursor, fault-monitor state, stage, chunk id, fingerprints, git commit
        config.yaml             the fully resolved run config
        data_manifest.json      tokenizer sha256 and every shard's hash: the data fingerprint's preimage
        chunk.json              (release checkpoints) record of the data chunk that ends here
        manifest.json           sha256 + size of every file above, kind (release | keep), git commit; last
    <run>/checkpoints/latest    name of the newest complete checkpoint (updated after the rename)

A sharded store (torchrun, backend.streaming.shard_store) writes, instead of model/optimizer.safetensors,
one `shard-RRRRR-of-NNNNN.safetensors` per rank (its flat share of every unit: <unit>.master, .exp_avg,
.exp_avg_sq) and `shards.json` (each unit's parameters: name, offset, shape, Adam step). Each rank writes its
file into `step-XXXXXXXX.shards/` (tmp + rename, then a small record of its sha256); rank 0 moves them into its
`.tmp` directory, lists them in the manifest with the rest, and renames as always. load_checkpoint serves such a
checkpoint as the same named tensors (ShardedTensors), so it loads at any world size, into backend=resident too.

A checkpoint is written into `step-XXXXXXXX.tmp/`, every file fsynced, then renamed; a directory
counts only if its manifest exists and every hash matches, so kill -9 at any moment leaves the
previous checkpoint loadable. Tensors are copied off the training state before the write starts,
so the write runs in a background thread while training goes on (a second save waits for it). An engine
whose state dict is its own host tensors (backend=streaming) skips the copy: it keeps them unchanged until
the write has read them (hold_state), and the write streams them to disk tensor by tensor.

Retention: "release" checkpoints (every train.ckpt_every steps, step 0 and the last step) are kept
forever: they bound the released data chunks. "keep" checkpoints (train.ckpt_keep_every) exist for
resume and rollback; only the newest train.ckpt_keep_last survive. Deleting renames the directory
to `*.deleting` first, so a kill mid-delete never leaves a half-deleted directory that looks valid.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from crystal.errors import CheckpointError
from crystal.streaming.sharded import shard_range
from crystal.tokenizer import file_sha256
from crystal.utils import git_commit

FORMAT_VERSION = 1
SHARDS_JSON = "shards.json"
SHARD_WAIT_S = 1800.0  # how long rank 0 waits for the other ranks' shard files before it gives the write up
TENSOR_FILES = ("model", "optimizer")
STEP_DIR = re.compile(r"^step-(\d{8})$")
RELEASE, KEEP = "release", "keep"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(path: Path) -> int:
    return int(STEP_DIR.match(Path(path).name).group(1))


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


def snapshot(
    tensors: dict[str, dict[str, torch.Tensor]], into: dict[str, dict[str, torch.Tensor]] | None = None
) -> dict[str, dict[str, torch.Tensor]]:
    """Detached CPU copies, contiguous and unshared (safetensors refuses tensors sharing storage).

    `into`: buffers of an earlier snapshot to copy into when shapes match. Reusing them skips the page
    faults of fresh allocations (several times the copy itself on a busy host); GPU tensors land in
    pinned buffers so the device-to-host copy runs at full speed."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for group, items in tensors.items():
        old = (into or {}).get(group, {})
        out[group] = {}
        for k, v in items.items():
            buf = old.get(k)
            if buf is None or buf.shape != v.shape or buf.dtype != v.dtype:
                buf = torch.empty(v.shape, dtype=v.dtype, pin_memory=v.is_cuda)
            out[group][k] = buf.copy_(v.detach())
    return out


# safetensors' dtype names, in the order of its Dtype enum: it lays tensors out by that order, largest first
# (alignment), then by name. Writing the same layout keeps the bytes (and hashes) what save_file writes.
_ST_DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
              torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64",
              torch.int64: "I64"}  # fmt: skip
_ST_RANK = {dt: i for i, dt in enumerate(_ST_DTYPES)}


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
                 ) -> None:  # fmt: skip
    """A safetensors file written tensor by tensor straight from `tensors` (views of larger buffers included):
    no copy of the whole state in memory, whatever the installed safetensors (before 0.8 its save_file turned
    every tensor into bytes first: a second full copy, 79 GB at 7B). The same bytes as safetensors' save_file."""
    order = sorted(tensors, key=lambda k: (-_ST_RANK[tensors[k].dtype], k))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for k in order:
        t = tensors[k]
        size = t.numel() * t.element_size()
        header[k] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for k in order:
            t = tensors[k].detach().to("cpu").contiguous()  # a no-op for the host tensors a checkpoint holds
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


class LazyTensors(Mapping):
    """A safetensors file's tensors, each read from the file when asked for, with plain reads (no memory map, so
    nothing of the file counts as the process's memory): a resume of the 7B streaming store copies tensor by
    tensor into the store instead of first holding a second 79 GB copy of it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self._data_start, self._header = 8 + n, header
        self._dtypes = {name: dt for dt, name in _ST_DTYPES.items()}

    def __getitem__(self, key: str) -> torch.Tensor:
        info = self._header[key]
        begin, end = info["data_offsets"]
        out = torch.empty(info["shape"], dtype=self._dtypes[info["dtype"]])
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            if f.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy())) != end - begin:
                raise CheckpointError(f"{self.path} is truncated at tensor {key}; use an earlier checkpoint")
        return out

    def __iter__(self):
        return iter(self._header)

    def __len__(self) -> int:
        return len(self._header)

    def read_flat(self, key: str, begin: int, end: int) -> torch.Tensor:
        """Elements [begin, end) of the tensor's flat data, read alone (a sharded store loads only its share)."""
        info = self._header[key]
        dtype = self._dtypes[info["dtype"]]
        size = torch.empty((), dtype=dtype).element_size()
        out = torch.empty(end - begin, dtype=dtype)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + info["data_offsets"][0] + begin * size)
            if f.readinto(memoryview(out.view(torch.uint8).numpy())) != (end - begin) * size:
                raise CheckpointError(f"{self.path} is truncated at tensor {key}; use an earlier checkpoint")
        return out


def shard_file_name(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.safetensors"


class ShardedTensors(Mapping):
    """One group ("model" or "optimizer") of a sharded checkpoint as named tensors, each assembled from the ranks'
    files when asked for; read_flat(name, a, b) reads only the files that hold that range."""

    def __init__(self, path: Path, layout: dict[str, Any], group: str) -> None:
        self.world = layout["world"]
        self.files = [LazyTensors(Path(path) / shard_file_name(r, self.world)) for r in range(self.world)]
        self.index: dict[str, tuple] = {}  # name -> (unit, field, offset, shape, unit numel) or ("step", value)
        for unit, info in layout["units"].items():
            for name, offset, shape, step in info["params"]:
                if group == "model":
                    self.index[name] = (unit, "master", offset, shape, info["numel"])
                elif step > 0:  # torch's AdamW has no state for a parameter never updated
                    for field in ("exp_avg", "exp_avg_sq"):
                        self.index[f"{name}.{field}"] = (unit, field, offset, shape, info["numel"])
                    self.index[f"{name}.step"] = ("step", step)

    def read_flat(self, key: str, begin: int, end: int) -> torch.Tensor:
        unit, field, offset, _, numel = self.index[key]
        parts = []
        for r, f in enumerate(self.files):
            lo, hi = shard_range(numel, self.world, r)
            a, b = max(offset + begin, lo), min(offset + end, hi)
            if a < b:
                parts.append(f.read_flat(f"{unit}.{field}", a - lo, b - lo))
        return torch.cat(parts) if parts else torch.empty(0)

    def __getitem__(self, key: str) -> torch.Tensor:
        entry = self.index[key]
        if entry[0] == "step":
            return torch.tensor(entry[1], dtype=torch.float32)
        shape = entry[3]
        return self.read_flat(key, 0, math.prod(shape)).view(shape)

    def __iter__(self):
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


def tensor_bytes(tensors: dict[str, dict[str, torch.Tensor]]) -> int:
    return sum(v.numel() * v.element_size() for items in tensors.values() for v in items.values())


def _write_latest(root: Path, name: str) -> None:
    tmp = root / "latest.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / "latest")


def _write_error(final: Path, err: BaseException) -> CheckpointError:
    previous = find_latest(final.parent.parent)
    keep = f"; the last complete checkpoint is {previous}" if previous else ""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"the disk is full: free space under {final.parent} and continue with train.resume=latest"
    elif isinstance(err, OSError):
        fix = f"check that {final.parent} is writable, then continue with train.resume=latest"
    else:
        fix = "continue with train.resume=latest"
    return CheckpointError(f"writing checkpoint {final} failed ({err}); {fix}{keep}")


def _shards_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / (step_dir_name(step) + ".shards")


def write_shard(run_dir: Path, step: int, rank: int, world: int, tensors: dict[str, torch.Tensor]) -> Path:
    """One rank's share of a sharded store, for rank 0's write_checkpoint(shards=world) to collect: the file, then
    a record of its sha256 and size, each written under a temporary name and renamed, so the collector never sees
    half of either."""
    folder = _shards_dir(run_dir, step)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / shard_file_name(rank, world)
    tmp = final.with_name(final.name + ".tmp")
    save_tensors(tensors, tmp, metadata={"format": str(FORMAT_VERSION), "rank": str(rank), "world": str(world)})
    _fsync_file(tmp)
    os.replace(tmp, final)
    record = final.with_name(final.name + ".json.tmp")
    record.write_text(json.dumps({"sha256": file_sha256(final), "bytes": final.stat().st_size}))
    os.replace(record, final.with_name(final.name + ".json"))
    return final


def _collect_shards(run_dir: Path, step: int, world: int, into: Path, timeout: float) -> dict[str, dict[str, Any]]:
    """Wait for every rank's shard of `step`, move them into `into`; their manifest entries."""
    folder, deadline = _shards_dir(run_dir, step), time.monotonic() + timeout
    names = [shard_file_name(r, world) for r in range(world)]
    while not all((folder / f"{n}.json").is_file() for n in names):
        if time.monotonic() > deadline:
            missing = [n for n in names if not (folder / f"{n}.json").is_file()]
            raise CheckpointError(f"ranks never wrote {missing[:3]} of {folder} within {timeout:.0f} s (a rank died?)")
        time.sleep(0.02)
    files = {}
    for n in names:
        files[n] = json.loads((folder / f"{n}.json").read_text())
        os.replace(folder / n, into / n)
    shutil.rmtree(folder, ignore_errors=True)
    return files


def write_checkpoint(
    run_dir: Path,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    meta: dict[str, Any],
    config_yaml: str,
    kind: str = RELEASE,
    extra_files: dict[str, bytes | str | Callable[[], bytes | str]] | None = None,
    shards: int = 0,
) -> Path:
    """Write one checkpoint atomically; returns its final directory. Tensors should be a snapshot. `shards` > 0:
    the tensors are that many ranks' shard files (write_shard), collected here instead of `tensors`.

    `extra_files` values may be callables: they run here (in the writer thread), e.g. a chunk record."""
    t0 = time.perf_counter()
    root = Path(run_dir) / "checkpoints"
    final = root / step_dir_name(step)
    tmp = root / (step_dir_name(step) + ".tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for group in TENSOR_FILES if not shards else ():
            meta_st = {"format": str(FORMAT_VERSION)}
            save_tensors(tensors.get(group, {}), tmp / f"{group}.safetensors", metadata=meta_st)
        (tmp / "trainer.json").write_text(json.dumps(meta, sort_keys=True))
        (tmp / "config.yaml").write_text(config_yaml)
        for name, content in (extra_files or {}).items():
            content = content() if callable(content) else content
            (tmp / name).write_bytes(content.encode() if isinstance(content, str) else content)
        files = {}
        for f in sorted(tmp.iterdir()):
            _fsync_file(f)
            files[f.name] = {"sha256": file_sha256(f), "bytes": f.stat().st_size}
        if shards:  # each rank hashed its own (fsynced) file: rank 0 does not read the whole store again
            files.update(_collect_shards(run_dir, step, shards, tmp, SHARD_WAIT_S))
        manifest = {
            "format": FORMAT_VERSION, "step": step, "kind": kind, "git_commit": git_commit(), "files": files,
            "write_s": round(time.perf_counter() - t0, 4),
        }  # fmt: skip
        with open(tmp / "manifest.json", "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # the same step written again (a replay after a rollback): the new one replaces it
            _delete_dir(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _write_latest(root, final.name)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a partial directory behind
        raise _write_error(final, e) from e
    return final


def read_manifest(path: Path) -> dict[str, Any]:
    mpath = Path(path) / "manifest.json"
    if not mpath.is_file():
        raise CheckpointError(f"{path} has no manifest.json: incomplete or not a checkpoint; use an earlier one")
    try:
        return json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mpath} is corrupt ({e}); use an earlier checkpoint") from None


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check the manifest and every file's hash; raise CheckpointError naming the first problem."""
    path = Path(path)
    manifest = read_manifest(path)
    for name, info in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing; use an earlier checkpoint")
        if f.stat().st_size != info["bytes"] or file_sha256(f) != info["sha256"]:
            raise CheckpointError(
                f"checkpoint file {f} fails its sha256 check (corrupt or truncated); use an earlier checkpoint"
            )
    return manifest


def load_checkpoint(path: str | os.PathLike, verify: bool = True, lazy: bool = False) -> Checkpoint:
    """lazy: each tensor is read from its file when first asked for (LazyTensors), for a caller that copies
    them one at a time into memory of its own (the streaming store)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if verify:
        verify_checkpoint(path)
    if (path / SHARDS_JSON).is_file():  # a sharded store's: named tensors assembled from the ranks' files
        layout = json.loads((path / SHARDS_JSON).read_text())
        tensors = {g: ShardedTensors(path, layout, g) for g in TENSOR_FILES}
        return Checkpoint(path, tensors, load_meta(path), (path / "config.yaml").read_text())
    read = LazyTensors if lazy else lambda p: load_file(str(p))
    tensors = {g: read(path / f"{g}.safetensors") for g in TENSOR_FILES}
    return Checkpoint(path, tensors, load_meta(path), (path / "config.yaml").read_text())


def load_meta(path: Path) -> dict[str, Any]:
    """trainer.json alone (no tensors): cheap enough to scan every checkpoint of a run."""
    try:
        return json.loads((Path(path) / "trainer.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}/trainer.json is unreadable ({e}); use an earlier checkpoint") from None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories (manifest present), oldest first. Ignores *.tmp and *.deleting."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and p.is_dir() and (p / "manifest.json").is_file()]
    return sorted(found, key=step_of)


def find_latest(run_dir: Path, skipped: list[tuple[Path, CheckpointError]] | None = None) -> Path | None:
    """The newest checkpoint that verifies. Newer ones that fail verification are passed over and, when the
    caller gives a `skipped` list, appended to it with their error, for the caller to report."""
    for p in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(p)
            return p
        except CheckpointError as e:
            if skipped is not None:
                skipped.append((p, e))
    return None


def resolve_resume(
    resume: str, run_dir: Path, skipped: list[tuple[Path, CheckpointError]] | None = None
) -> Path | None:
    """train.resume: 'latest' (this run's newest valid checkpoint; None when it has none yet), a checkpoint dir,
    or a run dir. Checkpoints passed over for failing verification go to `skipped` (see find_latest)."""
    if resume == "latest":
        return find_latest(run_dir, skipped)
    path = Path(resume)
    if (path / "checkpoints").is_dir():
        found = find_latest(path, skipped)
        if found is None:
            raise CheckpointError(f"train.resume={resume}: run directory holds no complete checkpoint")
        return found
    if not path.is_dir():
        raise CheckpointError(f"train.resume={resume}: no such checkpoint directory")
    return path


# ----------------------------------------------------------------------------------------------
# Retention, rollback bookkeeping, leftovers


def _delete_dir(path: Path) -> None:
    doomed = path.with_name(path.name + ".deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def latest_pointer(run_dir: Path) -> str | None:
    p = Path(run_dir) / "checkpoints" / "latest"
    return p.read_text().strip() if p.is_file() else None


def prune(run_dir: Path, keep_last: int) -> list[Path]:
    """Delete "keep" checkpoints beyond the newest `keep_last`; never a release one, never `latest`'s target.
    Called from the writer thread after a write, so it never races a checkpoint being written."""
    protected = latest_pointer(run_dir)
    keeps = []
    for p in list_checkpoints(run_dir):
        try:
            if read_manifest(p).get("kind", RELEASE) == KEEP:
                keeps.append(p)
        except CheckpointError:
            continue  # unreadable: leave it for a human
    doomed = [p for p in keeps[: max(0, len(keeps) - keep_last)] if p.name != protected]
    for p in doomed:
        _delete_dir(p)
    return doomed


def move_aside(run_dir: Path, after_step: int, label: str) -> list[Path]:
    """Move checkpoints newer than `after_step` (an abandoned branch, after a rollback) to checkpoints/<label>/,
    kept for inspection but invisible to resume; points `latest` at the newest one left."""
    root = Path(run_dir) / "checkpoints"
    aside, n = root / label, 1
    while aside.exists():  # the same rollback met again after a resume: keep both sets
        aside, n = root / f"{label}.{n}", n + 1
    moved = []
    for p in list_checkpoints(run_dir):
        if step_of(p) > after_step:
            aside.mkdir(exist_ok=True)
            os.replace(p, aside / p.name)
            moved.append(aside / p.name)
    remaining = list_checkpoints(run_dir)
    if remaining:
        _write_latest(root, remaining[-1].name)
    return moved


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Partial directories a killed process left (`*.tmp` being written, `*.deleting` being deleted)."""
    root = Path(run_dir) / "checkpoints"
    gone = [p for p in root.glob("step-*") if p.is_dir() and p.name.endswith((".tmp", ".deleting", ".shards"))]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".probe-*"):
        p.unlink(missing_ok=True)
    return gone


def check_output_dir(run_dir: Path, checkpoint_bytes: int, copies: int = 2) -> None:
    """Before training: the run directory can be created and written, and holds `copies` checkpoints."""
    root = Path(run_dir) / "checkpoints"
    probe = root / f".probe-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"crystal")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise CheckpointError(
            f"cannot write to output directory {run_dir} ({e.strerror or e}); fix its permissions or free space, "
            f"or choose another train.out_dir"
        ) from None
    check_free_space(root, checkpoint_bytes * copies, what=f"{copies} checkpoints")


def check_free_space(directory: Path, needed: int, what: str = "this checkpoint") -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise CheckpointError(
            f"only {free / 2**20:,.0f} MB free under {directory} but {what} need about {needed / 2**20:,.0f} MB; "
            f"free space or choose another train.out_dir"
        )


# ----------------------------------------------------------------------------------------------
# Background writes


class AsyncCheckpointer:
    """Writes snapshots in a background thread; a second save waits for the first to finish.

    The calling thread pays only for the snapshot (one copy of weights + optimizer state); a write
    that fails surfaces as a CheckpointError at the next poll(), save() or wait(), never silently."""

    def __init__(self, keep_last: int | None = None) -> None:
        self.keep_last = keep_last
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_path: Path | None = None
        self.last_stall_s = 0.0  # snapshot: the time training waited
        self.last_write_s = 0.0  # background write, wall clock
        self.last_write_cpu_s = 0.0  # CPU time the writer thread used (what it can take from training)
        self._buffers: dict | None = None  # the last snapshot, reused by the next (its write has finished then)

    def save(
        self, run_dir: Path, step: int, tensors, meta, config_yaml: str, blocking: bool = False,
        kind: str = RELEASE, extra_files: dict | None = None, copy: bool = True,
        shard: tuple[int, int, dict[str, torch.Tensor]] | None = None, assemble: bool = True,
    ) -> None:  # fmt: skip
        """copy=False: write `tensors` as they are, no snapshot; the caller keeps them unchanged until join().
        shard = (rank, world, this rank's share): a sharded store's checkpoint; its share is written as it is (no
        copy) and, when `assemble` (rank 0), the checkpoint is made of every rank's."""
        self.wait()
        t0 = time.perf_counter()
        root = Path(run_dir) / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        check_free_space(root, tensor_bytes(tensors) + tensor_bytes({"shard": shard[2]} if shard else {}) + (1 << 20))
        if copy:
            snap = self._buffers = snapshot(tensors, into=self._buffers)
        else:
            snap, self._buffers = tensors, None  # the caller's own tensors: never buffers to copy into later
        self.last_stall_s = time.perf_counter() - t0

        def work() -> None:
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                if shard is not None:
                    write_shard(run_dir, step, *shard)
                if assemble:
                    sharded = {"shards": shard[1]} if shard else {}
                    self.last_path = write_checkpoint(run_dir, step, snap, meta, config_yaml, kind, extra_files,
                                                      **sharded)  # fmt: skip
                if assemble and self.keep_last is not None:
                    prune(run_dir, self.keep_last)
            except BaseException as e:  # surfaced on the next poll()/wait()
                self._error = e
            self.last_write_s, self.last_write_cpu_s = time.perf_counter() - wall, time.thread_time() - cpu

        self._thread = threading.Thread(target=work, name=f"checkpoint-{step}", daemon=False)
        self._thread.start()
        if blocking:
            self.wait()

    def join(self) -> None:
        """Block until the running write (if any) has finished; its error, if any, is left for poll()/wait()."""
        thread = self._thread
        if thread is not None:
            thread.join()

    def poll(self) -> None:
        """Raise now if a finished background write failed; never blocks."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, CheckpointError):
                raise err
            raise CheckpointError(f"checkpoint write failed: {err}") from err
