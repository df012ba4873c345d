"""LLM360-style release: data chunk k <-> checkpoint k <-> metrics rows, tied by one sha256 manifest.

    python -m crystal.release build outputs/default release/      lay out a release from a finished run
    python -m crystal.release verify release/ --chunk 2           replay chunk 2 from checkpoint 1, compare
    python -m crystal.release verify release/                     every chunk

Chunk k is exactly the samples consumed between release checkpoint k-1 and release checkpoint k
(checkpoint -1 is `init`, the state training started from: step 0, or the previous stage's end).
The loader's position at each checkpoint bounds the chunk; windows skipped after a rollback are
left out. A chunk is written in Amber's layout (LLM360/AmberDatasets `train_000.jsonl`): one line
per training sequence, `{"token_ids": [S+1 ints], "source": ..., "doc_ids": [...], "sample_index": ...,
"window": ...}` (crystal.data.chunks.iter_chunk), so tools written for Amber read it unchanged; the
extra keys say where the sequence came from.

    <release>/
      manifest.json                  every file's sha256; per chunk: its file, record, the checkpoints
                                     before and after, the steps and the metrics rows it produced
      data/train_000.jsonl           chunk 0 in Amber's layout
      data/train_000.record.json     sample range, excluded windows, documents, tokens per source, hashes
      checkpoints/init/              where training started (step 0)
      checkpoints/ckpt_000/          after chunk 0 (the run's checkpoint directory, manifest included)
      configs/stage-<n>.yaml         the resolved config of each stage's run
      metrics/metrics.jsonl          per step and per checkpoint (+ metrics.replaced.jsonl after rollbacks)
      tokenizer/tokenizer.model      and data_manifest.json (the data fingerprint's preimage)
      evals/                         evaluations added after the build (`python -m crystal.analysis code-eval
                                     <release>`), listed in the manifest's files and `evaluations`

`verify` checks every file it uses (and every evaluation file) against the manifest, naming any altered
file, loads checkpoint k-1, trains on the chunk's token ids with the recorded config (same engine, same
step function, the recorded torch thread count), and compares every weight and optimizer tensor with
checkpoint k and every loss with the metrics rows: bitwise on CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crystal.data import chunks as data_chunks
from crystal.errors import CrystalError
from crystal.tokenizer import ADDED_TOKENS, EOS_ID, file_sha256

FORMAT_VERSION = 1
EVALS_DIR = "evals"  # evaluation outputs added to a built release


class ReleaseError(CrystalError):
    """A release that cannot be built, or that fails verification."""


# ----------------------------------------------------------------------------------------------
# Chunks (what training consumed between two checkpoints)


def chunk_record(loader, chunk: int, start: int, end: int, excluded: list, steps: list[int]) -> dict[str, Any]:
    """The data pipeline's record of samples [start, end) minus `excluded` (crystal.data.chunks: documents,
    tokens per source, token sha256, recipe), numbered and tied to the steps that consumed it."""
    return {"chunk": chunk, "steps": steps, **data_chunks.chunk_record(loader, start, end, excluded)}


def batch_from_rows(rows: list[dict[str, Any]], fim_pad_id: int):
    """Rows of a released chunk -> the Batch training built from the same samples (bitwise).

    Segment starts follow EOS tokens: every document in the token stream ends with EOS, which is how
    the loader's document offsets were made."""
    from crystal.data.loader import IGNORE_INDEX, Batch

    tokens = torch.tensor([r["token_ids"] for r in rows], dtype=torch.int64)  # (B, S+1)
    b, s = tokens.shape[0], tokens.shape[1] - 1
    targets = tokens[:, 1:].clone()
    targets[targets == fim_pad_id] = IGNORE_INDEX
    starts = torch.zeros(b, s, dtype=torch.int32)
    starts[:, 1:] = (tokens[:, : s - 1] == EOS_ID).to(torch.int32)  # a document starts after an EOS
    doc_ids = torch.cumsum(starts, dim=1, dtype=torch.int32)
    idx = torch.arange(s, dtype=torch.int64).expand(b, s)
    seg_start = torch.where(starts.bool(), idx, torch.zeros_like(idx)).cummax(dim=1).values
    return Batch(
        input_ids=tokens[:, :-1].contiguous(), targets=targets, positions=idx - seg_start, doc_ids=doc_ids,
        sample_index=np.array([r["sample_index"] for r in rows], dtype=np.int64),
        source_index=np.full(b, -1, dtype=np.int64), window_index=np.array([r.get("window", -1) for r in rows]),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Build


def _sha_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _copy(src: Path, dst: Path, link: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            dst.hardlink_to(src)
            return
        except OSError:
            pass
    shutil.copyfile(src, dst)


def release_checkpoints(run_dir: Path) -> list[Path]:
    from crystal.checkpoint import RELEASE, list_checkpoints, read_manifest

    return [p for p in list_checkpoints(run_dir) if read_manifest(p).get("kind", RELEASE) == RELEASE]


def _metrics_lines(metrics: Path) -> list[tuple[int, bytes, dict[str, Any]]]:
    out = []
    for n, raw in enumerate(metrics.read_bytes().splitlines(keepends=True)):
        try:
            out.append((n, raw, json.loads(raw)))
        except json.JSONDecodeError:
            continue
    return out


def _metrics_span(lines: list, step0: int, step1: int) -> list:
    """The metrics rows chunk (step0, step1] produced: after checkpoint step0's row, up to checkpoint step1's."""
    from crystal.checkpoint import step_dir_name

    at = {r.get("checkpoint"): n for n, (_, _, r) in enumerate(lines) if r.get("kind") == "checkpoint"}
    a, b = at.get(step_dir_name(step0)), at.get(step_dir_name(step1))
    if a is None or b is None:
        raise ReleaseError(f"metrics.jsonl lacks the checkpoint rows of steps {step0} and {step1}; is it this run's?")
    return lines[a + 1 : b + 1]


def build(run_dir: Path, out_dir: Path, link: bool = False, log=print) -> dict[str, Any]:
    """Lay out the release of one run (see the module docstring); returns the manifest."""
    from tqdm.auto import tqdm

    from crystal.checkpoint import load_meta, verify_checkpoint
    from crystal.trainer import config_from_yaml

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    ckpts = release_checkpoints(run_dir)
    if len(ckpts) < 2:
        raise ReleaseError(f"{run_dir} has {len(ckpts)} release checkpoint(s); a release needs the start and one more")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ReleaseError(f"{out_dir} exists and is not empty; choose a new release directory")
    for p in ckpts:
        verify_checkpoint(p)
    metas = [load_meta(p) for p in ckpts]
    cfg = config_from_yaml((ckpts[-1] / "config.yaml").read_text())
    t = cfg.train
    manifest_path = ckpts[-1] / "data_manifest.json"
    loader = data_chunks.loader_from_config(
        cfg, json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    )
    data = loader.data
    out_dir.mkdir(parents=True, exist_ok=True)

    names = {ckpts[0]: "init"}
    for p, m in zip(ckpts[1:], metas[1:]):
        names[p] = f"ckpt_{m['ends_chunk']:03d}"
    for p in ckpts:
        for f in sorted(p.iterdir()):
            _copy(f, out_dir / "checkpoints" / names[p] / f.name, link)

    stage = metas[-1].get("stage", 0)
    _copy(run_dir / "config.yaml", out_dir / "configs" / f"stage-{stage}.yaml", False)
    origin = started_from(run_dir, ckpts[0])
    if origin and origin.get("config"):  # the stage before: its resolved config sits next to this one
        _copy(Path(origin.pop("config")), out_dir / "configs" / f"stage-{origin['stage']}.yaml", False)
    _copy(data.tokenizer.path, out_dir / "tokenizer" / "tokenizer.model", False)
    (out_dir / "tokenizer" / "data_manifest.json").write_text(
        json.dumps({**data.manifest, "fingerprint": data.fingerprint}, indent=1, sort_keys=True)
    )
    for name in ("metrics.jsonl", "metrics.replaced.jsonl"):
        if (run_dir / name).is_file():
            _copy(run_dir / name, out_dir / "metrics" / name, False)
    lines = _metrics_lines(out_dir / "metrics" / "metrics.jsonl")

    chunks = []
    for prev, cur, pm, cm in tqdm(list(zip(ckpts, ckpts[1:], metas, metas[1:])), desc="chunks", leave=False):
        k = cm["ends_chunk"]
        start, end = pm["loader"]["sample_index"], cm["loader"]["sample_index"]
        excluded = cm["loader"].get("excluded", [])
        steps = [pm["step"], cm["step"]]
        record = chunk_record(loader, k, start, end, excluded, steps)
        trained = json.loads((cur / "chunk.json").read_text()) if (cur / "chunk.json").is_file() else None
        if trained is not None and trained["tokens_sha256"] != record["tokens_sha256"]:
            raise ReleaseError(
                f"chunk {k} regenerated from the data recipe differs from what training recorded in {cur}/chunk.json "
                f"(token hash {record['tokens_sha256'][:12]} vs {trained['tokens_sha256'][:12]}); the data changed"
            )
        path = out_dir / "data" / f"train_{k:03d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        fim_pad = loader.fim_pad_id
        with open(path, "w") as f:
            for r in data_chunks.iter_chunk(loader, start, end, excluded):
                f.write(json.dumps(r, separators=(",", ":")) + "\n")
        _check_rows_rebuild(path, loader, fim_pad, t.global_batch)
        record["sha256"] = file_sha256(path)
        rec_path = path.with_name(f"train_{k:03d}.record.json")
        rec_path.write_text(json.dumps(record, indent=1, sort_keys=True))
        span = _metrics_span(lines, pm["step"], cm["step"])
        chunks.append({
            "chunk": k, "data": str(path.relative_to(out_dir)), "record": str(rec_path.relative_to(out_dir)),
            "sha256": record["sha256"], "tokens_sha256": record["tokens_sha256"], "num_samples": record["num_samples"],
            "num_tokens": record["num_tokens"], "sample_range": [start, end], "excluded": record["excluded"],
            "steps": steps, "start_checkpoint": f"checkpoints/{names[prev]}", "checkpoint": f"checkpoints/{names[cur]}",
            "metrics": {"file": "metrics/metrics.jsonl", "lines": [span[0][0], span[-1][0]],
                        "sha256": hashlib.sha256(b"".join(raw for _, raw, _ in span)).hexdigest()},
        })  # fmt: skip

    files = {str(p.relative_to(out_dir)): file_sha256(p) for p in sorted(out_dir.rglob("*")) if p.is_file()}
    manifest = {
        "format": FORMAT_VERSION, "run": str(run_dir), "model": cfg.model.name, "stage": stage,
        "git_commit": metas[-1].get("git_commit"), "data_fingerprint": data.fingerprint,
        "tokenizer_sha256": data.tokenizer.sha256, "global_batch": t.global_batch, "seq_len": loader.seq_len,
        "started_from": origin,
        "checkpoints": {names[p]: {"step": m["step"], "tokens": m["tokens"], "ends_chunk": m.get("ends_chunk"),
                                   "manifest_sha256": file_sha256(p / "manifest.json")} for p, m in zip(ckpts, metas)},
        "chunks": chunks, "files": files,
    }  # fmt: skip
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    log(f"release: {len(chunks)} chunks, {len(ckpts)} checkpoints, {len(files)} files in {out_dir}; "
        f"manifest sha256 {file_sha256(out_dir / 'manifest.json')}")  # fmt: skip
    return manifest


def add_evaluation(release: Path, name: str, files: list[Path], meta: dict[str, Any]) -> dict[str, Any]:
    """Record evaluation outputs written under <release>/evals/ in the manifest: each file's sha256 in `files`
    and an `evaluations[name]` entry (its files and how they were made). verify() checks them like any other
    file. The manifest is replaced atomically: a crash leaves the previous one."""
    release = Path(release)
    manifest = _read_manifest(release)
    base = (release / EVALS_DIR).resolve()
    rels = []
    for f in files:
        f = Path(f).resolve()
        if base not in f.parents or not f.is_file():
            raise ReleaseError(f"{f} is not a file under {release / EVALS_DIR}; evaluation outputs go there")
        rel = str(f.relative_to(release.resolve()))
        manifest["files"][rel] = file_sha256(f)
        rels.append(rel)
    manifest.setdefault("evaluations", {})[name] = {**meta, "files": rels}
    tmp = release / "manifest.json.tmp"
    with open(tmp, "w") as fh:
        fh.write(json.dumps(manifest, indent=1, sort_keys=True))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, release / "manifest.json")
    return manifest


def started_from(run_dir: Path, init: Path) -> dict[str, Any] | None:
    """Where a run began when it did not start from scratch: the checkpoint of the previous stage (or run),
    and whether this run's first checkpoint holds exactly its weights and optimizer state."""
    from crystal.checkpoint import load_meta

    events = [r for _, _, r in _metrics_lines(run_dir / "metrics.jsonl") if r.get("kind") == "event"]
    event = next((e for e in events if e.get("event") in ("stage_transition", "forked")), None)
    if event is None:
        return None
    src = Path(event["from_checkpoint"])
    out: dict[str, Any] = {"checkpoint": str(src), "event": event["event"], "stage": event.get("from_stage")}
    if (src / "manifest.json").is_file():
        meta = load_meta(src)
        out.update(stage=meta.get("stage", 0), step=meta["step"], manifest_sha256=file_sha256(src / "manifest.json"),
                   config=str(src / "config.yaml"))  # fmt: skip
        # a sharded store's checkpoint holds shard-*.safetensors instead (docs/cluster.md): the same test on them
        files = [f for f in ("model.safetensors", "optimizer.safetensors") if (src / f).is_file()] or sorted(
            p.name for p in src.glob("shard-*.safetensors"))  # fmt: skip
        out["same_tensors_as_init"] = all(
            (init / f).is_file() and file_sha256(src / f) == file_sha256(init / f) for f in files
        )
    return out


def describe_run(run_dir: Path) -> dict[str, Any]:
    """The run's release-readiness in one file (<run>/release_manifest.json, written at the end of training):
    release checkpoint k <-> chunk k (its record as training wrote it) <-> metrics rows, with hashes.
    `build` turns it into a release by materialising the chunks from the data recipe."""
    from crystal.checkpoint import load_meta, step_dir_name

    ckpts = release_checkpoints(run_dir)
    lines = _metrics_lines(run_dir / "metrics.jsonl")
    chunks = []
    for prev, cur in zip(ckpts, ckpts[1:]):
        meta, record = load_meta(cur), json.loads((cur / "chunk.json").read_text())
        span = _metrics_span(lines, load_meta(prev)["step"], meta["step"])
        chunks.append({
            "chunk": meta["ends_chunk"], "start_checkpoint": prev.name, "checkpoint": cur.name,
            "steps": record["steps"], "sample_range": record["sample_range"], "excluded": record["excluded"],
            "num_tokens": record["num_tokens"],
            "tokens_per_source": record["tokens_per_source"], "tokens_sha256": record["tokens_sha256"],
            "checkpoint_manifest_sha256": file_sha256(cur / "manifest.json"),
            "metrics": {"file": "metrics.jsonl", "lines": [span[0][0], span[-1][0]],
                        "sha256": hashlib.sha256(b"".join(raw for _, raw, _ in span)).hexdigest()},
        })  # fmt: skip
    last = load_meta(ckpts[-1]) if ckpts else {}
    return {
        "format": FORMAT_VERSION, "run": str(run_dir), "stage": last.get("stage"), "git_commit": last.get("git_commit"),
        "data_fingerprint": last.get("data_fingerprint"), "tokenizer_sha256": last.get("tokenizer_sha256"),
        "init_checkpoint": ckpts[0].name if ckpts else None, "chunks": chunks,
        "started_from": started_from(run_dir, ckpts[0]) if ckpts else None,
        "rollbacks": last.get("skipped_windows", []), "skipped_steps": last.get("skipped_steps", 0),
        "build": f"python -m crystal.release build {run_dir} <release dir>",
        "latest": step_dir_name(last["step"]) if last else None,
    }  # fmt: skip


def _check_rows_rebuild(path: Path, loader, fim_pad: int, global_batch: int) -> None:
    """The batches verify will rebuild from the released rows equal the loader's own (positions included)."""
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    for a in range(0, len(rows), global_batch):
        part = rows[a : a + global_batch]
        mine = batch_from_rows(part, fim_pad)
        ref = loader.batch_from_samples([r["sample_index"] for r in part])
        for key in ("input_ids", "targets", "positions", "doc_ids"):
            if not torch.equal(getattr(mine, key), getattr(ref, key)):
                raise ReleaseError(f"{path}: rows {a}..{a + len(part)} do not rebuild the trained batch ({key})")


# ----------------------------------------------------------------------------------------------
# Verify


@dataclass
class ChunkVerdict:
    chunk: int
    steps: list[int]
    samples: int
    tensors_equal: int = 0
    tensors_total: int = 0
    losses_equal: int = 0
    losses_total: int = 0
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches


def _read_manifest(release: Path) -> dict[str, Any]:
    path = release / "manifest.json"
    if not path.is_file():
        raise ReleaseError(f"{path} does not exist; pass a directory made by `python -m crystal.release build`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReleaseError(f"{path} is corrupt ({e}); rebuild the release or fetch it again") from None


def _check_files(release: Path, manifest: dict[str, Any], prefixes: list[str]) -> int:
    n = 0
    for rel, digest in manifest["files"].items():
        if not any(rel == p or rel.startswith(p + "/") for p in prefixes):
            continue
        path = release / rel
        if not path.is_file():
            raise ReleaseError(f"{path} is missing from the release (listed in manifest.json)")
        if file_sha256(path) != digest:
            raise ReleaseError(f"{path} was altered: its sha256 does not match the release manifest")
        n += 1
    for p in prefixes:  # a file added to a checkpoint or chunk is as suspicious as one changed
        base = release / p
        extra = [q for q in ([base] if base.is_file() else base.rglob("*")) if q.is_file()]
        for q in extra:
            if str(q.relative_to(release)) not in manifest["files"]:
                raise ReleaseError(f"{q} is not in the release manifest (added after the release was built)")
    return n


def verify_chunk(release: Path, k: int, log=print, device: str = "cpu", atol: float = 0.0) -> ChunkVerdict:
    """Replay chunk k from its start checkpoint with the recorded config; compare with checkpoint k.

    On CPU the comparison is bitwise (atol 0). Elsewhere (`device="cuda"`) kernels may reduce in another
    order than the run did: pass the tolerance you accept as `atol`; the verdict states the largest difference."""
    release = Path(release)
    manifest = _read_manifest(release)
    entry = next((c for c in manifest["chunks"] if c["chunk"] == k), None)
    if entry is None:
        known = [c["chunk"] for c in manifest["chunks"]]
        raise ReleaseError(f"{release} has no chunk {k}; it has chunks {known[0]}..{known[-1]}")
    n_files = _check_files(release, manifest, [entry["data"], entry["record"], entry["start_checkpoint"],
                                                entry["checkpoint"], entry["metrics"]["file"]])  # fmt: skip
    with open(release / entry["data"]) as f:
        rows = [json.loads(line) for line in f]
    cfg, engine, end = _replay_setup(release, entry, torch.device(device))
    if cfg.backend.name == "fsdp" and atol == 0:
        ranks = end.meta.get("world_size", "several")
        raise ReleaseError(
            f"chunk {k} was trained with backend=fsdp on {ranks} ranks, and one device sums the ranks' gradients in "
            f"another order, so its replay is not bitwise: pass --atol with the difference you accept (Adam moves a "
            f"weight whose gradient is ~0 by up to lr per step either way; 1e-3 covers a few steps at lr 6e-3)"
        )
    verdict = ChunkVerdict(k, entry["steps"], len(rows))
    _replay(engine, cfg, rows, entry, _fim_pad_id(release), _recorded_losses(release, entry), verdict, atol)
    _compare_state(engine.state_dict(), end.tensors, verdict, atol)
    step0, step1 = entry["steps"]
    how = "bitwise equal" if atol == 0 else f"equal within {atol:g}"
    log(
        f"chunk {k}: {n_files} files match the manifest; replayed steps {step0 + 1}..{step1} "
        f"({len(rows)} sequences) from {entry['start_checkpoint']}: {verdict.tensors_equal}/{verdict.tensors_total} "
        f"tensors of {entry['checkpoint']} {how}, {verdict.losses_equal}/{verdict.losses_total} losses equal "
        f"to metrics rows" + ("" if verdict.ok else f"; MISMATCH: {'; '.join(verdict.mismatches[:3])}")
    )
    return verdict


def _replay_setup(release: Path, entry: dict[str, Any], device: torch.device):
    """Engine in the state of the chunk's start checkpoint, built from the end checkpoint's recorded config."""
    from crystal.checkpoint import load_checkpoint
    from crystal.model import build_model
    from crystal.trainer import CrystalAdapter, build_engine, config_from_yaml, debug_poison
    from crystal.utils import autocast_dtype, set_determinism, set_rng_state

    start = load_checkpoint(release / entry["start_checkpoint"])
    end = load_checkpoint(release / entry["checkpoint"])
    cfg = config_from_yaml(end.config_yaml)
    threads = start.meta.get("env", {}).get("torch_threads")
    if threads and device.type == "cpu":
        torch.set_num_threads(threads)  # CPU matmul reductions split by thread; the same count gives the same bits
    set_determinism(cfg.train.seed)
    model = build_model(cfg.model, seed=cfg.train.seed)
    adapter = CrystalAdapter(model, cfg.train.doc_masking, debug_poison(cfg.train))
    # A run sharded over ranks replays on one device: the resident engine computes the same step, summed in order.
    one_device = replace(cfg, backend=replace(cfg.backend, name="resident")) if cfg.backend.name == "fsdp" else cfg
    engine = build_engine(one_device, adapter, device, autocast_dtype(cfg.train.precision, device))
    engine.load_state_dict(start.tensors)
    set_rng_state(start.meta["rng"])
    return cfg, engine, end


def _fim_pad_id(release: Path) -> int:
    base_vocab = json.loads((release / "tokenizer" / "data_manifest.json").read_text())["tokenizer"]["base_vocab"]
    return base_vocab + ADDED_TOKENS.index("<|fim_pad|>")


def _replay(engine, cfg, rows: list, entry: dict, fim_pad: int, recorded: dict, verdict: ChunkVerdict, atol: float):
    """The training steps of the chunk: same batches, same LR schedule, same step function as the run."""
    from crystal.trainer import lr_at

    g, mb = cfg.train.global_batch, cfg.train.micro_batch
    step0, step1 = entry["steps"]
    if len(rows) != (step1 - step0) * g:
        raise ReleaseError(f"{entry['data']} has {len(rows)} rows; steps {step0}..{step1} x batch {g} need "
                           f"{(step1 - step0) * g}")  # fmt: skip
    for n, step in enumerate(range(step0, step1)):
        part = rows[n * g : (n + 1) * g]
        batches = [batch_from_rows(part[a : a + mb], fim_pad) for a in range(0, g, mb)]
        result = engine.train_step(batches, lr_at(step, cfg.optim, cfg.train.steps))
        if step + 1 not in recorded:
            continue
        want = recorded[step + 1]
        if isinstance(want, str):  # "nan"/"inf": a skipped step
            same = result.skipped and str(result.loss) == want
        else:
            same = result.loss == want if atol == 0 else abs(result.loss - want) <= atol
        verdict.losses_total += 1
        verdict.losses_equal += same
        if not same:
            verdict.mismatches.append(f"step {step + 1} loss {result.loss!r} vs recorded {want!r}")


def _compare_state(mine: dict, ref_groups: dict, verdict: ChunkVerdict, atol: float) -> None:
    for group in ("model", "optimizer"):
        ref = ref_groups[group]
        got = {name: t.detach().cpu() for name, t in mine[group].items()}
        if set(ref) != set(got):
            verdict.mismatches.append(f"{group}: tensor names differ ({sorted(set(ref) ^ set(got))[:3]})")
        for name in sorted(set(ref) & set(got)):
            verdict.tensors_total += 1
            a, b = ref[name], got[name]
            diff = 0.0 if torch.equal(a, b) else (a.double() - b.double()).abs().max().item()
            if a.dtype == b.dtype and (torch.equal(a, b) or (atol > 0 and diff <= atol)):
                verdict.tensors_equal += 1
            else:
                verdict.mismatches.append(f"{group} {name} differs (max abs diff {diff:.3g}, {a.dtype} vs {b.dtype})")


def _recorded_losses(release: Path, entry: dict[str, Any]) -> dict[int, Any]:
    lo, hi = entry["metrics"]["lines"]
    raw = (release / entry["metrics"]["file"]).read_bytes().splitlines(keepends=True)[lo : hi + 1]
    if hashlib.sha256(b"".join(raw)).hexdigest() != entry["metrics"]["sha256"]:
        raise ReleaseError(f"{entry['metrics']['file']} lines {lo}..{hi} do not match the manifest's hash")
    rows = [json.loads(r) for r in raw]
    return {r["step"]: r["loss"] for r in rows if r.get("kind") == "train" and entry["steps"][0] < r["step"]}


def verify(
    release: Path, chunks: list[int] | None = None, log=print, device: str = "cpu", atol: float = 0.0
) -> list[ChunkVerdict]:
    manifest = _read_manifest(Path(release))
    if manifest.get("evaluations") or (Path(release) / EVALS_DIR).exists():
        n = _check_files(Path(release), manifest, [EVALS_DIR])
        names = ", ".join(sorted(manifest.get("evaluations", {})))
        log(f"{EVALS_DIR}: {n} evaluation files ({names}) match the manifest")
    ks = chunks if chunks else [c["chunk"] for c in manifest["chunks"]]
    return [verify_chunk(Path(release), k, log, device, atol) for k in ks]


# ----------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crystal.release", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="lay out a release (chunks, checkpoints, configs, metrics, manifest) from a run")
    b.add_argument("run", type=Path)
    b.add_argument("out", type=Path)
    b.add_argument("--link", action="store_true", help="hard-link checkpoint files instead of copying them")
    v = sub.add_parser("verify", help="replay chunk k from checkpoint k-1 and check it reproduces checkpoint k")
    v.add_argument("release", type=Path)
    v.add_argument("--chunk", type=int, action="append", help="chunk index (repeatable); default: every chunk")
    v.add_argument("--device", default="cpu", help="replay device (default cpu: bitwise)")
    v.add_argument("--atol", type=float, default=0.0, help="accepted max abs difference (0 = bitwise; for GPUs)")
    args = parser.parse_args(argv)
    from crystal.errors import USER_ERRORS

    try:
        if args.cmd == "build":
            build(args.run, args.out, link=args.link)
            return 0
        verdicts = verify(args.release, args.chunk, device=args.device, atol=args.atol)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    bad = [v.chunk for v in verdicts if not v.ok]
    if bad:
        print(f"error: chunk(s) {bad} do not reproduce their checkpoints (see above)", file=sys.stderr)
        return 1
    how = "bitwise" if args.atol == 0 else f"within {args.atol:g}"
    print(f"verified: {len(verdicts)} chunk(s) reproduce their checkpoints {how}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
