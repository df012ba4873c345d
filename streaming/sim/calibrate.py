"""Measure this machine (device = cpu) and write conf/cluster/cpu.yaml for the simulator.

    python -m crystal.streaming.sim calibrate --out conf/cluster/cpu.yaml [--budget-s 20]

What is measured, with torch's default thread count (the trainer's) unless --threads says otherwise:
  matmul     fp32 F.linear (with bias, as the model's layers) at sizes shaped like the small models'
             linears -> TFLOP/s by GFLOP
  attention  SDPA causal fp32 forward and forward+backward at the tiny model's shape
  elementwise  layer_norm + silu*mul + residual add over an activation-sized tensor -> read+write GB/s
  softmax    F.cross_entropy forward+backward over fp32 logits -> GB/s as timing.py counts them
  memcpy     copy_ of a block-sized fp32 buffer -> GB/s (the CPU executor's host -> "device" copy)
  AdamW      torch.optim.AdamW(fused=True) over block-sized tensors -> params/s
  accumulate fp32 add_ into an accumulator -> accumulator GB/s
  op overhead  a tiny add -> microseconds per op dispatch
Each figure is the median over a few rounds of a batch-mean time (see _time), all within the budget.
"""

from __future__ import annotations

import datetime as dt
import platform
import socket
import statistics
import time
from pathlib import Path

MATMUL_SHAPES = [(64, 64, 64), (512, 256, 256), (2048, 256, 768), (2048, 256, 682), (2048, 512, 1536),
                 (1024, 512, 4096), (4096, 512, 1365), (8192, 512, 1536)]  # fmt: skip


def _time(fn, budget_s: float, min_reps: int = 3) -> float:
    """Seconds per call of fn(): the median over rounds of the mean of a batch of calls (a round lasts
    ~budget/5), after a warm-up. Batches, not single calls: on a shared 2-core machine single calls swing
    10x when a torch worker thread is descheduled, and a step's throughput sees the average, not the best."""
    fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    per_round = max(1, int(budget_s / 5 / one))
    means: list[float] = []
    t_end = time.perf_counter() + budget_s
    while len(means) < min_reps or (time.perf_counter() < t_end and len(means) < 50):
        t0 = time.perf_counter()
        for _ in range(per_round):
            fn()
        means.append((time.perf_counter() - t0) / per_round)
    return statistics.median(means)


def measure(budget_s: float = 20.0) -> dict:
    """Every rate, after one short discarded pass: the first pass in a process runs with cold allocator
    state (freshly mapped pages on every large temporary) and measured elementwise work ~4x slower than
    the same process a moment later, which is what a training step sees after its first step."""
    _measure(min(2.0, 0.15 * budget_s))
    return _measure(budget_s)


def _measure(budget_s: float) -> dict:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    each = budget_s / (len(MATMUL_SHAPES) + 9)
    out: dict = {"threads": torch.get_num_threads(), "torch": torch.__version__}

    table = []
    for m, k, n in MATMUL_SHAPES:
        a, w, bias = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
        s = _time(lambda a=a, w=w, bias=bias: F.linear(a, w, bias), each)
        table.append([2.0 * m * k * n / 1e9, 2.0 * m * k * n / s / 1e12])
    table.sort()
    out["matmul"] = table

    bsz, heads, seq, hd = 4, 2, 256, 128
    q, k, v = (torch.randn(bsz, heads, seq, hd, requires_grad=True) for _ in range(3))
    flops = 2.0 * bsz * seq * seq * heads * hd  # causal: half of QK^T and PV
    fwd = _time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), each)
    g = torch.randn(bsz, heads, seq, hd)

    def fwd_bwd():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(g)

    both = _time(fwd_bwd, each)
    out["attention_fwd"] = flops / fwd / 1e12
    out["attention_bwd"] = 2.5 * flops / max(both - fwd, 1e-9) / 1e12

    # 2048 tokens: the small models' micro-batch size. At 8192 the 22 MB temporaries sit right at glibc's
    # mmap threshold and the rate flips between ~24 and ~6 GB/s from one call to the next (page faults on
    # every fresh mapping), which the executor's smaller temporaries never see.
    t, d, f = 2048, 256, 682
    x, r = torch.randn(t, d), torch.randn(t, d)
    u, w = torch.randn(t, f), torch.randn(t, f)
    ln_w, ln_b = torch.ones(d), torch.zeros(d)

    def elementwise():
        F.layer_norm(x, (d,), ln_w, ln_b)  # read d, write d
        F.silu(u) * w  # read 2 f, write f (+ the silu temporary: write f, read f)
        x + r  # read 2 d, write d

    s = _time(elementwise, each)
    out["elementwise"] = t * (5 * d + 5 * f) * 4 / s / 1e9

    for key, vocab in (("softmax", 4096), ("softmax_big", 32032)):  # in cache / far beyond it
        rows = 1024
        logits = torch.randn(rows, vocab, requires_grad=True)
        targets = torch.randint(0, vocab, (rows,))

        def cross_entropy(logits=logits, targets=targets):
            F.cross_entropy(logits * 0.5, targets).backward()

        s = _time(cross_entropy, each)
        out[key] = rows * 11 * vocab * 4 / s / 1e9  # the 11 V fp32 elements per token timing.py counts

    n = 4 * 1024 * 1024  # ~ a small-model block in fp32 (16 MB)
    src, dst = torch.randn(n), torch.empty(n)
    out["memcpy"] = n * 4 / _time(lambda: dst.copy_(src), each) / 1e9
    acc = torch.zeros(n)
    out["accumulate"] = n * 4 / _time(lambda: acc.add_(src), each) / 1e9

    params = [torch.nn.Parameter(torch.randn(s_)) for s_ in (n // 2, n // 4, n // 4)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    try:
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-9, weight_decay=0.1, fused=True)
        out["adamw_impl"] = "fused"
    except (RuntimeError, TypeError):  # an old torch without CPU fused AdamW
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-9, weight_decay=0.1, foreach=True)
        out["adamw_impl"] = "foreach"
    out["adamw"] = n / _time(opt.step, each) / 1e6

    a1, b1 = torch.ones(1), torch.ones(1)
    out["op_overhead_us"] = _time(lambda: torch.add(a1, b1), each / 2) * 1e6
    return out


def total_memory_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return 8.0  # unknown platform: a conservative figure, said so in the file


def render(m: dict, budget_s: float) -> str:
    """The measured figures as a cluster profile, every line saying where it came from."""
    date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    host = socket.gethostname()
    cpu = platform.processor() or platform.machine()
    mem = total_memory_gb()
    table = ", ".join(f"[{g:.4g}, {r:.4g}]" for g, r in m["matmul"])
    peak = max(r for _, r in m["matmul"])
    return f"""\
# This machine as a streaming device (device = cpu), written by
#   crystal-sim calibrate --out conf/cluster/cpu.yaml --budget-s {budget_s:g} --threads {m["threads"]}
# measured {date} on host {host} ({cpu}, {m["threads"]} torch threads, torch {m["torch"]}).
# Every rate below is a median measured by streaming/sim/calibrate.py at that time; the machine may be shared.
name: cpu
description: this CPU ({m["threads"]} threads), measured {date[:10]} on {host}
device:
  name: cpu ({cpu}, {m["threads"]} threads)
  peak_tflops: {peak:.4g}  # measured: the best fp32 matmul rate below (MFU denominator; no datasheet figure)
  matmul_tflops: [{table}]  # measured: fp32 F.linear, [GFLOP of one matmul, TFLOP/s]
  attention_fwd_tflops: {m["attention_fwd"]:.4g}  # measured: SDPA causal fp32 B4 H2 S256 D128 forward
  attention_bwd_tflops: {m["attention_bwd"]:.4g}  # measured: the same, backward (2.5 x forward FLOPs)
  memory_gbps: {m["elementwise"]:.4g}  # measured: layer_norm + silu*mul + add, read+write bytes/s
  softmax_gbps: {m["softmax"]:.4g}  # measured: F.cross_entropy fwd+bwd on (1024, 4096) fp32 logits, 11 V x 4 B/token
  softmax_big_gbps: {m["softmax_big"]:.4g}  # measured: the same on (1024, 32032) logits (131 MB, beyond the caches)
  memory_gb: {mem:.1f}  # /proc/meminfo MemTotal (the device is the host's memory)
  compute_dtype: fp32  # the CPU executor runs fp32 (bitwise checks against resident)
  op_overhead_us: {m["op_overhead_us"]:.3g}  # measured: one tiny torch.add
  shares_host_memory: true
link:  # no copy engines: host -> "device" buffer copies are memcpy on the same cores
  h2d_gbps: {m["memcpy"]:.4g}  # measured: copy_ of a 16 MB fp32 buffer
  d2h_gbps: {m["memcpy"]:.4g}  # measured: the same copy
  duplex_gbps: {m["memcpy"]:.4g}  # one copy at a time on the same cores
  overlap: false  # copies, compute and optimizer run serially on the same cores
host:
  memory_gb: {mem:.1f}  # /proc/meminfo MemTotal
  optimizer_mparams_per_s: {m["adamw"]:.4g}  # measured: torch AdamW ({m["adamw_impl"]}) on 16 MB of params
  accumulate_gbps: {m["accumulate"]:.4g}  # measured: fp32 add_ into a 16 MB accumulator
  overlap: false
network:
  devices: 1
run:  # the CPU validation bench's defaults
  batch: 8
  seq: 0
  micro_batches: 1
  replicas: 1
  schedule: batch_major
  prefetch: 1
  recompute: true
  stream_dtype: fp32
  grad_dtype: fp32
"""


def calibrate(out: str | Path, budget_s: float = 20.0, threads: int = 0) -> Path:
    """Measure and write a profile; threads > 0 sets torch's thread count first (0 = torch's default)."""
    import torch
    from crystal.streaming.sim.profile import load_profile

    if threads:
        torch.set_num_threads(threads)
    text = render(measure(budget_s), budget_s)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.yaml")
    tmp.write_text(text)
    load_profile(tmp)  # refuse to write a profile that does not validate
    tmp.replace(out)
    return out
