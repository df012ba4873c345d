"""Fused SwiGLU vs reference.swiglu, including CrystalCoder's FFN width 10922 (not a multiple of 128)."""

from __future__ import annotations

import pytest
import torch
from crystal.kernels import reference
from crystal.kernels.swiglu import swiglu, swiglu_backward_op, swiglu_op
from torch.library import opcheck

from tests.kernels.helpers import DEVICE, assert_close, gpu_param

# (name, tokens, C, F, bias): realistic-but-small, CrystalCoder's FFN 10922 at a cheap width, odd/prime
# everything (K not a multiple of the tile either), one row, no biases (Amber).
SHAPES = [
    ("realistic", 64, 64, 176, True),
    ("ffn_10922", 16, 32, 10922, True),
    ("odd", 37, 40, 97, True),
    ("one_row", 1, 32, 64, True),
    ("no_bias", 24, 32, 80, False),
]
# (dtype, atol, rtol). fp32: summation order only, but dx sums over F terms. fp16/bf16: the reference
# rounds u and g to 16 bits before the product while the kernel keeps them in fp32, and the gradients are
# stored in 16 bits before the dx/dW matmuls (as eager autograd does).
DTYPES = [
    (torch.float32, 2e-5, 2e-5),
    (torch.float16, 5e-3, 5e-3),
    gpu_param(torch.bfloat16, 3e-2, 3e-2, id="bfloat16"),
]


def _inputs(n, c, f, bias, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g)
    w_up, w_gate = (torch.randn(f, c, generator=g) / c**0.5 for _ in range(2))
    b_up, b_gate = (torch.randn(f, generator=g) * 0.1 if bias else None for _ in range(2))
    return [t.to(DEVICE, dtype).requires_grad_() if t is not None else None for t in (x, w_up, b_up, w_gate, b_gate)]


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
@pytest.mark.parametrize(("name", "n", "c", "f", "bias"), SHAPES, ids=[s[0] for s in SHAPES])
def test_swiglu_forward_backward_match_reference(name, n, c, f, bias, dtype, atol, rtol):
    args = _inputs(n, c, f, bias, dtype)
    h = swiglu(*args)
    grad_h = torch.randn(h.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    leaves = [t for t in args if t is not None]
    grads = torch.autograd.grad(h, leaves, grad_h)
    ref_args = [t.detach().float().requires_grad_() if t is not None else None for t in args]
    ref_h = reference.swiglu(*ref_args)
    ref_grads = torch.autograd.grad(ref_h, [t for t in ref_args if t is not None], grad_h.float())
    assert h.dtype == dtype and h.shape == (n, f)
    assert_close(h, ref_h, atol=atol, rtol=rtol, name="h")
    for got, want, label in zip(grads, ref_grads, ("dx", "dw_up", "db_up", "dw_gate", "db_gate")):
        assert_close(got, want, atol=atol * max(1.0, want.abs().max().item()), rtol=rtol, name=label)


def test_leading_dims_are_flattened_and_restored():
    x, w_up, b_up, w_gate, b_gate = _inputs(12, 32, 48, True, torch.float32)
    h = swiglu(x.view(2, 6, 32), w_up, b_up, w_gate, b_gate)
    assert h.shape == (2, 6, 48)
    assert_close(h.flatten(0, 1), reference.swiglu(x, w_up, b_up, w_gate, b_gate), atol=2e-5, rtol=2e-5, name="h")


def test_opcheck():
    x, w_up, b_up, w_gate, b_gate = _inputs(9, 32, 40, True, torch.float32)
    opcheck(swiglu_op, (x, w_up, b_up, w_gate, b_gate))
    opcheck(swiglu_op, (x, w_up, None, w_gate, None))
    dh = torch.randn(9, 40, device=DEVICE)
    opcheck(swiglu_backward_op, (dh, x.detach(), w_up.detach(), b_up.detach(), w_gate.detach(), b_gate.detach()))


def test_mismatched_inputs_are_refused():
    x, w_up, b_up, w_gate, b_gate = _inputs(4, 32, 40, True, torch.float32)
    with pytest.raises(ValueError, match="both biases or neither"):
        swiglu(x, w_up, b_up, w_gate, None)
    with pytest.raises(ValueError, match="W \\(F, C\\)"):
        swiglu(x, w_up[:, :16], b_up, w_gate[:, :16], b_gate)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_long_shape_uses_64bit_offsets():
    """tokens * C > 2^31 (x offsets) and tokens * F > 2^31 (h offsets); checks the last rows."""
    c, f = 64, 80
    n = (2**31) // c + 7
    x = torch.randn(n, c, device="cuda", dtype=torch.bfloat16)
    w_up, w_gate = (torch.randn(f, c, device="cuda", dtype=torch.bfloat16) / 8 for _ in range(2))
    b_up, b_gate = (torch.randn(f, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    h = swiglu_op(x, w_up, b_up, w_gate, b_gate)
    ref = reference.swiglu(*(t.float() for t in (x[-5:], w_up, b_up, w_gate, b_gate)))
    assert_close(h[-5:], ref, atol=3e-2, rtol=3e-2, name="h tail")
