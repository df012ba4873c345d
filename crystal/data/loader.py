"""Packed, mixed, resumable batches whose order is a pure function of (data fingerprint, seed).

Each source's training stream (documents, each followed by EOS) is cut into windows of S+1 tokens
with stride S (inputs = window[:-1], targets = window[1:]). A mixture turns a global sample index i
into (source, window) without looking at any other index:

    block b = i // K holds round(K * w_s) samples of source s, in an order shuffled by (seed, fp, b);
    the m-th sample of source s is window perm_{s,e}[m mod N_s], e = m // N_s being its epoch, and
    perm_{s,e} a permutation seeded by (seed, fp, s, e).

So the batch at any step is computable directly (no replay), resume needs only the next sample
index, and a changed fingerprint or mixture changes the order (and is refused on resume).

Shapes: B sequences per micro-batch, S sequence length.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from crystal.data.prepare import DataError, PreparedData, Split
from crystal.tokenizer import ADDED_TOKENS

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
        self.num_windows = max(0, (len(split.tokens) - 1) // seq_len)

    def window(self, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """tokens (S+1,), positions (S,), segment ids (S,) of window j."""
        s = self.seq_len
        start = j * s
        tokens = np.asarray(self.split.tokens[start : start + s + 1], dtype=np.int64)
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


class Mixture:
    """Global sample index -> (source index, window index), as described in the module docstring."""

    def __init__(self, names: list[str], weights: list[float], sizes: list[int], seed: int, fingerprint: str):
        if any(n == 0 for n, w in zip(sizes, weights) if w > 0):
            empty = [name for name, n, w in zip(names, sizes, weights) if n == 0 and w > 0]
            raise DataError(f"source(s) {empty} have no full training window; lower the sequence length or add data")
        total = float(sum(weights))
        self.names, self.sizes, self.seed, self.fingerprint = names, sizes, seed, fingerprint
        self.weights = [w / total for w in weights]
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
        rng = np.random.default_rng(_seed_words("block", self.seed, self.fingerprint, b))
        labels = labels[rng.permutation(BLOCK)]
        # rank[r] = how many samples of the same source precede position r inside the block
        rank = np.zeros(BLOCK, dtype=np.int64)
        for s in range(len(self.counts)):
            where = labels == s
            rank[where] = np.arange(where.sum())
        return labels, rank

    def _perm_uncached(self, s: int, epoch: int) -> np.ndarray:
        rng = np.random.default_rng(_seed_words("epoch", self.seed, self.fingerprint, self.names[s], epoch))
        return rng.permutation(self.sizes[s])

    def locate(self, i: int) -> tuple[int, int, int]:
        """Sample i -> (source index, window index, epoch of that source)."""
        b, r = divmod(i, BLOCK)
        labels, rank = self._block_order(b)
        s = int(labels[r])
        m = b * int(self.counts[s]) + int(rank[r])
        epoch, j = divmod(m, self.sizes[s])
        return s, int(self._perm(s, epoch)[j]), epoch


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
    ) -> None:
        if global_batch % (micro_batch * world_size):
            raise ValueError(
                f"train.global_batch={global_batch} must be a multiple of train.micro_batch={micro_batch} "
                f"x world size {world_size}"
            )
        self.data, self.seq_len, self.seed = data, seq_len, seed
        self.global_batch, self.micro_batch, self.rank, self.world_size = global_batch, micro_batch, rank, world_size
        self.names = list(data.shards)
        self.train = [WindowedSplit(data.shards[n].train, seq_len) for n in self.names]
        self.heldout = [WindowedSplit(data.shards[n].heldout, seq_len) for n in self.names]
        if mixture:
            weights = [float(mixture.get(n, 0.0)) for n in self.names]
        else:  # proportional to size: one pass over everything
            weights = [float(w.num_windows) for w in self.train]
        self.mixture_weights = dict(zip(self.names, weights))
        self.mixture = Mixture(self.names, weights, [w.num_windows for w in self.train], seed, data.fingerprint)
        self.fim_pad_id = data.tokenizer.base_vocab + ADDED_TOKENS.index("<|fim_pad|>")
        self.sample_index = 0
        # [start, end) sample ranges never trained on (a rollback skips the window that spiked); sorted, disjoint
        self.excluded: list[tuple[int, int]] = []

    # -- state ------------------------------------------------------------------------------------

    @property
    def accum_steps(self) -> int:
        return self.global_batch // (self.micro_batch * self.world_size)

    def state_dict(self) -> dict[str, Any]:
        return {
            "sample_index": self.sample_index,
            "fingerprint": self.data.fingerprint,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "mixture": self.mixture_weights,
            "excluded": [list(r) for r in self.excluded],
        }

    def load_state_dict(self, state: dict[str, Any], allow_data_change: bool = False) -> None:
        mine = self.state_dict()
        for key in ("fingerprint", "seed", "seq_len", "mixture"):
            if state[key] != mine[key] and not allow_data_change:
                raise DataError(
                    f"checkpoint was trained with data {key} {state[key]!r}, this run has {mine[key]!r}; the sample "
                    "order would differ. Restore the original data, or pass train.allow_data_change=true to accept it"
                )
        self.sample_index = int(state["sample_index"])
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
        rows = [self.train[s].window(j) for s, j, _ in located]
        return self._collate(rows, np.asarray(list(indices)), located)

    def _collate(self, rows: list, indices: np.ndarray, located: list) -> Batch:
        tokens = torch.from_numpy(np.stack([r[0] for r in rows]))  # (B, S+1)
        targets = tokens[:, 1:].clone()
        targets[targets == self.fim_pad_id] = IGNORE_INDEX
        return Batch(
            input_ids=tokens[:, :-1].contiguous(),
            targets=targets,
            positions=torch.from_numpy(np.stack([r[1] for r in rows])),
            doc_ids=torch.from_numpy(np.stack([r[2] for r in rows])),
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
            js = range(a, min(a + self.micro_batch, n))
            rows = [split.window(j) for j in js]
            out.append(self._collate(rows, np.full(len(rows), -1), [(s, j, 0) for j in js]))
        return out
