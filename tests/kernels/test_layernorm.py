"""LayerNorm kernel vs crystal.kernels.reference.layernorm (fp32 statistics, row-parallel dW/db)."""

from __future__ import annotations

import pytest
import torch
from crystal.kernels import reference
from crystal.kernels.layernorm import layernorm, layernorm_backward_op, layernorm_op
from torch.library import opcheck

from tests.kernels.helpers import DEVICE, assert_close, gpu_param

# (name, leading shape, C, bias): realistic-but-small (the model's (B, S, C)), CrystalCoder's width on one
# row, odd/prime rows and width without bias (several programs share the dW reduction).
SHAPES = [
    ("realistic", (2, 48), 256, True),
    ("one_row_4096", (1,), 4096, True),
    ("odd_no_bias", (131,), 97, False),
]
# (dtype, atol, rtol). fp32: statistics in fp32 both sides. 16-bit: y and dx are one rounding of an fp32
# value (the reference computes in fp32 on the upcast input); dW/db stay fp32 (fp32 weights).
DTYPES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 2e-3, 2e-3),
    gpu_param(torch.bfloat16, 2e-2, 2e-2, id="bfloat16"),
]


def _inputs(lead, c, bias, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, c, generator=g) * 2 + 0.5).to(DEVICE, dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(c, generator=g)).to(DEVICE).requires_grad_()  # fp32 weights, as in training
    b = (0.1 * torch.randn(c, generator=g)).to(DEVICE).requires_grad_() if bias else None
    return x, w, b


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
@pytest.mark.parametrize(("name", "lead", "c", "bias"), SHAPES, ids=[s[0] for s in SHAPES])
def test_layernorm_forward_backward_match_reference(name, lead, c, bias, dtype, atol, rtol):
    x, w, b = _inputs(lead, c, bias, dtype)
    y = layernorm(x, w, b, 1e-5)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    leaves = [t for t in (x, w, b) if t is not None]
    grads = torch.autograd.grad(y, leaves, grad_y)
    x32 = x.detach().float().requires_grad_()
    ref_leaves = [x32] + leaves[1:]
    ref_y = reference.layernorm(x32, w, b, 1e-5)
    ref_grads = torch.autograd.grad(ref_y, ref_leaves, grad_y.float())
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, ref_y, atol=atol, rtol=rtol, name="y")
    assert [g.dtype for g in grads] == [t.dtype for t in leaves]
    for got, want, label in zip(grads, ref_grads, ("dx", "dw", "db")):
        assert_close(got, want, atol=atol * max(1.0, want.abs().max().item()), rtol=rtol, name=label)


def test_opcheck():
    x, w, b = _inputs((7,), 40, True, torch.float32)
    opcheck(layernorm_op, (x, w, b, 1e-5))
    opcheck(layernorm_op, (x, w, None, 1e-5))
    _, mean, rstd = layernorm_op(x.detach(), w.detach(), b.detach(), 1e-5)
    opcheck(layernorm_backward_op, (torch.randn(7, 40, device=DEVICE), x.detach(), w.detach(), mean, rstd))


def test_too_wide_rows_are_refused():
    x = torch.zeros(1, 40000, device=DEVICE)
    with pytest.raises(ValueError, match="C=40000"):
        layernorm(x, torch.ones(40000, device=DEVICE), None, 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_long_shape_uses_64bit_offsets():
    """N * C > 2^31 elements at CrystalCoder's width; checks the last rows and the dW/db reduction."""
    c = 4096
    n = (2**31) // c + 3
    x = torch.randn(n, c, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(c, device="cuda", requires_grad=True)
    b = torch.zeros(c, device="cuda", requires_grad=True)
    y = layernorm(x, w, b, 1e-5)
    y[-4:].float().sum().backward()
    x_tail = x[-4:].detach().float().requires_grad_()
    w_ref, b_ref = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ref = reference.layernorm(x_tail, w_ref, b_ref, 1e-5)
    ref.sum().backward()
    assert_close(y[-4:], ref, atol=2e-2, rtol=2e-2, name="y tail")
    assert_close(x.grad[-4:], x_tail.grad, atol=2e-2, rtol=2e-2, name="dx tail")
    assert_close(w.grad, w_ref.grad, atol=2e-2, rtol=2e-2, name="dw")
    assert torch.count_nonzero(x.grad[:-4]) == 0
