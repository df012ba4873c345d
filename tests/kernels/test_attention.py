"""Flash attention vs the materialised fp32 reference (crystal.kernels.reference.attention_math)."""

from __future__ import annotations

import math

import pytest
import torch
from crystal.kernels import reference
from crystal.kernels.attention import (
    attention,
    attention_backward,
    attention_backward_op,
    attention_op,
    attention_with_lse,
)
from torch.library import opcheck

from tests.kernels.helpers import DEVICE, assert_close, gpu_param, random_doc_ids

# (name, B, H, S, D, scale): realistic-but-small, odd/prime length with D 128 and the standard scale, one row.
SHAPES = [
    ("realistic", 2, 2, 64, 64, 1 / 64),
    ("odd", 1, 3, 67, 128, 1 / math.sqrt(128)),
    ("one_row", 1, 1, 1, 64, 1 / 64),
]
# (dtype, atol, rtol). fp32 differs from the reference only by summation order. fp16/bf16 round P to the
# value dtype before P @ V (as every flash kernel does) and store in 16 bits; bf16 keeps 8 mantissa bits,
# so its bound is ~8x fp16's. Gradient tolerances are relative to the largest reference gradient.
DTYPES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 2e-3, 2e-3),
    gpu_param(torch.bfloat16, 2e-2, 2e-2, id="bfloat16"),
]


def _inputs(b, h, s, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g).to(DEVICE, dtype) for _ in range(3)]


def _reference(q, k, v, scale, doc_ids, grad_out):
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    out, lse = reference.attention_math(q32, k32, v32, scale=scale, doc_ids=doc_ids)
    grads = torch.autograd.grad(out, (q32, k32, v32), grad_out.float())
    return out, lse, grads


@pytest.mark.parametrize("masking", ["causal", "documents"])
@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
@pytest.mark.parametrize(("name", "b", "h", "s", "d", "scale"), SHAPES, ids=[s[0] for s in SHAPES])
def test_attention_forward_backward_match_reference(name, b, h, s, d, scale, dtype, atol, rtol, masking):
    q, k, v = _inputs(b, h, s, d, dtype)
    doc_ids = None
    if masking == "documents":
        doc_ids = random_doc_ids(b, s, n_docs=min(3, s), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = attention_with_lse(q, k, v, scale=scale, doc_ids=doc_ids)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_out, ref_lse, ref_grads = _reference(q, k, v, scale, doc_ids, grad_out)

    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out, ref_out, atol=atol, rtol=rtol, name="out")
    assert_close(lse, ref_lse, atol=atol, rtol=rtol, name="lse")
    for got, want, label in zip((dq, dk, dv), ref_grads, ("dq", "dk", "dv")):
        assert_close(got, want, atol=atol * max(1.0, want.abs().max().item()), rtol=rtol, name=label)


def test_lse_output_is_differentiable():
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 40, 64, torch.float32))
    out, lse = attention_with_lse(q, k, v, scale=1 / 64)
    grads = torch.autograd.grad(out.sum() + lse.square().sum(), (q, k, v))
    q32, k32, v32 = (t.detach().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = reference.attention_math(q32, k32, v32, scale=1 / 64)
    ref_grads = torch.autograd.grad(ref_out.sum() + ref_lse.square().sum(), (q32, k32, v32))
    for got, want, label in zip(grads, ref_grads, ("dq", "dk", "dv")):
        assert_close(got, want, atol=1e-5, rtol=1e-5, name=label)


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the poisoned document's own rows are NaN, on purpose
def test_fully_masked_blocks_are_skipped():
    """Two 128-token documents (block-aligned for every tile size we use): poisoning one document with NaN
    must not reach the other, which is only possible if its blocks are never loaded."""
    b, h, s, d = 1, 1, 256, 64
    q, k, v = _inputs(b, h, s, d, torch.float32)
    doc_ids = torch.repeat_interleave(torch.arange(2), 128)[None].to(DEVICE)
    nan_first = lambda t: torch.cat([torch.full_like(t[:, :, :128], float("nan")), t[:, :, 128:]], dim=2)  # noqa: E731
    nan_second = lambda t: torch.cat([t[:, :, :128], torch.full_like(t[:, :, 128:], float("nan"))], dim=2)  # noqa: E731

    # forward and dQ of document 2 never read the keys/values of document 1
    out, lse = attention_with_lse(q, nan_first(k), nan_first(v), scale=1 / d, doc_ids=doc_ids)
    ref_out, _ = reference.attention_math(q[:, :, 128:], k[:, :, 128:], v[:, :, 128:], scale=1 / d)
    assert_close(out[:, :, 128:], ref_out, atol=1e-5, rtol=1e-5, name="out of document 2")
    dq, _, _ = attention_backward(torch.ones_like(out), None, q, nan_first(k), nan_first(v), out, lse, 1 / d, doc_ids)
    assert torch.isfinite(dq[:, :, 128:]).all()

    # dK/dV of document 1 never read the queries/gradients of document 2
    out, lse = attention_with_lse(q, k, v, scale=1 / d, doc_ids=doc_ids)
    _, dk, dv = attention_backward(
        nan_second(torch.ones_like(out)), None, nan_second(q), k, v, out, lse, 1 / d, doc_ids
    )
    assert torch.isfinite(dk[:, :, :128]).all() and torch.isfinite(dv[:, :, :128]).all()


def test_non_contiguous_document_ids_follow_the_reference_mask():
    """A repeated id is one document wherever it appears (the reference's equality mask)."""
    q, k, v = _inputs(1, 1, 48, 64, torch.float32)
    doc_ids = torch.tensor([[3] * 10 + [7] * 20 + [3] * 18], device=DEVICE)
    out = attention(q, k, v, scale=1 / 64, doc_ids=doc_ids)
    ref_out, _ = reference.attention_math(q, k, v, scale=1 / 64, doc_ids=doc_ids)
    assert_close(out, ref_out, atol=1e-5, rtol=1e-5, name="out")


def test_opcheck():
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 33, 64, torch.float32))
    doc_ids = random_doc_ids(1, 33, 2, torch.Generator().manual_seed(0)).to(DEVICE)
    opcheck(attention_op, (q, k, v, 1 / 64, doc_ids))
    out, lse = attention_op(q, k, v, 1 / 64, None)
    opcheck(attention_backward_op, (torch.randn_like(out), None, q.detach(), k.detach(), v.detach(),
                                    out.detach(), lse.detach(), 1 / 64, None))  # fmt: skip


def test_bad_shapes_are_refused_with_a_clear_message():
    q, k, v = _inputs(1, 2, 16, 64, torch.float32)
    with pytest.raises(ValueError, match="share one"):
        attention(q, k[:, :1], v, scale=1.0)
    with pytest.raises(ValueError, match="doc_ids has shape"):
        attention(q, k, v, scale=1.0, doc_ids=torch.zeros(2, 16, dtype=torch.long, device=DEVICE))


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_long_shape_uses_64bit_offsets(d):
    """(B*H) * S * D > 2^31 elements: head offsets only fit in int64. Checks the last heads."""
    s = 128
    h = (2**31) // (s * d) + 3
    q, k, v = (torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = attention(q, k, v, scale=1 / d)
    (out[:, -2:].float().sum()).backward()
    tail = [t[:, -2:].detach().float().requires_grad_() for t in (q, k, v)]
    ref_out, _ = reference.attention_math(*tail, scale=1 / d)
    ref_out.sum().backward()
    assert_close(out[:, -2:], ref_out, atol=2e-2, rtol=2e-2, name="out tail")
    for t, r, label in zip((q, k, v), tail, ("dq", "dk", "dv")):
        assert_close(t.grad[:, -2:], r.grad, atol=2e-2 * max(1.0, r.grad.abs().max().item()), rtol=2e-2, name=label)


@pytest.mark.parametrize(("dtype", "atol", "rtol"), [gpu_param(torch.bfloat16, 2e-2, 2e-2, id="bfloat16")])
def test_crystalcoder_shape_on_gpu(dtype, atol, rtol):
    """One full CrystalCoder attention (S 2048, D 128, scale 1/128) with documents, against SDPA's fp32 math."""
    b, h, s, d = 1, 4, 2048, 128
    q, k, v = (t.requires_grad_() for t in _inputs(b, h, s, d, dtype))
    doc_ids = random_doc_ids(b, s, 5, torch.Generator().manual_seed(3)).to(DEVICE)
    out = attention(q, k, v, scale=1 / d, doc_ids=doc_ids)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_out, _, ref_grads = _reference(q, k, v, 1 / d, doc_ids, grad_out)
    assert_close(out, ref_out, atol=atol, rtol=rtol, name="out")
    for got, want, label in zip(grads, ref_grads, ("dq", "dk", "dv")):
        assert_close(got, want, atol=atol * max(1.0, want.abs().max().item()), rtol=rtol, name=label)
