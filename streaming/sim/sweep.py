"""Sweep: tokens/s and MFU vs number of CS-2s for 1.3B/7B/13B/70B, and days to 1.392T tokens.

Fixed global batch, CrystalCoder's 2112 sequences x 2048 tokens (strong scaling: more CS-2s split
the same batch). Per CS-2, the micro-batch is the largest divisor of its share that is <= 66
sequences (CrystalCoder's per-system micro-batch) and fits the device under the memory model; the
rest is gradient accumulation.
"""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

from crystal.streaming.sim.cli import CRYSTALCODER_TOKENS, resolve
from crystal.streaming.sim.profile import ClusterProfile, RunDefaults
from crystal.streaming.sim.shapes import SWEEP_MODELS, ModelShape, load_shape
from crystal.streaming.sim.timing import Prediction, check_fit, memory, simulate

GLOBAL_BATCH = 2112
MAX_BATCH = 66
COUNTS = (1, 2, 4, 8, 16, 32, 64)


def fitting_run(shape: ModelShape, prof: ClusterProfile, base: RunDefaults, replicas: int,
                global_batch: int = GLOBAL_BATCH, max_batch: int = MAX_BATCH) -> RunDefaults:  # fmt: skip
    """The run for `replicas` devices sharing `global_batch` sequences: the largest micro-batch that divides
    the per-device share, is <= max_batch and fits; the smallest one if none fits (reported as not fitting)."""
    share = global_batch // replicas
    sizes = [b for b in range(min(share, max_batch), 0, -1) if share % b == 0]
    for b in sizes:
        run = replace(base, replicas=replicas, batch=b, micro_batches=share // b, micro_batch_size="none")
        if check_fit(memory(shape, prof, run), prof)[0]:
            return run
    return replace(base, replicas=replicas, batch=sizes[-1], micro_batches=share, micro_batch_size="none")


def sweep_rows(prof: ClusterProfile, base: RunDefaults, counts=COUNTS) -> list[tuple[str, Prediction]]:
    rows = []
    for label, name in SWEEP_MODELS.items():
        shape = load_shape(name)
        for n in counts:
            if n > prof.network.devices or GLOBAL_BATCH % n:
                continue
            rows.append((label, simulate(shape, prof, fitting_run(shape, prof, base, n))))
    return rows


def write_csv(rows: list[tuple[str, Prediction]], path: Path) -> Path:
    fields = ["model", "params_b", "devices", "batch", "micro_batches", "tokens_per_step", "step_s", "tokens_s", "mfu",
              "bottleneck", "device_gb", "host_gb", "fits", "days_to_1.392T"]  # fmt: skip
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for label, p in rows:
            dev = sum(v for k, v in p.memory.items() if k.startswith("device")) / 1e9
            host = sum(v for k, v in p.memory.items() if k.startswith("host")) / 1e9
            days = CRYSTALCODER_TOKENS / p.tokens_s / 86400
            w.writerow([label, f"{p.shape.params / 1e9:.2f}", p.run.replicas, p.run.batch, p.run.micro_batches,
                        p.tokens_per_step, f"{p.step_s:.4f}", f"{p.tokens_s:.0f}", f"{p.mfu:.4f}", p.bottleneck,
                        f"{dev:.1f}", f"{host:.1f}", p.fits, f"{days:.2f}"])  # fmt: skip
    return path


def plot(rows: list[tuple[str, Prediction]], path: Path, cluster: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    for label in SWEEP_MODELS:
        pts = [(p.run.replicas, p.tokens_s, p.mfu, p.fits) for lab, p in rows if lab == label]
        if not pts:
            continue
        n, tok, mfu, fits = zip(*pts)
        (line,) = ax1.plot(n, tok, marker="o", label=label)
        ax2.plot(n, [100 * m for m in mfu], marker="o", label=label, color=line.get_color())
        for x, y, ok in zip(n, tok, fits):
            if not ok:
                ax1.plot([x], [y], marker="x", color="black", markersize=9)
    ax1.set(xscale="log", yscale="log", xlabel="CS-2 systems", ylabel="tokens/s", title=f"{cluster}: throughput")
    ax2.set(
        xscale="log", xlabel="CS-2 systems", ylabel="MFU (%)", title="MFU (6N + 12 L d S FLOPs/token)", ylim=(0, 100)
    )
    for ax in (ax1, ax2):
        ax.set_xticks(COUNTS, [str(c) for c in COUNTS])
        ax.grid(alpha=0.3)
        ax.legend()
    at16 = [(lab, CRYSTALCODER_TOKENS / p.tokens_s / 86400) for lab, p in rows if p.run.replicas == 16]
    if at16:
        labels, days = zip(*at16)
        bars = ax3.bar(labels, days, color="tab:gray")
        ax3.bar_label(bars, fmt="%.0f d")
        ax3.set(ylabel="days", title="1.392T tokens on 16 CS-2 (predicted)")
    fig.suptitle(f"Simulated weight streaming, global batch {GLOBAL_BATCH} x 2048 tokens (x = does not fit)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep(out_dir: str | Path, overrides: list[str] | None = None) -> list[Path]:
    """Write <out_dir>/sim_sweep_<cluster>.csv and .png."""
    _, prof, base, _ = resolve(list(overrides or []), default_cluster="cg1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = sweep_rows(prof, base)
    stem = out_dir / f"sim_sweep_{prof.name}"
    return [write_csv(rows, stem.with_suffix(".csv")), plot(rows, stem.with_suffix(".png"), prof.name)]
