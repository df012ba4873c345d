"""Typed configuration schemas and the model registry.

Every knob is a dataclass field. Hydra composes YAML from conf/ on top of these
schemas (registered with the ConfigStore below), so a typo in a key fails at
composition time with Hydra's message instead of deep inside training.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

# ----------------------------------------------------------------------------------------------
# Model


@dataclass
class ModelConfig:
    """One decoder-only transformer family: CrystalCoder, with switches that also give Amber (LLaMA-7B).

    muP (CrystalCoder): the proxy model was tuned at width ``mup_base_width`` (256); a model of width
    d_model gets width_scale = mup_base_width / d_model (0.0625 for the 7B), which scales hidden init
    std (sqrt), hidden learning rate (linear) and output logits (linear, times ``mup_output_alpha``).
    """

    name: str = "tiny"
    vocab_size: int = 4096
    n_layer: int = 4
    d_model: int = 256
    n_head: int = 2
    ffn_hidden: int = 682
    max_seq_len: int = 256
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    bias: bool = True  # biases on every linear layer (the LM head never has one)
    rope_theta: float = 10000.0
    rotary_pct: float = 0.25  # fraction of each head's dims that get rotary
    rope_interleaved: bool = True  # GPT-J pairs (x0,x1),(x2,x3)...; False = rotate-half (NeoX / LLaMA)
    tie_embeddings: bool = True
    mup: bool = True
    mup_base_width: int = 256
    mup_embed_scale: float = 14.6
    mup_output_alpha: float = 2.22
    attn_scale: str = "inv_head_dim"  # inv_head_dim (muP) | inv_sqrt_head_dim (standard)
    init: str = "trunc_normal"  # trunc_normal (Cerebras run, +-2 std) | normal
    init_std: float = 0.073  # embedding std; hidden and residual-out stds derive from it
    ops: str = "torch"  # torch | triton: which implementation of attention/rope/mlp/norm/loss

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"model.norm={self.norm!r}: use 'layernorm' or 'rmsnorm'")
        if self.attn_scale not in ("inv_head_dim", "inv_sqrt_head_dim"):
            raise ValueError(f"model.attn_scale={self.attn_scale!r}: use 'inv_head_dim' or 'inv_sqrt_head_dim'")
        if self.init not in ("trunc_normal", "normal"):
            raise ValueError(f"model.init={self.init!r}: use 'trunc_normal' or 'normal'")
        if self.ops not in ("torch", "triton"):
            raise ValueError(f"model.ops={self.ops!r}: use 'torch' or 'triton'")
        if not 0.0 < self.rotary_pct <= 1.0 or self.rotary_dims % 2:
            raise ValueError(
                f"model.rotary_pct={self.rotary_pct} gives {self.rotary_dims} rotary dims; need an even number > 0"
            )

    # Derived quantities (properties, so they never go stale in a serialised config).
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def rotary_dims(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @property
    def width_scale(self) -> float:
        return self.mup_base_width / self.d_model if self.mup else 1.0

    @property
    def embed_scale(self) -> float:
        return self.mup_embed_scale if self.mup else 1.0

    @property
    def logits_scale(self) -> float:
        return self.mup_output_alpha * self.width_scale if self.mup else 1.0

    @property
    def softmax_scale(self) -> float:
        return 1.0 / self.head_dim if self.attn_scale == "inv_head_dim" else 1.0 / math.sqrt(self.head_dim)

    @property
    def hidden_init_std(self) -> float:
        return self.init_std * math.sqrt(self.width_scale)

    @property
    def out_init_std(self) -> float:
        # Residual output projections: scaled down by depth so the residual stream does not grow with L.
        return self.hidden_init_std / math.sqrt(2 * self.n_layer)

    def num_params(self, include_embedding: bool = True) -> int:
        d, f, b = self.d_model, self.ffn_hidden, int(self.bias)
        norm_p = d * (2 if self.norm == "layernorm" else 1)
        per_layer = (d * 3 * d + b * 3 * d) + (d * d + b * d) + 2 * (d * f + b * f) + (f * d + b * d) + 2 * norm_p
        n = self.n_layer * per_layer + norm_p
        if include_embedding:
            n += self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6N (N includes the LM head matmul) + 12*L*d*S for attention."""
        s = seq_len or self.max_seq_len
        n = self.num_params(include_embedding=False) + self.vocab_size * self.d_model
        return 6.0 * n + 12.0 * self.n_layer * self.d_model * s

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in MODEL_REGISTRY:
            known = ", ".join(sorted(MODEL_REGISTRY))
            raise ValueError(f"unknown model {name!r}; known models: {known}")
        return cls(**{**MODEL_REGISTRY[name], "name": name, **overrides})


def _crystal(**shape: Any) -> dict[str, Any]:
    """A CrystalCoder family member: the 7B's rules (head dim 128, 25% interleaved rotary, biases, muP)."""
    d = shape["d_model"]
    return {"n_head": d // 128, "ffn_hidden": int(8 * d / 3), **shape}


MODEL_REGISTRY: dict[str, dict[str, Any]] = {
    # CPU default: trains in minutes on 2 cores. Width 256 is CrystalCoder's muP base width, so width_scale = 1.
    "tiny": _crystal(vocab_size=4096, n_layer=4, d_model=256, max_seq_len=256),
    # A few tens of millions of parameters: the CPU streaming and checkpoint benchmarks' model.
    "small": _crystal(vocab_size=32032, n_layer=8, d_model=512, max_seq_len=1024),
    "1b": _crystal(vocab_size=32032, n_layer=24, d_model=2048, max_seq_len=2048),
    # LLM360/crystalcoder-train finetune/Megatron-LM/CrystalCoder config (same as HF LLM360/Crystal):
    # 32 layers, width 4096, 32 heads, SwiGLU 10922, vocab 32032, rotary 25% GPT-J style, theta 10000,
    # muP embedding scale 14.6, output alpha 2.22, width scale 0.0625, attention scores / head_dim.
    "crystalcoder_7b": _crystal(vocab_size=32032, n_layer=32, d_model=4096, max_seq_len=2048),
    # LLM360/Amber (HF LLM360/Amber config.json): LLaMA-7B shape, no muP, untied, no biases, RMSNorm.
    "amber_7b": dict(
        vocab_size=32000, n_layer=32, d_model=4096, n_head=32, ffn_hidden=11008, max_seq_len=2048,
        norm="rmsnorm", norm_eps=1e-6, bias=False, rotary_pct=1.0, rope_interleaved=False,
        tie_embeddings=False, mup=False, attn_scale="inv_sqrt_head_dim", init="normal", init_std=0.02,
    ),
}  # fmt: skip

# ----------------------------------------------------------------------------------------------
# Data, optimisation, training, backend


@dataclass
class TokenizerConfig:
    path: str | None = None  # an existing sentencepiece .model (e.g. LLaMA's); None = train one
    vocab_size: int = 4000  # sentencepiece pieces; model.vocab_size must hold these + 22 added tokens
    sample_mb: float = 6.0  # MB of text sampled (evenly over sources) to train on
    seed: int = 1

    def __post_init__(self) -> None:
        if self.vocab_size < 300:  # 256 byte-fallback pieces + unk/bos/eos + some merges
            raise ValueError(f"data.tokenizer.vocab_size={self.vocab_size} is too small; use at least 300")
        if self.sample_mb <= 0:
            raise ValueError(f"data.tokenizer.sample_mb={self.sample_mb} must be > 0")


@dataclass
class SourceConfig:
    """One named document source; `type` picks the reader in crystal.data.sources (docs/data.md lists
    which options each reader takes; setting one a reader does not use is an error)."""

    type: str = "python_stdlib"
    kind: str | None = None  # code | english (readers of local corpora know their own)
    lang: str | None = None  # language/subset tag recorded in the manifest (python, javascript, en, ...)
    path: str | None = None  # file or directory for file-based readers
    max_mb: float | None = None  # cap on raw bytes read (deterministic subset of files)
    max_docs: int | None = None  # cap on files read (deterministic subset; man pages render slowly)
    include_tests: bool = False  # python_stdlib: also read Lib/test
    include: list[str] | None = None  # glob patterns (file name or relative path) a file must match
    exclude: list[str] | None = None  # glob patterns that drop a file
    file_mod: list[int] | None = None  # [m, r]: keep files whose name's last number is r mod m (SlimPajama halves)
    text_field: str | None = None  # jsonl/starcoder: the record field holding the text (text | content)
    set_names: list[str] | None = None  # jsonl: keep records whose meta.redpajama_set_name is one of these
    languages: list[str] | None = None  # starcoder: keep these languages (lang_field, else the parent folder)
    lang_field: str | None = None  # starcoder: record field naming the language
    max_line_chars: int = 10000  # documents with a longer line are skipped (counted); 0 = no limit
    fim: bool | None = None  # apply data.fim_rate to this source; None = only if kind is code
    optional: bool = False  # absent on this machine -> recorded in the manifest, its share goes to `fallback`
    fallback: str | None = None  # source that takes this one's mixture share when it is absent

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in ("code", "english"):
            raise ValueError(f"data.sources.*.kind={self.kind!r}: use 'code' or 'english'")
        if self.file_mod is not None and (len(self.file_mod) != 2 or not 0 <= self.file_mod[1] < self.file_mod[0]):
            raise ValueError(f"data.sources.*.file_mod={self.file_mod}: use [modulus, remainder] with 0 <= r < m")
        if self.max_line_chars < 0:
            raise ValueError(f"data.sources.*.max_line_chars={self.max_line_chars} must be >= 0 (0 = no limit)")


@dataclass
class DataConfig:
    name: str = "local"
    # Empty in the schema on purpose: a YAML dict merges into a default dict instead of replacing it.
    # conf/data/*.yaml names the sources.
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    # Token shares by source or by alias; empty = proportional to each source's size. Stage files name
    # CrystalCoder's subsets (sp0_commoncrawl, starcoder, sc_python, ...); `aliases` maps those onto
    # this data config's sources (several subsets may share one local source: their shares add up).
    mixture: dict[str, float] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    # Most passes over a source's training windows this stage may take (by source or alias); going past
    # it is an error naming the source. Empty = sources cycle through fresh permutations as needed.
    epochs: dict[str, float] = field(default_factory=dict)
    stage: int = 0  # set from train.stage (conf/config.yaml); the sample order is seeded by it
    fim_rate: float = 0.0  # fill-in-the-middle probability per code document
    fim_spm_rate: float = 0.5  # share of FIM documents in SPM (vs PSM) order
    fim_seed: int = 0  # FIM decisions are a function of (fim_seed, document id)
    cache_dir: str = "~/.cache/crystal"  # tokenizer and token shards; env CRYSTAL_CACHE overrides
    heldout_fraction: float = 0.02  # documents (by hash of their id) kept out of training for eval
    num_workers: int = 0  # tokenizer processes for prepare; 0 = one per core
    part_mb: float = 64.0  # a source's shard is written in parts of about this many MB of input: resumable
    verify: str = "full"  # on load: full = re-hash every shard file; size = check sizes only (huge data)
    allow_data_change: bool = False  # resume although fingerprint/mixture/stage differ (recorded in the loader)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    def __post_init__(self) -> None:
        bad_alias = sorted(a for a, target in self.aliases.items() if target not in self.sources)
        if bad_alias:
            raise ValueError(f"data.aliases {bad_alias} point at sources not in data.sources {sorted(self.sources)}")
        for key, what in ((self.mixture, "mixture"), (self.epochs, "epochs")):
            unknown = sorted(set(key) - set(self.sources) - set(self.aliases))
            if unknown:
                raise ValueError(
                    f"data.{what} names unknown source(s) {unknown}; sources are {sorted(self.sources)}, "
                    f"aliases {sorted(self.aliases)}"
                )
        if any(w < 0 for w in self.mixture.values()) or (self.mixture and sum(self.mixture.values()) <= 0):
            raise ValueError(f"data.mixture weights must be >= 0 with a positive sum, got {dict(self.mixture)}")
        if any(e is not None and e <= 0 for e in self.epochs.values()):
            raise ValueError(f"data.epochs must be > 0 (or null for no limit), got {dict(self.epochs)}")
        for name, src in self.sources.items():
            fallback = src.fallback if not isinstance(src, dict) else src.get("fallback")
            if fallback is not None and fallback not in self.sources:
                raise ValueError(f"data.sources.{name}.fallback={fallback!r} is not a source; sources are "
                                 f"{sorted(self.sources)}")  # fmt: skip
        for key in ("fim_rate", "fim_spm_rate", "heldout_fraction"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"data.{key}={getattr(self, key)} must be in [0, 1]")
        if self.part_mb <= 0:
            raise ValueError(f"data.part_mb={self.part_mb} must be > 0")
        if self.verify not in ("full", "size"):
            raise ValueError(f"data.verify={self.verify!r}: use 'full' (re-hash shards) or 'size'")

    def _by_source(self, values: dict[str, float], combine) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, v in values.items():
            name = self.aliases.get(key, key)
            out[name] = combine(out[name], float(v)) if name in out else float(v)
        return out

    def source_mixture(self) -> dict[str, float]:
        """The mixture over this config's sources (aliases resolved, shares summed, normalised)."""
        if not self.mixture:
            return {}
        out = self._by_source(self.mixture, lambda a, b: a + b)
        total = sum(out.values())
        return {n: w / total for n, w in sorted(out.items())}

    def source_epochs(self) -> dict[str, float]:
        """Epoch caps by source (aliases resolved; several subsets on one source: the largest cap)."""
        return dict(sorted(self._by_source({k: v for k, v in self.epochs.items() if v is not None}, max).items()))


@dataclass
class OptimConfig:
    lr: float = 0.012  # peak LR (embedding, biases, norms); hidden matrices get lr * width_scale
    final_lr: float = 0.00012  # LR reached at the end of the decay horizon
    warmup_steps: int = 20
    decay_steps: int | None = None  # linear-decay horizon after warmup; None = until train.steps
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-9
    weight_decay: float = 0.1
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    stage: int = 0  # 0 = no stage file; 1/2/3 = CrystalCoder's stages (set by +stage=N)
    steps: int = 400
    micro_batch: int = 8  # sequences per forward/backward
    global_batch: int = 8  # sequences per optimizer step = micro_batch * grad_accum * world size
    seq_len: int | None = None  # None = model.max_seq_len
    seed: int = 1
    device: str = "auto"  # auto (cuda if present) | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    # torch.use_deterministic_algorithms: null (auto) = on for CPU (save -> reload -> replay is bitwise), off on a
    # GPU, where it also fills every torch.empty with NaN (one more write per kernel output); recorded in checkpoints
    deterministic: bool | None = None
    doc_masking: bool = False  # reset positions and mask attention per packed document
    eval_every: int = 100
    eval_batches: int = 4
    log_every: int = 1  # one metrics row per step (skipped steps and rollbacks are always logged)
    ckpt_every: int = 200  # release interval: every checkpoint here is kept and ends one data chunk
    resume: str | None = None  # a checkpoint dir, a run dir, or 'latest'
    out_dir: str = "outputs"
    run_name: str = "default"
    progress: bool = True
    peak_tflops: float | None = None  # device peak for MFU; None = known GPU table or a CPU matmul probe
    # Transparency and fault handling (crystal/checkpoint.py, crystal/trainer.py; docs/transparency.md).
    ckpt_keep_every: int = 0  # extra resume/rollback checkpoints at this shorter interval; 0 = none
    ckpt_keep_last: int = 2  # how many of those extra checkpoints to keep (release ones are never deleted)
    stop_after: int | None = None  # end this process after this step (checkpointed); the schedule still ends at steps
    spike_factor: float = 2.0  # a loss above spike_factor x the running mean rolls back; 0 = off
    spike_window: int = 20  # running mean over this many recent finite losses (no spike check before it fills)
    max_nonfinite: int = 3  # this many consecutive non-finite steps roll back (fewer are skipped and counted)
    max_rollbacks: int = 5  # give up (clear error) after this many rollbacks in one run
    tensorboard: bool = True  # also write TensorBoard scalars under <run>/tb when tensorboard is installed
    plots: bool = True  # draw <run>/plots/*.png at the end (python -m crystal.metrics plot <run> does it any time)
    allow_config_change: bool = False  # resume although settings that change the math differ (recorded as an event)
    debug_nan_steps: list[int] = field(default_factory=list)  # test hook: NaN loss on the samples of these steps
    debug_spike_steps: list[int] = field(default_factory=list)  # test hook: loss x 1000 on these steps' samples

    def __post_init__(self) -> None:
        for key in ("steps", "micro_batch", "global_batch", "eval_every", "log_every", "ckpt_every", "ckpt_keep_last",
                    "spike_window", "max_nonfinite"):  # fmt: skip
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key}={getattr(self, key)} must be >= 1")
        if self.ckpt_keep_every < 0 or self.max_rollbacks < 0 or self.spike_factor < 0:
            raise ValueError("train.ckpt_keep_every, train.max_rollbacks and train.spike_factor must be >= 0")
        if self.spike_factor and self.spike_factor <= 1:
            raise ValueError(f"train.spike_factor={self.spike_factor} must be > 1 (or 0 to turn spike rollback off)")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"train.stop_after={self.stop_after} must be >= 1 or null")
        if any(s < 1 for s in [*self.debug_nan_steps, *self.debug_spike_steps]):
            raise ValueError("train.debug_nan_steps / train.debug_spike_steps name 1-based steps (>= 1)")


@dataclass
class ScaleConfig:
    """Scales a stage file's real CrystalCoder figures down for small runs (1.0 = the real thing)."""

    steps: float = 1.0  # train.steps, warmup, decay horizon
    ckpt: float = 1.0  # checkpoint interval
    batch: float = 1.0  # global batch in sequences


CEREBRAS_TARGETS = ("CPU", "GPU", "CSX")
CEREBRAS_HALF_DTYPES = ("bfloat16", "float16", "cbfloat16")


@dataclass
class CerebrasConfig:
    """backend=cerebras: which cerebras-pytorch (cstorch) backend runs the compiled step, and for CSX the
    Wafer-Scale Cluster to run it on (the fields of cstorch's ClusterConfig that a run must choose)."""

    target: str = "CPU"  # CPU (runs anywhere) | GPU | CSX (a Cerebras Wafer-Scale Cluster)
    # CSX only. The cluster's management server as <host>:<port> and its TLS certificate
    # (LLM360's CrystalCoder runs: /opt/cerebras/certs/tls.crt).
    mgmt_address: str | None = None
    credentials_path: str | None = None
    mgmt_namespace: str | None = None  # cluster-management software version; None = the cluster's default
    num_csx: int = 1  # CS-2/CS-3 systems, data parallel (CrystalCoder: 16)
    num_workers_per_csx: int = 1  # input workers per system, each runs the project's loader
    # Directories the cluster's input workers must see: the data cache and this checkout (added for you).
    mount_dirs: list[str] = field(default_factory=list)
    python_paths: list[str] = field(default_factory=list)
    job_labels: list[str] = field(default_factory=list)  # key=value pairs
    compile_dir: str | None = None  # None = cstorch's default on the cluster
    compile_only: bool = False  # CSX: compile the step and stop (checks that it fits), no training
    # Mixed precision half type when train.precision=bf16 (CSX always runs its half type; cbfloat16 is
    # Cerebras' float16 variant). CrystalCoder trained with bfloat16.
    half_dtype: str = "bfloat16"
    artifact_dir: str | None = None  # cstorch's logs and executor artifacts; None = <run dir>/cerebras
    # Skip the update of a step whose loss or gradient norm is not finite, decided inside the compiled
    # graph (a CSX step cannot branch on a value), as the resident engine does on the host.
    skip_nonfinite: bool = True
    # The AdamW update equation. cstorch: cstorch.optim.AdamW as Cerebras runs it (eps added to sqrt(v) before
    # bias correction: effective eps / sqrt(1 - beta2^t)), whose losses drift from backend=resident by a
    # machine-dependent 1e-4..1e-2 (docs/cerebras.md). torch: the same cstorch optimizer and state with
    # torch.optim.AdamW's equation: equal to backend=resident to fp32 rounding, so checkpoints move between
    # backends as one run. auto: torch on CPU/GPU (where cstorch stands in for a cluster and runs interchange
    # with the other backends), cstorch on CSX (the optimizer Cerebras compiles and validates).
    adamw: str = "auto"

    def __post_init__(self) -> None:
        self.target = str(self.target).upper()
        if self.target not in CEREBRAS_TARGETS:
            raise ValueError(f"backend.cerebras.target={self.target!r}: use one of {', '.join(CEREBRAS_TARGETS)}")
        if self.half_dtype not in CEREBRAS_HALF_DTYPES:
            raise ValueError(
                f"backend.cerebras.half_dtype={self.half_dtype!r}: use one of {', '.join(CEREBRAS_HALF_DTYPES)}"
            )
        if self.adamw not in ("auto", "cstorch", "torch"):
            raise ValueError(f"backend.cerebras.adamw={self.adamw!r}: use 'auto', 'cstorch' or 'torch'")
        if self.half_dtype == "cbfloat16" and self.target != "CSX":
            raise ValueError("backend.cerebras.half_dtype=cbfloat16 exists only on CSX; use bfloat16 on CPU/GPU")
        if self.num_csx < 1 or self.num_workers_per_csx < 1:
            raise ValueError(
                f"backend.cerebras.num_csx={self.num_csx} and num_workers_per_csx={self.num_workers_per_csx} "
                "must be >= 1"
            )
        if self.target == "CSX":
            self.check_cluster()

    @property
    def adamw_equation(self) -> str:
        """The AdamW equation this target runs: `adamw` with auto resolved."""
        if self.adamw != "auto":
            return self.adamw
        return "cstorch" if self.target == "CSX" else "torch"

    def check_cluster(self) -> None:
        """A CSX run needs a cluster: name the first missing setting and how to give it."""
        if not self.mgmt_address:
            raise ValueError(
                "backend.cerebras.target=CSX needs backend.cerebras.mgmt_address (the cluster's management "
                "server, <host>:<port>); set backend.cerebras.mgmt_address=... or use backend.cerebras.target=CPU"
            )
        if not re.fullmatch(r".+:[0-9]+", self.mgmt_address):
            raise ValueError(
                f"backend.cerebras.mgmt_address={self.mgmt_address!r} must be <host>:<port>, e.g. mgmt.example:443"
            )
        if not self.credentials_path:
            raise ValueError(
                "backend.cerebras.target=CSX needs backend.cerebras.credentials_path (the cluster's TLS "
                "certificate, e.g. /opt/cerebras/certs/tls.crt); set backend.cerebras.credentials_path=..."
            )


@dataclass
class StreamingConfig:
    """backend=streaming: weights and AdamW state in a host store, blocks streamed through two device buffers
    (streaming/, docs/streaming.md)."""

    # batch_major: every micro-batch streams all layers (weights cross the link 2 x micro-batches per step);
    # layer_major: a layer, once on the device, serves every micro-batch of the step (as a CS-2 does), at
    # the cost of keeping every micro-batch's block inputs at once.
    schedule: str = "batch_major"
    prefetch: int = 1  # 0: copy a block, then compute it; 1: copy block i+1 while block i computes
    # true: only block inputs kept, internals recomputed in backward (activation memory flat in depth, one more
    # block forward); false: every block's internals kept as resident training keeps them, weights still streamed
    recompute: bool = True
    stream_dtype: str = (
        "auto"  # weights sent to the device: auto (bf16 under bf16 autocast on CUDA, else fp32) | fp32 | bf16
    )
    # gradients sent back, summed in fp32 on the host: auto (bf16 under bf16 autocast on CUDA, else fp32) | fp32 | bf16
    grad_dtype: str = "auto"
    pin_memory: bool = True  # page-locked host store when CUDA is present (falls back to pageable with a warning)
    # CUDA: pinned buffers gradients go D2H through; a copy waits until the host has summed the buffer's last
    # contents, so enough of them cover the host's work on one block while the device goes on
    staging_buffers: int = 4
    overlap_optimizer: str = "auto"  # host AdamW of step t overlaps step t+1's forward: auto (on CUDA) | on | off
    # the clip factor inside the fused AdamW kernel (one pass over the gradients fewer; last-bit differences from
    # backend=resident): auto (on CUDA; off on CPU, where streamed == resident bit for bit) | on | off
    fused_clip: str = "auto"
    host_threads: int = 0  # CUDA: torch threads of the host optimizer; 0 = cores - 2 (leaves the launcher a core)
    trace: bool = False  # record per-lane timings (<run>/streaming_trace.json, Chrome/Perfetto format)
    # torchrun with N > 1 replicas: each rank holds 1/N of the store, gradients reduce-scattered and weights
    # all-gathered on the device (streaming/sharded.py); false: every replica a full store (all-reduce on the host)
    shard_store: bool = True

    def __post_init__(self) -> None:
        choices = {
            "schedule": ("batch_major", "layer_major"), "stream_dtype": ("auto", "fp32", "bf16"),
            "grad_dtype": ("auto", "fp32", "bf16"), "overlap_optimizer": ("auto", "on", "off"),
            "fused_clip": ("auto", "on", "off"),
        }  # fmt: skip
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"backend.streaming.{key}={getattr(self, key)!r}: use one of {', '.join(allowed)}")
        if self.prefetch not in (0, 1):
            raise ValueError(f"backend.streaming.prefetch={self.prefetch}: use 0 (no prefetch) or 1 (double buffer)")
        if self.staging_buffers < 1:
            raise ValueError(f"backend.streaming.staging_buffers={self.staging_buffers} must be >= 1 (default 4)")
        if self.host_threads < 0:
            raise ValueError(f"backend.streaming.host_threads={self.host_threads} must be >= 0 (0 = cores - 2)")


@dataclass
class FSDPConfig:
    """backend=fsdp: FSDP2 (fully_shard per block and on the root) across the ranks of a torchrun job, for a model
    whose weights, gradients and AdamW state fit the GPUs together (docs/backends.md)."""

    # dtype the blocks compute in (the all-gathered copy; fp32 master shards stay): auto (bf16 on a GPU when
    # train.precision resolves to bf16, the GPU default; else fp32) | fp32 | bf16 (GPU only)
    param_dtype: str = "auto"
    reduce_dtype: str = "fp32"  # gradients are reduce-scattered in: fp32 | bf16 (half the network bytes)
    reshard_after_forward: bool = True  # free gathered blocks after forward (ZeRO-3); false keeps them (ZeRO-2)
    activation_checkpointing: bool = False  # keep only block inputs, recompute the block in backward
    # HSDP: > 1 replicates over this many groups and shards within each (a 2-D mesh dp_replicate x dp_shard);
    # set it to the number of nodes so that the reduce-scatter stays on NVLink. 1 = shard over every rank.
    dp_replicate: int = 1
    # step: micro-batches accumulate full-size gradients on each GPU and are reduce-scattered once per step (the
    # least network; + 4 bytes/param per GPU); micro_batch: reduce-scatter after each (sharded accumulation, 1/N of
    # that memory, a reduce-scatter per micro-batch). The 7B on 8 H100s needs micro_batch (docs/backends.md).
    grad_sync: str = "step"

    def __post_init__(self) -> None:
        choices = (("param_dtype", ("auto", "fp32", "bf16")), ("reduce_dtype", ("fp32", "bf16")),
                   ("grad_sync", ("step", "micro_batch")))  # fmt: skip
        for key, allowed in choices:
            if getattr(self, key) not in allowed:
                raise ValueError(f"backend.fsdp.{key}={getattr(self, key)!r}: use one of {', '.join(allowed)}")
        if self.dp_replicate < 1:
            raise ValueError(f"backend.fsdp.dp_replicate={self.dp_replicate} must be >= 1 (1 = no replication)")


@dataclass
class BackendConfig:
    name: str = "resident"  # resident | streaming | fsdp | cerebras
    streaming: StreamingConfig = field(default_factory=StreamingConfig)  # used only by name=streaming
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)  # used only by name=fsdp
    cerebras: CerebrasConfig = field(default_factory=CerebrasConfig)  # used only by name=cerebras


@dataclass
class CodeEvalConfig:
    """`python -m crystal.analysis code-eval`: HumanEval pass@k and the infilling sets built from HumanEval,
    every program run in crystal.analysis.sandbox. Override as code.<key>=value."""

    problems: int = 0  # the first N HumanEval problems; 0 = all 164
    greedy: bool = True  # greedy pass@1: one completion per problem at temperature 0
    samples: int = 0  # n sampled completions per problem for pass@k; 0 = none (Codex used 200)
    k: list[int] = field(default_factory=lambda: [1, 10])  # pass@k reported from the samples (each k <= samples)
    temperature: float = 0.2  # of the sampled completions (LLM360 reports HumanEval at 0.2)
    top_p: float = 0.95
    max_new_tokens: int = 512  # per completion; at most half the model's context (the prompt keeps the rest)
    infill: list[str] = field(default_factory=lambda: ["single", "multi"])  # infilling sets; [] = none
    fim_modes: list[str] = field(default_factory=lambda: ["psm", "spm"])
    spans: int = 2  # random multi-line spans per problem (infill multi)
    infill_max_new_tokens: int = 128
    seed: int = 0  # the multi-line spans and the sampling
    batch_size: int = 32  # sequences generated at once
    timeout_s: float = 10.0  # sandbox: wall clock per program
    memory_mb: int = 1024  # sandbox: address space per program
    workers: int = 0  # sandbox: programs run at once; 0 = one per CPU core

    def __post_init__(self) -> None:
        for key in ("problems", "samples", "workers"):
            if getattr(self, key) < 0:
                raise ValueError(f"analysis.code.{key}={getattr(self, key)} must be >= 0")
        for key in ("max_new_tokens", "infill_max_new_tokens", "batch_size", "spans"):
            if getattr(self, key) < 1:
                raise ValueError(f"analysis.code.{key}={getattr(self, key)} must be at least 1")
        if self.samples and not all(1 <= k <= self.samples for k in self.k):
            raise ValueError(f"analysis.code.k={list(self.k)} needs 1 <= k <= code.samples={self.samples}; "
                             f"raise code.samples or lower k")  # fmt: skip
        if self.samples and not self.temperature > 0:
            raise ValueError(f"analysis.code.temperature={self.temperature}: sampling needs a temperature > 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"analysis.code.top_p={self.top_p} must be in (0, 1]")
        if not set(self.infill) <= {"single", "multi"} or not set(self.fim_modes) <= {"psm", "spm"}:
            raise ValueError(f"analysis.code.infill={list(self.infill)} / fim_modes={list(self.fim_modes)}: use "
                             "single, multi / psm, spm")  # fmt: skip
        if self.infill and not self.fim_modes:
            raise ValueError("analysis.code.fim_modes=[] leaves the infilling sets nothing to run; set code.infill=[]")
        if not (self.greedy or self.samples or self.infill):
            raise ValueError("analysis.code: greedy=false, samples=0 and infill=[] evaluate nothing")
        if not self.timeout_s > 0 or self.memory_mb < 64:
            raise ValueError(f"analysis.code.timeout_s={self.timeout_s} must be > 0 and memory_mb={self.memory_mb} "
                             ">= 64 (a Python interpreter needs that much)")  # fmt: skip


@dataclass
class AnalysisConfig:
    """`python -m crystal.analysis`: Analysis360 memorization and per-chunk / per-source evaluation of a run
    or release. Defaults in conf/analysis/default.yaml; override on the command line as key=value."""

    sequences: int = 1000  # per (checkpoint, chunk), sampled with `seed` (Analysis360: 1000)
    prompt_tokens: int = 32  # memorization prompt: tokens 0..31 of each sampled sequence
    generate_tokens: int = 32  # greedily decoded and compared with tokens 32..63
    seed: int = 0  # which sequences are sampled from each chunk (the same for every checkpoint)
    batch_size: int = 64  # sequences decoded / scored at once
    device: str = "auto"  # auto (cuda if present) | cpu | cuda | cuda:N
    checkpoints: list[int] | None = None  # steps to analyse; null = every checkpoint
    loss_sequences: int = 64  # per (checkpoint, chunk) for the forgetting table; 0 = skip it
    eval_batches: int = 4  # held-out batches per source (as train.eval_batches); 0 = skip held-out loss
    curves: int = 6  # checkpoints drawn in the by-chunk and histogram views
    threads: int = 0  # torch CPU threads for the command; 0 = torch's default (1 is fastest for tiny models)
    progress: bool = True
    code: CodeEvalConfig = field(default_factory=CodeEvalConfig)  # the code-eval command's settings

    def __post_init__(self) -> None:
        for key in ("sequences", "prompt_tokens", "generate_tokens", "batch_size", "curves"):
            if getattr(self, key) < 1:
                raise ValueError(f"analysis.{key}={getattr(self, key)} must be at least 1")
        for key in ("loss_sequences", "eval_batches", "threads"):
            if getattr(self, key) < 0:
                raise ValueError(f"analysis.{key}={getattr(self, key)} must be >= 0 (0 skips it)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)


# ----------------------------------------------------------------------------------------------
# Hydra glue


def _scaled(value: int, kind: str, *, _root_: Any) -> int:
    """`${scaled:79721,steps}` = the real figure times scale.<kind>, at least 1."""
    return max(1, round(float(value) * float(_root_.scale[kind])))


# A checkout (and an editable install) reads conf/ beside crystal/; a wheel carries the same files as crystal/conf.
_CHECKOUT_CONF = Path(__file__).resolve().parent.parent / "conf"
CONFIG_DIR = _CHECKOUT_CONF if (_CHECKOUT_CONF / "config.yaml").exists() else Path(__file__).resolve().parent / "conf"
_GROUP_OVERRIDE = re.compile(r"^(?P<prefix>[+~]{0,2})(?P<group>[A-Za-z_][\w/]*)=(?P<value>\d+)$")


def quote_numeric_group_choices(overrides: list[str], config_dir: Path = CONFIG_DIR) -> list[str]:
    """`+stage=2` -> `+stage='2'`: Hydra parses a bare 2 as an int and refuses ints as config group
    choices, but stage files are named 1/2/3. Only overrides naming a config group are touched."""
    out = []
    for arg in overrides:
        m = _GROUP_OVERRIDE.match(arg)
        if m and (config_dir / m["group"]).is_dir():
            arg = f"{m['prefix']}{m['group']}='{m['value']}'"
        out.append(arg)
    return out


def register_configs() -> None:
    if not OmegaConf.has_resolver("scaled"):
        OmegaConf.register_new_resolver("scaled", _scaled)
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)


def to_dataclass(cfg: Any) -> Config:
    """A composed DictConfig (or plain dict) -> Config dataclasses, running every __post_init__ check."""
    if isinstance(cfg, Config):
        return cfg
    obj = OmegaConf.to_object(cfg) if OmegaConf.is_config(cfg) else cfg
    return obj if isinstance(obj, Config) else config_from_dict(obj)


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(where + k for k in unknown)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = _from_dict(hint, value, f"{where}{name}.")
        kwargs[name] = value
    return cls(**kwargs)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict[str, Any]) -> Config:
    return _from_dict(Config, data, "")
