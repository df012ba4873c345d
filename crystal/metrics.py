"""JSONL metrics: one row per logged step (kind "train"), per evaluation ("eval") and per event.

Rows are appended and flushed as they are written. A checkpoint records the file's byte length
(the metrics cursor); resuming from it moves any rows written after that point (steps that will be
replayed) to metrics.replaced.jsonl instead of deleting them, so nothing written is lost and
metrics.jsonl reads as one consistent history.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf; keep them visible as strings
    return v


class MetricsLogger:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a")

    def log(self, kind: str, **row: Any) -> None:
        self._f.write(json.dumps({"kind": kind, **{k: _clean(v) for k, v in row.items()}}) + "\n")
        self._f.flush()

    def cursor(self) -> int:
        self._f.flush()
        return self._f.tell()

    def rewind(self, cursor: int) -> int:
        """Truncate to `cursor`, moving the tail to metrics.replaced.jsonl; returns rows moved."""
        self._f.close()
        data = self.path.read_bytes()
        tail = data[cursor:]
        if tail:
            with open(self.path.with_name("metrics.replaced.jsonl"), "ab") as side:
                side.write(tail)
            with open(self.path, "r+b") as f:
                f.truncate(cursor)
        self._f = open(self.path, "a")
        return tail.count(b"\n")

    def close(self) -> None:
        self._f.close()

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rewind(int(state["cursor"]))


def read_metrics(path: str | os.PathLike, kind: str | None = None) -> list[dict[str, Any]]:
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                if kind is None or row.get("kind") == kind:
                    rows.append(row)
    return rows
