"""CrystalCoder (LLM360), single-device, as a stack of identical blocks.

    x = wte(idx) * embed_scale                                   (muP: 14.6)
    for each block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))  (pre-norm, biases everywhere)
        attn: fused QKV, RoPE on the first 25% of each head's dims (GPT-J interleaved pairs, fp32 angles),
              causal softmax(q k^T / head_dim) in fp32, output projection
        mlp:  c_proj(c_fc(x) * silu(c_fc2(x)))                     (c_fc = up, c_fc2 = gate)
    logits = (ln_f(x) @ wte^T) * logits_scale                    (tied; muP: 2.22 * width_scale)

The same class gives Amber (LLaMA-7B shape) through config switches: RMSNorm, no biases, full
rotate-half RoPE, untied head, no muP. The model knows nothing of streaming or data parallelism;
those wrap it from outside through `embed`, `blocks` and `head_loss`.

Shape legend: B batch, S sequence, C d_model, H heads, D head dim, F ffn hidden, V vocab.
Parameter names follow LLM360's HF layout (ln_1, attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_fc2,
mlp.c_proj, ln_f) so the checkpoint converter is a rename plus a transpose.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from crystal.config import ModelConfig
from crystal.kernels import get_ops


class Norm(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind, self.eps, self.ops = cfg.norm, cfg.norm_eps, get_ops(cfg.ops)
        self.weight = nn.Parameter(torch.ones(cfg.d_model))
        self.bias = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.norm == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return self.ops.layernorm(x, self.weight, self.bias, self.eps)
        return self.ops.rmsnorm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg, self.ops = cfg, get_ops(cfg.ops)
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)  # columns q | k | v, head-major
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, doc_ids: torch.Tensor | None) -> torch.Tensor:
        cfg = self.cfg
        b, s, c = x.shape
        qkv = self.c_attn(x).view(b, s, 3, cfg.n_head, cfg.head_dim)  # (B, S, 3, H, D)
        q, k, v = qkv.unbind(dim=2)  # each (B, S, H, D)
        q, k = self.ops.rope(
            q, k, positions, rotary_dims=cfg.rotary_dims, theta=cfg.rope_theta, interleaved=cfg.rope_interleaved
        )
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
        y = self.ops.attention(q, k, v, scale=cfg.softmax_scale, doc_ids=doc_ids)
        return self.c_proj(y.transpose(1, 2).reshape(b, s, c))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ops = get_ops(cfg.ops)
        self.c_fc = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=cfg.bias)  # up
        self.c_fc2 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=cfg.bias)  # gate
        self.c_proj = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=cfg.bias)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ops.swiglu(x, self.c_fc.weight, self.c_fc.bias, self.c_fc2.weight, self.c_fc2.bias)  # (B, S, F)
        return self.c_proj(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = Norm(cfg)
        self.attn = Attention(cfg)
        self.ln_2 = Norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), positions, doc_ids)
        return x + self.mlp(self.ln_2(x))


class CrystalCoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg, self.ops = cfg, get_ops(cfg.ops)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = Norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    # -- the three pieces a streaming executor drives: embed -> blocks -> head_loss ----------------

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.wte(input_ids) * self.cfg.embed_scale  # (B, S, C)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.ln_f(x), self.output_weight) * self.cfg.logits_scale  # (B, S, V)

    def head_loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.ln_f(x).flatten(0, 1)  # (B*S, C)
        return self.ops.linear_cross_entropy(
            x, self.output_weight, targets.flatten(), logits_scale=self.cfg.logits_scale
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, S) -> mean loss if targets (B, S) are given (-100 = ignored), else logits (B, S, V)."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, positions, doc_ids)
        return self.head_logits(x) if targets is None else self.head_loss(x, targets)

    # -- initialisation ---------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """CrystalCoder's Cerebras run: truncated normal at +-2 std; embedding std init_std, hidden
        matrices init_std * sqrt(width_scale), residual output projections additionally / sqrt(2L).
        Biases zero, norm weights one. Amber: plain normal(0.02) everywhere."""
        cfg = self.cfg

        def fill(t: torch.Tensor, std: float) -> None:
            if cfg.init == "trunc_normal":
                nn.init.trunc_normal_(t, std=std, a=-2 * std, b=2 * std, generator=generator)
            else:
                nn.init.normal_(t, std=std, generator=generator)

        fill(self.wte.weight, cfg.init_std)
        if self.lm_head is not None:
            fill(self.lm_head.weight, cfg.init_std)
        for name, p in self.blocks.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif ".ln_" in f".{name}":
                p.fill_(1.0)
            else:
                fill(p, cfg.out_init_std if name.endswith("c_proj.weight") else cfg.hidden_init_std)
        self.ln_f.weight.fill_(1.0)
        if self.ln_f.bias is not None:
            self.ln_f.bias.zero_()


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", seed: int | None = None) -> CrystalCoder:
    """Build on `device`; on 'meta' nothing is allocated or initialised (parameter counting, planning)."""
    with torch.device(device):
        model = CrystalCoder(cfg)
    if str(device) != "meta":
        gen = None
        if seed is not None:
            gen = torch.Generator(device=device).manual_seed(seed)
        model.init_weights(gen)
    return model


# ----------------------------------------------------------------------------------------------
# muP parameter groups

GROUP_HIDDEN, GROUP_EMBEDDING, GROUP_NO_DECAY = "hidden", "embedding", "no_decay"


def param_group_of(name: str, param: torch.Tensor) -> str:
    """Which muP group a parameter belongs to, by name: hidden matrices (LR x width_scale, decayed),
    embedding / untied head (LR, decayed), biases and norms (LR, not decayed)."""
    if name in ("wte.weight", "lm_head.weight"):
        return GROUP_EMBEDDING
    return GROUP_HIDDEN if param.dim() == 2 else GROUP_NO_DECAY


def group_settings(cfg: ModelConfig, weight_decay: float) -> dict[str, dict[str, float]]:
    """Per group: lr_scale multiplies the scheduled LR; weight_decay is AdamW's decoupled decay."""
    return {
        GROUP_HIDDEN: {"lr_scale": cfg.width_scale, "weight_decay": weight_decay},
        GROUP_EMBEDDING: {"lr_scale": 1.0, "weight_decay": weight_decay},
        GROUP_NO_DECAY: {"lr_scale": 1.0, "weight_decay": 0.0},
    }


def param_groups(model: CrystalCoder, weight_decay: float) -> list[dict]:
    """torch.optim-style groups (with 'name' and 'lr_scale' keys) in a fixed order."""
    settings = group_settings(model.cfg, weight_decay)
    members: dict[str, list[nn.Parameter]] = {g: [] for g in settings}
    for name, p in model.named_parameters():
        members[param_group_of(name, p)].append(p)
    return [{"name": g, "params": ps, **settings[g]} for g, ps in members.items() if ps]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
