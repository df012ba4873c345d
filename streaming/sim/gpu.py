"""GPU-cluster alternatives on the same workload: FSDP (ZeRO-3) with and without CPU offload, hybrid
tensor + pipeline + data parallel (Megatron-style 3D), next to weight streaming, on N GPUs of a profile.

    python -m crystal.streaming.sim gpu model=crystalcoder_7b cluster=h100 sizes=16,64

Workload: CrystalCoder's global batch (2112 x 2048 tokens). For every strategy the simulator tries
every micro-batch size (divisors of the per-replica share), activation checkpointing on/off and, for
3D, every (tp, pp) and keeps the fastest configuration that fits in device memory: each strategy
tuned, then compared.

Collective costs (per GPU; bandwidth = the profile's NVLink figure inside a node, its InfiniBand
figure when a group spans nodes; ring algorithms):
  all-gather / reduce-scatter of B bytes over n GPUs: (n - 1) / n x B / bw
  all-reduce: 2 (n - 1) / n x B / bw
FSDP: per layer and micro-batch, an all-gather of its bf16 weights before the forward and again before
  the backward, a reduce-scatter of its fp32 gradients after the backward (torchtitan's default mixed
  precision: bf16 params, fp32 reduce); communication on one lane overlapping compute one layer ahead.
  CPU offload (FSDP2): fp32 shards copied H2D before each all-gather and grads D2H after each
  reduce-scatter, and AdamW on the host after the backward (not overlapped), at the profile's host rate
  per GPU (assumption: each GPU has a host like the measured one, 16 cores).
3D: 1F1B pipeline, step = (m + p - 1) x (slowest stage's forward + backward per micro-batch); TP: 2
  all-reduces of the (b, S, d) activation per layer forward and 2 backward, not overlapped; PP: one
  activation send forward and one gradient send backward per micro-batch and stage boundary, on the
  critical path; DP: distributed optimizer, fp32 grad reduce-scatter + bf16 param all-gather, hidden
  behind the last micro-batch's backward except what exceeds it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from pathlib import Path

from crystal.streaming.sim.engine import Engine
from crystal.streaming.sim.profile import DTYPE_BYTES, ClusterProfile
from crystal.streaming.sim.shapes import ModelShape
from crystal.streaming.sim.timing import ADAM_DEVICE_BYTES, block_times, simulate

SEQ_BATCH = 2112  # CrystalCoder's global batch in sequences (DESIGN.md)
HYBRID, DP = "3D (TP x PP x DP)", "DP + ZeRO-1 (tp=pp=1)"  # the 3D search's winner with and without model split


@dataclass
class Alt:
    strategy: str
    gpus: int
    config: str
    step_s: float
    tokens_s: float
    mfu: float
    comm_s: float  # communication/copy/optimizer time not hidden behind compute
    device_gb: float
    fits: bool


def _bw(prof: ClusterProfile, group: int, spans_nodes: bool) -> float:
    n = prof.network
    return (n.inter_node_gbps if spans_nodes else n.intra_node_gbps) * 1e9


def _divisors(n: int, cap: int) -> list[int]:
    return [b for b in range(1, min(n, cap) + 1) if n % b == 0]


def _act_per_layer(shape: ModelShape, b: int, seq: int, tp: int, ckpt: bool) -> float:
    """Bytes of one layer's saved activations (bf16): its input, plus its internals without checkpointing."""
    d, f = shape.d_model, shape.ffn_hidden
    per_token = d + (0 if ckpt else 3 * d + (4 * d + 4 * f) / tp)
    return b * seq * per_token * 2


def _internals(shape: ModelShape, b: int, seq: int, tp: int) -> float:
    return b * seq * (3 * shape.d_model + (4 * shape.d_model + 4 * shape.ffn_hidden) / tp) * 2


def _result(strategy, n, config, shape, prof, seq, step_s, compute_s, dev_bytes, seqs: int = SEQ_BATCH) -> Alt:
    tokens = seqs * seq
    tok_s = tokens / step_s
    mfu = tok_s * shape.flops_per_token(seq) / (n * prof.device.peak_tflops * 1e12)
    fits = dev_bytes <= prof.device.memory_gb * 1e9
    return Alt(strategy, n, config, step_s, tok_s, mfu, max(0.0, step_s - compute_s), dev_bytes / 1e9, fits)


# ------------------------------------------------------------------------------------------------
# FSDP


def fsdp_device_bytes(shape: ModelShape, n: int, b: int, seq: int, ckpt: bool, offload: bool) -> float:
    """Per GPU: 1/n of the fp32 weights, gradients and AdamW moments (16 B/param; none with offload), two
    gathered blocks (bf16 weights + fp32 gradients) and the root unit, saved activations, fp32 logits + grad."""
    P, Pb, Pn = shape.params, shape.block_params, shape.nonblock_params
    act = shape.n_layer * _act_per_layer(shape, b, seq, 1, ckpt) + (_internals(shape, b, seq, 1) if ckpt else 0)
    return (0 if offload else 16 * P / n) + 2 * Pb * (2 + 4) + Pn * (2 + 4) + act + b * seq * shape.vocab_size * 4 * 2


def fsdp(shape: ModelShape, prof: ClusterProfile, n: int, b: int, ckpt: bool, offload: bool, seq: int,
         seqs: int = SEQ_BATCH) -> Alt:  # fmt: skip
    L, P, Pb, Pn = shape.n_layer, shape.params, shape.block_params, shape.nonblock_params
    m = seqs // n // b
    bt = block_times(shape, prof.device, b, seq)
    bw = _bw(prof, n, n > prof.network.devices_per_node)
    frac = (n - 1) / n  # 0 on one GPU: FSDP2 with offload there is copies + host AdamW, no collectives
    wb = DTYPE_BYTES[prof.device.compute_dtype]  # a gathered weight: bf16 on GPUs, fp32 in a CPU (gloo) run
    ag, rs = frac * wb * Pb / bw, frac * 4 * Pb / bw
    ag_n, rs_n = frac * wb * Pn / bw, frac * 4 * Pn / bw
    h2d = 4 * Pb / n / (prof.link.h2d_gbps * 1e9) if offload else 0.0
    d2h = 4 * Pb / n / (prof.link.d2h_gbps * 1e9) if offload else 0.0
    opt = P / n / (prof.host.optimizer_mparams_per_s * 1e6) if offload else P / n * ADAM_DEVICE_BYTES / (
        prof.device.memory_gbps * 1e9)  # fmt: skip
    # A device without copy engines (a CPU: link.overlap false) runs collectives on the cores that compute.
    eng = Engine(serial=not prof.link.overlap,
                 shared=("h2d", "d2h", prof.link.duplex_gbps / (prof.link.h2d_gbps + prof.link.d2h_gbps)))  # fmt: skip
    prev_opt = None
    for s in range(2):
        gathers: list[list] = []  # [gather task, last compute using it]; gather k reuses the buffer of k - 2

        def gather(name: str, t: float, block, s=s, gathers=gathers, after=None) -> int:
            deps = [after, gathers[-2][1] if len(gathers) >= 2 else None]
            if offload:
                deps = [eng.add("h2d", f"shard {name}", h2d if block is not None else 0.0, deps, block, s)]
            gathers.append([eng.add("reduce", f"all-gather {name}", t, deps, block, s), None])
            return gathers[-1][0]

        def run(name: str, t: float, deps, block, s=s, gathers=gathers) -> int:
            tid = eng.add("compute", name, t, deps, block, s)
            if block is not None:
                gathers[-1][1] = tid  # the compute that frees this gather's buffer
            return tid

        e = eng.add("reduce", "all-gather embedding", ag_n, [prev_opt], None, s)
        for mb in range(m):
            c = run(f"embed mb{mb}", bt.embed_fwd, [e], None)
            for i in range(L):
                c = run(f"F{i} mb{mb}", bt.fwd, [c, gather(f"{i}", ag, i)], i)
            c = run(f"head mb{mb}", bt.head, [c], None)
            g = gather(f"{L - 1} bwd", ag, L - 1)
            for i in reversed(range(L)):
                c = run(f"B{i} mb{mb}", bt.bwd + (bt.fwd if ckpt else 0.0), [c, g], i)
                if i:  # backward prefetch: the next layer's all-gather is issued before this layer's reduce-scatter
                    g = gather(f"{i - 1} bwd", ag, i - 1)
                r = eng.add("reduce", f"reduce-scatter {i}", rs, [c], i, s)
                if offload:
                    eng.add("d2h", f"grad shard {i}", d2h, [r], i, s)
            c = run(f"embed bwd mb{mb}", bt.embed_bwd, [c], None)
        r = eng.add("reduce", "reduce-scatter embedding", rs_n, [c], None, s)
        done = [r] + ([eng.add("d2h", "grad shard embedding", 4 * Pn / n / (prof.link.d2h_gbps * 1e9), [r], None, s)]
                      if offload else [])  # fmt: skip
        # every gradient shard is in before the update (FSDP's optimizer.step() after backward)
        last = [t.id for t in eng.tasks if t.step == s and t.lane in ("reduce", "d2h")]
        prev_opt = eng.add("optimizer" if offload else "compute", "adam", opt, done + last, None, s)
    tasks = eng.run()
    end0 = max(t.end_s for t in tasks if t.step == 0)
    step = max(t.end_s for t in tasks if t.step == 1) - end0
    compute = sum(t.end_s - t.start_s for t in tasks if t.step == 1 and t.lane == "compute" and t.name != "adam")
    dev = fsdp_device_bytes(shape, n, b, seq, ckpt, offload)
    cfg = f"b={b} m={m} ckpt={'on' if ckpt else 'off'}"
    name = "FSDP + CPU offload" if offload else "FSDP (ZeRO-3)"
    return _result(name, n, cfg, shape, prof, seq, step, compute, dev, seqs)


# ------------------------------------------------------------------------------------------------
# 3D: tensor x pipeline x data


def hybrid(shape: ModelShape, prof: ClusterProfile, n: int, tp: int, pp: int, b: int, ckpt: bool, seq: int) -> Alt:
    L, P, d = shape.n_layer, shape.params, shape.d_model
    dp = n // (tp * pp)
    m = SEQ_BATCH // dp // b
    bt = block_times(shape, prof.device, b, seq, tp)
    act_bytes = b * seq * d * 2
    tp_ar = 2 * (tp - 1) / tp * act_bytes / _bw(prof, tp, False) if tp > 1 else 0.0
    per_stage = L // pp
    f_stage = per_stage * (bt.fwd + 2 * tp_ar)
    b_stage = per_stage * (bt.bwd + (bt.fwd if ckpt else 0.0) + 2 * tp_ar + (2 * tp_ar if ckpt else 0.0))
    ends = bt.head + bt.embed_fwd + bt.embed_bwd  # first and last stage extras, on the slowest stage
    stage = f_stage + b_stage + ends / (1 if pp == 1 else 1)
    p2p = 2 * act_bytes / tp / _bw(prof, 2, tp * pp > prof.network.devices_per_node) if pp > 1 else 0.0
    pipe = (m + pp - 1) * (stage + p2p)
    p_stage = P / (tp * pp)
    dp_s = (dp - 1) / dp * 6 * p_stage / _bw(prof, dp, n > prof.network.devices_per_node) if dp > 1 else 0.0
    exposed_dp = max(0.0, dp_s - b_stage)
    opt = p_stage / dp * ADAM_DEVICE_BYTES / (prof.device.memory_gbps * 1e9)
    step = pipe + exposed_dp + opt
    compute = m * (per_stage * (bt.fwd * (2 if ckpt else 1) + bt.bwd) + ends)
    act = pp * per_stage * _act_per_layer(shape, b, seq, tp, ckpt) + (_internals(shape, b, seq, tp) if ckpt else 0)
    dev = p_stage * (2 + 4) + 12 * p_stage / dp + act + b * seq * shape.vocab_size / tp * 4 * 2
    cfg = f"tp={tp} pp={pp} dp={dp} b={b} m={m} ckpt={'on' if ckpt else 'off'}"
    return _result(HYBRID if tp * pp > 1 else DP, n, cfg, shape, prof, seq, step, compute, dev)


# ------------------------------------------------------------------------------------------------
# weight streaming on the same GPUs, and the comparison


def streaming(shape: ModelShape, prof: ClusterProfile, n: int, b: int, schedule: str, seq: int) -> Alt:
    run = replace(prof.run, replicas=n, batch=b, micro_batches=SEQ_BATCH // n // b, schedule=schedule, seq=seq)
    p = simulate(shape, prof, run)
    dev = sum(v for k, v in p.memory.items() if k.startswith("device"))
    cfg = f"b={b} m={run.micro_batches} {schedule}"
    res = _result("weight streaming", n, cfg, shape, prof, seq, p.step_s, p.busy_s["compute"], dev)
    res.fits = p.fits
    return res


def best(cands: list[Alt]) -> Alt | None:
    fitting = [c for c in cands if c.fits]
    return max(fitting, key=lambda c: c.tokens_s) if fitting else None


def compare(shape: ModelShape, prof: ClusterProfile, sizes: list[int], global_batch: int = SEQ_BATCH) -> list[Alt]:
    if global_batch != SEQ_BATCH:
        raise ValueError(f"global_batch={global_batch}: only CrystalCoder's {SEQ_BATCH} sequences are modelled")
    seq = prof.run.seq or shape.max_seq_len
    rows = []
    for n in sizes:
        if n > prof.network.devices or SEQ_BATCH % n:
            raise ValueError(f"sizes: {n} GPUs must divide {SEQ_BATCH} sequences and be <= network.devices")
        share = SEQ_BATCH // n
        bs = _divisors(share, 16)
        for offload in (False, True):
            r = best([fsdp(shape, prof, n, b, ck, offload, seq) for b in bs for ck in (False, True)])
            if r:
                rows.append(r)
        cands = []
        for tp in (1, 2, 4, 8):
            for pp in (1, 2, 4, 8):
                if n % (tp * pp) or shape.n_layer % pp or tp * pp > n or shape.n_head % tp:
                    continue
                dp = n // (tp * pp)
                if SEQ_BATCH % dp:
                    continue
                for b in _divisors(SEQ_BATCH // dp, 16):
                    cands += [hybrid(shape, prof, n, tp, pp, b, ck, seq) for ck in (False, True)]
        for kind in (HYBRID, DP):
            r = best([c for c in cands if c.strategy == kind])
            if r:
                rows.append(r)
        r = best([streaming(shape, prof, n, b, sch, seq) for b in bs for sch in ("batch_major", "layer_major")])
        if r:
            rows.append(r)
    return rows


CRYSTAL_FSDP, CRYSTAL_STREAMING = "FSDP (ZeRO-3)", "weight streaming"  # the rows crystal's backends run


@dataclass
class Recommendation:
    gpus: int
    backend: str  # crystal's backend.name: resident | fsdp | streaming
    why: str


def recommend(rows: list[Alt], shape: ModelShape, prof: ClusterProfile) -> list[Recommendation]:
    """Which of crystal's backends to run per GPU count: fsdp (resident on one GPU, where FSDP has nothing to
    shard) when its weights, gradients, AdamW state and activations fit the GPUs together and it is the faster;
    weight streaming when they do not fit, or when it predicts more tokens/s. The other rows (offload, 3D)
    are references crystal does not run."""
    seq = prof.run.seq or shape.max_seq_len
    out = []
    for n in sorted({r.gpus for r in rows}):
        by = {r.strategy: r for r in rows if r.gpus == n}
        sharded, streamed = by.get(CRYSTAL_FSDP), by.get(CRYSTAL_STREAMING)
        name = "resident" if n == 1 else "fsdp"
        if sharded and (streamed is None or sharded.tokens_s >= streamed.tokens_s):
            vs = f" vs streaming {streamed.tokens_s:,.0f}" if streamed else ""
            how = " with backend.fsdp.grad_sync=micro_batch, as modelled" if n > 1 else ""
            out.append(Recommendation(n, name, f"fits{how} ({sharded.device_gb:.1f} GB per GPU, {sharded.config}); "
                                               f"{sharded.tokens_s:,.0f} tokens/s{vs}"))  # fmt: skip
        elif sharded and streamed:
            out.append(Recommendation(n, "streaming", f"{streamed.tokens_s:,.0f} tokens/s vs {name} "
                                                      f"{sharded.tokens_s:,.0f}"))  # fmt: skip
        elif streamed:
            least = fsdp_device_bytes(shape, n, 1, seq, True, False) / 1e9  # smallest footprint: b=1, checkpointing
            why = (f"{name} does not fit: needs {least:.1f} GB per GPU of {prof.device.memory_gb:g}; "
                   f"streaming {streamed.tokens_s:,.0f} tokens/s in {streamed.device_gb:.1f} GB")  # fmt: skip
            out.append(Recommendation(n, "streaming", why))
    return out


def table(rows: list[Alt]) -> str:
    head = f"{'strategy':<22} {'GPUs':>4}  {'best config':<36} {'step s':>7} {'tokens/s':>10} {'MFU':>6} " \
           f"{'exposed s':>9} {'dev GB':>7}"  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.strategy:<22} {r.gpus:>4}  {r.config:<36} {r.step_s:>7.2f} {r.tokens_s:>10,.0f} "
                     f"{100 * r.mfu:>5.1f}% {r.comm_s:>9.2f} {r.device_gb:>7.1f}")  # fmt: skip
    for n in sorted({r.gpus for r in rows}):
        by = {r.strategy: r for r in rows if r.gpus == n}
        for kind in (HYBRID, DP):
            if kind in by and "FSDP (ZeRO-3)" in by:
                gain = by[kind].tokens_s / by["FSDP (ZeRO-3)"].tokens_s - 1
                lines.append(f"{n} GPUs: {kind} vs FSDP (ZeRO-3): {100 * gain:+.1f}% tokens/s")
    return "\n".join(lines)


def write_csv(rows: list[Alt], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["strategy", "gpus", "config", "step_s", "tokens_s", "mfu", "exposed_s", "device_gb", "fits"])
        for r in rows:
            w.writerow([r.strategy, r.gpus, r.config, f"{r.step_s:.4f}", f"{r.tokens_s:.0f}", f"{r.mfu:.4f}",
                        f"{r.comm_s:.4f}", f"{r.device_gb:.1f}", r.fits])  # fmt: skip
    return path


# DESIGN.md "Measured on one H100": the 8-layer CrystalCoder-shaped model (1.88B params, so untied
# embeddings), 8 x 2048 tokens per step.
H100_MEASURED = {"resident": 45_000, "resident + activation checkpointing": 36_500, "FSDP2 + CPU offload": 14_900}


def h100_checks(prof: ClusterProfile) -> list[tuple[str, float, float]]:
    """(what, measured tokens/s, predicted tokens/s) for the three measured single-GPU runs."""
    from crystal.streaming.sim.shapes import load_shape

    shape = load_shape("crystalcoder_7b", {"n_layer": 8, "tie_embeddings": False})
    run = replace(prof.run, batch=8, micro_batches=1, replicas=1, schedule="resident")
    pred = {
        "resident": simulate(shape, prof, replace(run, recompute=False)).tokens_s,
        "resident + activation checkpointing": simulate(shape, prof, replace(run, recompute=True)).tokens_s,
        "FSDP2 + CPU offload": fsdp(shape, prof, 1, 8, False, True, 2048, seqs=8).tokens_s,
    }
    return [(k, H100_MEASURED[k], pred[k]) for k in H100_MEASURED]
