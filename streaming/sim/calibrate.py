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
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from crystal.streaming.sim.shapes import ModelShape

MATMUL_SHAPES = [(64, 64, 64), (512, 256, 256), (2048, 256, 768), (2048, 256, 682), (2048, 512, 1536),
                 (1024, 512, 4096), (4096, 512, 1365), (8192, 512, 1536)]  # fmt: skip
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


@dataclass(frozen=True)
class Workload:
    """The step the profile is for: calibrate on this model's own ops at this micro-batch's shapes.

    `block`, when given, builds the model's own block at these shapes: () -> (forward, backward), forward()
    returning the output that backward(output) differentiates. Its measured time less the matmuls and
    attention measured beside it is the elementwise work (norms, RoPE, relayouts, residuals, activation)
    as the model really does it; without it a proxy mix of layer_norm, silu*mul and add is timed. The
    caller supplies it because crystal.streaming imports nothing of the model."""

    shape: ModelShape
    batch: int
    seq: int
    block: Callable[[], tuple[Callable[[], Any], Callable[[Any], Any]]] | None = None
    # blocks that `block` runs in a row (all forwards, then all backwards, as a resident step keeps every
    # layer's activations: their working set and reuse distance are the step's, not one block's)
    block_depth: int = 1


def _time(fn, budget_s: float, clock=time.process_time, min_reps: int = 3) -> float:
    """Seconds per call of fn() on `clock`: the median over rounds of the mean of a batch of calls (a round
    lasts ~budget/7), after a warm-up. The default clock is this process's CPU time: on a shared machine
    wall time counts the moments a neighbour holds the core (a 64^3 matmul took 0.2 ms alone, 8 ms under
    load), CPU time does not, and the step it is compared with is measured on the same clock."""
    fn()
    t0 = clock()
    fn()
    one = max(clock() - t0, 1e-6)
    per_round = max(1, int(budget_s / 7 / one))
    means: list[float] = []
    t_end = clock() + budget_s
    while len(means) < min_reps or (clock() < t_end and len(means) < 50):
        t0 = clock()
        for _ in range(per_round):
            fn()
        means.append(max(clock() - t0, 1e-9) / per_round)
    return statistics.median(means)


def measure(budget_s: float = 20.0, workload: Workload | None = None, clock: str = "cpu") -> dict:
    """Every rate, after one short discarded pass: the first pass in a process runs with cold allocator
    state (freshly mapped pages on every large temporary) and measured elementwise work ~4x slower than
    the same process a moment later, which is what a training step sees after its first step."""
    tick = CLOCKS[clock]
    if workload is not None:
        _measure_workload(0.0, workload, tick, min_reps=1)
        return _measure_workload(budget_s, workload, tick) | {"clock": clock}
    _measure(min(2.0, 0.15 * budget_s), tick)
    return _measure(budget_s, tick) | {"clock": clock}


def _time_fwd_bwd(fwd, bwd, budget_s: float, clock=time.process_time, min_reps: int = 7) -> tuple[float, float]:
    """(forward s, backward s): medians over single calls, each call timed on its own (the backward of the
    forward just run), so the backward is measured, not a difference of two noisy medians."""
    samples: list[tuple[float, float]] = []
    t_end = clock() + budget_s
    for i in range(2 + 200):
        t0 = clock()
        out = fwd()
        t1 = clock()
        bwd(out)
        t2 = clock()
        if i >= 2:  # two warm-up calls
            samples.append((t1 - t0, t2 - t1))
            if len(samples) >= min_reps and clock() > t_end:
                break
    return statistics.median(f for f, _ in samples), statistics.median(b for _, b in samples)


def _linear_fwd_bwd(m: int, k: int, n: int, each: float, tick, reps: int) -> tuple[float, float, float]:
    """(GFLOP, forward s, backward s) of F.linear with bias on (m, k) x (n, k)^T, as the model's layers run
    it (backward: dX, dW and the bias gradient, through autograd)."""
    import torch
    import torch.nn.functional as F

    x = torch.randn(m, k, requires_grad=True)
    w = torch.randn(n, k, requires_grad=True)
    b = torch.randn(n, requires_grad=True)
    g = torch.randn(m, n)
    fwd, bwd = _time_fwd_bwd(lambda: F.linear(x, w, b), lambda y: torch.autograd.grad(y, (x, w, b), g), each, tick,
                             reps)  # fmt: skip
    return 2.0 * m * k * n / 1e9, fwd, bwd


def _rate_table(rows: list[tuple[float, float]]) -> list[list[float]]:
    """[(GFLOP, seconds)] -> [[GFLOP, TFLOP/s]] sorted, equal sizes merged (their times summed)."""
    merged: dict[float, list[float]] = {}
    for gflop, s in rows:
        key = float(f"{gflop:.4g}")
        acc = merged.setdefault(key, [0.0, 0.0])
        acc[0] += gflop
        acc[1] += s
    return [[k, f / s / 1e3] for k, (f, s) in sorted(merged.items())]


def _measure_workload(budget_s: float, wl: Workload, tick, min_reps: int = 7) -> dict:
    """The model's own ops at the workload's shapes: each linear of a block and the LM head forward and
    backward, attention at (B, H, S, D), the block's elementwise mix at (B S, d) and (B S, F), the cross
    entropy over (B S, V) logits, and the host side of the streaming executor at one block's and the
    embedding's parameter layout (weight copy, gradient landing copy, accumulate, norms, fused AdamW)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    s = wl.shape
    t, d, f, v = wl.batch * wl.seq, s.d_model, s.ffn_hidden, s.vocab_size
    linears = sorted({(i, o) for _, i, o in s.block_linears()} | {(d, v)})
    each = budget_s / (len(linears) + 8)
    out: dict = {"threads": torch.get_num_threads(), "torch": torch.__version__,
                 "workload": f"{s.name} B{wl.batch} S{wl.seq}"}  # fmt: skip
    fwd_rows, bwd_rows = [], []
    for i, o in linears:
        gflop, fwd, bwd = _linear_fwd_bwd(t, i, o, each, tick, min_reps)
        fwd_rows.append((gflop, fwd))
        bwd_rows.append((gflop, bwd / 2))  # the table is by the forward matmul's size; backward is 2 of them
    out["matmul"] = _rate_table(fwd_rows)
    out["matmul_bwd"] = _rate_table(bwd_rows)

    heads = s.n_head
    q, k_, v_ = (torch.randn(wl.batch, heads, wl.seq, d // heads, requires_grad=True) for _ in range(3))
    flops = 2.0 * wl.batch * wl.seq * wl.seq * d
    g = torch.randn_like(q)
    fwd, bwd = _time_fwd_bwd(lambda: F.scaled_dot_product_attention(q, k_, v_, is_causal=True),
                             lambda y: torch.autograd.grad(y, (q, k_, v_), g), each, tick, min_reps)  # fmt: skip
    out["attention_fwd"] = flops / fwd / 1e12
    out["attention_bwd"] = 2.5 * flops / bwd / 1e12
    out["elementwise"] = _elementwise_rate(t, d, f, each, tick, min_reps)

    logits = torch.randn(t, v, requires_grad=True)
    targets = torch.randint(0, v, (t,))

    def cross_entropy():
        torch.autograd.grad(F.cross_entropy(logits * 0.5, targets), (logits,))

    out["softmax"] = out["softmax_big"] = t * 11 * v * 4 / _time(cross_entropy, each, tick, min_reps) / 1e9
    out["elementwise_bwd"] = out["elementwise"]
    a1, b1 = torch.ones(1), torch.ones(1)
    out["op_overhead_us"] = _time(lambda: torch.add(a1, b1), each / 2, tick, min_reps) * 1e6
    if wl.block is not None:
        out |= _block_elementwise(wl, out, each, tick, min_reps)
    out |= host_rates(s, each, tick, min_reps)
    return out


def _block_elementwise(wl: Workload, m: dict, each: float, tick, reps: int) -> dict:
    """Elementwise read+write GB/s forward and backward from the model's own block: its measured time less
    what the simulator charges for its matmuls, attention and op launches at the rates just measured.
    Falls back to the proxy's rate when the remainder is not positive (noise larger than the work)."""
    from crystal.streaming.sim.profile import DeviceProfile
    from crystal.streaming.sim.timing import block_times

    fwd_fn, bwd_fn = wl.block()
    fwd, bwd = _time_fwd_bwd(fwd_fn, bwd_fn, 2 * each, tick, reps)
    fwd, bwd = fwd / wl.block_depth, bwd / wl.block_depth
    free = DeviceProfile(name="calibration", peak_tflops=1.0, matmul_tflops=m["matmul"],
                         matmul_bwd_tflops=m["matmul_bwd"], attention_fwd_tflops=m["attention_fwd"],
                         attention_bwd_tflops=m["attention_bwd"], memory_gbps=1e9, memory_gb=1.0,
                         compute_dtype="fp32", op_overhead_us=m["op_overhead_us"])  # fmt: skip
    rest = block_times(wl.shape, free, wl.batch, wl.seq)
    ones = block_times(wl.shape, replace(free, memory_gbps=1.0, op_overhead_us=0.0, matmul_tflops=[[1.0, 1e9]],
                                         matmul_bwd_tflops=[], attention_fwd_tflops=1e9, attention_bwd_tflops=1e9),
                       wl.batch, wl.seq)  # fmt: skip
    # `ones`: the elementwise bytes / 1e9 as block_times counts them (seconds at 1 GB/s; fp32 as the CPU runs)
    out = {"block_fwd_ms": fwd * 1e3, "block_bwd_ms": bwd * 1e3}
    for key, measured, model, nbytes in (("elementwise", fwd, rest.fwd, ones.fwd), ("elementwise_bwd", bwd, rest.bwd,
                                                                                   ones.bwd)):  # fmt: skip
        if measured > model * 1.02:
            out[key] = nbytes / (measured - model)
    return out


def _elementwise_rate(t: int, d: int, f: int, each: float, tick, reps: int = 3) -> float:
    """Read+write GB/s of layer_norm + silu*mul + residual add over (t, d) and (t, f) fp32 activations."""
    import torch
    import torch.nn.functional as F

    x, r = torch.randn(t, d), torch.randn(t, d)
    u, w = torch.randn(t, f), torch.randn(t, f)
    ln_w, ln_b = torch.ones(d), torch.zeros(d)

    def elementwise():
        F.layer_norm(x, (d,), ln_w, ln_b)  # read d, write d
        F.silu(u) * w  # read 2 f, write f (+ the silu temporary: write f, read f)
        x + r  # read 2 d, write d

    return t * (5 * d + 5 * f) * 4 / _time(elementwise, each, tick, reps) / 1e9


def host_rates(s: ModelShape, each: float, tick=time.process_time, reps: int = 3) -> dict:
    """The streaming executor's host work on this CPU, at one block's parameter layout and at the embedding
    /head's, combined per parameter as a step sees them (n_layer blocks + the rest), with its own kernels:
    the weight copy into a device buffer (copy_ of the flat master), the gradient landing in the store
    (_foreach_copy_ on the first micro-batch, _foreach_add_ on later ones), the norms (_foreach_norm) and
    the update (_fused_adamw_)."""
    import torch

    d = s.d_model
    block = [(i * o, o) for _, i, o in s.block_linears()]
    block = [n for w, b in block for n in ((w, b) if s.bias else (w,))] + [d] * (4 if s.norm == "layernorm" else 2)
    rest = [s.vocab_size * d] * (1 if s.tie_embeddings else 2) + [d] * (2 if s.norm == "layernorm" else 1)
    totals: dict[str, float] = {}
    for layout, count in ((block, s.n_layer), (rest, 1)):
        n = sum(layout)
        src, dst = torch.randn(n), torch.empty(n)
        grads = [torch.randn(k) * 1e-3 for k in layout]
        acc = [torch.zeros(k) for k in layout]
        params = [torch.randn(k) for k in layout]
        m_, v_ = [torch.zeros(k) for k in layout], [torch.zeros(k) for k in layout]
        steps = [torch.zeros(()) for _ in layout]

        def adamw(params=params, grads=grads, m_=m_, v_=v_, steps=steps):
            torch._foreach_add_(steps, 1)
            torch._fused_adamw_(params, grads, m_, v_, [], steps, amsgrad=False, lr=1e-4, beta1=0.9,
                                beta2=0.95, weight_decay=0.1, eps=1e-9, maximize=False, grad_scale=None,
                                found_inf=None)  # fmt: skip

        for key, fn in (("copy", lambda src=src, dst=dst: dst.copy_(src)),
                        ("land", lambda acc=acc, grads=grads: torch._foreach_copy_(acc, grads)),
                        ("accumulate", lambda acc=acc, grads=grads: torch._foreach_add_(acc, grads)),
                        ("norm", lambda grads=grads: torch._foreach_norm(grads, 2.0)),
                        ("adamw", adamw)):  # fmt: skip
            totals[key] = totals.get(key, 0.0) + count * _time(fn, each / 5, tick, reps)
    p = s.n_layer * sum(block) + sum(rest)
    return {"memcpy": p * 4 / totals["copy"] / 1e9, "land": p * 4 / totals["land"] / 1e9,
            "accumulate": p * 4 / totals["accumulate"] / 1e9, "norm": p * 4 / totals["norm"] / 1e9,
            "adamw": p / totals["adamw"] / 1e6, "adamw_impl": "torch._fused_adamw_ (the executor's)"}  # fmt: skip


def _measure(budget_s: float, tick) -> dict:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    each = budget_s / (len(MATMUL_SHAPES) + 9)
    out: dict = {"threads": torch.get_num_threads(), "torch": torch.__version__}

    table = []
    for m, k, n in MATMUL_SHAPES:
        a, w, bias = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
        s = _time(lambda a=a, w=w, bias=bias: F.linear(a, w, bias), each, tick)
        table.append([2.0 * m * k * n / 1e9, 2.0 * m * k * n / s / 1e12])
    table.sort()
    out["matmul"] = table

    bsz, heads, seq, hd = 4, 2, 256, 128
    q, k, v = (torch.randn(bsz, heads, seq, hd, requires_grad=True) for _ in range(3))
    flops = 2.0 * bsz * seq * seq * heads * hd  # causal: half of QK^T and PV
    fwd = _time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), each, tick)
    g = torch.randn(bsz, heads, seq, hd)

    def fwd_bwd():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(g)

    both = _time(fwd_bwd, each, tick)
    out["attention_fwd"] = flops / fwd / 1e12
    out["attention_bwd"] = 2.5 * flops / max(both - fwd, 1e-9) / 1e12

    # 2048 tokens: the small models' micro-batch size. At 8192 the 22 MB temporaries sit right at glibc's
    # mmap threshold and the rate flips between ~24 and ~6 GB/s from one call to the next (page faults on
    # every fresh mapping), which the executor's smaller temporaries never see.
    out["elementwise"] = _elementwise_rate(2048, 256, 682, each, tick)

    for key, vocab in (("softmax", 4096), ("softmax_big", 32032)):  # in cache / far beyond it
        rows = 1024
        logits = torch.randn(rows, vocab, requires_grad=True)
        targets = torch.randint(0, vocab, (rows,))

        def cross_entropy(logits=logits, targets=targets):
            F.cross_entropy(logits * 0.5, targets).backward()

        s = _time(cross_entropy, each, tick)
        out[key] = rows * 11 * vocab * 4 / s / 1e9  # the 11 V fp32 elements per token timing.py counts

    n = 4 * 1024 * 1024  # ~ a small-model block in fp32 (16 MB)
    src, dst = torch.randn(n), torch.empty(n)
    out["memcpy"] = out["land"] = n * 4 / _time(lambda: dst.copy_(src), each, tick) / 1e9
    acc = torch.zeros(n)
    out["accumulate"] = n * 4 / _time(lambda: acc.add_(src), each, tick) / 1e9
    out["norm"] = 2 * out["accumulate"]  # not measured: a read-only pass, half an accumulate

    params = [torch.nn.Parameter(torch.randn(s_)) for s_ in (n // 2, n // 4, n // 4)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    try:
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-9, weight_decay=0.1, fused=True)
        out["adamw_impl"] = "fused"
    except (RuntimeError, TypeError):  # an old torch without CPU fused AdamW
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-9, weight_decay=0.1, foreach=True)
        out["adamw_impl"] = "foreach"
    out["adamw"] = n / _time(opt.step, each, tick) / 1e6

    a1, b1 = torch.ones(1), torch.ones(1)
    out["op_overhead_us"] = _time(lambda: torch.add(a1, b1), each / 2, tick) * 1e6
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
    bwd = ", ".join(f"[{g:.4g}, {r:.4g}]" for g, r in m.get("matmul_bwd", []))
    peak = max(r for _, r in m["matmul"] + m.get("matmul_bwd", []))
    clock = {"cpu": "process CPU time", "wall": "wall time"}[m.get("clock", "cpu")]
    where = f"the model's own ops at {m['workload']}" if "workload" in m else "generic small-model sizes"
    elem_src = ("the model's block less its matmuls and attention" if "block_fwd_ms" in m
                else "layer_norm + silu*mul + add")  # fmt: skip
    return f"""\
# This machine as a streaming device (device = cpu), written by
#   crystal-sim calibrate --out conf/cluster/cpu.yaml --budget-s {budget_s:g} --threads {m["threads"]}
# measured {date} on host {host} ({cpu}, {m["threads"]} torch threads, torch {m["torch"]}).
# Every rate below is a median in {clock} measured by streaming/sim/calibrate.py on {where};
# predictions made with it are in the same clock. The machine may be shared.
name: cpu
description: this CPU ({m["threads"]} threads), measured {date[:10]} on {host}
device:
  name: cpu ({cpu}, {m["threads"]} threads)
  peak_tflops: {peak:.4g}  # measured: the best fp32 matmul rate below (MFU denominator; no datasheet figure)
  matmul_tflops: [{table}]  # measured: fp32 F.linear forward, [GFLOP of one matmul, TFLOP/s]
  matmul_bwd_tflops: [{bwd}]  # measured: its backward (dX + dW + bias grad), by the forward's GFLOP; [] = as forward
  attention_fwd_tflops: {m["attention_fwd"]:.4g}  # measured: SDPA causal fp32 forward
  attention_bwd_tflops: {m["attention_bwd"]:.4g}  # measured: the same, backward (2.5 x forward FLOPs)
  memory_gbps: {m["elementwise"]:.4g}  # measured: {elem_src}, forward, read+write bytes/s
  elementwise_bwd_gbps: {m.get("elementwise_bwd", m["elementwise"]):.4g}  # measured: the same, backward
  softmax_gbps: {m["softmax"]:.4g}  # measured: F.cross_entropy fwd+bwd on fp32 logits, 11 V x 4 B/token
  softmax_big_gbps: {m["softmax_big"]:.4g}  # measured: the same beyond the caches
  memory_gb: {mem:.1f}  # /proc/meminfo MemTotal (the device is the host's memory)
  compute_dtype: fp32  # the CPU executor runs fp32 (bitwise checks against resident)
  op_overhead_us: {m["op_overhead_us"]:.3g}  # measured: one tiny torch.add
  shares_host_memory: true
link:  # no copy engines: host -> "device" buffer copies are memcpy on the same cores
  h2d_gbps: {m["memcpy"]:.4g}  # measured: copy_ of the flat fp32 master into a buffer
  d2h_gbps: {m["land"]:.4g}  # measured: a gradient landing in the store (_foreach_copy_, the first micro-batch)
  duplex_gbps: {m["memcpy"]:.4g}  # one copy at a time on the same cores
  overlap: false  # copies, compute and optimizer run serially on the same cores
host:
  memory_gb: {mem:.1f}  # /proc/meminfo MemTotal
  optimizer_mparams_per_s: {m["adamw"]:.4g}  # measured: AdamW ({m["adamw_impl"]})
  accumulate_gbps: {m["accumulate"]:.4g}  # measured: fp32 _foreach_add_ into the accumulators (later micro-batches)
  norm_gbps: {m["norm"]:.4g}  # measured: _foreach_norm over the gradients (fp32 bytes read per second)
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


def calibrate(out: str | Path, budget_s: float = 20.0, threads: int = 0, workload: Workload | None = None,
              clock: str = "cpu") -> Path:  # fmt: skip
    """Measure and write a profile; threads > 0 sets torch's thread count first (0 = torch's default);
    a workload calibrates on that model's ops at that micro-batch's shapes (else generic small sizes)."""
    import torch
    from crystal.streaming.sim.profile import load_profile

    if threads:
        torch.set_num_threads(threads)
    text = render(measure(budget_s, workload, clock), budget_s)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.yaml")
    tmp.write_text(text)
    load_profile(tmp)  # refuse to write a profile that does not validate
    tmp.replace(out)
    return out
