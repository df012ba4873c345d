"""Whole training step on CPU: crystal's trainer vs a minimal plain-PyTorch loop of the same size.

The issue's bar: crystal's tokens/s >= a minimal loop's at the same parameter count and batch
(reference figure: ~1,250 tok/s at 14M params, seq 256, batch 8, fp32, 2 cores).
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.conftest import bench_data_overrides, record


class PlainBlock(nn.Module):
    """nanoGPT's block: the smallest honest transformer layer (GELU MLP 4x, no biases)."""

    def __init__(self, d: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.fc, self.out = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class PlainGPT(nn.Module):
    def __init__(self, vocab: int, d: int, n_layer: int, n_head: int, seq: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(PlainBlock(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for b in self.blocks:
            x = b(x)
        return F.cross_entropy((self.ln_f(x) @ self.wte.weight.T).flatten(0, 1), targets.flatten())


def plain_loop_tok_s(
    vocab: int, d: int, n_layer: int, n_head: int, seq: int, batch: int, steps: int
) -> tuple[float, int]:
    torch.manual_seed(0)
    model = PlainGPT(vocab, d, n_layer, n_head, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(0, vocab, (steps + 2, batch, seq + 1))
    for i in range(steps + 2):
        if i == 2:
            t0 = time.perf_counter()
        loss = model(data[i, :, :-1], data[i, :, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * batch * seq / (time.perf_counter() - t0), sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("model_name", ["tiny"])
def test_trainer_step_vs_plain_loop(model_name, tmp_path):
    from crystal.trainer import Trainer
    from tests.conftest import compose_config

    steps = 8
    cfg = compose_config([*bench_data_overrides(), f"model={model_name}", "train.progress=false",
                          f"train.out_dir={tmp_path}", f"train.steps={steps + 2}", "train.eval_every=1000",
                          "train.ckpt_every=1000"])  # fmt: skip
    trainer = Trainer(cfg, log=lambda *_: None)
    rates = [trainer.train_step()["tok_s"] for _ in range(steps + 2)][2:]
    trainer.close()
    ours = len(rates) / sum(1 / r for r in rates)  # harmonic mean = total tokens / total time
    m = cfg.model
    batch, seq = cfg.train.micro_batch, trainer.seq_len
    plain, plain_params = plain_loop_tok_s(m.vocab_size, m.d_model, m.n_layer, m.n_head, seq, batch, steps)
    shape = f"{model_name} B{batch} S{seq}"
    record("train_step", op="train_step", shape=shape, dtype="fp32", impl="crystal", ms=batch * seq / ours * 1e3,
           rate=ours, unit="tok/s")  # fmt: skip
    record("train_step", op="train_step", shape=f"{shape} ({plain_params / 1e6:.1f}M plain)", dtype="fp32",
           impl="plain_loop", ms=batch * seq / plain * 1e3, rate=plain, unit="tok/s")  # fmt: skip
    print(f"crystal {ours:,.0f} tok/s vs plain loop {plain:,.0f} tok/s: ratio {ours / plain:.2f}")
