"""Data pipeline throughput on CPU: prepare (MB/s of text per core) and the loader (tokens/s, one process).

The issue's bars: the loader must give >= 1M tokens/s in a single process and >= 20x what the tiny
model trains at on CPU (about 2.8k tokens/s on 2 cores), so data never bounds a GPU run. The tiny
model's training rate is measured here too, interleaved, so the ratio survives a busy machine.

    pytest bench/test_data.py -s
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from unittest import mock

import pytest
import torch

from bench.conftest import record
from crystal.config import DataConfig, ModelConfig, SourceConfig, TokenizerConfig
from crystal.data.loader import DataLoader
from crystal.data.prepare import build_sources, prepare_data
from crystal.tokenizer import train_sentencepiece

TEXT_MB = 2.0  # of standard-library code: big enough to time, small enough for a bench run


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data_bench")


@pytest.fixture(scope="module")
def tokenizer_path(workdir) -> Path:
    from crystal.data.sources import _stdlib_py_files, read_text

    lines = [line for f in _stdlib_py_files()[:60] for line in read_text(f).split("\n") if line.strip()]
    path = workdir / "tok.model"
    train_sentencepiece(iter(lines), path, 4000, seed=1)  # the default run's vocabulary size
    return path


def data_config(tokenizer_path: Path, workers: int) -> DataConfig:
    return DataConfig(
        sources={"python": SourceConfig(type="python_stdlib", max_mb=TEXT_MB)},
        tokenizer=TokenizerConfig(path=str(tokenizer_path)), num_workers=workers, heldout_fraction=0.02,
    )  # fmt: skip


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the prepare workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed_prepare(cfg: DataConfig, cache: Path):
    with mock.patch.dict(os.environ, {"CRYSTAL_CACHE": str(cache)}):
        t0, c0 = time.perf_counter(), cpu_seconds()
        data = prepare_data(cfg, 4096, log=lambda *_: None, progress=False)
        return data, time.perf_counter() - t0, cpu_seconds() - c0


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_throughput(workers, workdir, tokenizer_path):
    """MB of text per second per core, from CPU time (wall time on a shared machine says little about a
    core: there, more workers need not mean more CPU)."""
    cfg = data_config(tokenizer_path, workers)
    mb = sum(f.stat().st_size for f in build_sources(cfg)["python"].files()) / 1e6
    data, seconds, cpu = timed_prepare(cfg, workdir / f"cache{workers}")
    tokens = sum(c["tokens"] for c in data.shards["python"].manifest["counts"].values())
    record("data", op="prepare", shape=f"python_stdlib {mb:.1f}MB", dtype="uint16", impl=f"workers={workers}",
           ms=seconds * 1e3, rate=mb / cpu, unit="MB/cpu-s")  # fmt: skip
    print(f"prepare: {mb:.2f} MB, {tokens:,} tokens with {workers} worker(s): wall {seconds:.1f}s ({mb / seconds:.2f} "
          f"MB/s), CPU {cpu:.1f}s = {mb / cpu:.2f} MB/s per core")  # fmt: skip


def loader_tok_s(loader: DataLoader, seconds: float = 2.0) -> float:
    loader.next_step()  # warm the block/permutation caches
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += sum(b.num_tokens for b in loader.next_step())
    return n / (time.perf_counter() - t0)


def tiny_train_tok_s(loader: DataLoader, steps: int = 3) -> float:
    """The tiny default model's fwd + bwd + AdamW on this loader's batches (what the default run does)."""
    from crystal.model import build_model

    model = build_model(ModelConfig.from_name("tiny"), device="cpu", seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    n, elapsed = 0, 0.0
    for i in range(steps + 1):
        t0 = time.perf_counter()
        for b in loader.next_step():
            loss = model(b.input_ids, b.targets, torch.arange(b.input_ids.shape[1]), None)
            loss.backward()
            n_b = b.num_tokens
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step warms up
            elapsed += time.perf_counter() - t0
            n += n_b
    return n / elapsed


@pytest.mark.parametrize("seq_len,batch", [(256, 8), (2048, 8)])
def test_loader_throughput(seq_len, batch, workdir, tokenizer_path):
    data, _, _ = timed_prepare(data_config(tokenizer_path, 1), workdir / "cache1")
    make = lambda: DataLoader(data, seq_len, batch, batch, seed=1)
    rate = loader_tok_s(make())
    record("data", op="loader", shape=f"S{seq_len} B{batch}", dtype="int64", impl="DataLoader", ms=batch * seq_len /
           rate * 1e3, rate=rate, unit="tok/s")  # fmt: skip
    msg = f"loader S{seq_len} B{batch}: {rate:,.0f} tokens/s in one process"
    if seq_len == 256:  # the tiny default's shape: compare with its training rate, measured right after
        train = tiny_train_tok_s(make())
        record("data", op="tiny_train", shape=f"S{seq_len} B{batch}", dtype="fp32", impl="model+AdamW",
               ms=batch * seq_len / train * 1e3, rate=train, unit="tok/s")  # fmt: skip
        msg += f"; tiny model trains at {train:,.0f} tokens/s: loader is {rate / train:,.0f}x faster"
    print(msg)
