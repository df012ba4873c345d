"""Weight streaming on a GPU cluster: today's replicated store, the sharded store (streaming/sharded.py,
docs/cluster.md), and FSDP2 with and without CPU offload (gpu.py's model), on N GPUs of a profile.

    python -m crystal.streaming.sim cluster model=crystalcoder_7b cluster=h100 sizes=8,64

Workload: CrystalCoder's global batch (2112 x 2048 tokens), m micro-batches of b sequences per GPU; each layout
tuned over b (divisors of its share, up to 16) and schedule, keeping the fastest that fits device memory.

Per GPU and step (P params, Pb per block, L blocks, Pn outside the blocks, N GPUs):
  link (PCIe, the profile's pinned h2d / d2h rates): weights H2D = loads x 2 Pb (bf16) per block + 4 Pn once;
    gradients D2H = sends x 2 Pb (bf16) per block + 4 Pn; loads = 2m (batch_major) or 2 (layer_major) per block,
    sends = m or 1. Sharded: both / N (each GPU moves its share; the device gathers the rest).
  device collectives (sharded; ring, NVLink inside a node, the per-GPU InfiniBand rate across nodes): an
    all-gather per load, (N-1)/N x 2 Pb, and a reduce-scatter per send, (N-1)/N x 4 Pb (fp32).
  host all-reduce (replicated): every gradient, fp32, 2 (N-1)/N x 4 P per step, at the same network rates (the
    simulator's assumption for replicas; gloo over host memory is slower, so this flatters today's layout).
  host work: AdamW of P (replicated) or P/N (sharded) at the profile's host rate, each GPU with a host like the
    measured one (gpu.py's assumption), plus summing the landed gradient bytes at its accumulate rate.
  step = max(compute, H2D, D2H, device collectives, host all-reduce, host work) + one block's load: the executor
    overlaps copies, collectives and host work with compute, so the slowest lane bounds the step.
  host bytes per node = GPUs per node x a rank's store (16 P + 2 L Pb bf16 copy; / N when sharded).
An analytic bound, not the event simulation `simulate` runs for one replica; nothing here is measured.
"""

from __future__ import annotations

from dataclasses import dataclass

from crystal.streaming.sim.gpu import SEQ_BATCH, _act_per_layer, _bw, _divisors, _internals, fsdp
from crystal.streaming.sim.profile import ClusterProfile
from crystal.streaming.sim.shapes import ModelShape
from crystal.streaming.sim.timing import block_times

REPLICATED, SHARDED = "streaming, replicated store", "streaming, sharded store"


@dataclass
class ClusterRow:
    layout: str
    gpus: int
    config: str
    host_gb_per_node: float
    pcie_gb_per_gpu: float  # H2D + D2H bytes per GPU per step
    step_s: float
    tokens_s: float
    bound: str  # the lane that sets the step
    device_gb: float
    fits: bool


def streaming_row(shape: ModelShape, prof: ClusterProfile, n: int, b: int, schedule: str, sharded: bool,
                  seq: int, recompute: bool = True) -> ClusterRow:  # fmt: skip
    L, P, Pb, Pn = shape.n_layer, shape.params, shape.block_params, shape.nonblock_params
    m = SEQ_BATCH // n // b
    share = n if sharded else 1
    loads, sends = (2 * m, m) if schedule == "batch_major" else (2, 1)
    h2d_bytes = (loads * L * 2 * Pb + 4 * Pn) / share
    d2h_bytes = (sends * L * 2 * Pb + 4 * Pn) / share
    bt = block_times(shape, prof.device, b, seq)
    lanes = {
        "compute": m * (L * ((2 if recompute else 1) * bt.fwd + bt.bwd) + bt.head + bt.embed_fwd + bt.embed_bwd),
        "h2d": h2d_bytes / (prof.link.h2d_gbps * 1e9),
        "d2h": d2h_bytes / (prof.link.d2h_gbps * 1e9),
    }
    bw = _bw(prof, n, n > prof.network.devices_per_node)
    frac = (n - 1) / n
    if sharded:
        lanes["device collectives"] = frac * (loads * L * 2 * Pb + sends * L * 4 * Pb + 8 * Pn) / bw
    elif n > 1:
        lanes["host all-reduce"] = 2 * frac * 4 * P / bw
    lanes["host"] = P / share / (prof.host.optimizer_mparams_per_s * 1e6) + sends * L * 4 * Pb / share / (
        prof.host.accumulate_gbps * 1e9)  # fmt: skip
    bound = max(lanes, key=lanes.get)
    step = lanes[bound] + 2 * Pb / share / (prof.link.h2d_gbps * 1e9)
    held = m if schedule == "layer_major" else 1  # micro-batches whose block inputs are kept at once
    act = held * L * _act_per_layer(shape, b, seq, 1, recompute) + (_internals(shape, b, seq, 1) if recompute else 0)
    dev = 2 * 2 * Pb + 2 * 4 * Pn + act + b * seq * shape.vocab_size * 4 * 2
    if sharded:  # the share sent to the gather, and the padded fp32 gradient a reduce-scatter takes
        dev += 2 * Pb / n + 4 * Pb * (1 + 1 / n)
    host_node = min(n, prof.network.devices_per_node) * (16 * P + 2 * L * Pb) / share
    cfg = f"b={b} m={m} {schedule} recompute={'on' if recompute else 'off'}"
    return ClusterRow(SHARDED if sharded else REPLICATED, n, cfg, host_node / 1e9,
                      (h2d_bytes + d2h_bytes) / 1e9, step, SEQ_BATCH * seq / step, bound, dev / 1e9,
                      dev <= prof.device.memory_gb * 1e9)  # fmt: skip


def fsdp_row(shape: ModelShape, prof: ClusterProfile, n: int, offload: bool, seq: int) -> ClusterRow | None:
    """gpu.py's FSDP2 (tuned over b and activation checkpointing) with its host bytes and link traffic: offload
    keeps the fp32 shards, grads and Adam state on the host (16 P / N per GPU) and copies a layer's fp32 shard
    H2D before each all-gather (2 per layer and micro-batch) and its gradient shard D2H after each reduce-scatter."""
    fits = [a for a in (fsdp(shape, prof, n, b, ck, offload, seq) for b in _divisors(SEQ_BATCH // n, 16)
                        for ck in (False, True)) if a.fits]  # fmt: skip
    if not fits:
        return None
    a = max(fits, key=lambda r: r.tokens_s)
    m = int(a.config.split("m=")[1].split()[0])
    P = shape.params
    pcie = m * 3 * 4 * P / n if offload else 0.0
    host = min(n, prof.network.devices_per_node) * 16 * P / n if offload else 0.0
    return ClusterRow(a.strategy, n, a.config, host / 1e9, pcie / 1e9, a.step_s, a.tokens_s, "-", a.device_gb, True)


def compare(shape: ModelShape, prof: ClusterProfile, sizes: list[int]) -> list[ClusterRow]:
    seq = prof.run.seq or shape.max_seq_len
    rows: list[ClusterRow] = []
    for n in sizes:
        if n > prof.network.devices or SEQ_BATCH % n:
            raise ValueError(f"sizes: {n} GPUs must divide {SEQ_BATCH} sequences and be <= network.devices")
        for sharded in (False, True):
            cands = [streaming_row(shape, prof, n, b, sch, sharded, seq, rc) for b in _divisors(SEQ_BATCH // n, 16)
                     for sch in ("batch_major", "layer_major") for rc in (True, False)]  # fmt: skip
            fitting = [c for c in cands if c.fits]
            if fitting:  # the fastest; among those within 1% of it, the one moving fewest bytes over PCIe
                top = max(c.tokens_s for c in fitting)
                rows.append(min((c for c in fitting if c.tokens_s >= 0.99 * top), key=lambda r: r.pcie_gb_per_gpu))
        rows += [r for r in (fsdp_row(shape, prof, n, off, seq) for off in (False, True)) if r is not None]
    return rows


def table(rows: list[ClusterRow], markdown: bool = False) -> str:
    cols = ["layout", "GPUs", "best config", "host GB/node", "PCIe GB/GPU/step", "step s", "tokens/s", "bound by"]
    body = [[r.layout, str(r.gpus), r.config, f"{r.host_gb_per_node:,.0f}", f"{r.pcie_gb_per_gpu:,.1f}",
             f"{r.step_s:.2f}", f"{r.tokens_s:,.0f}", r.bound] for r in rows]  # fmt: skip
    if markdown:
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in body)])
    widths = [max(len(c), *(len(row[i]) for row in body)) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*cols), "-" * (sum(widths) + 2 * len(widths)), *(fmt.format(*row) for row in body)])
