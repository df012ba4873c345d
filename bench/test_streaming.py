"""Weight streaming vs resident: the whole training step on the same model and batch, and the host AdamW.

CPU (runs here): `small` (41.6M params), streamed vs resident tokens/s; the issue's bar is >= 0.9x. The 7B
host-memory plan (no allocation: runs anywhere): store, pinned rounding, staging, checkpoint buffers against a
128 GB host, as check_host_memory adds them up.
GPU (bench/run_gpu.sh): the 8-layer CrystalCoder-shaped 1.74B model (tied embeddings) at 8 x 2048 tokens per
step, streamed vs resident in steady state (bar: >= 90%), with the overlap report; CrystalCoder-7B streamed
batch-major at 8/16/32 layers (device peak memory flat within 5%, throughput and MFU at 32).
"""

from __future__ import annotations

import gc
import statistics
import time

import numpy as np
import pytest
import torch
from crystal.streaming.backends.base import AdamWSettings
from crystal.streaming.backends.resident import ResidentEngine
from crystal.streaming.backends.streaming import StreamingEngine
from crystal.streaming.executor import overlap_report
from crystal.streaming.store import HostMemoryError

from bench.conftest import record, requires_cuda
from crystal.config import ModelConfig
from crystal.data.loader import Batch
from crystal.model import build_model
from crystal.trainer import CrystalAdapter, param_group_specs

SETTINGS = AdamWSettings((0.9, 0.95), 1e-9, 1.0)


def random_batches(cfg: ModelConfig, rows: int, seq: int, count: int, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, cfg.vocab_size, (rows, seq + 1), generator=g)
        pos = torch.arange(seq).repeat(rows, 1)
        idx = np.arange(rows)
        out.append(Batch(ids[:, :-1], ids[:, 1:].clone(), pos, torch.zeros(rows, seq, dtype=torch.int32), idx,
                         idx * 0, idx))  # fmt: skip
    return out


def make_engine(cfg: ModelConfig, backend: str, device: torch.device, amp: torch.dtype | None, **options):
    # Initialising billions of parameters is minutes of CPU work and seconds on a GPU: init there, then
    # hand the streaming store a host copy.
    model = build_model(cfg, device=device, seed=0)
    if backend != "resident":
        model = model.cpu()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    adapter = CrystalAdapter(model, doc_masking=False)
    groups = param_group_specs(model, 0.1)
    if backend == "resident":
        return ResidentEngine(adapter, groups, SETTINGS, device, amp)
    return StreamingEngine(adapter, groups, SETTINGS, device, amp, **options)


def time_steps(engine, mbs: list[Batch], steps: int, device: torch.device) -> float:
    """Median seconds per optimizer step in steady state, after one warm-up step: from one step's end to the
    next's, the device synchronised but a streamed step's host update not flushed, so it overlaps the next
    step's forward as in training, and costs what that forward waits for it."""

    def step_end() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    engine.train_step(mbs, 1e-4)
    ends = [step_end()]
    for _ in range(steps):
        engine.train_step(mbs, 1e-4)
        ends.append(step_end())
    return statistics.median(b - a for a, b in zip(ends, ends[1:]))


def compare(cfg: ModelConfig, device: torch.device, amp, rows: int, seq: int, n_mb: int, steps: int,
            variants: dict[str, dict], file: str = "streaming") -> dict[str, float]:  # fmt: skip
    mbs = random_batches(cfg, rows, seq, n_mb)
    tokens = rows * seq * n_mb
    flops = cfg.flops_per_token(seq) * tokens
    shape = f"{cfg.name} L{cfg.n_layer} d{cfg.d_model} {n_mb}x{rows}x{seq}"
    dtype = "bf16" if amp == torch.bfloat16 else "fp32"
    out = {}
    for name, options in variants.items():
        backend = "resident" if name == "resident" else "streaming"
        engine = make_engine(cfg, backend, device, amp, **options)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # the step's peak, not the initialisation's
        sec = time_steps(engine, mbs, steps, device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        out[name] = tokens / sec
        record(file, op="train_step", shape=shape, dtype=dtype, impl=name, ms=sec * 1e3, rate=tokens / sec,
               unit="tok/s", peak_mb=peak, device=device)  # fmt: skip
        if device.type == "cuda":
            record(file, op="train_step_tflops", shape=shape, dtype=dtype, impl=name, ms=sec * 1e3,
                   rate=flops / sec / 1e12, unit="TFLOP/s", device=device)  # fmt: skip
        if backend == "streaming" and options.get("trace"):
            engine.train_step(mbs, 1e-4)
            report = overlap_report(engine.last_trace)
            record(
                file,
                op="overlap_copy_while_compute",
                shape=shape,
                dtype=dtype,
                impl=name,
                ms=report["step_s"] * 1e3,
                rate=report["copy_overlap_frac"],
                unit="fraction",
                device=device,
            )
            record(file, op="exposed_step_boundary", shape=shape, dtype=dtype, impl=name,
                   ms=report["exposed_boundary_s"] * 1e3, device=device)  # fmt: skip
        if hasattr(engine, "close"):
            engine.close()
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for name, rate in out.items():
        if name != "resident" and "resident" in out:
            record(file, op="streamed_over_resident", shape=shape, dtype=dtype, impl=name, ms=0.0,
                   rate=rate / out["resident"], unit="x", device=device)  # fmt: skip
    return out


def test_cpu_small_streaming_vs_resident():
    """The issue's CPU bar: streaming >= 0.9x resident tokens/s on `small` (fp32, 2 micro-batches)."""
    cpu = torch.device("cpu")
    cfg = ModelConfig.from_name("small")
    variants = {"resident": {}, "streaming_batch_major": {"schedule": "batch_major"},
                "streaming_layer_major": {"schedule": "layer_major"},
                "streaming_batch_major_keep": {"schedule": "batch_major", "recompute": False},
                "streaming_layer_major_keep": {"schedule": "layer_major", "recompute": False}}  # fmt: skip
    rates = compare(cfg, cpu, None, rows=4, seq=256, n_mb=2, steps=3, variants=variants)
    assert all(r > 0 for r in rates.values())


@pytest.mark.parametrize("threads", [1, 0])
def test_host_adamw_vs_torch_fused(threads):
    """Clip + AdamW on 41.6M parameters: the store's two-phase AdamW (torch's fused kernel per block and muP
    group, clip factor applied inside each update) vs clip_grad_norm_ + torch's fused CPU AdamW over the
    same parameter tensors in one call, as the resident engine runs it. 0 threads = torch's default."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        cfg = ModelConfig.from_name("small")
        engine = make_engine(cfg, "streaming", torch.device("cpu"), None)
        store, optimizer = engine.store, engine.optimizer
        for u in store.units:
            u.grad.normal_()  # norm ~ sqrt(41.6M) >> clip 1.0: the clipped path
        n = store.num_params

        def ours():  # phase 1 (norms as blocks land) + phase 2 (clip inside each block's update)
            optimizer.start_step()
            for u in store.units:
                optimizer.gradient_final(u)
            _, clip = optimizer.clip_factor()
            for u in store.units:
                optimizer.update(u, 1e-4, clip)

        # the same per-parameter tensors a resident run hands torch (one fused call over all of them)
        params = [torch.nn.Parameter(torch.zeros(s.shape)) for u in store.units for s in u.layout.slots]
        for p in params:
            p.grad = torch.randn_like(p)
        fused = torch.optim.AdamW(params, lr=1e-4, fused=True)

        def resident():  # what the resident engine runs: clip_grad_norm_ then one fused AdamW call
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            fused.step()

        label = f"{n / 1e6:.1f}M params, {torch.get_num_threads()} threads"
        for impl, fn in (("host_adamw_per_block", ours), ("torch_clip_then_fused_adamw", resident)):
            fn()
            t0 = time.perf_counter()
            reps = 5
            for _ in range(reps):
                fn()
            sec = (time.perf_counter() - t0) / reps
            record("streaming_adamw", op="adamw_step", shape=label, dtype="fp32", impl=impl, ms=sec * 1e3,
                   rate=n / sec / 1e9, unit="Gparam/s", device=torch.device("cpu"))  # fmt: skip
        engine.close()
    finally:
        torch.set_num_threads(before)


def test_7b_host_memory_plan():
    """What a CrystalCoder-7B streaming run holds in host memory on one GPU (the engine's defaults there: bf16
    weights and gradients on the link, pinned store, 4 staging buffers), item by item as check_host_memory adds
    it up, against a 128 GB host (DESIGN's H100 host: 16 cores / 128 GB). Nothing is allocated."""
    from crystal.streaming.backends.streaming import engine_host_plan, resolve_link_dtype
    from crystal.streaming.store import GIB, check_host_memory, plan_host_memory, unit_numels

    from crystal.config import StreamingConfig

    cuda, settings = torch.device("cuda"), StreamingConfig()
    model = build_model(ModelConfig.from_name("crystalcoder_7b"), device="meta")
    link = resolve_link_dtype("auto", cuda, torch.bfloat16)
    plan = plan_host_memory(*unit_numels(model, model.blocks), stream_dtype=link, grad_dtype=link, pinned=True,
                            staging_buffers=settings.staging_buffers)  # fmt: skip
    if torch.cuda.is_available():  # on the GPU host, the engine's own plan (which asks whether pinning works)
        assert engine_host_plan(unit_numels(model, model.blocks), cuda, torch.bfloat16) == plan
    host = 128 * GIB
    needed = check_host_memory(plan, available=host)  # raises when it does not fit
    assert needed == sum(plan.values())
    shape = f"crystalcoder_7b {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B, 4 staging"
    for item, nbytes in [*plan.items(), ("total (check_host_memory)", needed), ("128 GiB host", host),
                         ("headroom on a 128 GiB host", host - needed)]:  # fmt: skip
        record("streaming_host_plan", op="host_bytes", shape=shape, dtype="bf16", impl=f"{item}: {nbytes} B",
               ms=0.0, rate=nbytes / 1e9, unit="GB", device=torch.device("cpu"))  # fmt: skip


# -- GPU (bench/run_gpu.sh) ---------------------------------------------------------------------------------


def crystal_shaped(n_layer: int) -> ModelConfig:
    return ModelConfig.from_name("crystalcoder_7b", n_layer=n_layer)


@requires_cuda
def test_gpu_8_layer_streamed_vs_resident():
    """Bar: streamed >= 90% of resident (DESIGN measured 45.0k tok/s resident on an H100 for an untied 1.88B
    variant; this one ties its embeddings, as CrystalCoder does: 1.74B)."""
    cfg = crystal_shaped(8)  # 1.74B params
    variants = {
        "resident": {},
        "streaming_batch_major": {"schedule": "batch_major", "trace": True},
        "streaming_layer_major": {"schedule": "layer_major", "trace": True},
        "streaming_no_prefetch": {"schedule": "batch_major", "prefetch": 0},
        "streaming_batch_major_keep": {"schedule": "batch_major", "recompute": False, "trace": True},
    }
    compare(cfg, torch.device("cuda"), torch.bfloat16, rows=2, seq=2048, n_mb=4, steps=3, variants=variants)


@requires_cuda
def test_gpu_7b_streamed_depths():
    """CrystalCoder-7B shapes streamed at 8, 16, 32 layers: device peak flat in depth; tok/s and MFU at 32.
    Batch-major: layer-major keeps every micro-batch's input to every block, which grows with depth."""
    device = torch.device("cuda")
    peaks = {}
    for layers in (8, 16, 32):
        cfg = crystal_shaped(layers)
        torch.cuda.reset_peak_memory_stats(device)
        variants = {"streaming_batch_major": {"schedule": "batch_major"}}
        steps = 1 if layers < 32 else 2  # peak memory needs one step; throughput is taken at full depth
        try:
            rates = compare(cfg, device, torch.bfloat16, rows=2, seq=2048, n_mb=4, steps=steps, variants=variants,
                            file="streaming_7b")  # fmt: skip
        except HostMemoryError as e:  # a host too small for this depth: say so in the CSV, go on
            record(
                "streaming_7b",
                op="refused_host_memory",
                shape=f"L{layers}",
                dtype="bf16",
                impl="streaming_batch_major",
                ms=0.0,
                unit=str(e)[:120].replace(",", ";"),
                device=device,
            )
            continue
        peaks[layers] = torch.cuda.max_memory_allocated(device)
        mfu = rates["streaming_batch_major"] * cfg.flops_per_token(2048) / 989e12  # H100 dense bf16 datasheet
        record("streaming_7b", op="mfu_vs_h100_datasheet", shape=f"L{layers}", dtype="bf16",
               impl="streaming_batch_major", ms=0.0, rate=mfu, unit="fraction", device=device)  # fmt: skip
    if len(peaks) < 2:
        pytest.skip(f"the host could hold only depths {sorted(peaks)} of the 7B store")
    spread = (max(peaks.values()) - min(peaks.values())) / min(peaks.values())
    record("streaming_7b", op="device_peak_spread_8_16_32", shape="7B shapes", dtype="bf16",
           impl="streaming_batch_major", ms=0.0, rate=spread, unit="fraction", device=device)  # fmt: skip
