"""Timeline events -> Chrome/Perfetto trace JSON and a matplotlib Gantt chart.

The event contract, shared by the simulator and the streaming executor (which records real timings
in the same form so the two timelines can be compared side by side):

    {"lane": str, "name": str, "start_s": float, "dur_s": float, "block": int | None, "step": int}

Import-light on purpose (json and pathlib only): the executor imports this module; matplotlib is
imported inside plot_timeline.
"""

from __future__ import annotations

import json
from pathlib import Path

LANE_ORDER = ("compute", "h2d", "d2h", "optimizer", "reduce")
COLORS = {"compute": "tab:blue", "h2d": "tab:green", "d2h": "tab:orange", "optimizer": "tab:red",
          "reduce": "tab:purple"}  # fmt: skip


def _lanes(events: list[dict]) -> list[str]:
    seen = {e["lane"] for e in events}
    return [lane for lane in LANE_ORDER if lane in seen] + sorted(seen - set(LANE_ORDER))


def to_chrome_trace(events: list[dict], process_name: str = "crystal") -> dict:
    """Chrome trace-event JSON: complete events (ph "X", ts/dur in microseconds), one tid per lane."""
    tids = {lane: i + 1 for i, lane in enumerate(_lanes(events))}
    out = [{"ph": "M", "name": "process_name", "pid": 1, "tid": 0, "args": {"name": process_name}}]
    for lane, tid in tids.items():
        out.append({"ph": "M", "name": "thread_name", "pid": 1, "tid": tid, "args": {"name": lane}})
        out.append({"ph": "M", "name": "thread_sort_index", "pid": 1, "tid": tid, "args": {"sort_index": tid}})
    for e in events:
        out.append({
            "ph": "X", "name": e["name"], "pid": 1, "tid": tids[e["lane"]], "cat": e["lane"],
            "ts": e["start_s"] * 1e6, "dur": e["dur_s"] * 1e6,
            "args": {"block": e.get("block"), "step": e.get("step")},
        })  # fmt: skip
    return {"traceEvents": out, "displayTimeUnit": "ms"}


def write_chrome_trace(events: list[dict], path: str | Path, process_name: str = "crystal") -> Path:
    """Write events as a trace that chrome://tracing and ui.perfetto.dev open."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_chrome_trace(events, process_name)))
    return path


def plot_timeline(events: list[dict], png_path: str | Path, title: str = "") -> Path:
    """A Gantt chart of the events, one row per lane, blocks labelled when they are wide enough."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lanes = _lanes(events)
    end = max((e["start_s"] + e["dur_s"] for e in events), default=1.0)
    scale, unit = (1e3, "ms") if end < 10 else (1.0, "s")
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(lanes) + 1.4))
    for row, lane in enumerate(lanes):
        spans = [(e["start_s"] * scale, e["dur_s"] * scale) for e in events if e["lane"] == lane]
        ax.broken_barh(spans, (row - 0.4, 0.8), facecolors=COLORS.get(lane, "tab:gray"), edgecolor="black",
                       linewidth=0.15)  # fmt: skip
        for e in events:
            if e["lane"] == lane and e["dur_s"] > end * 0.03 and e.get("block") is not None:
                ax.text((e["start_s"] + e["dur_s"] / 2) * scale, row, str(e["block"]), ha="center", va="center",
                        fontsize=6, color="white")  # fmt: skip
    ax.set_yticks(range(len(lanes)), lanes)
    ax.invert_yaxis()
    ax.set_xlabel(f"time ({unit})")
    ax.set_xlim(0, end * scale)
    ax.set_title(title)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path
