"""Checkpoints and data chunks of one or more runs / releases, in training order.

Chunk k is what training consumed between checkpoint k-1 and checkpoint k (checkpoint -1 = where the run
started), so it pairs with checkpoint k, as in LLM360's Amber release (train_k.jsonl -> ckpt_k).

- A run directory (`outputs/<run>`): checkpoints are `checkpoints/step-*`; chunk k is the sample range
  [sample_index of checkpoint k-1, sample_index of checkpoint k) from each checkpoint's trainer.json (minus
  windows skipped after a rollback), read back through the run's own loader, rebuilt from its config.yaml
  (the data fingerprint must match what the run recorded).
- A release directory: `manifest.json` lists its chunks (`data/train_{k:03}.jsonl`, Amber's layout:
  `{"token_ids": [...], "source": ...}` per line) and the checkpoint after each; without a manifest, every
  `train_*.jsonl` pairs with the checkpoints found below the directory, ordered by step.

Several paths in a row (stage 1, 2, 3) continue each other: steps, tokens and chunk indices add up, and a
stage boundary is recorded where the stage changes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crystal.checkpoint import load_checkpoint
from crystal.config import ModelConfig
from crystal.errors import CrystalError, DataError
from crystal.model import CrystalCoder, build_model
from crystal.tokenizer import ADDED_TOKENS


class AnalysisError(CrystalError):
    """A run or release that cannot be analysed as asked."""


# ----------------------------------------------------------------------------------------------
# Chunk readers: num_samples, rows(positions) -> (tokens (n, S+1), sources)


class LoaderChunk:
    """Samples of a run, read through its loader (the same windows training saw)."""

    def __init__(self, loader, samples: np.ndarray) -> None:
        self.loader, self.samples = loader, samples

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    def rows(self, positions: np.ndarray) -> tuple[np.ndarray, list[str]]:
        tokens, sources = [], []
        for i in self.samples[positions]:
            s, j, _ = self.loader.mixture.locate(int(i))
            tokens.append(self.loader.train[s].window(j)[0])  # (S+1,)
            sources.append(self.loader.names[s])
        return np.stack(tokens), sources


class JsonlChunk:
    """An Amber-layout chunk file: one `{"token_ids": [...], "source": ...}` per line. Only the sampled lines
    are parsed (their byte offsets are indexed once), so a 2 GB chunk costs one pass of reading."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise AnalysisError(f"chunk file {path} does not exist")
        self.path = path
        self._offsets: np.ndarray | None = None

    @property
    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            offsets, pos = [], 0
            with open(self.path, "rb") as f:
                for line in f:
                    if line.strip():
                        offsets.append(pos)
                    pos += len(line)
            self._offsets = np.asarray(offsets, dtype=np.int64)
        return self._offsets

    @property
    def num_samples(self) -> int:
        return len(self.offsets)

    def rows(self, positions: np.ndarray) -> tuple[np.ndarray, list[str]]:
        tokens, sources = [], []
        with open(self.path, "rb") as f:
            for p in positions:
                f.seek(int(self.offsets[p]))
                line = f.readline()
                try:
                    row = json.loads(line)
                    tokens.append(np.asarray(row["token_ids"], dtype=np.int64))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise AnalysisError(f"{self.path} line {p + 1} is not an Amber-layout row ({e})") from None
                sources.append(str(row.get("source", "")))
        lengths = {len(t) for t in tokens}
        if len(lengths) > 1:
            cut = min(lengths)  # Amber's rows are all 2049 tokens; ragged rows are compared on their common prefix
            tokens = [t[:cut] for t in tokens]
        return np.stack(tokens) if tokens else np.zeros((0, 0), dtype=np.int64), sources


# ----------------------------------------------------------------------------------------------
# Timeline


@dataclass
class CheckpointRef:
    path: Path
    label: str
    step: int  # within its run
    global_step: int  # steps since the first run's start
    global_tokens: int
    stage: Any
    run: int


@dataclass
class ChunkRef:
    index: int  # global chunk index
    label: str
    reader: Any
    checkpoint: int  # index into Timeline.checkpoints of the checkpoint that ends this chunk
    end_global_step: int
    run: int


@dataclass
class Run:
    path: Path
    kind: str  # run | release
    config: Any = None  # crystal Config of the run, when it could be read
    fingerprint: str | None = None
    _loader: Any = None

    def loader(self):
        """The run's loader, rebuilt from its config; its data must be the data the run recorded."""
        if self._loader is None:
            if self.config is None:
                raise AnalysisError(f"{self.path}: no run config found, so its data cannot be rebuilt")
            from crystal.data.loader import DataLoader
            from crystal.data.prepare import prepare_data

            cfg = self.config
            data = prepare_data(cfg.data, cfg.model.vocab_size, log=lambda *_: None)
            if self.fingerprint and data.fingerprint != self.fingerprint:
                raise DataError(
                    f"{self.path}: the data rebuilt from its config has fingerprint {data.fingerprint[:12]}, the run "
                    f"recorded {self.fingerprint[:12]}; restore the run's data (data.sources, CRYSTAL_CACHE) first"
                )
            t = cfg.train
            self._loader = DataLoader(
                data, t.seq_len or cfg.model.max_seq_len, t.global_batch, t.micro_batch, t.seed,
                mixture=cfg.data.source_mixture(),
            )  # fmt: skip
        return self._loader


@dataclass
class Timeline:
    checkpoints: list[CheckpointRef] = field(default_factory=list)
    chunks: list[ChunkRef] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    # (global step, global tokens, stage it enters) where consecutive checkpoints change stage
    stage_boundaries: list[tuple[int, int, Any]] = field(default_factory=list)

    def select(self, steps: list[int] | None) -> Timeline:
        """Only the checkpoints at these (run-local or global) steps; chunks are kept."""
        if not steps:
            return self
        keep = [i for i, c in enumerate(self.checkpoints) if c.step in steps or c.global_step in steps]
        if not keep:
            raise AnalysisError(f"analysis.checkpoints={steps} matches none of steps "
                                f"{[c.step for c in self.checkpoints]}")  # fmt: skip
        remap = {old: new for new, old in enumerate(keep)}
        chunks = [ChunkRef(c.index, c.label, c.reader, remap.get(c.checkpoint, -1), c.end_global_step, c.run)
                  for c in self.chunks]  # fmt: skip
        return Timeline([self.checkpoints[i] for i in keep], chunks, self.runs, self.stage_boundaries)


def _read_config(path: Path):
    from omegaconf import OmegaConf

    from crystal.config import to_dataclass

    try:
        return to_dataclass(OmegaConf.load(path))
    except Exception as e:  # an unreadable config: the run can still be analysed from its chunks alone
        raise AnalysisError(f"cannot read run config {path}: {e}") from None


def _excluded(samples_from: int, samples_to: int, excluded: list) -> np.ndarray:
    keep = np.ones(max(0, samples_to - samples_from), dtype=bool)
    for a, b in excluded or []:
        lo, hi = max(a, samples_from), min(b, samples_to)
        if lo < hi:
            keep[lo - samples_from : hi - samples_from] = False
    return np.nonzero(keep)[0] + samples_from


def _meta(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / "trainer.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AnalysisError(f"{ckpt}/trainer.json is missing or corrupt ({e})") from None


def _add_run(tl: Timeline, path: Path) -> None:
    run_index = len(tl.runs)
    step0 = tl.checkpoints[-1].global_step if tl.checkpoints else 0
    tok0 = tl.checkpoints[-1].global_tokens if tl.checkpoints else 0
    prev_stage = tl.checkpoints[-1].stage if tl.checkpoints else None
    is_release = (path / "manifest.json").is_file() or next(path.rglob("train_*.jsonl"), None) is not None
    if not is_release:
        from crystal.release import release_checkpoints

        ckpts = release_checkpoints(path)  # keep-interval checkpoints (resume/rollback only) end no chunk
        metas = [_meta(c) for c in ckpts]
        start = 0
        if metas and metas[0].get("ends_chunk", 0) is None:  # where the run started (step 0 or a stage's start)
            start, ckpts, metas = int(metas[0]["loader"]["sample_index"]), ckpts[1:], metas[1:]
        if not ckpts:
            raise AnalysisError(f"run directory {path} holds no complete checkpoint")
        config = _read_config(path / "config.yaml") if (path / "config.yaml").is_file() else None
        run = Run(path, "run", config, metas[-1].get("data_fingerprint"))
        pairs = []
        for c, m in zip(ckpts, metas):
            end = int(m["loader"]["sample_index"])
            samples = _excluded(start, end, m["loader"].get("excluded", []))
            pairs.append((c, m, lambda s=samples: LoaderChunk(run.loader(), s)))
            start = end
        labels = [c.name for c in ckpts]
    else:
        run = Run(path, "release")
        pairs, labels = _release_pairs(path, run)
    tl.runs.append(run)
    for (c, m, make_reader), label in zip(pairs, labels):
        stage = m.get("stage", 0)
        if prev_stage is not None and stage != prev_stage:
            tl.stage_boundaries.append((step0 + 0, tok0, stage))
        prev_stage = stage
        ref = CheckpointRef(c, label, int(m["step"]), step0 + int(m["step"]), tok0 + int(m.get("tokens", 0)), stage,
                            run_index)  # fmt: skip
        tl.checkpoints.append(ref)
        tl.chunks.append(ChunkRef(len(tl.chunks), f"chunk {len(tl.chunks)}", _Lazy(make_reader),
                                  len(tl.checkpoints) - 1, ref.global_step, run_index))  # fmt: skip


class _Lazy:
    """Builds a chunk reader on first use (a run's loader needs its data prepared)."""

    def __init__(self, make) -> None:
        self._make, self._reader = make, None

    def _get(self):
        if self._reader is None:
            self._reader = self._make()
        return self._reader

    @property
    def num_samples(self) -> int:
        return self._get().num_samples

    def rows(self, positions: np.ndarray):
        return self._get().rows(positions)


def _release_pairs(path: Path, run: Run):
    """(checkpoint dir, trainer.json, reader factory) per chunk of a release, and labels."""
    manifest_path = path / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        chunks = sorted(manifest.get("chunks", []), key=lambda c: c["chunk"])
        if not chunks:
            raise AnalysisError(f"{manifest_path} lists no chunks")
        run.fingerprint = manifest.get("data_fingerprint")
        configs = sorted((path / "configs").glob("*.yaml"))
        if configs:
            run.config = _read_config(configs[-1])
        pairs = []
        for c in chunks:
            ckpt = path / c["checkpoint"]
            pairs.append((ckpt, _meta(ckpt), lambda f=path / c["data"]: JsonlChunk(f)))
        return pairs, [Path(c["checkpoint"]).name for c in chunks]
    files = sorted(path.rglob("train_*.jsonl"))
    ckpts = sorted((p.parent for p in path.rglob("trainer.json") if (p.parent / "manifest.json").is_file()),
                   key=lambda p: _meta(p)["step"])  # fmt: skip
    ckpts = [c for c in ckpts if c.name != "init"]
    if not files or len(files) != len(ckpts):
        raise AnalysisError(
            f"{path} is neither a run directory (checkpoints/) nor a release: found {len(files)} train_*.jsonl "
            f"chunk files and {len(ckpts)} checkpoints, which must pair one to one"
        )
    return [(c, _meta(c), lambda f=f: JsonlChunk(f)) for c, f in zip(ckpts, files)], [c.name for c in ckpts]


def build_timeline(paths: list[str | Path]) -> Timeline:
    tl = Timeline()
    for p in paths:
        p = Path(p)
        if not p.is_dir():
            raise AnalysisError(f"{p} is not a directory; give a run directory (outputs/<run>) or a release")
        _add_run(tl, p)
    if len(tl.runs) > 1:  # several runs: say which one a checkpoint belongs to
        for c in tl.checkpoints:
            c.label = f"{tl.runs[c.run].path.name}/{c.label}"
    return tl


# ----------------------------------------------------------------------------------------------
# Models and samples


def load_model(ref: CheckpointRef, device: torch.device) -> CrystalCoder:
    ckpt = load_checkpoint(ref.path)
    cfg = ModelConfig(**{**ckpt.meta["model_config"], "ops": "torch"})
    model = build_model(cfg, device="meta")
    model.load_state_dict(ckpt.tensors["model"], assign=True)
    return model.to(device).eval()


def sample_positions(num_samples: int, n: int, seed: int, chunk: int) -> np.ndarray:
    """Which rows of a chunk are analysed: n of them without replacement, by (seed, chunk) only, so every
    checkpoint sees the same sequences and a rerun picks them again."""
    if n >= num_samples:
        return np.arange(num_samples)
    rng = np.random.default_rng([seed, chunk])
    return np.sort(rng.choice(num_samples, size=n, replace=False))


def fim_pad_id(run: Run) -> int | None:
    """<|fim_pad|>'s id (its targets carry no loss in training), from the run's tokenizer; None if unknown."""
    if run.kind == "run":
        return run.loader().fim_pad_id
    tok = run.path / "tokenizer" / "tokenizer.model"
    if not tok.is_file():
        return None
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tok)).get_piece_size() + ADDED_TOKENS.index("<|fim_pad|>")
