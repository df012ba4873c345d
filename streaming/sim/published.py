"""Published, measured Cerebras training throughputs, and the CS-2 / CS-3 profiles calibrated on them.

Every row is a training log someone published (samples/s as logged, at a known model, batch, sequence
length, number of systems and software release), with its source at a commit. The simulator is calibrated
on ONE row per device kind (the matmul + attention efficiency is the only figure fitted) and must predict
every other row within 25% (bench/test_sim_published.py). docs/simulator.md prints the table.

    python -m crystal.streaming.sim published        the table: published, predicted, ratio, source

Model shapes are Cerebras Model Zoo's configs for those models. GPT-J's MLP is GELU with 2 matmuls of
d x 16384; the simulator's block is SwiGLU with 3, so GPT-J is given ffn_hidden 10923 (= 2 x 16384 / 3):
the same matmul FLOPs and weight bytes per block, which is what a CS-2's step time depends on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from crystal.streaming.sim.profile import ClusterProfile, load_profile
from crystal.streaming.sim.shapes import ModelShape
from crystal.streaming.sim.timing import simulate

ALCF_GUIDES = "https://github.com/argonne-lcf/user-guides/blob/{}/docs/ai-testbed/cerebras/example-programs.md"
ALCF_TRAINING = "https://github.com/argonne-lcf/ai-science-training-series/blob/{}/07_AITestbeds/Cerebras/gpt-j.md"
MODELZOO = "https://github.com/Cerebras/modelzoo/blob/{}/src/cerebras/modelzoo/models/nlp/{}"

# Cerebras Model Zoo configs (shapes): params_gptj_6B.yaml, params_llama_7b.yaml, params_llama2_7b.yaml
GPTJ_6B = ModelShape("gptj_6b", 28, 4096, 16, 10923, 50257, 2048, bias=False, tie_embeddings=False)
LLAMA_7B = ModelShape("llama_7b", 32, 4096, 32, 11008, 32000, 2048, bias=False, tie_embeddings=False, norm="rmsnorm")
LLAMA2_7B = ModelShape("llama2_7b", 32, 4096, 32, 11008, 32000, 4096, bias=False, tie_embeddings=False,
                       norm="rmsnorm")  # fmt: skip


@dataclass(frozen=True)
class Published:
    key: str
    device: str  # cs2 | cs3: the profile it is predicted with
    shape: ModelShape
    batch: int  # sequences per step, all systems together
    seq: int
    systems: int
    release: str  # Cerebras software release, as the page gives it
    samples_s: float  # as published (steady-state Rate in the log)
    date: str  # of the log
    source: str
    shape_source: str
    calibrate: bool = False  # the one row per device kind the profile's efficiency is fitted on

    @property
    def tokens_s(self) -> float:
        return self.samples_s * self.seq


ROWS = [
    Published("llama-7b 1xCS-2", "cs2", LLAMA_7B, 99, 2048, 1, "R_2.1.1 (page's modelzoo checkout)", 20.44,
              "2024-03-21", ALCF_GUIDES.format("4bba8133c587025007af681ac16c2a45fad089b0") + " (Llama-7B log: "
              "'Effective batch size is 99', 'Preparing to execute using 1 CSX', Rate=20.44 samples/sec from step 500)",
              MODELZOO.format("244523ac819393945c812bdbc0dc7d07d3d344b9", "llama/configs/params_llama_7b.yaml"),
              calibrate=True),
    Published("gpt-j 6B 1xCS-2", "cs2", GPTJ_6B, 66, 2048, 1, "R_2.3.0 (page's modelzoo checkout)", 19.80,
              "2023-11-10", ALCF_TRAINING.format("866e261310447fec3a43c8fd83509759ee02eaa6") + " (GPT-J log: "
              "Rate=19.80 samples/sec at step 200, 13200 samples in 200 steps = batch 66, default num_csx 1)",
              MODELZOO.format("608d5a3aa87986e7d467ae2423cfa0732c8b4967", "gptj/configs/params_gptj_6B.yaml")),
    Published("gpt-j 6B 2xCS-2", "cs2", GPTJ_6B, 120, 2048, 2, "R_2.1.1 (page's modelzoo checkout)", 43.70,
              "2023-11-29", ALCF_GUIDES.format("4bba8133c587025007af681ac16c2a45fad089b0") + " (GPT-J: 'uses 2 "
              "CS2s', --num_csx=2, Rate=43.70 samples/sec, 24000 samples in 200 steps = batch 120)",
              MODELZOO.format("608d5a3aa87986e7d467ae2423cfa0732c8b4967", "gptj/configs/params_gptj_6B.yaml")),
    Published("gpt-j 6B 1xCS-3", "cs3", GPTJ_6B, 120, 2048, 1, "R_2.5.0 (page's modelzoo checkout)", 44.75,
              "2025-10-10", ALCF_GUIDES.format("0a3c674778c6651556d36aabcbc2fa403329feef") + " (GPT-J: 'uses 1 "
              "CS3', GlobalRate=44.75 samples/sec at step 200, 24000 samples in 200 steps = batch 120)",
              MODELZOO.format("608d5a3aa87986e7d467ae2423cfa0732c8b4967", "gptj/configs/params_gptj_6B.yaml"),
              calibrate=True),
    Published("llama2-7b 1xCS-3", "cs3", LLAMA2_7B, 1024, 4096, 1, "R_2.5.0 (page's modelzoo checkout)", 31.98,
              "2025-10-13", ALCF_GUIDES.format("0a3c674778c6651556d36aabcbc2fa403329feef") + " (Llama2-7B: "
              "'Preparing to execute using 1 CSX', Rate=31.98 samples/sec, 204800 samples in 200 steps = batch "
              "1024; seq 4096 is the Model Zoo config's, ALCF's own copy of it is not public)",
              MODELZOO.format("244523ac819393945c812bdbc0dc7d07d3d344b9", "llama/configs/params_llama2_7b.yaml")),
]  # fmt: skip


def with_efficiency(prof: ClusterProfile, eff: float) -> ClusterProfile:
    """The profile with matmul and attention at `eff` of its peak at every size."""
    rate = eff * prof.device.peak_tflops
    dev = replace(prof.device, matmul_tflops=[[1.0, rate]], matmul_bwd_tflops=[], attention_fwd_tflops=rate,
                  attention_bwd_tflops=rate)  # fmt: skip
    return replace(prof, device=dev)


def predict(row: Published, prof: ClusterProfile) -> float:
    """Predicted samples/s of the row's run on `prof` (micro-batching as the profile says: auto on CS-2/3)."""
    run = replace(prof.run, batch=row.batch // row.systems, micro_batches=1, replicas=row.systems, seq=row.seq)
    if run.replicas > prof.network.devices:  # several systems: SwarmX as cg1.yaml models it (tree, at I/O rate)
        net = replace(prof.network, devices=run.replicas, topology="tree", inter_node_gbps=prof.link.h2d_gbps)
        prof = replace(prof, network=net)
    return simulate(row.shape, prof, run).tokens_s / row.seq


def efficiency(prof: ClusterProfile) -> float:
    """The profile's matmul efficiency (fraction of peak), as with_efficiency sets it."""
    return prof.device.matmul_tflops[0][1] / prof.device.peak_tflops


def fit_efficiency(row: Published, prof: ClusterProfile, lo: float = 0.01, hi: float = 1.0) -> float:
    """The efficiency at which the simulator reproduces the row's published samples/s (bisection: throughput
    only grows with the compute rate)."""
    if predict(row, with_efficiency(prof, hi)) < row.samples_s:
        raise ValueError(f"{row.key}: even at 100% of peak the simulator predicts less than published")
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if predict(row, with_efficiency(prof, mid)) < row.samples_s else (lo, mid)
    return (lo + hi) / 2


def table(profiles: dict[str, ClusterProfile] | None = None) -> list[dict]:
    """One dict per row: published and predicted samples/s, their ratio, calibration row or not."""
    profiles = profiles or {k: load_profile(k) for k in {r.device for r in ROWS}}
    out = []
    for r in ROWS:
        pred = predict(r, profiles[r.device])
        out.append({"row": r, "published": r.samples_s, "predicted": pred, "ratio": pred / r.samples_s})
    return out
