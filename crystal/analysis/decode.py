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
        """In the dtype the keys come out in (bf16 under autocast, else the weights'). Zeros, not empty: a ragged
        batch's attention spans slots a shorter sequence never wrote; masked out, but 0 x NaN is NaN."""
        if self.k is None:
            self.k = torch.zeros(self.shape, dtype=like.dtype, device=like.device)
            self.v = torch.zeros(self.shape, dtype=like.dtype, device=like.device)


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


# ----------------------------------------------------------------------------------------------
# Ragged batches: prompts of different lengths, sampling, early stop (code evaluation)


def _ragged_step(model: CrystalCoder, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One new token per sequence, ids (B,) at its own position pos (B,) -> logits (B, V).

    Sequence b's key/value goes to cache slot pos[b]; it attends to slots 0..pos[b] only, so the slots a
    shorter prompt left as padding (and stale slots of longer ones) are never seen."""
    cfg, ops = model.cfg, model.ops
    b = ids.shape[0]
    rows = torch.arange(b, device=ids.device)
    x = model.embed(ids[:, None])  # (B, 1, C)
    t = int(pos.max()) + 1
    visible = (torch.arange(t, device=ids.device)[None, :] <= pos[:, None])[:, None, None, :]  # (B, 1, 1, t)
    for layer, block in enumerate(model.blocks):
        attn = block.attn
        qkv = attn.c_attn(block.ln_1(x)).view(b, 1, 3, cfg.n_head, cfg.head_dim)
        q, k, v = qkv.unbind(dim=2)  # (B, 1, H, D)
        q, k = ops.rope(q, k, pos[:, None], rotary_dims=cfg.rotary_dims, theta=cfg.rope_theta,
                        interleaved=cfg.rope_interleaved)  # fmt: skip
        cache.allocate(k)
        cache.k[layer, rows, :, pos] = k[:, 0]  # (B, H, D) into slot pos[b] of row b
        cache.v[layer, rows, :, pos] = v[:, 0]
        keys, values = cache.k[layer, :, :, :t], cache.v[layer, :, :, :t]  # (B, H, t, D)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=visible, scale=cfg.softmax_scale)
        x = x + attn.c_proj(y.transpose(1, 2).reshape(b, 1, cfg.d_model))
        x = x + block.mlp(block.ln_2(x))
    return model.head_logits(x)[:, 0]


def pick_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None,
                vocab_limit: int | None = None) -> torch.Tensor:  # fmt: skip
    """logits (B, V) -> ids (B,): argmax at temperature 0, else nucleus sampling (Holtzman et al. 2019): the
    smallest set of tokens whose probability reaches top_p, renormalised. Ids >= vocab_limit (embedding rows
    no token uses) are never picked."""
    logits = logits.float()
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits[:, vocab_limit:] = float("-inf")
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        sorted_p[(sorted_p.cumsum(-1) - sorted_p) >= top_p] = 0.0  # drop a token once those before it reach top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model: CrystalCoder, prompts: list[list[int]], max_new_tokens: int, *, samples: int = 1,
             temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None,
             stop_ids: frozenset[int] = frozenset(), stop=None,
             vocab_limit: int | None = None) -> list[list[int]]:  # fmt: skip
    """Prompts of any lengths -> `samples` continuations of each (out[i * samples + s]), one KV cache.

    A sequence ends at a token in stop_ids (not included), when stop(j, ids) says so for sequence j's ids
    so far, or after max_new_tokens. Finished sequences leave the batch (their cache rows are dropped). The
    prompt pass is right-padded and causal, so every real position sees only its own prompt's tokens; it
    runs once per prompt, its cache then copied to the prompt's `samples` sequences."""
    model.eval()
    device = next(model.parameters()).device
    lens = [len(p) for p in prompts]
    if not prompts or min(lens) == 0:
        raise ValueError("generate needs at least one prompt, each of at least one token")
    p_max = max(lens)
    if p_max + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt {p_max} + {max_new_tokens} new tokens exceed model.max_seq_len={model.cfg.max_seq_len}"
        )
    ids = torch.zeros(len(prompts), p_max, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.as_tensor(p)
    ids = ids.to(device)
    cache = KVCache(model, len(prompts), p_max + max_new_tokens)
    x = model.embed(ids)
    for layer, block in enumerate(model.blocks):
        x = _block_with_cache(model, block, layer, x, cache)
    pos = torch.tensor(lens, device=device)  # where each sequence's next token goes
    logits = model.head_logits(x[torch.arange(len(prompts), device=device), pos - 1][:, None])[:, 0]
    if samples > 1:  # (L, B, H, T, D) -> (L, B * samples, H, T, D), prompt-major like the output
        cache.k, cache.v = cache.k.repeat_interleave(samples, 1), cache.v.repeat_interleave(samples, 1)
        pos, logits = pos.repeat_interleave(samples), logits.repeat_interleave(samples, 0)
    out: list[list[int]] = [[] for _ in range(len(prompts) * samples)]
    active = list(range(len(out)))  # batch row -> output index
    for step in range(max_new_tokens):
        chosen = pick_tokens(logits, temperature, top_p, generator, vocab_limit)
        keep = []
        for row, (i, t) in enumerate(zip(active, chosen.tolist())):
            if t in stop_ids:
                continue
            out[i].append(t)
            if stop is None or not stop(i, out[i]):
                keep.append(row)
        if not keep or step + 1 == max_new_tokens:
            break
        if len(keep) < len(active):
            rows = torch.tensor(keep, device=device)
            cache.k, cache.v = cache.k[:, rows], cache.v[:, rows]
            chosen, pos = chosen[rows], pos[rows]
            active = [active[r] for r in keep]
        logits = _ragged_step(model, chosen, pos, cache)
        pos = pos + 1
    return out
