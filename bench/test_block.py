"""One CrystalCoder block, and a whole training step, with model.ops=triton vs ops=torch (eager and
compiled). bf16 autocast over fp32 weights, as training runs on a GPU. Issue 6 target (H100): the whole
step with ops=triton faster than ops=torch eager.

GPU shapes: the 7B's block (d 4096, 32 heads of 128, FFN 10922) at 16k tokens (B8 x S2048); the step
uses a 2-layer model of the 7B's width with its 32032 vocabulary (embedding, LM head and loss included).
CPU: only the block with ops=torch on the tiny model (Triton would run in the interpreter).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from bench.conftest import record
from bench.kernel_bench import COMPILE, COMPILE_SKIP, DEVICE, ON_GPU, measure, require_gpu, retained_mb
from crystal.config import ModelConfig
from crystal.model import Block, build_model

MODEL, BATCH, SEQ = ("crystalcoder_7b", 8, 2048) if ON_GPU else ("tiny", 1, 64)
IMPLS = ["triton", "torch", "torch_compiled"]


def _autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16) if ON_GPU else contextlib.nullcontext()


def _ops(impl):
    return "triton" if impl == "triton" else "torch"


def _maybe_compile(impl, module):
    if impl != "torch_compiled":
        return module
    if not COMPILE:
        pytest.skip(COMPILE_SKIP)
    return torch.compile(module)


def _impl_allowed(impl):
    # On CPU the reference figures come from eager ops=torch only (a compile would dominate the run).
    if impl != "torch":
        require_gpu(impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_block_forward_backward(impl):
    _impl_allowed(impl)
    cfg = ModelConfig.from_name(MODEL, n_layer=1, ops=_ops(impl))
    with torch.device(DEVICE):
        block = Block(cfg)
    step_block = _maybe_compile(impl, block)
    x = torch.randn(BATCH, SEQ, cfg.d_model, device=DEVICE, requires_grad=True)
    positions = torch.arange(SEQ, device=DEVICE)
    params = [x, *block.parameters()]

    def forward():
        with _autocast():
            return step_block(x, positions)

    def fwd_bwd():
        out = forward()
        return torch.autograd.grad(out, params, torch.ones_like(out))

    out, saved = retained_mb(forward)
    del out
    shape = f"{MODEL} block B{BATCH} S{SEQ}"
    flops = BATCH * SEQ * (cfg.flops_per_token(SEQ) - 6 * cfg.vocab_size * cfg.d_model)  # one layer, no LM head
    if saved is not None:
        record("block", op="block.saved", shape=shape, dtype="bf16-autocast", impl=impl, ms=0.0, rate=saved,
               unit="MB saved by forward")  # fmt: skip
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    measure("block", op="block.fwd+bwd", shape=shape, dtype=dtype, impl=impl, fn=fwd_bwd, flops=flops)


@pytest.mark.parametrize("impl", ["triton", "torch"])  # the target is eager; compiling a model costs minutes
def test_model_training_step(impl):
    if not ON_GPU:
        pytest.skip("GPU comparison; the CPU training-step figure is bench/test_train_step.py's")
    cfg = ModelConfig.from_name(MODEL, n_layer=2, ops=_ops(impl))
    model = build_model(cfg, device=DEVICE, seed=1)
    step_model = _maybe_compile(impl, model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=ON_GPU)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), device=DEVICE, generator=g)
    targets = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), device=DEVICE, generator=g)

    def step():
        with _autocast():
            loss = step_model(idx, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    tokens = BATCH * SEQ
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    row = measure("block", op="train_step", shape=f"{MODEL} n_layer 2 B{BATCH} S{SEQ}", dtype=dtype, impl=impl,
                  fn=step, flops=tokens * cfg.flops_per_token(SEQ))  # fmt: skip
    print(f"[bench] train_step {impl}: {tokens / float(row['ms']) * 1e3:,.0f} tok/s")
