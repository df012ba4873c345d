"""Harness shared by the kernel benchmarks (bench/test_<op>.py): timing, peak memory, rates, skips.

GPU: triton.testing.do_bench (median of a short run, L2 flushed between calls) and peak memory from
the CUDA caching allocator, relative to what was allocated before the call. CPU: only the torch
references run, a few wall-clock repetitions on small shapes; the Triton kernels would run in the
interpreter, which measures Python, not kernels.

Environment: CRYSTAL_BENCH_COMPILE=1 adds the torch.compile'd references (opt-in: their compile time
dominates a GPU run, and bench/run_gpu.sh must finish in 8 minutes).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import pytest
import torch

from bench.conftest import record

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
GPU_ONLY = "GPU comparison, needs CUDA; on CPU only the torch references run (Triton would run in the interpreter)"
COMPILE = os.environ.get("CRYSTAL_BENCH_COMPILE", "0") == "1"
COMPILE_SKIP = "torch.compile'd references are opt-in: CRYSTAL_BENCH_COMPILE=1"


def require_gpu(impl: str) -> None:
    if not ON_GPU and impl != "reference":
        pytest.skip(f"{impl}: {GPU_ONLY}")


def bench_ms(fn: Callable[[], object]) -> float:
    if ON_GPU:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mb(fn: Callable[[], object]) -> float | None:
    """Peak memory the call adds on top of what was already allocated (inputs, saved activations)."""
    if not ON_GPU:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure(file: str, *, op: str, shape: str, dtype: torch.dtype, impl: str, fn: Callable[[], object],
            flops: float | None = None, nbytes: float | None = None) -> dict:  # fmt: skip
    """Time fn, take its peak memory, and record one CSV row with TFLOP/s (flops) or GB/s (nbytes)."""
    ms = bench_ms(fn)
    peak = peak_mb(fn)
    rate, unit = None, ""
    if flops is not None:
        rate, unit = flops / ms / 1e9, "TFLOP/s"
    elif nbytes is not None:
        rate, unit = nbytes / ms / 1e6, "GB/s"
    dtype_name = str(dtype).removeprefix("torch.")
    return record(file, op=op, shape=shape, dtype=dtype_name, impl=impl, ms=ms, rate=rate, unit=unit, peak_mb=peak)


def retained_mb(fn: Callable[[], object]) -> tuple[object, float | None]:
    """Run a forward and report what it leaves allocated (output + tensors saved for backward)."""
    if not ON_GPU:
        return fn(), None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return out, (torch.cuda.memory_allocated() - base) / 2**20


_COMPILED: dict[object, Callable] = {}


def compiled(fn: Callable, main_shape: bool = True) -> Callable:
    """torch.compile'd reference (one compile per function per process), or a skip when disabled. Only at
    an op's main shape: each new shape recompiles, and compile time would dominate the GPU run."""
    if not COMPILE:
        pytest.skip(COMPILE_SKIP)
    if not main_shape:
        pytest.skip("compiled reference runs at the main (first) shape only: each shape recompiles")
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn)
    return _COMPILED[fn]


def liger(module: str):
    """Import a Liger-Kernel module, or skip: Liger is optional (pip install '.[liger]') and GPU-only."""
    if not ON_GPU:
        pytest.skip(f"liger: {GPU_ONLY}")
    try:
        return __import__(f"liger_kernel.{module}", fromlist=["_"])
    except ImportError as e:
        pytest.skip(f"liger-kernel not installed ({e}); pip install '.[liger]'")


def grads_fn(out: torch.Tensor | tuple, inputs: list[torch.Tensor], grad_out) -> Callable[[], object]:
    """The backward alone, repeatable: autograd.grad with the graph retained."""
    outs = out if isinstance(out, tuple) else (out,)
    grads = grad_out if isinstance(grad_out, tuple) else (grad_out,)
    return lambda: torch.autograd.grad(outs, inputs, grads, retain_graph=True)
