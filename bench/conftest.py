"""Benchmarks are data: every measurement is printed and appended as a CSV row to bench/results/.

pytest bench/                          everything that can run here (CPU: references on small shapes)
CRYSTAL_BENCH_DIR=/path pytest bench/  write the CSV files somewhere else
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The benches that train compose configs with tests/conftest.py. --import-mode=importlib leaves the checkout
# root off sys.path (so its kernels/ and streaming/ cannot shadow installed packages), and from a fresh clone
# `pytest bench/` then failed with "No module named 'tests'". Appended, not inserted: installed packages win.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

from crystal.utils import device_name, git_commit  # noqa: E402

FIELDS = ["op", "shape", "dtype", "impl", "ms", "rate", "unit", "peak_mb", "device", "commit", "date"]


def results_dir() -> Path:
    path = Path(os.environ.get("CRYSTAL_BENCH_DIR") or Path(__file__).parent / "results")
    path.mkdir(parents=True, exist_ok=True)
    return path


def record(file: str, *, op: str, shape: str, dtype: str, impl: str, ms: float, rate: float | None = None,
           unit: str = "", peak_mb: float | None = None, device: torch.device | None = None) -> dict:  # fmt: skip
    """Append one row to bench/results/<file>.csv and print it."""
    dev = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    row = {
        "op": op, "shape": shape, "dtype": dtype, "impl": impl, "ms": f"{ms:.4f}",
        "rate": "" if rate is None else f"{rate:.4g}", "unit": unit,
        "peak_mb": "" if peak_mb is None else f"{peak_mb:.1f}", "device": device_name(dev),
        "commit": git_commit(), "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }  # fmt: skip
    path = results_dir() / f"{file}.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)
    print(f"[bench] {file}: {op} {shape} {dtype} {impl}: {ms:.3f} ms {row['rate']} {unit} peak {row['peak_mb']} MB")
    return row


def bench_data_overrides() -> list[str]:
    """Data settings of the benches that train: the corpus subset the tests use (tests/conftest.py FAST_DATA),
    prepared in seconds; a step's time is set by the model, not by how much text the corpus holds."""
    from tests.conftest import FAST_DATA

    return list(FAST_DATA)


def prepare_bench_data() -> None:
    """Prepare (tokenizer, token shards) the benches' data into the cache once: bench/run_gpu.sh's own section,
    so no bench pays for it and it is never prepared twice."""
    from crystal.data.prepare import prepare_data
    from tests.conftest import compose_config

    cfg = compose_config(bench_data_overrides())
    prepare_data(cfg.data, cfg.model.vocab_size)


requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU; CPU runs only the references"
)
