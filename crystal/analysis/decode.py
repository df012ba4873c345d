"""Batched greedy decoding for crystal's model, with a KV cache, kept out of the training forward.

The cached path reuses every parameter and op of `crystal.model` (its blocks' c_attn / c_proj / mlp, its
norms, the same rope and attention ops): only the bookkeeping differs. The prompt is run once through the
same causal attention as training and its keys/values stored; each new token then attends to the cache.
`greedy_decode(..., use_cache=False)` recomputes the whole sequence every step (the plain forward) and is
what the cached path is tested against.

Shapes: B sequences, P prompt tokens, N new tokens, T = P + N, L layers, H heads, D head dim, C d_model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from crystal.model import Block, CrystalCoder


class KVCache:
    """Preallocated keys and values for every layer: (L, B, H, T, D) each, filled left to right."""

    def __init__(self, model: CrystalCoder, batch: int, max_len: int) -> None:
        cfg = model.cfg
        self.shape = (cfg.n_layer, batch, cfg.n_head, max_len, cfg.head_dim)
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0

    def allocate(self, like: torch.Tensor) -> None:
        """In the dtype the keys come out in (bf16 under autocast, else the weights')."""
        if self.k is None:
            self.k = torch.empty(self.shape, dtype=like.dtype, device=like.device)
            self.v = torch.empty(self.shape, dtype=like.dtype, device=like.device)


def _block_with_cache(model: CrystalCoder, block: Block, layer: int, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One block on x (B, t, C) at positions cache.length .. cache.length + t - 1, appending to the cache."""
    cfg, ops, attn = model.cfg, model.ops, block.attn
    b, t, c = x.shape
    start = cache.length
    positions = torch.arange(start, start + t, device=x.device)
    qkv = attn.c_attn(block.ln_1(x)).view(b, t, 3, cfg.n_head, cfg.head_dim)  # (B, t, 3, H, D)
    q, k, v = qkv.unbind(dim=2)
    q, k = ops.rope(
        q, k, positions, rotary_dims=cfg.rotary_dims, theta=cfg.rope_theta, interleaved=cfg.rope_interleaved
    )
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, H, t, D)
    cache.allocate(k)
    cache.k[layer, :, :, start : start + t] = k
    cache.v[layer, :, :, start : start + t] = v
    keys, values = cache.k[layer, :, :, : start + t], cache.v[layer, :, :, : start + t]  # (B, H, start+t, D)
    if start == 0:  # the prompt: the training attention op, causal
        y = ops.attention(q, keys, values, scale=cfg.softmax_scale)
    elif t == 1:  # one new token sees every cached position: no mask
        y = F.scaled_dot_product_attention(q, keys, values, scale=cfg.softmax_scale)
    else:
        raise ValueError("decode appends one token at a time after the prompt")
    x = x + attn.c_proj(y.transpose(1, 2).reshape(b, t, c))
    return x + block.mlp(block.ln_2(x))


def _cached_step(model: CrystalCoder, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """ids (B, t) -> logits of the last position (B, V); advances the cache by t."""
    x = model.embed(ids)
    for layer, block in enumerate(model.blocks):
        x = _block_with_cache(model, block, layer, x, cache)
    cache.length += ids.shape[1]
    return model.head_logits(x[:, -1:])[:, 0]


@torch.no_grad()
def greedy_decode(model: CrystalCoder, prompts: torch.Tensor, new_tokens: int, use_cache: bool = True) -> torch.Tensor:
    """prompts (B, P) -> the N = new_tokens greedily decoded ids (B, N). Never stops early (Analysis360:
    every sequence generates exactly N tokens, EOS included)."""
    model.eval()
    if prompts.shape[1] + new_tokens > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt {prompts.shape[1]} + {new_tokens} new tokens exceed model.max_seq_len={model.cfg.max_seq_len}"
        )
    out = torch.empty(prompts.shape[0], new_tokens, dtype=torch.long, device=prompts.device)
    if not use_cache:
        ids = prompts
        for i in range(new_tokens):
            out[:, i] = model(ids)[:, -1].argmax(-1)
            ids = torch.cat([ids, out[:, i : i + 1]], dim=1)
        return out
    cache = KVCache(model, prompts.shape[0], prompts.shape[1] + new_tokens)
    logits = _cached_step(model, prompts, cache)
    for i in range(new_tokens):
        out[:, i] = logits.argmax(-1)
        if i + 1 < new_tokens:
            logits = _cached_step(model, out[:, i : i + 1], cache)
    return out
