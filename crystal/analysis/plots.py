"""The analysis figures (matplotlib, Agg backend: files only, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _ticks(labels: list[str], max_ticks: int = 24) -> tuple[list[int], list[str]]:
    step = max(1, int(np.ceil(len(labels) / max_ticks)))
    idx = list(range(0, len(labels), step))
    return idx, [labels[i] for i in idx]


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def heatmap(values: np.ndarray, rows: list[str], cols: list[str], path: Path, title: str, cbar: str,
            seen: np.ndarray | None = None, vmin=None, vmax=None, cmap: str = "viridis") -> Path:  # fmt: skip
    """values (rows, cols): one cell per (checkpoint, chunk); cells not yet trained on are hatched."""
    k, c = values.shape
    fig, ax = plt.subplots(figsize=(min(16, max(7, 3 + 0.45 * c)), min(12, max(4, 2 + 0.4 * k))))
    im = ax.imshow(values, aspect="auto", origin="upper", vmin=vmin, vmax=vmax, cmap=cmap, interpolation="nearest")
    if seen is not None and (~seen).any():
        ys, xs = np.nonzero(~seen)
        for y, x in zip(ys, xs):
            ax.add_patch(plt.Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, hatch="//", edgecolor="white", lw=0))
    if k * c <= 144:  # small tables: print the numbers too
        for y in range(k):
            for x in range(c):
                if np.isfinite(values[y, x]):
                    ax.text(x, y, f"{values[y, x]:.2f}", ha="center", va="center", fontsize=7, color="w")
    xi, xl = _ticks(cols)
    yi, yl = _ticks(rows)
    ax.set_xticks(xi, xl, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(yi, yl, fontsize=8)
    ax.set_xlabel("data chunk (hatched: not yet trained on)" if seen is not None else "data chunk")
    ax.set_ylabel("checkpoint")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=cbar)
    return _save(fig, path)


def by_chunk(curves: dict[str, np.ndarray], path: Path, ylabel: str, title: str,
             seen_until: dict[str, int] | None = None) -> Path:  # fmt: skip
    """One line per checkpoint: value vs chunk index; a marker where each checkpoint's training data ends."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, ys in curves.items():
        (line,) = ax.plot(np.arange(len(ys)), ys, marker=".", label=label)
        last = (seen_until or {}).get(label, -1)
        if 0 <= last < len(ys):
            ax.axvline(last, color=line.get_color(), ls=":", lw=1)
    ax.set_xlabel("data chunk index (dotted: last chunk the checkpoint trained on)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def histogram(scores: dict[str, np.ndarray], path: Path, generate_tokens: int) -> Path:
    """Per-sequence memorization scores of a few checkpoints (log counts: the mass sits near 0)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bins = np.linspace(0, 1, generate_tokens + 2) - 0.5 / generate_tokens  # one bin per possible score
    for label, s in scores.items():
        ax.hist(s, bins=bins, histtype="step", lw=1.5, label=f"{label} (n={len(s)})")
    ax.set_yscale("log")
    ax.set_xlabel("memorization score of a sequence (fraction of 32 generated tokens that match)")
    ax.set_ylabel("sequences")
    ax.set_title("Distribution of per-sequence memorization scores")
    ax.legend(fontsize=8)
    return _save(fig, path)


def recency(steps_since: np.ndarray, values: np.ndarray, rows: list[str], path: Path, ylabel: str,
            title: str) -> Path:  # fmt: skip
    """Value of every (checkpoint, seen chunk) pair vs steps since the chunk was trained on; the mean over
    not-yet-seen pairs is the baseline."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    seen = ~np.isnan(steps_since)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(rows)))  # early checkpoints dark, late ones light
    for k, label in enumerate(rows):
        if seen[k].any():
            order = np.argsort(steps_since[k][seen[k]])
            ax.plot(steps_since[k][seen[k]][order], values[k][seen[k]][order], marker="o", ms=3, lw=1, label=label,
                    color=colors[k])  # fmt: skip
    if (~seen).any() and np.isfinite(values[~seen]).any():
        ax.axhline(np.nanmean(values[~seen]), color="gray", ls="--", label="chunks not yet seen (mean)")
    ax.set_xlabel("steps since the chunk was trained on")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(rows) <= 12:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def lines_over_training(series: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, xlabel: str, ylabel: str,
                        title: str, boundaries: list[tuple[float, str]] = ()) -> Path:  # fmt: skip
    """One line per source over training, stage boundaries as labelled vertical lines."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", ms=3, label=label)
    for x, label in boundaries:
        ax.axvline(x, color="k", ls="--", lw=1)
        ax.text(x, ax.get_ylim()[1], f" {label}", va="top", ha="left", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)
