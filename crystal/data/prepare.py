"""Prepare: sources -> tokenizer -> token shards with a sha256 manifest; the data fingerprint.

Layout under the cache directory (default ~/.cache/crystal, env CRYSTAL_CACHE overrides):

    tokenizers/<key>.model (+ .json: training options, sample, sources)
    shards/<source>-<key>/  train.bin  train.idx.npy  heldout.bin  heldout.idx.npy  docs.json  manifest.json

*.bin are flat token ids (uint16 when the vocab fits, else uint32), every document followed by EOS;
*.idx.npy are int64 document start offsets (n_docs + 1 entries). A shard directory is written to a
temp name and renamed, so an interrupted prepare leaves either a complete shard or none, and a rerun
resumes with the sources still missing. Loading re-hashes every file and names the one that differs.

    python -m crystal.data.prepare [data=local] [data.cache_dir=...]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crystal.config import DataConfig
from crystal.data.sources import Document, Source, build_source
from crystal.errors import DataError
from crystal.tokenizer import EOS_ID, Tokenizer, file_sha256, train_sentencepiece

FORMAT_VERSION = 1


def cache_root(cfg: DataConfig) -> Path:
    return Path(os.environ.get("CRYSTAL_CACHE") or cfg.cache_dir).expanduser()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def build_sources(cfg: DataConfig) -> dict[str, Source]:
    if not cfg.sources:
        raise DataError("data.sources is empty; pick a data config (e.g. data=local) or list sources")
    out = {}
    for name, spec in cfg.sources.items():
        fields = dataclasses.asdict(spec) if dataclasses.is_dataclass(spec) else dict(spec)
        out[name] = build_source(name, {k: v for k, v in fields.items() if v is not None})
    return out


# ----------------------------------------------------------------------------------------------
# Worker pool: reading (and parsing) units and tokenizing them both happen in workers


_worker_tok: Tokenizer | None = None


def _init_worker(tokenizer_path: str | None) -> None:
    global _worker_tok
    _worker_tok = Tokenizer(tokenizer_path) if tokenizer_path else None


def _read(task: tuple[Source, Any]) -> list[Document]:
    source, unit = task
    return source.read_unit(unit)


def _read_and_encode(task: tuple[Source, Any]) -> list[tuple[str, np.ndarray, int]]:
    source, unit = task
    out = []
    for doc in source.read_unit(unit):
        ids = _worker_tok.encode(doc.text) if doc.text else []
        out.append((doc.doc_id, np.asarray(ids, dtype=np.uint32), len(doc.text)))
    return out


def _pool(workers: int, tokenizer_path: str | None):
    return mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(tokenizer_path,))


def num_workers(cfg: DataConfig) -> int:
    return cfg.num_workers or max(1, os.cpu_count() or 1)


# ----------------------------------------------------------------------------------------------
# Tokenizer


def _tokenizer_sample(sources: dict[str, Source], budget_mb: float, workers: int) -> list[str]:
    """An even share of `budget_mb` from each source, in document order, split into lines."""
    per_source = budget_mb * 1e6 / len(sources)
    lines: list[str] = []
    for src in sources.values():
        taken = 0
        with _pool(workers, None) as pool:  # leaving the block terminates what is left of this source
            for docs in pool.imap(_read, [(src, u) for u in src.units()], chunksize=4):
                for doc in docs:
                    if taken < per_source:
                        taken += len(doc.text)
                        lines.extend(line for line in doc.text.split("\n") if line.strip())
                if taken >= per_source:
                    break
    return lines


def get_tokenizer(cfg: DataConfig, sources: dict[str, Source], vocab_size: int, workers: int) -> Tokenizer:
    """Load data.tokenizer.path, or the cached tokenizer trained on these sources, or train it now."""
    tcfg = cfg.tokenizer
    if tcfg.path:
        path = Path(tcfg.path).expanduser()
        if not path.is_file():
            raise DataError(f"tokenizer {path} does not exist; fix data.tokenizer.path or set it to null to train one")
        return Tokenizer(path, vocab_size)
    recipe = {
        "sources": {n: s.fingerprint() for n, s in sorted(sources.items())},
        "vocab_size": tcfg.vocab_size,
        "sample_mb": tcfg.sample_mb,
        "seed": tcfg.seed,
        "format": FORMAT_VERSION,
    }
    path = cache_root(cfg) / "tokenizers" / f"{sha256_json(recipe)[:16]}.model"
    if not path.is_file():
        t0 = time.time()
        sample = _tokenizer_sample(sources, tcfg.sample_mb, workers)
        options = train_sentencepiece(iter(sample), path, tcfg.vocab_size, tcfg.seed)
        meta = {"recipe": recipe, "options": options, "sample_lines": len(sample), "seconds": time.time() - t0}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    return Tokenizer(path, vocab_size)


# ----------------------------------------------------------------------------------------------
# Shards


def is_heldout(doc_id: str, fraction: float) -> bool:
    return int(hashlib.sha1(doc_id.encode()).hexdigest()[:8], 16) < fraction * 0x100000000


@dataclass
class Split:
    tokens: np.ndarray  # flat ids (memory-mapped), EOS after each document
    offsets: np.ndarray  # int64 document starts, len n_docs + 1
    doc_ids: list[str]

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1


@dataclass
class SourceShards:
    name: str
    kind: str
    lang: str
    directory: Path
    manifest: dict[str, Any]
    train: Split
    heldout: Split


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def _shard_key(src: Source, tok: Tokenizer, cfg: DataConfig) -> str:
    return sha256_json(
        {
            "source": src.fingerprint(),
            "tokenizer": tok.sha256,
            "vocab": tok.vocab_size,
            "heldout": cfg.heldout_fraction,
            "format": FORMAT_VERSION,
        }
    )[:16]


def _write_shard(src: Source, tok: Tokenizer, cfg: DataConfig, directory: Path, workers: int) -> None:
    dtype = token_dtype(tok.vocab_size)
    parts: dict[str, dict[str, list]] = {s: {"ids": [], "doc_ids": [], "lens": []} for s in ("train", "heldout")}
    stats = {"documents": 0, "empty_documents": 0, "chars": 0, "replacement_chars": 0}
    with _pool(workers, str(tok.path)) as pool:
        for docs in pool.imap(_read_and_encode, [(src, u) for u in src.units()], chunksize=2):
            for doc_id, ids, n_chars in docs:
                if len(ids) == 0:
                    stats["empty_documents"] += 1
                    continue
                split = parts["heldout" if is_heldout(doc_id, cfg.heldout_fraction) else "train"]
                split["ids"].append(ids)
                split["doc_ids"].append(doc_id)
                stats["documents"] += 1
                stats["chars"] += n_chars
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files: dict[str, str] = {}
    counts: dict[str, dict[str, int]] = {}
    for split_name, split in parts.items():
        lengths = np.array([len(a) + 1 for a in split["ids"]], dtype=np.int64)  # +1: EOS
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = np.empty(int(offsets[-1]), dtype=dtype)
        for a, start in zip(split["ids"], offsets[:-1]):
            flat[start : start + len(a)] = a
            flat[start + len(a)] = EOS_ID
        flat.tofile(tmp / f"{split_name}.bin")
        np.save(tmp / f"{split_name}.idx.npy", offsets)
        counts[split_name] = {"documents": len(split["ids"]), "tokens": int(offsets[-1])}
    (tmp / "docs.json").write_text(json.dumps({s: parts[s]["doc_ids"] for s in parts}))
    for f in sorted(tmp.iterdir()):
        files[f.name] = file_sha256(f)
    manifest = {
        "source": src.name,
        **src.describe(),
        "source_fingerprint": src.fingerprint(),
        "tokenizer_sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "counts": counts,
        "stats": stats,
        "files": files,
        "format": FORMAT_VERSION,
    }
    with open(tmp / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def load_shard(directory: Path, verify: bool = True) -> SourceShards:
    """Open a shard directory; with verify, re-hash every file and name the one that does not match."""
    mpath = directory / "manifest.json"
    if not mpath.is_file():
        raise DataError(f"{mpath} is missing; rerun `python -m crystal.data.prepare` to rebuild {directory.name}")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{mpath} is corrupt ({e}); delete {directory} and rerun prepare") from None
    if verify:
        for name, digest in manifest["files"].items():
            path = directory / name
            if not path.is_file():
                raise DataError(f"shard file {path} is missing; delete {directory} and rerun prepare")
            if file_sha256(path) != digest:
                raise DataError(
                    f"shard file {path} fails its sha256 check (corrupt or truncated); "
                    f"delete {directory} and rerun prepare"
                )
    dtype = np.dtype(manifest["dtype"])
    doc_ids = json.loads((directory / "docs.json").read_text())
    splits = {}
    for s in ("train", "heldout"):
        offsets = np.load(directory / f"{s}.idx.npy")
        n = int(offsets[-1])
        tokens = np.memmap(directory / f"{s}.bin", dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
        splits[s] = Split(tokens, offsets, doc_ids[s])
    return SourceShards(
        manifest["source"], manifest["kind"], manifest["lang"], directory, manifest, splits["train"], splits["heldout"]
    )


# ----------------------------------------------------------------------------------------------
# Everything together


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    shards: dict[str, SourceShards]
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """The data fingerprint: hash of the manifest (tokenizer + every shard's file hashes)."""
        return sha256_json(self.manifest)


def prepare_data(cfg: DataConfig, vocab_size: int, log=print) -> PreparedData:
    """Build (or load from cache) the tokenizer and every source's shards; verify what is loaded."""
    sources = build_sources(cfg)
    workers = num_workers(cfg)
    t0 = time.time()
    tok = get_tokenizer(cfg, sources, vocab_size, workers)
    shards = {}
    for name, src in sources.items():
        directory = cache_root(cfg) / "shards" / f"{name}-{_shard_key(src, tok, cfg)}"
        if not (directory / "manifest.json").is_file():
            t = time.time()
            log(f"prepare: tokenizing source {name!r} ({src.type}) into {directory}")
            _write_shard(src, tok, cfg, directory, workers)
            log(f"prepare: {name!r} done in {time.time() - t:.1f}s")
        shards[name] = load_shard(directory)
        if shards[name].train.num_docs == 0:
            raise DataError(f"source {name!r} has no training documents (shard {directory}); check its path or filters")
    manifest = {
        "tokenizer": {"sha256": tok.sha256, "base_vocab": tok.base_vocab, "vocab_size": tok.vocab_size},
        "sources": {
            n: {k: s.manifest[k] for k in ("type", "kind", "lang", "source_fingerprint", "counts", "stats", "files")}
            for n, s in shards.items()
        },
        "format": FORMAT_VERSION,
    }
    log(f"prepare: data ready in {time.time() - t0:.1f}s")
    return PreparedData(tok, shards, manifest)


def main() -> None:
    import sys

    import hydra

    from crystal.config import CONFIG_DIR, quote_numeric_group_choices, register_configs, to_dataclass

    sys.argv[1:] = quote_numeric_group_choices(sys.argv[1:])
    register_configs()

    @hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
    def run(dcfg) -> None:
        cfg = to_dataclass(dcfg)
        data = prepare_data(cfg.data, cfg.model.vocab_size)
        for name, s in data.shards.items():
            train, held = s.manifest["counts"]["train"], s.manifest["counts"]["heldout"]
            print(f"{name:>12}: {train['documents']} docs, {train['tokens']} tokens (+{held['tokens']} held out)")
        print(f"fingerprint {data.fingerprint}")

    run()


if __name__ == "__main__":
    main()
