"""Model shapes the simulator needs, read from conf/model/<name>.yaml without importing crystal.

Only what sets FLOPs and bytes: depth, width, heads, FFN width, vocab, sequence, biases, tied
embeddings and the norm kind. Per-block parameter count, per-token FLOPs (6N + 12 L d S, the
convention DESIGN.md uses for MFU) and the matmul list of a block live here too.

Shapes for the sweep that have no conf/model file follow CrystalCoder's rules: head dim 128,
SwiGLU hidden floor(8 d / 3), biases on every linear, LayerNorm, vocab 32032, seq 2048, tied
embeddings, multi-head attention (no GQA, unlike LLaMA-2-70B whose depth/width 70B copies).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

from omegaconf import OmegaConf

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


@dataclass(frozen=True)
class ModelShape:
    name: str
    n_layer: int
    d_model: int
    n_head: int
    ffn_hidden: int
    vocab_size: int
    max_seq_len: int
    bias: bool = True
    tie_embeddings: bool = True
    norm: str = "layernorm"  # layernorm (weight + bias) | rmsnorm (weight only)

    def __post_init__(self) -> None:
        for key in ("n_layer", "d_model", "n_head", "ffn_hidden", "vocab_size", "max_seq_len"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key}={getattr(self, key)} must be >= 1 (model {self.name})")
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"model.norm={self.norm!r}: use layernorm or rmsnorm")

    # --- parameters -------------------------------------------------------------------------
    @property
    def norm_params(self) -> int:
        return (2 if self.norm == "layernorm" else 1) * self.d_model

    def block_linears(self) -> list[tuple[str, int, int]]:
        """(name, in, out) of every linear in a block, in execution order."""
        d, f = self.d_model, self.ffn_hidden
        return [("qkv", d, 3 * d), ("attn_out", d, d), ("c_fc", d, f), ("c_fc2", d, f), ("c_proj", f, d)]

    @property
    def block_params(self) -> int:
        lin = sum(i * o + (o if self.bias else 0) for _, i, o in self.block_linears())
        return lin + 2 * self.norm_params

    @property
    def nonblock_params(self) -> int:
        """Embedding (+ untied head) + final norm."""
        emb = self.vocab_size * self.d_model
        return emb * (1 if self.tie_embeddings else 2) + self.norm_params

    @property
    def params(self) -> int:
        return self.n_layer * self.block_params + self.nonblock_params

    def flops_per_token(self, seq: int) -> float:
        """Model FLOPs per trained token, 6N + 12 L d S (DESIGN.md; no recompute, full attention)."""
        return 6 * self.params + 12 * self.n_layer * self.d_model * seq


def shape_from_dict(d: dict, name: str) -> ModelShape:
    keys = {f.name for f in fields(ModelShape)}
    return ModelShape(**{k: v for k, v in d.items() if k in keys} | {"name": str(d.get("name", name))})


# Sweep members with no conf/model file (CrystalCoder rules, module docstring).
BUILTIN = {
    "crystal_13b": ModelShape("crystal_13b", 40, 5120, 40, 13653, 32032, 2048),
    "crystal_70b": ModelShape("crystal_70b", 80, 8192, 64, 21845, 32032, 2048),
}
SWEEP_MODELS = {"1.3B": "1b", "7B": "crystalcoder_7b", "13B": "crystal_13b", "70B": "crystal_70b"}


def available_models() -> list[str]:
    return sorted([p.stem for p in (CONF_DIR / "model").glob("*.yaml")] + list(BUILTIN))


def load_shape(name: str, overrides: dict | None = None) -> ModelShape:
    """conf/model/<name>.yaml (or a built-in sweep shape) -> ModelShape, with model.<key> overrides."""
    if name in BUILTIN:
        shape = BUILTIN[name]
    else:
        path = CONF_DIR / "model" / f"{name}.yaml"
        if not path.exists():
            raise ValueError(f"model={name}: no {path}; known models: {', '.join(available_models())}")
        shape = shape_from_dict(OmegaConf.to_container(OmegaConf.load(path)), name)
    if overrides:
        known = {f.name for f in fields(ModelShape)} - {"name"}
        bad = sorted(set(overrides) - known)
        if bad:
            raise ValueError(f"model.{bad[0]} is not a shape key the simulator uses; known: {', '.join(sorted(known))}")
        shape = replace(shape, **overrides)
    return shape
