"""CrystalCoder for transformers: the same math as crystal/model.py, in LLM360's HF layout.

    x = wte(ids) * mup_embeddings_scale
    for each block h.i:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))
        attn: c_attn -> q | k | v (head-major), RoPE on the first `rotary_dim` dims of each head in GPT-J
              interleaved pairs (fp32 angles), causal softmax(q k^T / head_dim) (muP; / sqrt(head_dim) without
              mup_scale_qk_dot_by_d), c_proj
        mlp:  c_proj(c_fc(x) * silu(c_fc2(x)))          (c_fc = up, c_fc2 = gate)
    logits = lm_head(ln_f(x)) * mup_output_alpha * mup_width_scale

Weights are GPT-2 Conv1D, stored [in, out] (y = x @ W + b), under LLM360's names: transformer.wte,
transformer.h.{i}.ln_1 / attn.c_attn / attn.c_proj / ln_2 / mlp.c_fc / mlp.c_fc2 / mlp.c_proj,
transformer.ln_f, lm_head (a copy of wte). Written for crystal's exports (no code of LLM360's is used);
it also loads LLM360's released CrystalCoder checkpoints, whose buffers attn.bias / attn.masked_bias it
ignores. Works with transformers 4.40+ and 5.x: the KV cache is a transformers `Cache` when one is passed
(what `generate` does), or legacy per-layer (key, value) tuples.

Shape legend: B batch, T new tokens, P cached tokens, C n_embd, H heads, D head dim, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

try:  # transformers >= 4.36
    from transformers.cache_utils import Cache, DynamicCache
except ImportError:  # pragma: no cover - old transformers: legacy tuples only
    Cache, DynamicCache = None, None
try:  # transformers 5 no longer mixes generation into every PreTrainedModel
    from transformers.generation import GenerationMixin
except ImportError:  # pragma: no cover
    from transformers.generation.utils import GenerationMixin
try:  # transformers 5: init functions that leave already-loaded weights alone
    from transformers import initialization as hf_init
except ImportError:  # pragma: no cover
    hf_init = nn.init

from .configuration_crystalcoder import CrystalCoderConfig


class Conv1D(nn.Module):
    """GPT-2's linear layer with the weight stored [in, out]: y = x @ W + b."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


def rotate_gptj(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, theta: float) -> torch.Tensor:
    """x (B, T, H, D), positions (B, T): rotate pairs (x0, x1), (x2, x3), ... of the first rotary_dim dims.
    Angles in fp32 whatever x's dtype (bf16 angles lose position information at long context)."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=x.device) / rotary_dim
    angles = positions.to(torch.float32)[..., None] * (1.0 / theta**exponents)  # (B, T, R/2)
    cos, sin = torch.cos(angles)[:, :, None, :], torch.sin(angles)[:, :, None, :]  # broadcast over heads
    xr = x[..., :rotary_dim].float()
    x1, x2 = xr[..., 0::2], xr[..., 1::2]
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return torch.cat((rotated.to(x.dtype), x[..., rotary_dim:]), dim=-1)


class CrystalCoderAttention(nn.Module):
    def __init__(self, config: CrystalCoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.head_dim = config.n_head, config.n_embd // config.n_head
        self.rotary_dim = config.rotary_dim or self.head_dim
        self.theta = float(getattr(config, "rope_theta", 10000.0) or 10000.0)
        if not config.scale_attn_weights:
            self.scale = 1.0
        else:
            self.scale = 1.0 / (self.head_dim if config.mup_scale_qk_dot_by_d else math.sqrt(self.head_dim))
        self.c_attn = Conv1D(config.n_embd, 3 * config.n_embd)  # columns q | k | v, head-major
        self.c_proj = Conv1D(config.n_embd, config.n_embd)

    def forward(self, x, positions, mask, past):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).view(b, t, 3, self.n_head, self.head_dim).unbind(2)  # each (B, T, H, D)
        q = rotate_gptj(q, positions, self.rotary_dim, self.theta)
        k = rotate_gptj(k, positions, self.rotary_dim, self.theta)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, H, T, D)
        present = None
        if Cache is not None and isinstance(past, Cache):
            k, v = past.update(k, v, self.layer_idx)  # (B, H, P+T, D)
        elif past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
            present = (k, v)
        else:
            present = (k, v)
        # SDPA keeps the softmax in fp32 for every dtype; scale = 1/head_dim (muP).
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, scale=self.scale)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c)), present


class CrystalCoderMLP(nn.Module):
    def __init__(self, config: CrystalCoderConfig) -> None:
        super().__init__()
        inner = config.n_inner if config.n_inner is not None else 4 * config.n_embd
        self.c_fc = Conv1D(config.n_embd, inner)  # up
        self.c_fc2 = Conv1D(config.n_embd, inner)  # gate
        self.c_proj = Conv1D(inner, config.n_embd)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.c_fc(x) * F.silu(self.c_fc2(x)))


class CrystalCoderBlock(nn.Module):
    def __init__(self, config: CrystalCoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CrystalCoderAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = CrystalCoderMLP(config)

    def forward(self, x, positions, mask, past):
        a, present = self.attn(self.ln_1(x), positions, mask, past)
        x = x + a
        return x + self.mlp(self.ln_2(x)), present


class CrystalCoderPreTrainedModel(PreTrainedModel):
    config_class = CrystalCoderConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = False
    _no_split_modules = ["CrystalCoderBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    # LLM360's released checkpoints carry GPT-2's causal-mask buffers; this model builds its masks itself.
    _keys_to_ignore_on_load_unexpected = [r"attn\.bias$", r"attn\.masked_bias$"]
    _supports_cache_class = True

    def _init_weights(self, module: nn.Module) -> None:
        """Used only for weights a checkpoint lacks. LLM360's scheme: hidden std initializer_range x
        sqrt(mup_width_scale), residual output projections further / sqrt(2 n_layer)."""
        cfg = self.config
        std = cfg.initializer_range * math.sqrt(cfg.mup_width_scale)
        if isinstance(module, Conv1D):
            hf_init.normal_(module.weight, mean=0.0, std=std)
            hf_init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            hf_init.normal_(module.weight, mean=0.0, std=cfg.initializer_range)
        elif isinstance(module, nn.Linear):
            hf_init.normal_(module.weight, mean=0.0, std=cfg.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            hf_init.ones_(module.weight)
            hf_init.zeros_(module.bias)
        if isinstance(module, (CrystalCoderAttention, CrystalCoderMLP)):
            hf_init.normal_(module.c_proj.weight, mean=0.0, std=std / math.sqrt(2 * cfg.n_layer))


def _past_length(past) -> int:
    if past is None:
        return 0
    if Cache is not None and isinstance(past, Cache):
        return int(past.get_seq_length())
    return past[0][0].shape[2] if past[0] is not None else 0


def _attention_mask(attention_mask: torch.Tensor, t: int, past_len: int) -> torch.Tensor:
    """(B, P+T) 1 = token, 0 = padding -> (B, 1, T, P+T) bool: causal and not padding. Every query also sees
    itself, so a padding row is never fully masked (a fully masked row would give NaN and spread through V)."""
    total = attention_mask.shape[1]
    q_pos = torch.arange(past_len, past_len + t, device=attention_mask.device)[:, None]  # (T, 1)
    k_pos = torch.arange(total, device=attention_mask.device)[None, :]  # (1, P+T)
    allowed = (k_pos <= q_pos)[None] & attention_mask.bool()[:, None, :]  # (B, T, P+T)
    return (allowed | (k_pos == q_pos)[None])[:, None]


class CrystalCoderModel(CrystalCoderPreTrainedModel):
    def __init__(self, config: CrystalCoderConfig) -> None:
        super().__init__(config)
        if config.position_embedding_type != "rotary" or config.activation_function != "swiglu":
            raise ValueError(
                "this modeling file implements CrystalCoder's rotary + SwiGLU blocks; config has "
                f"position_embedding_type={config.position_embedding_type!r}, "
                f"activation_function={config.activation_function!r}"
            )
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.h = nn.ModuleList(CrystalCoderBlock(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def forward(
        self,
        input_ids=None,
        past_key_values=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        use_cache=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        use_cache = self.config.use_cache if use_cache is None else use_cache
        return_dict = getattr(self.config, "return_dict", True) if return_dict is None else return_dict
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        x = x * self.config.mup_embeddings_scale  # (B, T, C)
        b, t, _ = x.shape
        legacy = past_key_values is not None and not (Cache is not None and isinstance(past_key_values, Cache))
        if use_cache and past_key_values is None and DynamicCache is not None:
            past_key_values = DynamicCache()
        past_len = _past_length(past_key_values)
        if position_ids is None:
            if attention_mask is not None:  # left padding: positions count real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]
            else:
                position_ids = torch.arange(past_len, past_len + t, device=x.device)[None].expand(b, t)
        position_ids = position_ids.expand(b, t)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = _attention_mask(attention_mask.to(x.device), t, past_len)
        elif t > 1 and past_len > 0:  # chunked prefill: causal with an offset
            mask = _attention_mask(torch.ones(b, past_len + t, dtype=torch.bool, device=x.device), t, past_len)
        hidden = [] if output_hidden_states else None
        presents = []
        for i, block in enumerate(self.h):
            if hidden is not None:
                hidden.append(x)
            layer_past = past_key_values[i] if legacy else past_key_values
            x, present = block(x, position_ids, mask, layer_past)
            presents.append(present)
        x = self.ln_f(x)
        if hidden is not None:
            hidden.append(x)
        cache = None
        if use_cache:
            cache = tuple(presents) if (legacy or past_key_values is None) else past_key_values
        if not return_dict:
            return tuple(v for v in (x, cache, hidden) if v is not None)
        return BaseModelOutputWithPast(
            last_hidden_state=x, past_key_values=cache, hidden_states=tuple(hidden) if hidden else None
        )


class CrystalCoderLMHeadModel(CrystalCoderPreTrainedModel, GenerationMixin):
    # transformers 5 reads a {target: source} dict; 4.x iterates it as the list of tied keys.
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: CrystalCoderConfig) -> None:
        super().__init__(config)
        self.transformer = CrystalCoderModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.logits_scale = config.mup_output_alpha * config.mup_width_scale
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def prepare_inputs_for_generation(
        self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None, **kwargs
    ):
        past_len = _past_length(past_key_values)
        if past_len:
            input_ids = input_ids[:, past_len:]
        inputs = {"input_ids": input_ids}
        if inputs_embeds is not None and not past_len:
            inputs = {"inputs_embeds": inputs_embeds}
        return {**inputs, "past_key_values": past_key_values, "attention_mask": attention_mask,
                "use_cache": kwargs.get("use_cache", True)}  # fmt: skip

    def forward(
        self,
        input_ids=None,
        past_key_values=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_hidden_states=None,
        return_dict=None,
        logits_to_keep=0,
        **kwargs,
    ):
        return_dict = getattr(self.config, "return_dict", True) if return_dict is None else return_dict
        out = self.transformer(
            input_ids, past_key_values=past_key_values, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_hidden_states=output_hidden_states,
            return_dict=True,
        )  # fmt: skip
        x = out.last_hidden_state
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x) * self.logits_scale  # (B, T, V)
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(shifted, labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        if not return_dict:
            rest = tuple(v for v in (logits, out.past_key_values, out.hidden_states) if v is not None)
            return ((loss,) + rest) if loss is not None else rest
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=out.past_key_values, hidden_states=out.hidden_states
        )
