"""Data chunks tied to checkpoints: what training consumed between two checkpoints, regenerated from
the data manifest and the recipe alone.

The loader's order is a pure function of (data fingerprint, stage, seed, mixture, sequence length),
so the samples between checkpoint k-1 (loader at sample a) and checkpoint k (at sample b) are
`[a, b)` minus any windows excluded after a rollback. This module turns such a range into

- `chunk_record(loader, a, b)`: sample range, sources with their sample/token/document counts, the
  documents it touches, and the sha256 of its token ids (what the metrics and release refer to);
- `iter_chunk(loader, a, b)`: its sequences in Amber's layout (LLM360/AmberDatasets train_*.jsonl),
  one dict per training sequence: {"token_ids": [S+1 ints], "source", "doc_ids", "sample_index",
  "window"}; token_ids[:-1] are the inputs and token_ids[1:] the targets the step trained on;
- `loader_from_config(cfg, manifest)` / `loader_from_run(run_dir)`: the loader a run used, rebuilt
  from its resolved config and data_manifest.json (shards come from the cache or are re-tokenized from
  the sources; a fingerprint that differs from the manifest's is refused), no training run needed.

    python -m crystal.data.chunks outputs/default --steps 0 100 --out chunk_000.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from crystal.data.loader import DataLoader
from crystal.errors import DataError


def chunk_samples(start: int, end: int, excluded: Iterable[Iterable[int]] = ()) -> list[int]:
    """Sample indices in [start, end) that were trained on: the range minus excluded [a, b) windows."""
    keep = np.ones(max(0, end - start), dtype=bool)
    for a, b in excluded:
        lo, hi = max(int(a), start), min(int(b), end)
        if lo < hi:
            keep[lo - start : hi - start] = False
    return (np.nonzero(keep)[0] + start).tolist()


def iter_chunk(loader: DataLoader, start: int, end: int, excluded: Iterable[Iterable[int]] = ()) -> Iterator[dict]:
    """The chunk's sequences in training order, in Amber's layout plus provenance."""
    for i in chunk_samples(start, end, excluded):
        s, j, _ = loader.mixture.locate(i)
        split = loader.train[s]
        yield {
            "token_ids": split.window(j)[0].tolist(),
            "source": loader.names[s],
            "doc_ids": split.documents(j),
            "sample_index": int(i),
            "window": int(j),
        }


def tokens_sha256(rows: Iterable[dict]) -> str:
    """sha256 of the rows' token ids in order (uint32 little-endian), independent of serialisation."""
    h = hashlib.sha256()
    for r in rows:
        h.update(np.asarray(r["token_ids"], dtype="<u4").tobytes())
    return h.hexdigest()


def recipe(loader: DataLoader) -> dict[str, Any]:
    """What the sample order depends on (the loader state without its position)."""
    state = loader.state_dict()
    return {k: state[k] for k in loader.ORDER_KEYS}


def chunk_record(
    loader: DataLoader, start_sample: int, end_sample: int, excluded: Iterable[Iterable[int]] = (),
    list_documents: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """What samples [start_sample, end_sample) (minus `excluded`) hold; see the module docstring.

    tokens_per_source counts trained input tokens (S per sequence)."""
    excluded = [[int(a), int(b)] for a, b in excluded if int(a) < end_sample and int(b) > start_sample]
    h = hashlib.sha256()
    sources: dict[str, dict[str, Any]] = {}
    documents: dict[str, set[str]] = {}
    n = 0
    for row in iter_chunk(loader, start_sample, end_sample, excluded):
        h.update(np.asarray(row["token_ids"], dtype="<u4").tobytes())
        info = sources.setdefault(row["source"], {"samples": 0, "tokens": 0})
        info["samples"] += 1
        info["tokens"] += len(row["token_ids"]) - 1
        documents.setdefault(row["source"], set()).update(row["doc_ids"])
        n += 1
    for name, info in sources.items():
        info["documents"] = len(documents[name])
    record = {
        "sample_range": [start_sample, end_sample],
        "excluded": excluded,
        "num_samples": n,
        "seq_len": loader.seq_len,
        "sources": dict(sorted(sources.items())),
        "tokens_per_source": {s: v["tokens"] for s, v in sorted(sources.items())},
        "num_tokens": sum(v["tokens"] for v in sources.values()),
        "tokens_sha256": h.hexdigest(),
        "data_fingerprint": loader.data.fingerprint,
        "recipe": recipe(loader),
    }
    if list_documents:
        record["documents"] = {s: sorted(d) for s, d in sorted(documents.items())}
    return record


def write_chunk(
    loader: DataLoader, start: int, end: int, path: str | os.PathLike, excluded: Iterable[Iterable[int]] = ()
) -> dict[str, Any]:
    """Write the chunk as JSONL (temp file, fsync, rename) and return its record."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for row in iter_chunk(loader, start, end, excluded):
            f.write(json.dumps(row, separators=(",", ":")) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return chunk_record(loader, start, end, excluded)


def read_chunk(path: str | os.PathLike) -> Iterator[dict]:
    with open(path) as f:
        for line in f:
            yield json.loads(line)


# ----------------------------------------------------------------------------------------------
# The loader of a run, from its recipe


def loader_from_config(cfg, manifest: dict[str, Any] | None = None, rank: int = 0, world_size: int = 1,
                       log=lambda *_: None) -> DataLoader:  # fmt: skip
    """The loader `crystal.train` builds for this config (same arguments as the trainer), on data
    prepared from cfg.data; with `manifest` (a run's data_manifest.json), its fingerprint must match."""
    from crystal.data.prepare import prepare_data

    data = prepare_data(cfg.data, cfg.model.vocab_size, log=log, progress=False)
    if manifest is not None:
        expected = manifest.get("fingerprint") or _fingerprint_of(manifest)
        if data.fingerprint != expected:
            raise DataError(
                f"the data prepared here has fingerprint {data.fingerprint[:16]}..., the run's manifest says "
                f"{expected[:16]}...: the sources, tokenizer or data config differ from the run's"
            )
    t = cfg.train
    return DataLoader(
        data, t.seq_len or cfg.model.max_seq_len, t.global_batch, t.micro_batch, t.seed,
        mixture=cfg.data.source_mixture(), rank=rank, world_size=world_size,
    )  # fmt: skip


def _fingerprint_of(manifest: dict[str, Any]) -> str:
    from crystal.data.prepare import sha256_json

    return sha256_json({k: v for k, v in manifest.items() if k != "fingerprint"})


def load_run_config(path: str | os.PathLike):
    """A run's resolved config.yaml -> Config (checked like any composed config)."""
    from omegaconf import OmegaConf

    from crystal.config import register_configs, to_dataclass

    register_configs()
    return to_dataclass(OmegaConf.to_container(OmegaConf.load(path), resolve=True))


def loader_from_run(run_dir: str | os.PathLike, log=lambda *_: None) -> DataLoader:
    """The loader of the run in `run_dir` (its config.yaml and data_manifest.json)."""
    run_dir = Path(run_dir)
    for name in ("config.yaml", "data_manifest.json"):
        if not (run_dir / name).is_file():
            raise DataError(f"{run_dir / name} is missing; is {run_dir} a crystal run directory?")
    cfg = load_run_config(run_dir / "config.yaml")
    return loader_from_config(cfg, json.loads((run_dir / "data_manifest.json").read_text()), log=log)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate a data chunk of a run from its config and manifest.")
    parser.add_argument("run_dir", help="a run directory (config.yaml + data_manifest.json)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--samples", nargs=2, type=int, metavar=("START", "END"), help="sample index range [START, END)")
    where.add_argument("--steps", nargs=2, type=int, metavar=("START", "END"), help="optimizer steps [START, END)")
    parser.add_argument("--exclude", nargs=2, type=int, action="append", default=[], metavar=("A", "B"),
                        help="sample window [A, B) skipped after a rollback (repeatable)")  # fmt: skip
    parser.add_argument("--out", help="write the chunk here as JSONL (Amber layout); the record goes to stdout")
    args = parser.parse_args(argv)
    try:
        loader = loader_from_run(args.run_dir, log=lambda m: print(m, file=sys.stderr))
        a, b = args.samples or [s * loader.global_batch for s in args.steps]
        if args.out:
            record = write_chunk(loader, a, b, args.out, args.exclude)
        else:
            record = chunk_record(loader, a, b, args.exclude)
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(record, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
