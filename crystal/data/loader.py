"""Packed, mixed, resumable batches whose order is a pure function of (data fingerprint, stage, seed).

Each source's training stream (documents, each followed by EOS) is cut into windows of S+1 tokens
with stride S (inputs = window[:-1], targets = window[1:]). A mixture turns a global sample index i
into (source, window) without looking at any other index:

    block b = i // K holds round(K * w_s) samples of source s, in an order shuffled by (seed, fp, stage, b);
    the m-th sample of source s is window perm_{s,e}[m mod N_s], e = m // N_s being its epoch, and
    perm_{s,e} a permutation seeded by (seed, fp, stage, s, e).

So the batch at any step is computable directly (no replay), resume needs only the next sample
index, and a changed fingerprint, stage or mixture changes the order (and is refused on resume unless
data.allow_data_change=true, which is then recorded in the loader state). A source with an epoch cap
(data.epochs) raises a DataError naming it when the order would take it past the cap.

Shapes: B sequences per micro-batch, S sequence length.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from crystal.data.prepare import DataError, PreparedData, Split, resolve_fallbacks
from crystal.tokenizer import ADDED_TOKENS, EOS_ID

IGNORE_INDEX = -100
BLOCK = 1024  # mixture block size K: shares are exact (up to rounding) within every K samples


def _seed_words(*parts: Any) -> list[int]:
    """Stable 32-bit words for numpy's SeedSequence from ints and strings (e.g. the fingerprint)."""
    h = hashlib.sha256("\0".join(str(p) for p in parts).encode()).digest()
    return [int.from_bytes(h[i : i + 4], "little") for i in range(0, 16, 4)]


@dataclass
class Batch:
    """One micro-batch. Everything the model needs plus provenance (which source/window/sample)."""

    input_ids: torch.Tensor  # (B, S) int64
    targets: torch.Tensor  # (B, S) int64, IGNORE_INDEX where no loss is taken (FIM padding)
    positions: torch.Tensor  # (B, S) int64, restarting at 0 at every document start inside the window
    doc_ids: torch.Tensor  # (B, S) int32, index of the document segment within the window
    sample_index: np.ndarray  # (B,) global sample indices
    source_index: np.ndarray  # (B,) index into the loader's source list
    window_index: np.ndarray  # (B,) window within that source's training stream

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device | str) -> Batch:
        move = lambda t: t.to(device, non_blocking=True)
        return Batch(
            move(self.input_ids), move(self.targets), move(self.positions), move(self.doc_ids),
            self.sample_index, self.source_index, self.window_index,
        )  # fmt: skip


class WindowedSplit:
    """A split's token stream viewed as fixed windows of S+1 tokens with stride S."""

    def __init__(self, split: Split, seq_len: int) -> None:
        self.split, self.seq_len = split, seq_len
        self.num_windows = max(0, (len(split) - 1) // seq_len)

    def tokens(self, j: int) -> np.ndarray:
        """Token ids (S+1,) of window j in the stored dtype (a view when it lies inside one part)."""
        return self.split.read(j * self.seq_len, (j + 1) * self.seq_len + 1)

    def window(self, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """tokens (S+1,) int64, positions (S,), segment ids (S,) of window j, from the document offsets.
        (Batches derive the same positions and segments from EOS tokens, vectorised: see `segments`.)"""
        s = self.seq_len
        start = j * s
        tokens = np.asarray(self.tokens(j), dtype=np.int64)
        offsets = self.split.offsets
        # Document starts that fall strictly inside the window begin new segments.
        lo, hi = np.searchsorted(offsets, [start + 1, start + s], side="left")
        starts = offsets[lo:hi] - start  # (n_inner,) relative starts
        seg = np.zeros(s, dtype=np.int32)
        if len(starts):
            seg[starts] = 1
            seg = np.cumsum(seg, dtype=np.int32)
        seg_start = np.concatenate([[0], starts])[seg]
        positions = np.arange(s, dtype=np.int64) - seg_start
        return tokens, positions, seg

    def documents(self, j: int) -> list[str]:
        """Ids of the documents (whole or partial) that window j covers."""
        s, offsets = self.seq_len, self.split.offsets
        first = int(np.searchsorted(offsets, j * s, side="right")) - 1
        last = int(np.searchsorted(offsets, j * s + s, side="right")) - 1  # the target token's doc
        return self.split.doc_ids[first : min(last, self.split.num_docs - 1) + 1]


def segments(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions (B, S) and document segment ids (B, S) of windows `tokens` (B, S+1).

    Every document in a shard ends with EOS and EOS appears nowhere else (sentencepiece never emits a
    control id from text), so a document starts after each EOS: the same segments the offsets give."""
    b, s = tokens.shape[0], tokens.shape[1] - 1
    starts = np.zeros((b, s), dtype=bool)
    starts[:, 1:] = tokens[:, : s - 1] == EOS_ID  # (B, S) a new document begins here
    idx = np.arange(s, dtype=np.int64)
    seg_start = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)  # (B, S) start of the current document
    return idx - seg_start, np.cumsum(starts, axis=1, dtype=np.int32)


class Mixture:
    """Global sample index -> (source index, window index), as described in the module docstring."""

    def __init__(
        self, names: list[str], weights: list[float], sizes: list[int], seed: int, fingerprint: str, stage: int = 0,
        epochs: list[float | None] | None = None,
    ) -> None:  # fmt: skip
        if any(n == 0 for n, w in zip(sizes, weights) if w > 0):
            empty = [name for name, n, w in zip(names, sizes, weights) if n == 0 and w > 0]
            raise DataError(f"source(s) {empty} have no full training window; lower the sequence length or add data")
        total = float(sum(weights))
        self.names, self.sizes, self.seed, self.fingerprint, self.stage = names, sizes, seed, fingerprint, stage
        self.weights = [w / total for w in weights]
        # Samples of each source the cap allows: epochs x windows (None = no cap).
        self.limits = [None if e is None else int(e * n) for e, n in zip(epochs or [None] * len(names), sizes)]
        self.counts = self._block_counts(self.weights)
        self._block_order = lru_cache(maxsize=4)(self._block_order_uncached)
        self._perm = lru_cache(maxsize=64)(self._perm_uncached)

    @staticmethod
    def _block_counts(weights: list[float]) -> np.ndarray:
        """Largest-remainder apportionment of BLOCK samples to sources."""
        raw = np.array(weights) * BLOCK
        counts = np.floor(raw).astype(np.int64)
        for i in np.argsort(-(raw - counts), kind="stable")[: BLOCK - counts.sum()]:
            counts[i] += 1
        return counts

    def _block_order_uncached(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.repeat(np.arange(len(self.counts)), self.counts)
        rng = np.random.default_rng(_seed_words("block", self.seed, self.fingerprint, self.stage, b))
        labels = labels[rng.permutation(BLOCK)]
        # rank[r] = how many samples of the same source precede position r inside the block
        rank = np.zeros(BLOCK, dtype=np.int64)
        for s in range(len(self.counts)):
            where = labels == s
            rank[where] = np.arange(where.sum())
        return labels, rank

    def _perm_uncached(self, s: int, epoch: int) -> np.ndarray:
        rng = np.random.default_rng(_seed_words("epoch", self.seed, self.fingerprint, self.stage, self.names[s], epoch))
        return rng.permutation(self.sizes[s])

    def locate(self, i: int) -> tuple[int, int, int]:
        """Sample i -> (source index, window index, epoch of that source)."""
        b, r = divmod(i, BLOCK)
        labels, rank = self._block_order(b)
        s = int(labels[r])
        m = b * int(self.counts[s]) + int(rank[r])
        if self.limits[s] is not None and m >= self.limits[s]:
            raise DataError(
                f"sample {i} would take source {self.names[s]!r} past its data.epochs cap "
                f"({self.limits[s] / self.sizes[s]:g} epochs of {self.sizes[s]} windows); lower its share, train "
                "fewer steps, add data or raise the cap"
            )
        epoch, j = divmod(m, self.sizes[s])
        return s, int(self._perm(s, epoch)[j]), epoch

    def plan(self, num_samples: int) -> dict[str, dict[str, float]]:
        """What `num_samples` samples take from each source: samples, share, epochs (passes over its windows)."""
        out = {}
        full, rest = divmod(num_samples, BLOCK)
        labels = self._block_order(full)[0][:rest]
        for s, name in enumerate(self.names):
            n = full * int(self.counts[s]) + int(np.sum(labels == s))
            out[name] = {"samples": n, "share": n / max(1, num_samples), "windows": self.sizes[s],
                         "epochs": n / self.sizes[s] if self.sizes[s] else 0.0}  # fmt: skip
        return out


class DataLoader:
    """Stateful loader over a PreparedData: `next_step()` gives the micro-batches of one optimizer step.

    Sample indices of step n are [n*G, (n+1)*G) for global batch G; data-parallel rank r of W takes
    every W-th micro-batch-sized slice, so W replicas see exactly the samples one replica would.
    """

    def __init__(
        self,
        data: PreparedData,
        seq_len: int,
        global_batch: int,
        micro_batch: int,
        seed: int,
        mixture: dict[str, float] | None = None,
        rank: int = 0,
        world_size: int = 1,
        stage: int | None = None,
        epochs: dict[str, float] | None = None,
    ) -> None:
        if global_batch % (micro_batch * world_size):
            raise ValueError(
                f"train.global_batch={global_batch} must be a multiple of train.micro_batch={micro_batch} "
                f"x world size {world_size}"
            )
        self.data, self.seq_len, self.seed = data, seq_len, seed
        self.global_batch, self.micro_batch, self.rank, self.world_size = global_batch, micro_batch, rank, world_size
        # Stage, epoch caps and the override knob default to the data config the data was prepared from.
        cfg = data.config
        self.stage = int(stage if stage is not None else (cfg.stage if cfg else 0))
        epochs = epochs if epochs is not None else (cfg.source_epochs() if cfg else {})
        self.allow_data_change = bool(cfg.allow_data_change) if cfg else False
        self.data_changes: list[dict[str, Any]] = []  # resumes that accepted changed data (allow_data_change)
        self.names = list(data.shards)
        self.train = [WindowedSplit(data.shards[n].train, seq_len) for n in self.names]
        self.heldout = [WindowedSplit(data.shards[n].heldout, seq_len) for n in self.names]
        if mixture:
            # Absent sources (optional, not on this machine) hand their share to their fallback.
            mixture = resolve_fallbacks(dict(mixture), data.fallbacks)
            unknown = sorted(n for n, w in mixture.items() if w > 0 and n not in data.shards)
            if unknown:
                raise DataError(f"mixture names source(s) {unknown} that were not prepared; have {self.names}")
            weights = [float(mixture.get(n, 0.0)) for n in self.names]
        else:  # proportional to size: one pass over everything
            weights = [float(w.num_windows) for w in self.train]
        caps = resolve_fallbacks(dict(epochs), {})  # keys are source names already
        self.epochs = {n: float(caps[n]) for n in self.names if n in caps}
        self.mixture_weights = dict(zip(self.names, weights))
        self.mixture = Mixture(
            self.names, weights, [w.num_windows for w in self.train], seed, data.fingerprint, self.stage,
            [self.epochs.get(n) for n in self.names],
        )  # fmt: skip
        self.fim_pad_id = data.tokenizer.base_vocab + ADDED_TOKENS.index("<|fim_pad|>")
        self.sample_index = 0
        # [start, end) sample ranges never trained on (a rollback skips the window that spiked); sorted, disjoint
        self.excluded: list[tuple[int, int]] = []

    # -- state ------------------------------------------------------------------------------------

    @property
    def accum_steps(self) -> int:
        return self.global_batch // (self.micro_batch * self.world_size)

    ORDER_KEYS = ("fingerprint", "seed", "stage", "seq_len", "mixture", "epochs")  # what the order depends on

    def state_dict(self) -> dict[str, Any]:
        return {
            "sample_index": self.sample_index,
            "fingerprint": self.data.fingerprint,
            "seed": self.seed,
            "stage": self.stage,
            "seq_len": self.seq_len,
            "mixture": self.mixture_weights,
            "epochs": self.epochs,
            "data_changes": self.data_changes,
            "excluded": [list(r) for r in self.excluded],
        }

    def load_state_dict(self, state: dict[str, Any], allow_data_change: bool = False) -> None:
        """Resume at the saved position. A different fingerprint, stage, seed, sequence length, mixture or
        epoch cap is refused unless allowed (argument or data.allow_data_change); an accepted change is
        appended to `data_changes` (and so to every later checkpoint) with the sample index it took effect."""
        mine = self.state_dict()
        old = {"stage": 0, "epochs": {}, **state}  # checkpoints from before those keys existed
        changed = [k for k in self.ORDER_KEYS if old[k] != mine[k]]
        if changed and not (allow_data_change or self.allow_data_change):
            key = changed[0]
            raise DataError(
                f"checkpoint was trained with data {key} {old[key]!r}, this run has {mine[key]!r}; the sample "
                "order would differ. Restore the original data, or pass data.allow_data_change=true to accept it "
                "(the change is recorded in the loader state)"
            )
        self.sample_index = int(state["sample_index"])
        self.data_changes = list(state.get("data_changes", []))
        if changed:
            self.data_changes.append(
                {"at_sample": self.sample_index, "changed": {k: {"was": old[k], "now": mine[k]} for k in changed}}
            )
        self.excluded = [(int(a), int(b)) for a, b in state.get("excluded", [])]

    def exclude(self, start: int, end: int) -> None:
        """Never train on samples [start, end) from now on (merged with earlier exclusions)."""
        merged: list[tuple[int, int]] = []
        for a, b in sorted([*self.excluded, (int(start), int(end))]):
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self.excluded = merged

    def next_samples(self, n: int, start: int | None = None) -> list[int]:
        """The next n sample indices from `start` (default: the loader's position), skipping exclusions."""
        i, out = self.sample_index if start is None else start, []
        for a, b in self.excluded:
            if b <= i:
                continue
            while len(out) < n and i < a:
                out.append(i)
                i += 1
            if len(out) == n:
                return out
            i = max(i, b)
        return out + list(range(i, i + n - len(out)))

    # -- batches ----------------------------------------------------------------------------------

    def samples_of_step(self, step: int) -> range:
        return range(step * self.global_batch, (step + 1) * self.global_batch)

    def batch_from_samples(self, indices: list[int] | range) -> Batch:
        located = [self.mixture.locate(i) for i in indices]
        return self._collate(self._gather(self.train, located), np.asarray(list(indices)), located)

    def _gather(self, splits: list[WindowedSplit], located: list) -> np.ndarray:
        tokens = np.empty((len(located), self.seq_len + 1), dtype=np.int64)  # (B, S+1)
        for r, (s, j, _) in enumerate(located):
            tokens[r] = splits[s].tokens(j)
        return tokens

    def _collate(self, windows: np.ndarray, indices: np.ndarray, located: list) -> Batch:
        positions, doc_ids = segments(windows)
        tokens = torch.from_numpy(windows)  # (B, S+1)
        targets = tokens[:, 1:].clone()
        targets[targets == self.fim_pad_id] = IGNORE_INDEX
        return Batch(
            input_ids=tokens[:, :-1].contiguous(),
            targets=targets,
            positions=torch.from_numpy(positions),
            doc_ids=torch.from_numpy(doc_ids),
            sample_index=indices,
            source_index=np.array([s for s, _, _ in located], dtype=np.int64),
            window_index=np.array([j for _, j, _ in located], dtype=np.int64),
        )

    def step_batches(self, step: int) -> list[Batch]:
        """This rank's micro-batches of optimizer step `step` (pure: no state read or changed)."""
        return self.rank_batches(self.samples_of_step(step))

    def rank_batches(self, samples: list[int] | range) -> list[Batch]:
        """One step's global batch of sample indices -> this rank's micro-batches."""
        mb = self.micro_batch
        out = []
        for a in range(self.accum_steps):
            start = (a * self.world_size + self.rank) * mb
            out.append(self.batch_from_samples(samples[start : start + mb]))
        return out

    def next_step(self) -> list[Batch]:
        if self.excluded:
            samples = self.next_samples(self.global_batch)
            self.sample_index = samples[-1] + 1
            return self.rank_batches(samples)
        if self.sample_index % self.global_batch:
            raise DataError(f"loader sample index {self.sample_index} is not at a step boundary of {self.global_batch}")
        batches = self.step_batches(self.sample_index // self.global_batch)
        self.sample_index += self.global_batch
        return batches

    def heldout_batches(self, source: str, max_batches: int) -> list[Batch]:
        """The first windows of a source's held-out split, in order (the same every evaluation)."""
        s = self.names.index(source)
        split = self.heldout[s]
        n = min(split.num_windows, max_batches * self.micro_batch)
        out = []
        for a in range(0, n, self.micro_batch):
            located = [(s, j, 0) for j in range(a, min(a + self.micro_batch, n))]
            windows = self._gather(self.heldout, located)
            out.append(self._collate(windows, np.full(len(located), -1), located))
        return out
