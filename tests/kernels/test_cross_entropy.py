"""Fused linear + cross-entropy vs crystal.kernels.reference.linear_cross_entropy (which materialises the logits)."""

from __future__ import annotations

import pytest
import torch
from crystal.kernels import reference
from crystal.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_forward, linear_cross_entropy_op
from torch.library import opcheck

from tests.kernels.helpers import DEVICE, assert_close, gpu_param

LOGITS_SCALE = 0.13875  # CrystalCoder's muP output multiplier (2.22 x 0.0625)

# (name, N, C, V, ignored): CrystalCoder's vocabulary 32032 (not a power of two) at a tiny width with
# ignored targets, an odd/prime case, one row, and a batch whose targets are all ignored (loss 0, not nan).
SHAPES = [
    ("vocab_32032", 13, 16, 32032, 3),
    ("odd", 37, 24, 1009, 5),
    ("one_row", 1, 16, 100, 0),
    ("all_ignored", 6, 16, 100, 6),
]
# (dtype, atol, rtol). The logits are rounded to the input dtype before the fp32 scale in both (the
# reference's F.linear(...).float()); 16-bit gradients are stored in 16 bits before the dx/dW matmuls.
DTYPES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 2e-3, 2e-3),
    gpu_param(torch.bfloat16, 2e-2, 2e-2, id="bfloat16"),
]


def _inputs(n, c, v, ignored, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g).to(DEVICE, dtype).requires_grad_()
    w = torch.randn(v, c, generator=g).to(DEVICE, dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.randperm(n, generator=g)[:ignored]] = -100
    return x, w, targets.to(DEVICE)


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
@pytest.mark.parametrize(("name", "n", "c", "v", "ignored"), SHAPES, ids=[s[0] for s in SHAPES])
def test_linear_cross_entropy_matches_reference(name, n, c, v, ignored, dtype, atol, rtol):
    x, w, targets = _inputs(n, c, v, ignored, dtype)
    loss = linear_cross_entropy(x, w, targets, logits_scale=LOGITS_SCALE)
    dx, dw = torch.autograd.grad(loss * 3.0, (x, w))  # a non-unit upstream gradient
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = reference.linear_cross_entropy(x32, w32, targets, logits_scale=LOGITS_SCALE)
    ref_dx, ref_dw = torch.autograd.grad(ref * 3.0, (x32, w32))
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss, ref, atol=atol, rtol=rtol, name="loss")
    assert_close(dx, ref_dx, atol=atol * max(1.0, ref_dx.abs().max().item()), rtol=rtol, name="dx")
    assert_close(dw, ref_dw, atol=atol * max(1.0, ref_dw.abs().max().item()), rtol=rtol, name="dw")


def test_chunking_does_not_change_the_result():
    x, w, targets = _inputs(20, 16, 300, 4, torch.float32)
    whole = linear_cross_entropy_forward(x.detach(), w.detach(), targets, LOGITS_SCALE, -100, True, chunk_size=20)
    chunked = linear_cross_entropy_forward(x.detach(), w.detach(), targets, LOGITS_SCALE, -100, True, chunk_size=3)
    for a, b, label in zip(whole, chunked, ("loss", "dx", "dw")):
        assert_close(a, b, atol=1e-6, rtol=1e-5, name=label)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_dw_over_many_chunks_is_rounded_once(dtype):
    """dW sums every chunk's dlogits^T x: 64 chunks must give the single-chunk dW (one matmul, fp32 inside, one
    rounding) to within one 16-bit rounding. A 16-bit running sum rounds after each chunk (measured before the
    fix: up to 49 ulps in fp16, 143 in bf16 where the sum nearly cancels). bf16 is fine in the interpreter here:
    this kernel has no tl.dot, and the matmuls are torch's."""
    x, w, targets = _inputs(128, 16, 64, 0, dtype)
    x, w = x.detach(), w.detach()
    *_, one = linear_cross_entropy_forward(x, w, targets, LOGITS_SCALE, -100, True, chunk_size=128)
    *_, many = linear_cross_entropy_forward(x, w, targets, LOGITS_SCALE, -100, True, chunk_size=2)
    assert many.dtype == dtype
    mantissa = {torch.float16: 10, torch.bfloat16: 7}[dtype]
    ulp = torch.exp2(torch.floor(torch.log2(one.float().abs().clamp(min=torch.finfo(dtype).tiny))) - mantissa)
    assert ((many.float() - one.float()).abs() <= ulp).all()


def test_no_gradient_work_without_autograd():
    x, w, targets = _inputs(8, 16, 100, 1, torch.float32)
    with torch.no_grad():
        loss = linear_cross_entropy(x, w, targets, logits_scale=LOGITS_SCALE)
    _, gx, gw = linear_cross_entropy_op(x.detach(), w.detach(), targets, LOGITS_SCALE, -100, False)
    assert gx.numel() == 0 and gw.numel() == 0
    ref = reference.linear_cross_entropy(x, w, targets, logits_scale=LOGITS_SCALE)
    assert_close(loss, ref, atol=1e-5, rtol=1e-5, name="loss")


def test_opcheck():
    x, w, targets = _inputs(9, 16, 100, 2, torch.float32)
    opcheck(linear_cross_entropy_op, (x, w, targets, LOGITS_SCALE, -100, True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_long_logits_chunk_uses_64bit_offsets():
    """One chunk of 70,000 x 32,032 logits (> 2^31 elements): row offsets in the kernel need int64."""
    n, c, v = 70_000, 64, 32032
    x, w, targets = _inputs(n, c, v, 100, torch.bfloat16)
    loss, dx, _ = linear_cross_entropy_forward(x.detach(), w.detach(), targets, LOGITS_SCALE, -100, True, chunk_size=n)
    tail = slice(n - 4, n)
    x32 = x[tail].detach().float().requires_grad_()
    logits = (x32 @ w.detach().float().t()) * LOGITS_SCALE
    n_valid = (targets != -100).sum()
    ref_rows = torch.nn.functional.cross_entropy(logits, targets[tail], reduction="sum") / n_valid
    (ref_dx,) = torch.autograd.grad(ref_rows, x32)
    assert torch.isfinite(loss)
    assert_close(dx[tail], ref_dx, atol=2e-2 * max(1.0, ref_dx.abs().max().item()), rtol=2e-2, name="dx tail")
