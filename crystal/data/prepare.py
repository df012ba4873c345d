"""Prepare: sources -> tokenizer -> token shards with a sha256 manifest; the data fingerprint.

Layout under the cache directory (default ~/.cache/crystal, env CRYSTAL_CACHE overrides):

    tokenizers/<key>.model (+ .json: training options, sample, sources)
    shards/<source>-<key>/manifest.json           written last: parts, every file's sha256 and size,
                                                  counts, reader stats, tokenizer sha256, FIM setting
    shards/<source>-<key>/part-00000/  train.bin  train.idx.npy  heldout.bin  heldout.idx.npy  docs.json  part.json

*.bin are flat token ids (uint16 when the vocab fits, else uint32), every document followed by EOS;
*.idx.npy are int64 document start offsets (n_docs + 1 entries). A source is tokenized in parts of
about data.part_mb MB of input, each written to a temp name and renamed into `<source>-<key>.partial/`,
and the whole directory is renamed into place once its manifest is written: an interrupted prepare
keeps every finished part and a rerun continues with the rest. The key covers the source's files,
the tokenizer, the held-out fraction and, for sources that get fill-in-the-middle, (fim_rate,
fim_spm_rate, fim_seed). Loading re-hashes every file (data.verify=full; `size` only checks sizes)
and names the one that differs.

Only sources with a share in the mixture are tokenized (all of them when the mixture is empty); the
tokenizer is trained on a sample of every configured source, so it is the same in every stage.

    python -m crystal.data.prepare [data=local] [+stage=2] [data.cache_dir=...]
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from crystal.config import DataConfig
from crystal.data.fim import FimSpec, fim_encode
from crystal.data.sources import Document, Source, build_source
from crystal.errors import DataError
from crystal.tokenizer import ADDED_TOKENS, EOS_ID, Tokenizer, file_sha256, train_sentencepiece

FORMAT_VERSION = 2

# What each CrystalCoder subset named in conf/stage/*.yaml is: (kind, what). The manifest records, per
# alias, which source stands in for it and whether that source is the real thing or a substitute.
CRYSTALCODER_SUBSETS = {
    "starcoder": ("code", "starcoder"), "sc_python": ("code", "python"), "sc_html": ("code", "html"),
    "sc_javascript": ("code", "javascript"), "sc_css": ("code", "css"),
    **{f"{half}_{s}": ("code" if s == "github" else "english", s)
       for half in ("sp0", "sp1", "sp10pct")
       for s in ("commoncrawl", "c4", "github", "arxiv", "book", "wikipedia", "stackexchange")},
}  # fmt: skip


# What the data manifest (the fingerprint's preimage) keeps of each source's shard manifest.
SOURCE_MANIFEST_KEYS = ("type", "kind", "lang", "source_fingerprint", "counts", "stats", "files", "fim",
                        "tokenizer_sha256")  # fmt: skip


def cache_root(cfg: DataConfig) -> Path:
    return Path(os.environ.get("CRYSTAL_CACHE") or cfg.cache_dir).expanduser()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _source_options(spec: Any) -> dict[str, Any]:
    """The options a source config sets (those that differ from SourceConfig's defaults)."""
    from crystal.config import SourceConfig

    fields = dataclasses.asdict(spec) if dataclasses.is_dataclass(spec) else dict(spec)
    defaults = dataclasses.asdict(SourceConfig())
    return {k: v for k, v in fields.items() if k == "type" or (k in defaults and v != defaults[k])}


def build_sources(cfg: DataConfig) -> dict[str, Source]:
    if not cfg.sources:
        raise DataError("data.sources is empty; pick a data config (e.g. data=local) or list sources")
    return {name: build_source(name, _source_options(spec)) for name, spec in cfg.sources.items()}


def resolve_fallbacks(mixture: dict[str, float], fallbacks: dict[str, str]) -> dict[str, float]:
    """Move the shares of absent sources (keys of `fallbacks`) onto the sources standing in for them."""
    out: dict[str, float] = {}
    for name, w in mixture.items():
        seen = [name]
        while name in fallbacks:
            name = fallbacks[name]
            if name in seen:
                raise DataError(f"data source fallbacks form a cycle: {' -> '.join(seen + [name])}")
            seen.append(name)
        out[name] = out.get(name, 0.0) + w
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


@lru_cache(maxsize=8)
def _long_line(limit: int) -> re.Pattern:
    return re.compile(rf"[^\n]{{{limit + 1}}}")


def _encode_unit(task: tuple[Source, Any, FimSpec | None]) -> tuple[list[tuple[str, np.ndarray, int]], dict]:
    """One unit -> [(doc id, token ids, chars)] and the counters of what was skipped or transformed."""
    source, unit, fim = task
    docs = source.read_unit(unit)
    counts = Counter(source.take_counts())
    dtype = token_dtype(_worker_tok.base_vocab + len(ADDED_TOKENS))
    out = []
    for doc in docs:
        counts["read_documents"] += 1
        if doc.bad_bytes:
            counts["non_utf8_documents"] += 1
            counts["replaced_bytes"] += doc.bad_bytes
        if not doc.text.strip():
            counts["empty_documents"] += 1
            continue
        if source.max_line_chars and _long_line(source.max_line_chars).search(doc.text):
            counts["long_line_documents"] += 1
            continue
        if fim is not None:
            ids, mode = fim_encode(doc.text, doc.doc_id, fim, _worker_tok)
            if mode:
                counts[f"fim_{mode}_documents"] += 1
        else:
            ids = _worker_tok.encode(doc.text)
        counts["chars"] += len(doc.text)
        out.append((doc.doc_id, np.asarray(ids, dtype=dtype), len(doc.text)))
    return out, dict(counts)


class _Pool:
    """Ordered parallel map with bounded look-ahead, and an in-process twin for one worker.

    At most `ahead` tasks are in flight, so breaking out early (the tokenizer sample stops at its
    budget) wastes little work and the pool can be closed and joined cleanly. Pool.terminate() with a
    long task queue can hang: its feeder thread may block on a pipe to workers that are gone."""

    def __init__(self, workers: int, tokenizer_path: str | None) -> None:
        self.workers = workers
        if workers > 1:
            self.pool = mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(tokenizer_path,))
        else:
            self.pool = None
            _init_worker(tokenizer_path)

    def imap(self, fn, tasks: list, ahead: int | None = None):
        if self.pool is None:
            yield from map(fn, tasks)
            return
        ahead = ahead or 4 * self.workers
        pending: collections.deque = collections.deque()
        it = iter(tasks)
        for task in itertools.islice(it, ahead):
            pending.append(self.pool.apply_async(fn, (task,)))
        while pending:
            result = pending.popleft().get()
            for task in itertools.islice(it, 1):
                pending.append(self.pool.apply_async(fn, (task,)))
            yield result

    def __enter__(self) -> _Pool:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.pool:
            self.pool.close()  # in-flight tasks (at most `ahead`) finish, then the workers exit
            self.pool.join()


def num_workers(cfg: DataConfig) -> int:
    return cfg.num_workers or max(1, os.cpu_count() or 1)


# ----------------------------------------------------------------------------------------------
# Tokenizer


def _tokenizer_sample(sources: dict[str, Source], budget_mb: float, workers: int) -> list[str]:
    """An even share of `budget_mb` from each source, in document order, split into lines."""
    per_source = budget_mb * 1e6 / len(sources)
    lines: list[str] = []
    with _Pool(workers, None) as pool:
        for src in sources.values():
            taken = 0
            for docs in pool.imap(_read, [(src, u) for u in src.units()]):
                for doc in docs:
                    if taken < per_source:
                        taken += len(doc.text)
                        # sentencepiece skips sentences over max_sentence_length bytes anyway
                        lines.extend(line for line in doc.text.split("\n") if line.strip() and len(line) < 4096)
                if taken >= per_source:
                    break  # the few units still in flight finish and are dropped
    return lines


def get_tokenizer(cfg: DataConfig, sources: dict[str, Source], vocab_size: int, workers: int) -> Tokenizer:
    """Load data.tokenizer.path, or the cached tokenizer trained on these sources, or train it now."""
    tcfg = cfg.tokenizer
    if tcfg.path:
        path = Path(tcfg.path).expanduser()
        if not path.is_file():
            raise DataError(f"tokenizer {path} does not exist; fix data.tokenizer.path or set it to null to train one")
        return Tokenizer(path, vocab_size)
    from crystal.tokenizer import TRAINER_OPTIONS

    recipe = {
        "sources": {n: s.fingerprint() for n, s in sorted(sources.items())},
        "vocab_size": tcfg.vocab_size,
        "sample_mb": tcfg.sample_mb,
        "seed": tcfg.seed,
        "options": TRAINER_OPTIONS,
        "format": FORMAT_VERSION,
    }
    path = cache_root(cfg) / "tokenizers" / f"{sha256_json(recipe)[:16]}.model"
    if not path.is_file():
        t0 = time.time()
        sample = _tokenizer_sample(sources, tcfg.sample_mb, workers)
        if not sample:
            raise DataError(f"no text to train the tokenizer on from sources {sorted(sources)}; check their paths")
        options = train_sentencepiece(iter(sample), path, tcfg.vocab_size, tcfg.seed)
        meta = {"recipe": recipe, "options": options, "sample_lines": len(sample), "seconds": time.time() - t0}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    return Tokenizer(path, vocab_size)


# ----------------------------------------------------------------------------------------------
# Shards


def is_heldout(doc_id: str, fraction: float) -> bool:
    return int(hashlib.sha1(doc_id.encode()).hexdigest()[:8], 16) < fraction * 0x100000000


class Split:
    """One split (train or held-out) of a source: the concatenation of its parts' token streams.

    `offsets` are global document starts (n_docs + 1); `read(a, b)` slices the stream without copying
    whole parts; `tokens` is the whole stream (the memory map itself when there is one part)."""

    def __init__(self, parts: list[tuple[np.ndarray, np.ndarray]], doc_ids: list[str]) -> None:
        self.part_tokens = [t for t, _ in parts]
        lengths = [len(t) for t in self.part_tokens]
        self.part_starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # (n_parts + 1,)
        shifted = [o[:-1] + s for (_, o), s in zip(parts, self.part_starts[:-1])]
        self.offsets = np.concatenate([*shifted, [self.part_starts[-1]]]).astype(np.int64)
        self.doc_ids = doc_ids
        self._whole: np.ndarray | None = self.part_tokens[0] if len(parts) == 1 else None

    def __len__(self) -> int:
        return int(self.part_starts[-1])

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def tokens(self) -> np.ndarray:
        if self._whole is None:
            self._whole = np.concatenate(self.part_tokens) if self.part_tokens else np.zeros(0, np.uint16)
        return self._whole

    def read(self, a: int, b: int) -> np.ndarray:
        """Tokens [a, b) in the stored dtype: a view when they lie inside one part, else a copy."""
        p = int(self.part_starts.searchsorted(a, side="right")) - 1 if len(self.part_tokens) > 1 else 0
        start = a - int(self.part_starts[p])
        piece = self.part_tokens[p][start : start + (b - a)]
        if len(piece) == b - a or p + 1 >= len(self.part_tokens):
            return piece
        return np.concatenate([piece, self.read(int(self.part_starts[p + 1]), b)])


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


def source_fim(src: Source, cfg: DataConfig) -> FimSpec | None:
    """The FIM setting this source's documents get (None: not a FIM source, or rate 0)."""
    if not src.fim or cfg.fim_rate <= 0:
        return None
    return FimSpec(cfg.fim_rate, cfg.fim_spm_rate, cfg.fim_seed)


def _shard_key(src: Source, tok: Tokenizer, cfg: DataConfig) -> str:
    fim = source_fim(src, cfg)
    return sha256_json(
        {
            "source": src.fingerprint(),
            "tokenizer": tok.sha256,
            "vocab": tok.vocab_size,
            "heldout": cfg.heldout_fraction,
            "fim": fim.key() if fim else None,
            "format": FORMAT_VERSION,
        }
    )[:16]


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _plan_parts(src: Source, units: list[Any], part_mb: float) -> list[int]:
    """Units per part: consecutive units until about part_mb MB of input (deterministic)."""
    sizes, budget = [src.unit_size(u) for u in units], part_mb * 1e6
    out, n, total = [], 0, 0
    for size in sizes:
        n, total = n + 1, total + size
        if total >= budget:
            out.append(n)
            n, total = 0, 0
    if n or not out:
        out.append(n)
    return out


def _write_part(directory: Path, records: list[tuple[str, np.ndarray, int]], heldout_fraction: float,
                dtype: np.dtype, stats: dict[str, int]) -> dict[str, Any]:  # fmt: skip
    """Write one part atomically (temp dir, fsync, rename); returns its part.json content."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    splits: dict[str, list[tuple[str, np.ndarray]]] = {"train": [], "heldout": []}
    for doc_id, ids, _ in records:
        splits["heldout" if is_heldout(doc_id, heldout_fraction) else "train"].append((doc_id, ids))
    counts = {}
    for name, docs in splits.items():
        lengths = np.array([len(a) + 1 for _, a in docs], dtype=np.int64)  # +1: EOS
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = np.empty(int(offsets[-1]), dtype=dtype)
        for (_, a), start in zip(docs, offsets[:-1]):
            flat[start : start + len(a)] = a
            flat[start + len(a)] = EOS_ID
        flat.tofile(tmp / f"{name}.bin")
        np.save(tmp / f"{name}.idx.npy", offsets)
        counts[name] = {"documents": len(docs), "tokens": int(offsets[-1])}
    (tmp / "docs.json").write_text(json.dumps({s: [d for d, _ in docs] for s, docs in splits.items()}))
    files = {f.name: file_sha256(f) for f in sorted(tmp.iterdir())}
    sizes = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
    part = {"counts": counts, "stats": stats, "files": files, "sizes": sizes}
    _fsync_write(tmp / "part.json", json.dumps(part, indent=1, sort_keys=True))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return part


def _finished_part(directory: Path) -> dict[str, Any] | None:
    """A part left by an interrupted prepare, if it is complete and intact."""
    try:
        part = json.loads((directory / "part.json").read_text())
        if all(file_sha256(directory / n) == h for n, h in part["files"].items()):
            return part
    except (OSError, json.JSONDecodeError, KeyError):
        pass
    return None


def _sum_counts(parts: list[dict[str, Any]], split: str) -> dict[str, int]:
    return {k: sum(p["counts"][split][k] for p in parts) for k in ("documents", "tokens")}


def _write_shard(src: Source, tok: Tokenizer, cfg: DataConfig, directory: Path, pool: _Pool, progress: bool) -> None:
    """Tokenize one source into `directory` part by part (resumable; see the module docstring)."""
    dtype = token_dtype(tok.vocab_size)
    fim = source_fim(src, cfg)
    units = src.units()
    plan = _plan_parts(src, units, cfg.part_mb)
    partial = directory.with_name(directory.name + ".partial")
    plan_doc = {"units": len(units), "units_per_part": plan}
    plan_path = partial / "plan.json"
    if not plan_path.is_file() or json.loads(plan_path.read_text()) != plan_doc:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        _fsync_write(plan_path, json.dumps(plan_doc))
    bounds = np.concatenate([[0], np.cumsum(plan)]).astype(int)
    parts: list[dict[str, Any] | None] = [_finished_part(partial / f"part-{k:05d}") for k in range(len(plan))]
    todo = [k for k, p in enumerate(parts) if p is None]
    tasks = [(src, units[i], fim) for k in todo for i in range(bounds[k], bounds[k + 1])]
    bar = tqdm(total=len(tasks), desc=f"prepare {src.name}", unit="file", disable=not progress, leave=False)
    results = pool.imap(_encode_unit, tasks)
    for k in todo:
        records: list[tuple[str, np.ndarray, int]] = []
        stats: Counter = Counter()
        for _ in range(bounds[k], bounds[k + 1]):
            recs, counts = next(results)
            records.extend(recs)
            stats.update(counts)
            bar.update(1)
        parts[k] = _write_part(partial / f"part-{k:05d}", records, cfg.heldout_fraction, dtype, dict(stats))
    bar.close()
    stats = Counter()
    for p in parts:
        stats.update(p["stats"])
    manifest = {
        "source": src.name,
        **src.describe(),
        "source_fingerprint": src.fingerprint(),
        "tokenizer_sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "fim": fim.key() if fim else None,
        "parts": len(parts),
        "counts": {s: _sum_counts(parts, s) for s in ("train", "heldout")},
        "stats": dict(sorted(stats.items())),
        "files": {f"part-{k:05d}/{n}": h for k, p in enumerate(parts) for n, h in p["files"].items()},
        "sizes": {f"part-{k:05d}/{n}": s for k, p in enumerate(parts) for n, s in p["sizes"].items()},
        "format": FORMAT_VERSION,
    }
    _fsync_write(partial / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(partial, directory)


def load_shard(directory: Path, verify: bool | str = True) -> SourceShards:
    """Open a shard directory. verify=True/'full' re-hashes every file, 'size' checks sizes, False nothing;
    a file that does not match is named in the error."""
    mpath = directory / "manifest.json"
    if not mpath.is_file():
        raise DataError(f"{mpath} is missing; rerun `python -m crystal.data.prepare` to rebuild {directory.name}")
    try:
        manifest = json.loads(mpath.read_text())
        files, sizes = manifest["files"], manifest["sizes"]
    except (json.JSONDecodeError, KeyError) as e:
        raise DataError(
            f"{mpath} is corrupt or from an older crystal ({e}); delete {directory} and rerun prepare"
        ) from None
    for name, digest in files.items() if verify else ():
        path = directory / name
        if not path.is_file():
            raise DataError(f"shard file {path} is missing; delete {directory} and rerun prepare")
        if path.stat().st_size != sizes[name]:
            raise DataError(
                f"shard file {path} is truncated or altered ({path.stat().st_size} bytes, manifest says "
                f"{sizes[name]}); delete {directory} and rerun prepare"
            )
        if verify != "size" and file_sha256(path) != digest:
            raise DataError(
                f"shard file {path} fails its sha256 check (corrupt or truncated); delete {directory} and rerun prepare"
            )
    dtype = np.dtype(manifest["dtype"])
    splits: dict[str, tuple[list, list[str]]] = {"train": ([], []), "heldout": ([], [])}
    for k in range(manifest["parts"]):
        part = directory / f"part-{k:05d}"
        doc_ids = json.loads((part / "docs.json").read_text())
        for s, (arrays, ids) in splits.items():
            offsets = np.load(part / f"{s}.idx.npy")
            n = int(offsets[-1])
            # A plain ndarray over the memory map: slicing a np.memmap costs several microseconds more.
            tokens = (
                np.asarray(np.memmap(part / f"{s}.bin", dtype=dtype, mode="r", shape=(n,))) if n else np.zeros(0, dtype)
            )
            arrays.append((tokens, offsets))
            ids.extend(doc_ids[s])
    train, heldout = (Split(*splits[s]) for s in ("train", "heldout"))
    return SourceShards(manifest["source"], manifest["kind"], manifest["lang"], directory, manifest, train, heldout)


# ----------------------------------------------------------------------------------------------
# Everything together


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    shards: dict[str, SourceShards]
    manifest: dict[str, Any] = field(default_factory=dict)
    config: DataConfig | None = None  # what it was prepared from (the loader reads stage, epochs, ... from it)

    @property
    def fingerprint(self) -> str:
        """The data fingerprint: hash of the manifest (tokenizer + every shard's file hashes)."""
        return sha256_json(self.manifest)

    @property
    def fallbacks(self) -> dict[str, str]:
        """Absent source -> the source that takes its share (from the manifest)."""
        return dict(self.manifest.get("fallbacks", {}))


def _subsets(cfg: DataConfig, sources: dict[str, Source], fallbacks: dict[str, str]) -> dict[str, Any]:
    """Per alias (CrystalCoder subset): the source standing in for it, whether it is the real subset
    (a StarCoder language / SlimPajama set) or a local substitute, and whether its language matches."""
    out = {}
    for alias, target in sorted(cfg.aliases.items()):
        name = next(iter(resolve_fallbacks({target: 1.0}, fallbacks)))
        src = sources[name]
        kind, what = CRYSTALCODER_SUBSETS.get(alias, (src.kind, src.lang))
        if what == "starcoder":
            real = src.type == "starcoder"
        elif src.type == "jsonl":
            real = what in (getattr(src, "set_names", None) or [])
        else:
            real = src.type == "starcoder" and src.lang == what
        out[alias] = {
            "wanted": f"{kind}/{what}", "source": name, "has": f"{src.kind}/{src.lang}", "substitute": not real,
            "same_language": kind == "code" and src.kind == "code" and (src.lang == what or what == "starcoder"),
        }  # fmt: skip
    return out


def _progress_default() -> bool:
    return sys.stderr.isatty()


def prepare_data(cfg: DataConfig, vocab_size: int, log=print, progress: bool | None = None) -> PreparedData:
    """Build (or load from cache) the tokenizer and the shards of every source in use; verify them."""
    progress = _progress_default() if progress is None else progress
    sources = build_sources(cfg)
    missing = {n: reason for n, s in sources.items() if s.optional and (reason := s.missing())}
    fallbacks = {}
    for n in missing:
        if sources[n].fallback:
            fallbacks[n] = sources[n].fallback
        log(f"prepare: source {n!r} is absent here ({missing[n]}); its share goes to {sources[n].fallback!r}")
    available = {n: s for n, s in sources.items() if n not in missing}
    if not available:
        raise DataError(f"none of the data sources exist on this machine: {missing}")
    mixture = resolve_fallbacks(cfg.source_mixture(), fallbacks)
    stranded = sorted(n for n, w in mixture.items() if w > 0 and n in missing)
    if stranded:
        raise DataError(
            f"source(s) {stranded} have a mixture share but are absent here ({[missing[n] for n in stranded]}) and "
            "have no fallback; set data.sources.<name>.fallback or drop their share"
        )
    used = [n for n in available if not mixture or mixture.get(n, 0.0) > 0]
    # A tokenizer trained here samples every source (so it is the same in every stage); a given one
    # needs only the sources in use. Those must exist: one line naming the first that does not.
    for n in available if not cfg.tokenizer.path else used:
        if not available[n].units():
            raise DataError(f"data source {n!r} ({available[n].type}) found no files; check "
                            f"data.sources.{n}.path and its include patterns")  # fmt: skip
    workers = num_workers(cfg)
    t0 = time.time()
    tok = get_tokenizer(cfg, available, vocab_size, workers)
    dirs = {n: cache_root(cfg) / "shards" / f"{n}-{_shard_key(available[n], tok, cfg)}" for n in used}
    todo = [n for n in used if not (dirs[n] / "manifest.json").is_file()]
    if todo:
        with _Pool(workers, str(tok.path)) as pool:
            for name in todo:
                t = time.time()
                log(f"prepare: tokenizing source {name!r} ({available[name].type}) into {dirs[name]}")
                _write_shard(available[name], tok, cfg, dirs[name], pool, progress)
                log(f"prepare: {name!r} done in {time.time() - t:.1f}s")
    shards = {}
    for name in used:
        shards[name] = load_shard(dirs[name], verify=cfg.verify)
        if shards[name].train.num_docs == 0:
            raise DataError(
                f"source {name!r} has no training documents (shard {dirs[name]}); check its path or filters"
            )
    languages: dict[str, dict[str, list[str]]] = {"code": {}, "english": {}}
    for n, s in available.items():
        languages[s.kind].setdefault(s.lang, []).append(n)
    manifest = {
        "tokenizer": {
            "sha256": tok.sha256,
            "base_vocab": tok.base_vocab,
            "vocab_size": tok.vocab_size,
            "file": tok.path.name,
            "trained": not cfg.tokenizer.path,
        },  # fmt: skip
        "sources": {n: {k: s.manifest[k] for k in SOURCE_MANIFEST_KEYS} for n, s in shards.items()},
        "languages": languages,
        "missing": missing,
        "fallbacks": fallbacks,
        "subsets": _subsets(cfg, sources, fallbacks),
        "format": FORMAT_VERSION,
    }
    log(f"prepare: data ready in {time.time() - t0:.1f}s")
    return PreparedData(tok, shards, manifest, cfg)


def main() -> None:
    import hydra

    from crystal.config import CONFIG_DIR, quote_numeric_group_choices, register_configs, to_dataclass
    from crystal.errors import USER_ERRORS

    sys.argv[1:] = quote_numeric_group_choices(sys.argv[1:])
    register_configs()

    @hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
    def run(dcfg) -> None:
        try:
            cfg = to_dataclass(dcfg)
            data = prepare_data(cfg.data, cfg.model.vocab_size, progress=True)
            summarize(data)
            print_plan(data, cfg)
        except USER_ERRORS as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

    run()


def summarize(data: PreparedData) -> None:
    for name, s in data.shards.items():
        train, held = s.manifest["counts"]["train"], s.manifest["counts"]["heldout"]
        fim = " (FIM)" if s.manifest["fim"] else ""
        print(f"{name:>12}: {s.kind}/{s.lang}{fim}: {train['documents']} docs, {train['tokens']} tokens "
              f"(+{held['tokens']} held out)")  # fmt: skip
    for name, reason in data.manifest["missing"].items():
        print(f"{name:>12}: absent ({reason}); share goes to {data.fallbacks.get(name)}")
    subsets = data.manifest["subsets"]
    if subsets:
        stand_ins = [a for a, v in subsets.items() if v["substitute"]]
        same = [a for a in stand_ins if subsets[a]["same_language"]]
        print(f"CrystalCoder subsets: {len(subsets) - len(stand_ins)} real, {len(stand_ins)} local stand-ins "
              f"({len(same)} in the same language: {', '.join(same) or '-'}); manifest 'subsets'")  # fmt: skip
    print(f"fingerprint {data.fingerprint}")


def print_plan(data: PreparedData, cfg) -> None:
    """What train.steps x train.global_batch samples take from each source; epoch caps are checked here,
    before a run, instead of failing at the sample that crosses one."""
    from crystal.data.loader import DataLoader

    t = cfg.train
    seq_len = t.seq_len or cfg.model.max_seq_len
    loader = DataLoader(data, seq_len, t.global_batch, t.micro_batch, t.seed, mixture=cfg.data.source_mixture())
    n = t.steps * t.global_batch
    print(f"plan for stage {loader.stage}: {t.steps} steps x {t.global_batch} x {seq_len} tokens")
    over = []
    for name, p in loader.mixture.plan(n).items():
        cap = loader.epochs.get(name)
        flag = f" (cap {cap:g})" if cap else ""
        if cap and p["epochs"] > cap:
            over.append(name)
            flag += " EXCEEDS THE CAP"
        print(f"{name:>12}: share {p['share']:.4f}, {p['samples']} samples = {p['epochs']:.3f} epochs{flag}")
    if over:
        raise DataError(f"this stage would take {over} past their data.epochs cap; lower their share or steps")


if __name__ == "__main__":
    main()
