"""Per-task costs (FLOPs and bytes -> seconds on a profile) and the event model of one training step.

Shape legend: B = sequences per micro-batch per replica, S = sequence length, T = B * S tokens,
d = d_model, F = ffn_hidden, V = vocab, P_b = parameters of one block.

What a block costs (per micro-batch, per replica):
  matmuls   QKV (T, d, 3d), attention out (T, d, d), c_fc and c_fc2 (T, d, F), c_proj (T, F, d);
            forward 2 T in out FLOPs each, backward twice that (dX and dW), at the profile's
            rate for a matmul of that size
  attention causal: forward 2 B S^2 d FLOPs (half of QK^T and PV), backward 2.5 x forward
            (flash-attention's convention: recomputed scores + 4 matmuls)
  elementwise  forward (21 d + 5 F) elements per token read+written (2 norms, RoPE, q/k/v
            relayout, 2 residual adds, SiLU x gate) x activation bytes / memory bandwidth;
            backward twice that plus the bias-gradient reductions (5 d + 2 F)
  op launches  20 forward, 45 backward, x device.op_overhead_us
Embedding: gather forward, scatter-add backward (2 d elements per token). Head: final norm,
the LM-head matmul (T, d, V) and the cross entropy over fp32 logits (11 V elements per token read+written:
scale, log-softmax, NLL forward; their backward, as torch's unfused F.cross_entropy does).
Recompute adds one block forward before each block backward.

Step model: see `simulate`. Time is one replica's; replicas meet only in the reduce lane.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from crystal.streaming.sim.engine import LANES, Engine, Task
from crystal.streaming.sim.profile import DTYPE_BYTES, ClusterProfile, DeviceProfile, RunDefaults
from crystal.streaming.sim.shapes import ModelShape

FWD_OPS, BWD_OPS = 20, 45
ADAM_DEVICE_BYTES = 28  # resident AdamW on a GPU: read w, g, m, v (fp32) and write w, m, v, per param


@dataclass
class Costs:
    """Seconds of every task kind for one (shape, profile, run)."""

    block_fwd: float
    block_bwd: float
    embed_fwd: float
    embed_bwd: float
    head: float  # head forward + backward of one micro-batch
    block_h2d: float
    block_d2h: float
    nonblock_h2d: float
    nonblock_d2h: float
    block_opt: float
    nonblock_opt: float
    block_accum: float
    nonblock_accum: float
    block_norm: float  # the gradient norm pass once a unit's gradient is final
    nonblock_norm: float
    block_reduce: float
    nonblock_reduce: float
    resident_opt: float  # the whole model's AdamW when resident


def collective_s(nbytes: float, replicas: int, prof: ClusterProfile) -> float:
    """All-reduce of nbytes across replicas: ring (2 (R-1)/R bytes per device over the slowest link) or
    SwarmX-style in-network tree (each device sends its bytes once; the switch tree reduces)."""
    if replicas <= 1:
        return 0.0
    n = prof.network
    within = replicas <= n.devices_per_node and n.intra_node_gbps > 0
    bw = (n.intra_node_gbps if within else (n.inter_node_gbps or n.intra_node_gbps)) * 1e9
    lat = n.latency_us * 1e-6
    if n.topology == "tree":
        return nbytes / bw + math.ceil(math.log2(replicas)) * lat
    return 2 * (replicas - 1) / replicas * nbytes / bw + 2 * (replicas - 1) * lat


@dataclass
class BlockTimes:
    fwd: float  # one block forward
    bwd: float  # one block backward (without recompute)
    embed_fwd: float
    embed_bwd: float
    head: float  # final norm + LM head + cross entropy, forward and backward


def block_times(shape: ModelShape, dev: DeviceProfile, batch: int, seq: int, tp: int = 1) -> BlockTimes:
    """Compute time of one micro-batch of `batch` sequences; tp > 1 splits every linear Megatron-style
    (QKV, c_fc, c_fc2 by output columns; attention out, c_proj by input rows), the heads, the FFN's
    elementwise work and the LM head's vocab across tp devices."""
    t = batch * seq
    d, f, v = shape.d_model, shape.ffn_hidden, shape.vocab_size
    ab = DTYPE_BYTES[dev.compute_dtype]
    mem = dev.memory_gbps * 1e9
    ovh = dev.op_overhead_us * 1e-6

    def mm(m: int, k: int, n: int) -> float:
        flops = 2.0 * m * k * n
        return flops / dev.matmul_rate(flops)

    def mm_bwd(m: int, k: int, n: int) -> float:
        """dX and dW of the forward matmul (m, k) x (k, n)."""
        flops = 2.0 * m * k * n
        return 2 * flops / dev.matmul_rate(flops, backward=True)

    split = [(i // tp if name in ("attn_out", "c_proj") else i, o if name in ("attn_out", "c_proj") else o // tp)
             for name, i, o in shape.block_linears()]  # fmt: skip
    lin_f = sum(mm(t, i, o) for i, o in split)
    lin_b = sum(mm_bwd(t, i, o) for i, o in split)
    attn_f = 2.0 * batch * seq * seq * d / tp
    elem = 21 * d + 5 * f / tp
    elem_f = t * elem * ab / mem
    mem_b = (dev.elementwise_bwd_gbps or dev.memory_gbps) * 1e9
    elem_b = t * (2 * elem + ((5 * d + 2 * f / tp) if shape.bias else 0)) * ab / mem_b
    emb = t * 2 * d * ab / mem
    sm = dev.softmax_rate(t * (v // tp) * 4)
    vt = v // tp
    return BlockTimes(
        fwd=lin_f + attn_f / (dev.attention_fwd_tflops * 1e12) + elem_f + FWD_OPS * ovh,
        bwd=lin_b + 2.5 * attn_f / (dev.attention_bwd_tflops * 1e12) + elem_b + BWD_OPS * ovh,
        embed_fwd=emb + ovh,
        embed_bwd=emb + 2 * ovh,
        head=mm(t, d, vt) + mm_bwd(t, d, vt) + t * 4 * d * ab / mem + t * 11 * vt * 4 / sm + 8 * ovh,
    )


def compute_costs(shape: ModelShape, prof: ClusterProfile, run: RunDefaults) -> Costs:
    dev, link, host = prof.device, prof.link, prof.host
    bt = block_times(shape, dev, run.batch, run.seq or shape.max_seq_len)
    mem = dev.memory_gbps * 1e9
    pb, pn = shape.block_params, shape.nonblock_params
    sb, gb = DTYPE_BYTES[run.stream_dtype], DTYPE_BYTES[run.grad_dtype]
    lat = link.latency_us * 1e-6
    opt = host.optimizer_mparams_per_s * 1e6
    acc = host.accumulate_gbps * 1e9
    norm = (host.norm_gbps or 2 * host.accumulate_gbps) * 1e9  # a read-only pass: half an accumulate by default
    if dev.shares_host_memory:
        resident_opt = shape.params / opt
    else:
        resident_opt = shape.params * ADAM_DEVICE_BYTES / mem
    return Costs(
        block_fwd=bt.fwd, block_bwd=bt.bwd, embed_fwd=bt.embed_fwd, embed_bwd=bt.embed_bwd, head=bt.head,
        block_h2d=pb * sb / (link.h2d_gbps * 1e9) + lat, block_d2h=pb * gb / (link.d2h_gbps * 1e9) + lat,
        nonblock_h2d=pn * sb / (link.h2d_gbps * 1e9) + lat, nonblock_d2h=pn * gb / (link.d2h_gbps * 1e9) + lat,
        block_opt=pb / opt, nonblock_opt=pn / opt,
        block_accum=pb * 4 / acc if acc else 0.0, nonblock_accum=pn * 4 / acc if acc else 0.0,
        block_norm=pb * 4 / norm if norm else 0.0, nonblock_norm=pn * 4 / norm if norm else 0.0,
        block_reduce=collective_s(pb * gb, run.replicas, prof),
        nonblock_reduce=collective_s(pn * gb, run.replicas, prof),
        resident_opt=resident_opt,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Memory per tier


def memory(shape: ModelShape, prof: ClusterProfile, run: RunDefaults) -> dict[str, float]:
    """Bytes per tier. Device: block weight/grad buffers, activations (block inputs kept per layer and
    micro-batch in flight, one block's internals during recompute, or every block's without it),
    embedding/head weights, grads and logits. Host: fp32 master + Adam m, v + fp32 grad accumulators."""
    dev = prof.device
    seq = run.seq or shape.max_seq_len
    t = run.batch * seq
    d, f, v, L = shape.d_model, shape.ffn_hidden, shape.vocab_size, shape.n_layer
    ab, sb, gb = DTYPE_BYTES[dev.compute_dtype], DTYPE_BYTES[run.stream_dtype], DTYPE_BYTES[run.grad_dtype]
    t_int = min(t, dev.internals_batch * seq) if dev.internals_batch else t
    in_flight = run.micro_batches if run.schedule == "layer_major" else 1
    internals_one = t_int * (7 * d + 4 * f) * ab  # ln1, qkv, attn out, ln2, residual, c_fc, c_fc2, silu, product
    out: dict[str, float] = {}
    if run.schedule == "resident":
        out["device: weights+grads+Adam (fp32)"] = shape.params * 16
        out["device: activations"] = L * t * d * ab + (1 if run.recompute else L) * internals_one
        out["device: logits"] = t_int * v * 4 * 2
        out["host: (nothing streamed)"] = 0
    else:
        # the executor keeps two block buffers whatever the prefetch depth (prefetch 0 still reuses the block
        # left in the other buffer at each forward/backward turn)
        out["device: block buffers (weights+grads)"] = 2 * shape.block_params * (sb + gb)
        out["device: block inputs kept"] = L * in_flight * t * d * ab
        out["device: block internals"] = (1 if run.recompute else L * in_flight) * internals_one
        out["device: embedding/head (weights+grads)"] = shape.nonblock_params * (sb + gb)
        out["device: logits"] = t_int * v * 4 * 2
        out["host: fp32 master + Adam m, v"] = shape.params * 12
        out["host: fp32 grad accumulators"] = shape.params * 4
    return out


def check_fit(mem: dict[str, float], prof: ClusterProfile) -> tuple[bool, str]:
    dev_b = sum(v for k, v in mem.items() if k.startswith("device"))
    host_b = sum(v for k, v in mem.items() if k.startswith("host"))
    dev_cap, host_cap = prof.device.memory_gb * 1e9, prof.host.memory_gb * 1e9
    if prof.device.shares_host_memory:
        if dev_b + host_b > host_cap:
            return False, f"needs {(dev_b + host_b) / 1e9:.1f} GB of the {host_cap / 1e9:.1f} GB host memory"
        return True, ""
    if dev_b > dev_cap:
        return False, f"device needs {dev_b / 1e9:.1f} GB, has {dev_cap / 1e9:.1f} GB"
    if host_b > host_cap:
        return False, f"host needs {host_b / 1e9:.1f} GB, has {host_cap / 1e9:.1f} GB"
    return True, ""


# ------------------------------------------------------------------------------------------------
# The event model


@dataclass
class _Slot:
    """One of the device's two block buffers: which block it holds (for which step's weights), the copy that
    filled it and the last compute that read it (a new copy into it must wait for that)."""

    block: int
    step: int
    h2d: int
    last_user: int | None = None


@dataclass
class _Builder:
    """Adds one step's tasks in the executor's program order (streaming/executor.py):

    - a block already in a slot is not copied again (the forward -> backward turn, and block 0 from one
      micro-batch's backward to the next one's forward); every update invalidates the slots;
    - with prefetch 1 the next block is copied into the other slot while this one computes;
    - each block's gradient goes D2H through run.staging_buffers pinned staging buffers (a copy waits until
      the host has consumed the one N copies before it), then is accumulated on the host (host.accumulate_gbps);
      its norms are taken once final;
    - the update needs the global norm, so it starts only after the step's last gradient has landed:
      embedding/head first, then blocks 0..L-1, each on the host optimizer lane; the next step's copy of a
      block waits for that block's update (overlapping the next forward on a GPU; on a CPU all is serial).
    """

    eng: Engine
    c: Costs
    run: RunDefaults
    prof: ClusterProfile
    shape: ModelShape
    slots: list = field(default_factory=lambda: [None, None])
    cur: int = 1
    sends: list = field(default_factory=list)  # host-side landing of each gradient copy, in order
    last_dev: int | None = None  # prefetch 0: every device-side task waits for the previous one
    opt_done: dict = field(default_factory=dict)  # block (or "embed") -> its update in the previous step

    def _serial(self, deps: list) -> list:
        return deps + [self.last_dev] if self.run.prefetch == 0 else deps

    def load(self, block: int, step: int) -> None:
        for k, slot in enumerate(self.slots):
            if slot is not None and slot.block == block and slot.step == step:
                self.cur = k  # still on the device: no copy
                return
        k = 1 - self.cur
        old = self.slots[k]
        deps = [self.opt_done.get(block), old.last_user if old is not None else None]
        tid = self.eng.add("h2d", f"w{block}", self.c.block_h2d, self._serial(deps), block, step)
        self.slots[k], self.cur = _Slot(block, step, tid), k
        self.last_dev = tid

    def compute(self, name: str, dur: float, block: int | None, step: int, deps=()) -> int:
        deps = list(deps)
        slot = self.slots[self.cur] if block is not None else None
        if slot is not None:
            deps.append(slot.h2d)
        tid = self.eng.add("compute", name, dur, self._serial(deps), block, step)
        if slot is not None:
            slot.last_user = tid
        self.last_dev = tid
        return tid

    def send(self, name: str, block: int | None, step: int, d2h_s: float, accum_s: float) -> int:
        """D2H of one gradient into a staging buffer, then its accumulation on the host."""
        n = self.run.staging_buffers
        deps = [self.last_dev, self.sends[-n] if len(self.sends) >= n else None]
        g = self.eng.add("d2h", f"g {name}", d2h_s, self._serial(deps), block, step)
        self.last_dev = g
        landed = self.eng.add("optimizer", f"accum {name}", accum_s, [g], block, step) if accum_s else g
        self.sends.append(landed)
        return landed

    def final(self, name: str, block: int | None, step: int, after: int, reduce_s: float, norm_s: float) -> int:
        """A unit's gradient is complete: reduce across replicas (async), then its norms (phase 1)."""
        if self.run.replicas > 1:
            after = self.eng.add("reduce", f"reduce {name}", reduce_s, [after], block, step)
        return self.eng.add("optimizer", f"norm {name}", norm_s, [after], block, step) if norm_s else after

    def step(self, s: int) -> None:
        run, c, L, M = self.run, self.c, self.shape.n_layer, self.run.micro_batches
        if run.schedule == "resident":
            return self._resident_step(s)
        emb_in = self.eng.add("h2d", "embedding/head", c.nonblock_h2d, self._serial([self.opt_done.get("embed")]),
                              None, s)  # fmt: skip
        self.last_dev = emb_in
        finals: list[int] = []
        norm_b, norm_n = c.block_norm, c.nonblock_norm
        # On a device that is the host the "D2H" is the gradient landing in the store's accumulator: the first
        # micro-batch's lands by copy (that task), later ones are added (the accumulate task) -- as the
        # executor does (store.accumulate); with copy engines the landed copy is then accumulated every time.
        first_free = self.prof.device.shares_host_memory
        if run.schedule == "batch_major":
            for m in range(M):
                self.compute(f"embed fwd mb{m}", c.embed_fwd, None, s, [emb_in])
                for i in range(L):
                    self.load(i, s)
                    self.compute(f"F{i} mb{m}", c.block_fwd, i, s)
                self.compute(f"head mb{m}", c.head, None, s)
                for i in reversed(range(L)):
                    self.load(i, s)
                    if run.recompute:
                        self.compute(f"R{i} mb{m}", c.block_fwd, i, s)
                    self.compute(f"B{i} mb{m}", c.block_bwd, i, s)
                    landed = self.send(str(i), i, s, c.block_d2h, 0.0 if first_free and m == 0 else c.block_accum)
                    if m == M - 1:
                        finals.append(self.final(str(i), i, s, landed, c.block_reduce, norm_b))
                self.compute(f"embed bwd mb{m}", c.embed_bwd, None, s)
                accum = 0.0 if first_free and m == 0 else c.nonblock_accum
                landed = self.send("embedding/head", None, s, c.nonblock_d2h, accum)
            finals.append(self.final("embedding/head", None, s, landed, c.nonblock_reduce, norm_n))
        else:  # layer_major: a block, once on the device, serves every micro-batch of the step
            for m in range(M):
                self.compute(f"embed fwd mb{m}", c.embed_fwd, None, s, [emb_in])
            for i in range(L):
                self.load(i, s)
                for m in range(M):
                    self.compute(f"F{i} mb{m}", c.block_fwd, i, s)
            for m in range(M):
                self.compute(f"head mb{m}", c.head, None, s)
            for i in reversed(range(L)):
                self.load(i, s)
                for m in range(M):
                    if run.recompute:
                        self.compute(f"R{i} mb{m}", c.block_fwd, i, s)
                    self.compute(f"B{i} mb{m}", c.block_bwd, i, s)
                # one transfer per layer per step: on a host device it lands by copy
                landed = self.send(str(i), i, s, c.block_d2h, 0.0 if first_free else c.block_accum)
                finals.append(self.final(str(i), i, s, landed, c.block_reduce, norm_b))
            for m in range(M):
                self.compute(f"embed bwd mb{m}", c.embed_bwd, None, s)
            landed = self.send("embedding/head", None, s, c.nonblock_d2h, 0.0 if first_free else c.nonblock_accum)
            finals.append(self.final("embedding/head", None, s, landed, c.nonblock_reduce, norm_n))
        # phase 2: one clip factor from every norm, then the updates in the order the next forward needs them
        self.opt_done["embed"] = self.eng.add("optimizer", "adam embedding/head", c.nonblock_opt, finals, None, s)
        for i in range(L):
            self.opt_done[i] = self.eng.add("optimizer", f"adam {i}", c.block_opt, [self.opt_done["embed"]], i, s)

    def _resident_step(self, s: int) -> None:
        """backend=resident for comparison: weights stay on the device, no copies, AdamW after the backward
        (on the device for a GPU, on the cores for a CPU), next step after the update; recompute = activation
        checkpointing."""
        run, c, L = self.run, self.c, self.shape.n_layer
        prev = self.opt_done.get("all")
        reduces = []
        for m in range(run.micro_batches):
            self.compute(f"embed fwd mb{m}", c.embed_fwd, None, s, [prev])
            for i in range(L):
                self.compute(f"F{i} mb{m}", c.block_fwd, None, s)
            self.compute(f"head mb{m}", c.head, None, s)
            for i in reversed(range(L)):
                if run.recompute:  # activation checkpointing
                    self.compute(f"R{i} mb{m}", c.block_fwd, None, s)
                b = self.compute(f"B{i} mb{m}", c.block_bwd, None, s)
                if run.replicas > 1 and m == run.micro_batches - 1:
                    reduces.append(self.eng.add("reduce", f"reduce {i}", c.block_reduce, [b], i, s))
            e = self.compute(f"embed bwd mb{m}", c.embed_bwd, None, s)
        if run.replicas > 1:
            reduces.append(self.eng.add("reduce", "reduce embed", c.nonblock_reduce, [e], None, s))
        lane = "optimizer" if self.prof.device.shares_host_memory else "compute"
        self.opt_done["all"] = self.eng.add(lane, "adam (all)", c.resident_opt, [e, *reduces], None, s)
        self.last_dev = self.opt_done["all"]


@dataclass
class Prediction:
    shape: ModelShape
    profile: ClusterProfile
    run: RunDefaults
    seq: int
    step_s: float
    tokens_per_step: int
    tokens_s: float
    mfu: float
    busy_s: dict[str, float]  # per lane, within the measured step
    bottleneck: str
    memory: dict[str, float]
    fits: bool
    fit_note: str
    events: list[dict]  # the measured step, start at 0 (trace contract)
    costs: Costs
    micro_note: str = ""  # what micro_batch_size chose (split_micro_batches)

    @property
    def exposed_s(self) -> float:
        """Step time not covered by compute (copies, optimizer, reduce waited for)."""
        return self.step_s - self.busy_s.get("compute", 0.0)


def split_micro_batches(shape: ModelShape, prof: ClusterProfile, run: RunDefaults) -> tuple[RunDefaults, str]:
    """Apply run.micro_batch_size (profile.py): the run with batch = the micro-batch and micro_batches = how
    many, and a line saying what was chosen ("" when nothing changed). auto keeps the largest divisor of the
    step's sequences per replica whose micro-batch fits; when not even one sequence fits it keeps the run as
    given (check_fit then refuses it, naming what does not fit)."""
    mbs, total = str(run.micro_batch_size), run.batch * run.micro_batches
    if mbs == "none":
        return run, ""
    if mbs != "auto":
        n = int(mbs)
        return replace(run, batch=n, micro_batches=total // n), f"micro_batch_size={n}: {total // n} x {n} sequences"
    for n in sorted((k for k in range(1, total + 1) if total % k == 0), reverse=True):
        cand = replace(run, batch=n, micro_batches=total // n)
        if check_fit(memory(shape, prof, cand), prof)[0]:
            if n == run.batch:
                return cand, f"micro_batch_size=auto: {total // n} x {n} sequences as given (fits)"
            whole = check_fit(memory(shape, prof, replace(run, batch=total, micro_batches=1)), prof)[1]
            return cand, (f"micro_batch_size=auto: {total} sequences per step split into {total // n} micro-batches "
                          f"of {n} ({total} at once: {whole})")  # fmt: skip
    return replace(run, batch=1, micro_batches=total), "micro_batch_size=auto: not even one sequence fits"


def simulate(shape: ModelShape, prof: ClusterProfile, run: RunDefaults | None = None, steps: int = 3,
             strict: bool = False) -> Prediction:  # fmt: skip
    """Simulate `steps` training steps of the streaming executor; the last one is the steady state reported.

    strict=True raises ValueError when the model does not fit (otherwise it is flagged in the result)."""
    run = run or prof.run
    run.validate(f"cluster {prof.name} run")
    if run.replicas > prof.network.devices:
        raise ValueError(f"replicas={run.replicas} exceeds the {prof.network.devices} devices of cluster {prof.name}")
    run, micro_note = split_micro_batches(shape, prof, run)
    seq = run.seq or shape.max_seq_len
    mem = memory(shape, prof, run)
    fits, note = check_fit(mem, prof)
    if not fits and micro_note.endswith("not even one sequence fits"):
        note = f"one sequence alone: {note}"
    if strict and not fits:
        raise ValueError(f"model {shape.name} does not fit on cluster {prof.name}: {note}")
    c = compute_costs(shape, prof, run)
    shared = None
    lk = prof.link
    if lk.duplex_gbps < lk.h2d_gbps + lk.d2h_gbps:
        shared = ("h2d", "d2h", lk.duplex_gbps / (lk.h2d_gbps + lk.d2h_gbps))
    eng = Engine(serial=not (lk.overlap and prof.host.overlap), shared=shared)
    if not lk.overlap and prof.host.overlap or lk.overlap and not prof.host.overlap:
        raise ValueError(f"cluster {prof.name}: link.overlap and host.overlap must agree (both true: GPU/CS-2; "
                         "both false: CPU, everything on the same cores)")  # fmt: skip
    b = _Builder(eng, c, run, prof, shape)
    for s in range(steps):
        b.step(s)
    tasks = eng.run()
    ends = [max(t.end_s for t in tasks if t.step == s) for s in range(steps)]
    last = steps - 1
    t0 = ends[last - 1] if steps > 1 else 0.0
    step_s = ends[last] - t0
    busy = dict.fromkeys(LANES, 0.0)
    for t in tasks:
        if t.step == last:
            busy[t.lane] = busy.get(t.lane, 0.0) + (t.end_s - t.start_s)
    busy = {k: v for k, v in busy.items() if v > 0 or k == "compute"}
    tokens = run.batch * seq * run.micro_batches * run.replicas
    tokens_s = tokens / step_s
    mfu = tokens_s * shape.flops_per_token(seq) / (run.replicas * prof.device.peak_tflops * 1e12)
    return Prediction(
        shape=shape, profile=prof, run=run, seq=seq, step_s=step_s, tokens_per_step=tokens, tokens_s=tokens_s,
        mfu=mfu, busy_s=busy, bottleneck=max(busy, key=busy.get), memory=mem, fits=fits, fit_note=note,
        events=events_of(tasks, last, min([t0] + [t.start_s for t in tasks if t.step == last])), costs=c,
        micro_note=micro_note,
    )  # fmt: skip


def events_of(tasks: list[Task], step: int, t0: float) -> list[dict]:
    """The trace contract shared with the executor: {lane, name, start_s, dur_s, block, step}."""
    return [
        {"lane": t.lane, "name": t.name, "start_s": t.start_s - t0, "dur_s": t.end_s - t.start_s,
         "block": t.block, "step": t.step}
        for t in tasks if t.step == step
    ]  # fmt: skip


def with_run(prof: ClusterProfile, **changes) -> RunDefaults:
    return replace(prof.run, **changes)
