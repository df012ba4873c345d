"""Per-source and per-chunk evaluation of every checkpoint of a run or release.

    python -m crystal.analysis evaluate outputs/s1 outputs/s2 [--out DIR] [eval_batches=8 loss_sequences=64]

Writes into DIR:
    heldout_loss.csv / .png    held-out loss per source (code languages, English) and their mixture-weighted
                               mean for every checkpoint, over training tokens, stage boundaries marked. The
                               held-out windows are the trainer's own (the first eval_batches x micro_batch
                               windows of each source's held-out split), so the numbers line up with the
                               eval rows of metrics.jsonl.
    chunk_loss.csv / .png      loss of every checkpoint (rows) on every training chunk (columns), the same
                               sampled sequences for each checkpoint, per source too: a chunk's loss drops at
                               the checkpoint that trained on it (the diagonal) and may rise again below it
                               (forgetting); cells right of the diagonal are chunks not yet seen.

Losses are mean next-token cross-entropy in nats with plain causal attention over each window, FIM padding
not scored, as in training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from crystal.analysis import plots
from crystal.analysis.memorization import write_csv
from crystal.analysis.timeline import Timeline, fim_pad_id, load_model, sample_positions
from crystal.config import AnalysisConfig
from crystal.data.loader import IGNORE_INDEX
from crystal.utils import autocast_dtype, resolve_device


@torch.no_grad()
def sequence_losses(model, tokens: torch.Tensor, fim_pad: int | None, batch_size: int) -> np.ndarray:
    """tokens (N, S+1) -> mean loss of each row over its scored targets (N,)."""
    device = next(model.parameters()).device
    amp = autocast_dtype("auto", device)
    out = np.zeros(len(tokens))
    for a in range(0, len(tokens), batch_size):
        batch = tokens[a : a + batch_size].to(device)
        targets = batch[:, 1:].clone()
        if fim_pad is not None:
            targets[targets == fim_pad] = IGNORE_INDEX
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(batch[:, :-1])  # (B, S, V)
        nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                              reduction="none").view(targets.shape)  # fmt: skip
        scored = (targets != IGNORE_INDEX).sum(1).clamp(min=1)
        out[a : a + len(batch)] = (nll.sum(1) / scored).cpu().numpy()
    return out


def heldout_loss(timeline: Timeline, acfg: AnalysisConfig) -> list[dict]:
    """Rows (checkpoint, step, tokens, stage, source, loss) for every checkpoint and source, plus 'heldout'
    (the mixture-weighted mean, as the trainer reports it)."""
    device = resolve_device(acfg.device)
    rows = []
    for ref in tqdm(timeline.checkpoints, desc="held-out loss", disable=not acfg.progress, dynamic_ncols=True):
        loader = timeline.runs[ref.run].loader()
        model = load_model(ref, device)
        amp = autocast_dtype("auto", device)
        losses = {}
        for name in loader.names:
            batches = loader.heldout_batches(name, acfg.eval_batches)
            if not batches:
                continue
            vals = []
            for b in batches:
                b = b.to(device)
                with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    vals.append(model(b.input_ids, b.targets).item())
            losses[name] = float(np.mean(vals))
        weights = {n: w for n, w in loader.mixture_weights.items() if n in losses and w > 0}
        if weights:
            losses["heldout"] = sum(losses[n] * w for n, w in weights.items()) / sum(weights.values())
        for source, loss in losses.items():
            rows.append({"checkpoint": ref.label, "step": ref.global_step, "tokens": ref.global_tokens,
                         "stage": ref.stage, "source": source, "loss": f"{loss:.6f}"})  # fmt: skip
        del model
    return rows


def chunk_loss(timeline: Timeline, acfg: AnalysisConfig) -> tuple[list[dict], np.ndarray]:
    """Rows (checkpoint, chunk, source, loss, sequences) and the (K, C) matrix of overall losses."""
    device = resolve_device(acfg.device)
    samples = []
    for chunk in timeline.chunks:
        pos = sample_positions(chunk.reader.num_samples, acfg.loss_sequences, acfg.seed, chunk.index)
        tokens, sources = chunk.reader.rows(pos)
        samples.append((torch.from_numpy(tokens), np.asarray(sources)))
    pads = {r: fim_pad_id(run) for r, run in enumerate(timeline.runs)}
    matrix = np.full((len(timeline.checkpoints), len(timeline.chunks)), np.nan)
    rows = []
    total = len(timeline.checkpoints) * sum(len(t) for t, _ in samples)
    with tqdm(total=total, desc="chunk loss", unit="seq", disable=not acfg.progress, dynamic_ncols=True) as bar:
        for k, ref in enumerate(timeline.checkpoints):
            model = load_model(ref, device)
            for c, (tokens, sources) in enumerate(samples):
                if not len(tokens):
                    continue
                losses = sequence_losses(model, tokens, pads[timeline.chunks[c].run], acfg.batch_size)
                bar.update(len(tokens))
                matrix[k, c] = losses.mean()
                seen = timeline.chunks[c].end_global_step <= ref.global_step
                groups = {"all": losses, **{s: losses[sources == s] for s in sorted(set(sources.tolist()))}}
                for source, vals in groups.items():
                    rows.append({"checkpoint": ref.label, "step": ref.global_step, "chunk": c, "seen": int(seen),
                                 "source": source, "sequences": len(vals), "loss": f"{vals.mean():.6f}"})  # fmt: skip
            del model
    return rows, matrix


def stage_marks(timeline: Timeline) -> list[tuple[float, str]]:
    return [(tokens, f"stage {stage}") for _, tokens, stage in timeline.stage_boundaries]


def save_heldout(rows: list[dict], timeline: Timeline, out_dir: Path) -> dict[str, Path]:
    files = {"heldout_csv": write_csv(rows, out_dir / "heldout_loss.csv")}
    series: dict[str, tuple[list, list]] = {}
    for r in rows:
        xs, ys = series.setdefault(r["source"], ([], []))
        xs.append(r["tokens"])
        ys.append(float(r["loss"]))
    files["heldout_png"] = plots.lines_over_training(
        {k: (np.array(x), np.array(y)) for k, (x, y) in series.items()}, out_dir / "heldout_loss.png",
        xlabel="training tokens", ylabel="held-out loss (nats/token)", title="Held-out loss per source",
        boundaries=stage_marks(timeline),
    )  # fmt: skip
    return files


def save_chunk_loss(rows: list[dict], matrix: np.ndarray, timeline: Timeline, out_dir: Path) -> dict[str, Path]:
    files = {"chunk_csv": write_csv(rows, out_dir / "chunk_loss.csv")}
    seen = np.array([[ch.end_global_step <= ck.global_step for ch in timeline.chunks] for ck in timeline.checkpoints])
    files["chunk_png"] = plots.heatmap(
        matrix, [c.label for c in timeline.checkpoints], [c.label for c in timeline.chunks],
        out_dir / "chunk_loss.png", title="Loss of each checkpoint on each training chunk", cbar="loss (nats/token)",
        seen=seen, cmap="magma_r",
    )  # fmt: skip
    return files
