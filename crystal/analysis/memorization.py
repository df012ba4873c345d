"""Analysis360's memorization score, for every (checkpoint, data chunk) of a run or release.

Definition (LLM360 Analysis360, as used for Amber and CrystalCoder): from each chunk, 1000 sequences sampled
with a fixed seed, the first 64 tokens of each; the model gets tokens 0..31 as the prompt and greedily
decodes 32 tokens, never stopping early. Per sequence, the score is the fraction of the 32 generated tokens
equal to tokens 32..63; token_match (the memorization score) is its mean over the sequences, full_match the
fraction of sequences with all 32 equal. The same sequences are used for every checkpoint.

    python -m crystal.analysis memorization outputs/default [--out DIR] [sequences=200 ...]

Writes into DIR (default <first path>/analysis):
    memorization.csv                 one row per (checkpoint, chunk): token_match, full_match, steps since seen
    memorization_sequences.npz       matched-token counts per (checkpoint, chunk, sequence), sample positions
    memorization_heatmap.png         token_match, checkpoints x chunks (cells right of the diagonal: not yet seen)
    memorization_by_chunk.png        Analysis360 view 1: score vs chunk index for several checkpoints
    memorization_histogram.png       Analysis360 view 2: histogram of per-sequence scores
    memorization_recency.png         score vs how many steps ago the chunk was trained on
"""

from __future__ import annotations

import contextlib
import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from crystal.analysis.decode import greedy_decode
from crystal.analysis.timeline import AnalysisError, Timeline, load_model, sample_positions
from crystal.config import AnalysisConfig
from crystal.utils import autocast_dtype, resolve_device

# ----------------------------------------------------------------------------------------------
# The score


@torch.no_grad()
def match_counts(
    model,
    sequences: torch.Tensor,
    prompt_tokens: int = 32,
    generate_tokens: int = 32,
    batch_size: int = 64,
    on_batch=None,
) -> np.ndarray:
    """sequences (N, >= P+G) -> per sequence, how many of the G greedily decoded tokens equal the reference
    tokens P..P+G-1 (int, 0..G)."""
    device = next(model.parameters()).device
    amp = autocast_dtype("auto", device)
    out = np.zeros(len(sequences), dtype=np.int64)
    for a in range(0, len(sequences), batch_size):
        batch = sequences[a : a + batch_size].to(device)
        ctx = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
        with ctx:
            generated = greedy_decode(model, batch[:, :prompt_tokens], generate_tokens)  # (B, G)
        reference = batch[:, prompt_tokens : prompt_tokens + generate_tokens]
        out[a : a + len(batch)] = (generated == reference).sum(dim=1).cpu().numpy()
        if on_batch is not None:
            on_batch(len(batch))
    return out


def scores(counts: np.ndarray, generate_tokens: int = 32) -> tuple[float, float]:
    """Analysis360's (token_match, full_match) from per-sequence match counts."""
    if len(counts) == 0:
        return float("nan"), float("nan")
    return float(np.mean(counts / generate_tokens)), float(np.mean(counts == generate_tokens))


# ----------------------------------------------------------------------------------------------
# Over a timeline


@dataclass
class MemorizationTable:
    checkpoints: list[str]
    checkpoint_steps: list[int]
    chunks: list[str]
    token_match: np.ndarray  # (K, C)
    full_match: np.ndarray  # (K, C)
    steps_since_seen: np.ndarray  # (K, C), NaN where the checkpoint has not seen the chunk yet
    counts: np.ndarray  # (K, C, N) matched tokens per sequence, -1 where a chunk has fewer than N sequences
    positions: np.ndarray  # (C, N) row of each analysed sequence inside its chunk, -1 as above
    generate_tokens: int

    def rows(self) -> list[dict]:
        out = []
        for k, ck in enumerate(self.checkpoints):
            for c in range(len(self.chunks)):
                n = int((self.counts[k, c] >= 0).sum())
                since = self.steps_since_seen[k, c]
                out.append({
                    "checkpoint": ck, "step": self.checkpoint_steps[k], "chunk": c, "sequences": n,
                    "token_match": f"{self.token_match[k, c]:.6f}", "full_match": f"{self.full_match[k, c]:.6f}",
                    "seen": int(not np.isnan(since)), "steps_since_seen": "" if np.isnan(since) else int(since),
                })  # fmt: skip
        return out


def chunk_sequences(timeline: Timeline, acfg: AnalysisConfig, length: int) -> tuple[list[torch.Tensor], np.ndarray]:
    """The analysed sequences of every chunk, first `length` tokens each, and their row positions (C, N)."""
    seqs, positions = [], np.full((len(timeline.chunks), acfg.sequences), -1, dtype=np.int64)
    for c, chunk in enumerate(timeline.chunks):
        pos = sample_positions(chunk.reader.num_samples, acfg.sequences, acfg.seed, chunk.index)
        tokens, _ = chunk.reader.rows(pos)
        if len(pos) and tokens.shape[1] < length:
            raise AnalysisError(
                f"{chunk.label}: sequences have {tokens.shape[1]} tokens, memorization needs {length} "
                f"(analysis.prompt_tokens + analysis.generate_tokens); lower them or train with longer sequences"
            )
        seqs.append(torch.from_numpy(np.ascontiguousarray(tokens[:, :length])))
        positions[c, : len(pos)] = pos
    return seqs, positions


def memorization(timeline: Timeline, acfg: AnalysisConfig) -> MemorizationTable:
    device = resolve_device(acfg.device)
    length = acfg.prompt_tokens + acfg.generate_tokens
    seqs, positions = chunk_sequences(timeline, acfg, length)
    k_n, c_n = len(timeline.checkpoints), len(timeline.chunks)
    counts = np.full((k_n, c_n, acfg.sequences), -1, dtype=np.int16)  # 0..G matched, -1 = no sequence
    total = k_n * sum(len(s) for s in seqs)
    with tqdm(total=total, desc="memorization", unit="seq", disable=not acfg.progress, dynamic_ncols=True) as bar:
        for k, ref in enumerate(timeline.checkpoints):
            bar.set_postfix(checkpoint=ref.label)
            model = load_model(ref, device)
            for c, s in enumerate(seqs):
                counts[k, c, : len(s)] = match_counts(
                    model, s, acfg.prompt_tokens, acfg.generate_tokens, acfg.batch_size, on_batch=bar.update
                )
            del model
    tm = np.full((k_n, c_n), np.nan)
    fm = np.full((k_n, c_n), np.nan)
    since = np.full((k_n, c_n), np.nan)
    for k, ref in enumerate(timeline.checkpoints):
        for c, chunk in enumerate(timeline.chunks):
            tm[k, c], fm[k, c] = scores(counts[k, c][counts[k, c] >= 0], acfg.generate_tokens)
            if chunk.end_global_step <= ref.global_step:
                since[k, c] = ref.global_step - chunk.end_global_step
    return MemorizationTable(
        [r.label for r in timeline.checkpoints], [r.global_step for r in timeline.checkpoints],
        [c.label for c in timeline.chunks], tm, fm, since, counts, positions, acfg.generate_tokens,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Outputs


def write_csv(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
    return path


def pick(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n), ends included."""
    if n <= k:
        return list(range(n))
    return sorted({int(round(i * (n - 1) / (k - 1))) for i in range(k)}) if k > 1 else [n - 1]


def save_outputs(table: MemorizationTable, out_dir: Path, curves: int = 6) -> dict[str, Path]:
    from crystal.analysis import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"csv": write_csv(table.rows(), out_dir / "memorization.csv")}
    np.savez_compressed(
        out_dir / "memorization_sequences.npz", counts=table.counts, positions=table.positions,
        checkpoints=np.array(table.checkpoints), chunks=np.array(table.chunks),
        generate_tokens=table.generate_tokens,
    )  # fmt: skip
    files["npz"] = out_dir / "memorization_sequences.npz"
    seen = ~np.isnan(table.steps_since_seen)
    files["heatmap"] = plots.heatmap(
        table.token_match, table.checkpoints, table.chunks, out_dir / "memorization_heatmap.png",
        title="Memorization score (token match), Analysis360", cbar="token_match", seen=seen, vmin=0.0, vmax=1.0,
    )  # fmt: skip
    chosen = pick(len(table.checkpoints), curves)
    files["by_chunk"] = plots.by_chunk(
        {table.checkpoints[k]: table.token_match[k] for k in chosen}, out_dir / "memorization_by_chunk.png",
        ylabel="memorization score (token match)", title="Memorization vs data chunk",
        seen_until={table.checkpoints[k]: int(seen[k].sum()) - 1 for k in chosen},
    )  # fmt: skip
    hist = {}
    for k in chosen:  # per-sequence scores over the chunks this checkpoint has trained on (all, if none yet)
        cols = np.nonzero(seen[k])[0] if seen[k].any() else np.arange(len(table.chunks))
        c = table.counts[k, cols].ravel()
        hist[table.checkpoints[k]] = c[c >= 0] / table.generate_tokens
    files["histogram"] = plots.histogram(hist, out_dir / "memorization_histogram.png", table.generate_tokens)
    files["recency"] = plots.recency(
        table.steps_since_seen, table.token_match, table.checkpoints, out_dir / "memorization_recency.png",
        ylabel="memorization score (token match)", title="Memorization vs steps since the chunk was trained on",
    )  # fmt: skip
    return files
