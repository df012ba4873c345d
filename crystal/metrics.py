"""JSONL metrics, keyed by step, tokens, data chunk and checkpoint; plots; optional TensorBoard.

Row kinds in <run>/metrics.jsonl (one JSON object per line, appended and flushed as written):

    train       per step: step, tokens, loss, lr, grad_norm, tok_s, mfu, chunk, samples [first, end),
                skipped (non-finite loss/grad: no update), rolled_back (a rollback happened just before)
    eval        held-out loss per source and their mixture mean ("heldout"); checkpoint + chunk when the
                evaluation belongs to a checkpoint
    checkpoint  step, tokens, checkpoint (directory name), ckpt_kind (release | keep), ends_chunk
    event       stage_transition, rollback (reason, excluded sample window), ...
    summary     end of run

A checkpoint records the file's byte length (the metrics cursor); resuming from it (or rolling back
to it) moves rows written after that point to metrics.replaced.jsonl instead of deleting them, so
nothing written is lost and metrics.jsonl reads as one consistent history.

    python -m crystal.metrics plot outputs/default                 PNGs into outputs/default/plots/
    python -m crystal.metrics plot outputs/s1 outputs/s2 --out d   stages one after another
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

PLOT_KINDS = ("train", "eval")  # rows that also go to TensorBoard


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf; keep them visible as strings
    return v


def _number(v: Any) -> float | None:
    """A plottable float from a row value ("nan"/"inf" strings included), else None."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


class MetricsLogger:
    def __init__(self, path: str | os.PathLike, tensorboard_dir: str | os.PathLike | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a")
        self.tensorboard_dir = tensorboard_dir
        self._tb = self._open_tensorboard() if tensorboard_dir else None

    def _open_tensorboard(self, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard not installed: JSONL only
            return None
        return SummaryWriter(str(self.tensorboard_dir), purge_step=purge_step)

    def log(self, kind: str, **row: Any) -> None:
        self._f.write(json.dumps({"kind": kind, **{k: _clean(v) for k, v in row.items()}}) + "\n")
        self._f.flush()
        if self._tb is not None and kind in PLOT_KINDS and "step" in row:
            for k, v in row.items():
                if k != "step" and (x := _number(v)) is not None:
                    self._tb.add_scalar(f"{kind}/{k}", x, global_step=int(row["step"]))

    def cursor(self) -> int:
        self._f.flush()
        return self._f.tell()

    def rewind(self, cursor: int, step: int | None = None) -> int:
        """Truncate to `cursor`, moving the tail to metrics.replaced.jsonl; returns rows moved.
        TensorBoard events after `step` are purged when the writer reopens."""
        self._f.close()
        data = self.path.read_bytes()
        tail = data[cursor:]
        if tail:
            with open(self.path.with_name("metrics.replaced.jsonl"), "ab") as side:
                side.write(tail if tail.endswith(b"\n") else tail + b"\n")  # a kill may have cut the last row
            with open(self.path, "r+b") as f:
                f.truncate(cursor)
        self._f = open(self.path, "a")
        if self._tb is not None:
            self._tb.close()
            self._tb = self._open_tensorboard(purge_step=None if step is None else step + 1)
        return tail.count(b"\n")

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor()}

    def load_state_dict(self, state: dict[str, Any], step: int | None = None) -> None:
        self.rewind(int(state["cursor"]), step)


class NullMetrics:
    """What a data-parallel replica other than rank 0 logs: nothing (rank 0 writes the run's one record)."""

    def log(self, kind: str, **row: Any) -> None:
        pass

    def cursor(self) -> int:
        return 0

    def rewind(self, cursor: int, step: int | None = None) -> int:
        return 0

    def close(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": 0}

    def load_state_dict(self, state: dict[str, Any], step: int | None = None) -> None:
        pass


def read_metrics(path: str | os.PathLike, kind: str | None = None) -> list[dict[str, Any]]:
    """Rows of a metrics file; a last line cut short by a kill is ignored, any other bad line is an error."""
    rows = []
    lines = Path(path).read_text().splitlines()
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) - 1:
                break
            raise
        if kind is None or row.get("kind") == kind:
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# Plots


def _run_series(run: Path, token_offset: float) -> dict[str, Any]:
    rows = read_metrics(run / "metrics.jsonl")
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    ckpts = [r for r in rows if r["kind"] == "checkpoint"]
    events = [r for r in rows if r["kind"] == "event"]
    stage = next((r.get("to_stage") for r in events if r.get("event") == "stage_transition"), None)
    if stage is None:
        try:
            from omegaconf import OmegaConf

            stage = OmegaConf.load(run / "config.yaml").train.stage
        except Exception:
            stage = 0
    last_tokens = max([r.get("tokens", 0) for r in train + evals + ckpts] or [0])
    return {"run": run, "offset": token_offset, "train": train, "eval": evals, "ckpts": ckpts, "events": events,
            "stage": stage, "end": token_offset + last_tokens}  # fmt: skip


def _xy(rows: list[dict], key: str, offset: float) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        y = _number(r.get(key))
        if y is not None and math.isfinite(y):
            xs.append(offset + r["tokens"])
            ys.append(y)
    return xs, ys


def _robust_ylim(ax, values: list[float]) -> None:
    """Keep the first steps' loss (tens of nats at init) from flattening the rest of the curve: if the
    first 5% of points (at least one) reach more than twice the rest, cut the axis above the rest."""
    vals = [v for v in values if math.isfinite(v)]
    rest = vals[max(1, len(vals) // 20) :]
    if rest and max(vals) > 2 * max(rest):
        ax.set_ylim(top=max(rest) * 1.15)
        ax.text(0.99, 0.98, f"start {max(vals):.3g} off scale", transform=ax.transAxes, ha="right", va="top",
                fontsize=7, color="0.4")  # fmt: skip


def _mark_structure(ax, series: list[dict[str, Any]]) -> None:
    """Stage boundaries (dashed, labelled), release checkpoints (ticks at the bottom), rollbacks (red lines, at
    the step that triggered them)."""
    labelled = False
    for s in series:
        if s["stage"]:
            ax.axvline(s["offset"], color="0.4", ls="--", lw=0.8)
            ax.text(s["offset"], 1.0, f" stage {s['stage']}", transform=ax.get_xaxis_transform(), va="top",
                    fontsize=7, color="0.3")  # fmt: skip
        rel = [s["offset"] + c["tokens"] for c in s["ckpts"] if c.get("ckpt_kind", "release") == "release"]
        if rel:
            ax.plot(rel, [0.0] * len(rel), "|", color="tab:green", ms=10, mew=1.5, transform=ax.get_xaxis_transform(),
                    label="release checkpoint" if s is series[0] else None, clip_on=False)  # fmt: skip
        for e in s["events"]:
            if e.get("event") == "rollback":
                ax.axvline(s["offset"] + e.get("from_tokens", 0), color="tab:red", lw=0.8, alpha=0.6,
                           label=None if labelled else "rollback")  # fmt: skip
                labelled = True


def plot_runs(runs: list[Path], out_dir: Path) -> list[Path]:
    """Loss vs tokens (stages, checkpoints, rollbacks marked), loss per source, LR, grad norm, throughput,
    and an overview grid of all five. Returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series, offset = [], 0.0
    for run in runs:
        if not (run / "metrics.jsonl").is_file():
            from crystal.errors import CrystalError

            raise CrystalError(f"{run}/metrics.jsonl does not exist; pass a run directory (e.g. outputs/default)")
        s = _run_series(run, offset)
        series.append(s)
        offset = s["end"]
    out_dir.mkdir(parents=True, exist_ok=True)

    def loss(ax):
        for i, s in enumerate(series):
            ax.plot(*_xy(s["train"], "loss", s["offset"]), lw=0.8, color="tab:blue", label="train" if i == 0 else None)
            ax.plot(*_xy(s["eval"], "heldout", s["offset"]), "o-", ms=3, color="tab:orange",
                    label="held-out" if i == 0 else None)  # fmt: skip
            sk = [r for r in s["train"] if r.get("skipped")]
            if sk:
                ax.plot([s["offset"] + r["tokens"] for r in sk], [0.98] * len(sk), "v", color="tab:red", ms=4,
                        transform=ax.get_xaxis_transform(), label="skipped step" if i == 0 else None)  # fmt: skip
        _mark_structure(ax, series)
        _robust_ylim(ax, [y for s in series for y in _xy(s["train"], "loss", 0)[1]])
        ax.set(xlabel="tokens", ylabel="loss (nats)", title="loss")
        ax.legend(fontsize=7)

    def per_source(ax):
        names = sorted({k for s in series for r in s["eval"] for k in r if k not in _EVAL_META})
        for name in names:
            xs, ys = [], []
            for s in series:
                x, y = _xy(s["eval"], name, s["offset"])
                xs += x
                ys += y
            ax.plot(xs, ys, "o-", ms=3, label=name)
        _mark_structure(ax, series)
        _robust_ylim(ax, [max((y for k, y in r.items() if k not in _EVAL_META and isinstance(y, float)), default=0.0)
                          for s in series for r in s["eval"]])  # fmt: skip
        ax.set(xlabel="tokens", ylabel="held-out loss (nats)", title="held-out loss per source")
        ax.legend(fontsize=7)

    def simple(key: str, title: str, log: bool = False):
        def draw(ax):
            for s in series:
                ax.plot(*_xy(s["train"], key, s["offset"]), lw=0.8, color="tab:blue")
            _mark_structure(ax, series)
            ax.set(xlabel="tokens", title=title)
            if log:
                ax.set_yscale("log")

        return draw

    panels = {
        "loss": loss,
        "loss_per_source": per_source,
        "lr": simple("lr", "learning rate"),
        "grad_norm": simple("grad_norm", "grad norm (before clipping)", log=True),
        "throughput": simple("tok_s", "throughput (tokens/s)"),
    }
    paths = []
    from matplotlib.ticker import EngFormatter

    for name, draw in panels.items():
        fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
        draw(ax)
        ax.xaxis.set_major_formatter(EngFormatter())
        fig.tight_layout()
        paths.append(out_dir / f"{name}.png")
        fig.savefig(paths[-1])
        plt.close(fig)
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.4), dpi=80)
    for ax, draw in zip(axes.flat, panels.values()):
        draw(ax)
        ax.xaxis.set_major_formatter(EngFormatter())
    axes.flat[-1].axis("off")
    fig.suptitle(", ".join(str(r) for r in runs), fontsize=9)
    fig.tight_layout()
    paths.append(out_dir / "overview.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths


_EVAL_META = {"kind", "step", "tokens", "checkpoint", "chunk", "heldout"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crystal.metrics", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plot", help="draw PNG plots of one run, or of several runs (stages) one after another")
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <first run>/plots)")
    args = parser.parse_args(argv)
    from crystal.errors import CrystalError

    try:
        paths = plot_runs(args.runs, args.out or args.runs[0] / "plots")
    except CrystalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
