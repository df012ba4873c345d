"""Hardware profiles (conf/cluster/<name>.yaml) as typed dataclasses, validated on load.

Units in the YAML are the ones datasheets use (TFLOP/s, GB/s, GB, us); the dataclasses keep them
and expose SI helpers. A profile has five sections:

  device   one accelerator (a CS-2, a GPU, this CPU): compute rates, memory, memory bandwidth
  link     its host link (PCIe, or CS-2 I/O to MemoryX/SwarmX): each way and both ways at once
  host     where master weights and Adam state live (host RAM, MemoryX): capacity, optimizer rate
  network  how replicas reduce gradients: topology, per-device bandwidths, devices per node
  run      default workload and executor schedule (every key overridable on the command line)

Every bad value raises one ValueError line naming the file and key.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from crystal.streaming.sim.shapes import CONF_DIR
from omegaconf import OmegaConf

CLUSTER_DIR = CONF_DIR / "cluster"
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
SCHEDULES = ("batch_major", "layer_major", "resident")


SOFTMAX_SMALL_BYTES = 1024 * 4096 * 4  # the logits calibrate.py measures softmax_gbps on
SOFTMAX_BIG_BYTES = 1024 * 32032 * 4  # ... and softmax_big_gbps on


@dataclass
class DeviceProfile:
    name: str
    peak_tflops: float  # dense peak in compute_dtype (the MFU denominator)
    # [[GFLOP of one matmul, achieved TFLOP/s], ...]: rate by matmul size, log-interpolated, flat beyond the ends
    matmul_tflops: list[list[float]]
    attention_fwd_tflops: float  # causal attention forward, on causal (halved) FLOPs
    attention_bwd_tflops: float  # causal attention backward, on 2.5 x forward FLOPs
    memory_gbps: float  # read+write bytes/s of elementwise ops (norms, activations, residuals)
    memory_gb: float  # memory that holds weight buffers and activations
    # read+write bytes/s of the cross entropy over fp32 logits (exp-heavy, slower than plain elementwise
    # on a CPU); 0 = memory_gbps
    softmax_gbps: float = 0.0
    # the same over logits far beyond the caches (calibrate: (1024, 32032), 131 MB; CPU: ~2x slower than
    # (1024, 4096)); log-interpolated in logits bytes between the two sizes; 0 = softmax_gbps at every size
    softmax_big_gbps: float = 0.0
    compute_dtype: str = "bf16"  # activations and streamed compute
    op_overhead_us: float = 0.0  # fixed cost per op launch / dispatch
    shares_host_memory: bool = False  # the device memory is the host's (CPU): fit checks add both tiers
    internals_batch: int = 0  # sequences whose block internals live at once; 0 = the whole micro-batch
    elementwise_bwd_gbps: float = 0.0  # read+write bytes/s of the elementwise backward; 0 = memory_gbps
    # backward (dX + dW) rate by the forward matmul's GFLOP, [[GFLOP, TFLOP/s], ...]; [] = matmul_tflops
    matmul_bwd_tflops: list[list[float]] = field(default_factory=list)

    def softmax_rate(self, logits_bytes: float) -> float:
        """Achieved read+write bytes/s of the cross entropy over `logits_bytes` of fp32 logits."""
        small = (self.softmax_gbps or self.memory_gbps) * 1e9
        if not self.softmax_big_gbps:
            return small
        lo, hi = math.log(SOFTMAX_SMALL_BYTES), math.log(SOFTMAX_BIG_BYTES)
        w = min(1.0, max(0.0, (math.log(max(logits_bytes, 1.0)) - lo) / (hi - lo)))
        return small * (1 - w) + self.softmax_big_gbps * 1e9 * w

    def matmul_rate(self, flops: float, backward: bool = False) -> float:
        """Achieved FLOP/s for one matmul of `flops` FLOPs (backward: one of the two backward matmuls of a
        forward matmul of that size)."""
        pts = self.matmul_bwd_tflops if backward and self.matmul_bwd_tflops else self.matmul_tflops
        xs = [math.log(p[0] * 1e9) for p in pts]
        x = math.log(max(flops, 1.0))
        i = bisect.bisect_left(xs, x)
        if i == 0:
            return pts[0][1] * 1e12
        if i == len(xs):
            return pts[-1][1] * 1e12
        w = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
        return (pts[i - 1][1] * (1 - w) + pts[i][1] * w) * 1e12


@dataclass
class LinkProfile:
    h2d_gbps: float  # host -> device (weights in)
    d2h_gbps: float  # device -> host (gradients out)
    duplex_gbps: float  # total when both directions run at once
    overlap: bool = True  # copies run beside compute (copy engines / CS-2 I/O); False on CPU
    latency_us: float = 0.0  # per copy


@dataclass
class HostProfile:
    memory_gb: float  # host RAM / MemoryX capacity for fp32 master, Adam m, v, grad accumulators
    optimizer_mparams_per_s: float  # AdamW update rate, million parameters per second
    accumulate_gbps: float = 0.0  # fp32 grad-accumulator bytes updated per second; 0 = not measured, free
    norm_gbps: float = 0.0  # fp32 gradient bytes read per second by the norm pass; 0 = 2 x accumulate_gbps
    overlap: bool = True  # optimizer runs beside the device (host threads / MemoryX); False on CPU


@dataclass
class NetworkProfile:
    devices: int = 1  # devices in the cluster (upper bound for replicas)
    devices_per_node: int = 1
    topology: str = "ring"  # ring (NCCL/gloo all-reduce) | tree (SwarmX in-network reduce)
    intra_node_gbps: float = 0.0  # per device, each way (NVLink)
    inter_node_gbps: float = 0.0  # per device, each way (InfiniBand / SwarmX link)
    latency_us: float = 0.0  # per collective hop


@dataclass
class RunDefaults:
    batch: int = 1  # sequences per micro-batch per replica
    seq: int = 0  # 0 = the model's max_seq_len
    micro_batches: int = 1  # gradient-accumulation micro-batches per step
    replicas: int = 1  # data-parallel replicas (CS-2s / GPUs)
    schedule: str = "batch_major"  # batch_major | layer_major | resident (the plain model, for comparison)
    prefetch: int = 1  # 0 = copy then compute (serial); 1 = double buffering
    recompute: bool = True  # block internals recomputed in backward
    stream_dtype: str = "bf16"  # bytes per streamed weight
    grad_dtype: str = "bf16"  # bytes per gradient sent back
    staging_buffers: int = 4  # pinned D2H buffers; a gradient copy waits for the landing of the one N before it
    # How the step's batch * micro_batches sequences per replica are cut into micro-batches, as the Cerebras
    # stack's micro_batch_size setting: none = as given (refused when it does not fit); <n> = micro-batches of
    # n sequences (n divides the step's sequences); auto = the largest divisor of them that fits the device
    # (Cerebras' compiler searches the divisors with its performance model; here fewer, larger micro-batches
    # are never slower, so the largest fitting one is the best), refused only if one sequence does not fit
    micro_batch_size: str = "none"

    def validate(self, where: str) -> None:
        for key in ("batch", "micro_batches", "replicas", "staging_buffers"):
            if getattr(self, key) < 1:
                raise ValueError(f"{where}: {key}={getattr(self, key)} must be >= 1")
        if self.seq < 0:
            raise ValueError(f"{where}: seq={self.seq} must be >= 1 (0 = the model's max_seq_len)")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"{where}: schedule={self.schedule!r}: use one of {', '.join(SCHEDULES)}")
        if self.prefetch not in (0, 1):
            raise ValueError(
                f"{where}: prefetch={self.prefetch}: use 0 (copy then compute) or 1 (double buffering; "
                "the device never holds more than 2 block buffers)"
            )
        for key in ("stream_dtype", "grad_dtype"):
            if getattr(self, key) not in ("fp32", "bf16"):
                raise ValueError(f"{where}: {key}={getattr(self, key)!r}: use fp32 or bf16")
        mbs = str(self.micro_batch_size)
        if mbs not in ("auto", "none") and not (mbs.isdigit() and int(mbs) >= 1):
            raise ValueError(f"{where}: micro_batch_size={mbs!r}: use auto, none or a number of sequences >= 1")
        if mbs.isdigit() and (self.batch * self.micro_batches) % int(mbs):
            total = self.batch * self.micro_batches
            raise ValueError(f"{where}: micro_batch_size={mbs} does not divide the step's batch x micro_batches = "
                             f"{total} sequences per replica; use a divisor or auto")  # fmt: skip


@dataclass
class ClusterProfile:
    name: str
    description: str
    device: DeviceProfile
    link: LinkProfile
    host: HostProfile
    network: NetworkProfile = field(default_factory=NetworkProfile)
    run: RunDefaults = field(default_factory=RunDefaults)
    source: str = ""  # the file it came from

    def validate(self) -> None:
        where = self.source or f"cluster {self.name}"
        d, lk, h, n = self.device, self.link, self.host, self.network
        positive = {
            "device.peak_tflops": d.peak_tflops, "device.attention_fwd_tflops": d.attention_fwd_tflops,
            "device.attention_bwd_tflops": d.attention_bwd_tflops, "device.memory_gbps": d.memory_gbps,
            "device.memory_gb": d.memory_gb, "link.h2d_gbps": lk.h2d_gbps, "link.d2h_gbps": lk.d2h_gbps,
            "link.duplex_gbps": lk.duplex_gbps, "host.memory_gb": h.memory_gb,
            "host.optimizer_mparams_per_s": h.optimizer_mparams_per_s, "network.devices": n.devices,
            "network.devices_per_node": n.devices_per_node,
        }  # fmt: skip
        for key, value in positive.items():
            if not value > 0:
                raise ValueError(f"{where}: {key}={value} must be > 0")
        nonneg = {
            "device.op_overhead_us": d.op_overhead_us, "device.softmax_gbps": d.softmax_gbps,
            "device.softmax_big_gbps": d.softmax_big_gbps, "device.elementwise_bwd_gbps": d.elementwise_bwd_gbps,
            "device.internals_batch": d.internals_batch,
            "link.latency_us": lk.latency_us, "host.accumulate_gbps": h.accumulate_gbps, "host.norm_gbps": h.norm_gbps,
            "network.intra_node_gbps": n.intra_node_gbps, "network.inter_node_gbps": n.inter_node_gbps,
            "network.latency_us": n.latency_us,
        }  # fmt: skip
        for key, value in nonneg.items():
            if value < 0:
                raise ValueError(f"{where}: {key}={value} must be >= 0")
        if not d.matmul_tflops or any(len(p) != 2 or p[0] <= 0 or p[1] <= 0 for p in d.matmul_tflops):
            raise ValueError(f"{where}: device.matmul_tflops must be [[GFLOP, TFLOP/s], ...] with positive values")
        if [p[0] for p in d.matmul_tflops] != sorted(p[0] for p in d.matmul_tflops):
            raise ValueError(f"{where}: device.matmul_tflops must be sorted by GFLOP (first column)")
        bwd = d.matmul_bwd_tflops
        if any(len(p) != 2 or p[0] <= 0 or p[1] <= 0 for p in bwd) or [p[0] for p in bwd] != sorted(p[0] for p in bwd):
            raise ValueError(f"{where}: device.matmul_bwd_tflops must be [] or sorted [[GFLOP, TFLOP/s], ...] > 0")
        if d.compute_dtype not in DTYPE_BYTES:
            raise ValueError(f"{where}: device.compute_dtype={d.compute_dtype!r}: use one of {', '.join(DTYPE_BYTES)}")
        if lk.duplex_gbps > lk.h2d_gbps + lk.d2h_gbps:
            raise ValueError(f"{where}: link.duplex_gbps={lk.duplex_gbps} exceeds h2d_gbps + d2h_gbps")
        if n.topology not in ("ring", "tree"):
            raise ValueError(f"{where}: network.topology={n.topology!r}: use ring or tree")
        self.run.validate(where)
        if self.run.replicas > n.devices:
            raise ValueError(f"{where}: run.replicas={self.run.replicas} exceeds network.devices={n.devices}")
        if self.run.replicas > 1 and n.inter_node_gbps <= 0 and n.intra_node_gbps <= 0:
            raise ValueError(f"{where}: replicas > 1 needs network.inter_node_gbps or intra_node_gbps > 0")


SECTIONS = {"device": DeviceProfile, "link": LinkProfile, "host": HostProfile, "network": NetworkProfile,
            "run": RunDefaults}  # fmt: skip


def _build(cls, data: Any, where: str, section: str):
    if not isinstance(data, dict):
        raise ValueError(f"{where}: {section} must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in known:
            raise ValueError(f"{where}: unknown key {section}.{key}; known: {', '.join(known)}")
    kwargs = {}
    for name, f in known.items():
        if name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ValueError(f"{where}: missing key {section}.{name}")
            continue
        value = data[name]
        if f.type in ("float", float) and isinstance(value, int | float) and not isinstance(value, bool):
            value = float(value)
        elif f.type in ("int", int) and not (isinstance(value, int) and not isinstance(value, bool)):
            raise ValueError(f"{where}: {section}.{name}={value!r} must be an integer")
        elif f.type in ("bool", bool) and not isinstance(value, bool):
            raise ValueError(f"{where}: {section}.{name}={value!r} must be true or false")
        elif f.type in ("float", float) and not isinstance(value, float):
            raise ValueError(f"{where}: {section}.{name}={value!r} must be a number")
        kwargs[name] = value
    return cls(**kwargs)


def profile_from_dict(data: dict, where: str) -> ClusterProfile:
    allowed = {"name", "description", *SECTIONS}
    for key in data:
        if key not in allowed:
            raise ValueError(f"{where}: unknown top-level key {key!r}; known: {', '.join(sorted(allowed))}")
    for key in ("name", "device", "link", "host"):
        if key not in data:
            raise ValueError(f"{where}: missing key {key}")
    parts = {s: _build(cls, data.get(s, {}), where, s) for s, cls in SECTIONS.items()}
    prof = ClusterProfile(name=str(data["name"]), description=str(data.get("description", "")), source=where, **parts)
    prof.validate()
    return prof


def available_clusters() -> list[str]:
    return sorted(p.stem for p in CLUSTER_DIR.glob("*.yaml"))


def load_profile(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> ClusterProfile:
    """conf/cluster/<name>.yaml (or a path) -> validated ClusterProfile; overrides are {"link.h2d_gbps": 80}."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = CLUSTER_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise ValueError(f"cluster={name_or_path}: no {path}; known clusters: {', '.join(available_clusters())}")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:  # a YAML syntax error: name the file
        raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must be a mapping of sections (device, link, host, network, run)")
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if section not in SECTIONS or not key:
            raise ValueError(f"cluster.{dotted}: use cluster.<section>.<key> with section one of {', '.join(SECTIONS)}")
        data.setdefault(section, {})[key] = value
    try:
        rel = path.relative_to(CONF_DIR.parent)
    except ValueError:
        rel = path
    return profile_from_dict(data, str(rel))
