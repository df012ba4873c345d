"""RoPE kernel vs crystal.kernels.reference.rope: partial (CrystalCoder 25%) and full rotary, GPT-J interleaved
and rotate-half, shared and per-token positions, the in-place path, q and k in one launch."""

from __future__ import annotations

import pytest
import torch
from crystal.kernels import reference
from crystal.kernels.rope import rope, rope_backward_op, rope_op
from torch.library import opcheck

from tests.kernels.helpers import DEVICE, assert_close, gpu_param, positions_from_docs, random_doc_ids

# (name, B, S, H, D): realistic-but-small (CrystalCoder head dim), odd/prime, one row.
SHAPES = [("realistic", 2, 64, 2, 128), ("odd", 1, 37, 3, 64), ("one_row", 1, 1, 1, 64)]
# (dtype, atol, rtol): angles are fp32 in both, so fp32 differs by sin/cos ulps only; 16-bit outputs are one
# rounding of the same fp32 value (the reference rounds identically), so ~1 ulp of the dtype.
DTYPES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 1e-3, 1e-3),
    gpu_param(torch.bfloat16, 1e-2, 1e-2, id="bfloat16"),
]


def _qk_views(b, s, h, d, dtype, seed=0):
    """q, k as the model makes them: strided views into a fused (B, S, 3, H, D) projection."""
    qkv = torch.randn(b, s, 3, h, d, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    return qkv, qkv[:, :, 0], qkv[:, :, 1]


@pytest.mark.parametrize("positions_kind", ["shared", "per_document"])
@pytest.mark.parametrize(("rotary_pct", "interleaved"), [(0.25, True), (1.0, True), (0.25, False), (1.0, False)])
@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
@pytest.mark.parametrize(("name", "b", "s", "h", "d"), SHAPES, ids=[s[0] for s in SHAPES])
def test_rope_forward_backward_match_reference(name, b, s, h, d, dtype, atol, rtol, rotary_pct, interleaved,
                                               positions_kind):  # fmt: skip
    rotary_dims = int(d * rotary_pct)
    _, q, k = _qk_views(b, s, h, d, dtype)
    if positions_kind == "shared":
        positions = torch.arange(s, device=DEVICE) + 1000  # far from 0: exercises angle precision
    else:
        positions = positions_from_docs(random_doc_ids(b, s, min(3, s), torch.Generator().manual_seed(1))).to(DEVICE)
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    qo, ko = rope(q, k, positions, rotary_dims=rotary_dims, theta=10000.0, interleaved=interleaved)
    q32, k32 = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    rq, rk = reference.rope(q32, k32, positions, rotary_dims=rotary_dims, theta=10000.0, interleaved=interleaved)
    assert qo.dtype == dtype
    assert_close(qo, rq, atol=atol, rtol=rtol, name="q")
    assert_close(ko, rk, atol=atol, rtol=rtol, name="k")
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    dq, dk = torch.autograd.grad((qo, ko), (q, k), (gq, gk))
    rdq, rdk = torch.autograd.grad((rq, rk), (q32, k32), (gq.float(), gk.float()))
    assert_close(dq, rdq, atol=atol, rtol=rtol, name="dq")
    assert_close(dk, rdk, atol=atol, rtol=rtol, name="dk")


@pytest.mark.parametrize("interleaved", [True, False])
def test_without_autograd_rope_rotates_in_place(interleaved):
    qkv, q, k = _qk_views(2, 20, 2, 64, torch.float32)
    expected = reference.rope(q, k, torch.arange(20, device=DEVICE), rotary_dims=16, theta=10000.0,
                              interleaved=interleaved)  # fmt: skip
    untouched = qkv[:, :, :, :, 16:].clone()
    with torch.no_grad():
        qo, ko = rope(q, k, torch.arange(20, device=DEVICE), rotary_dims=16, theta=10000.0, interleaved=interleaved)
    assert qo.data_ptr() == q.data_ptr() and ko.data_ptr() == k.data_ptr()
    assert_close(qkv[:, :, 0], expected[0], atol=1e-5, rtol=1e-5, name="q in place")
    assert_close(qkv[:, :, 1], expected[1], atol=1e-5, rtol=1e-5, name="k in place")
    assert torch.equal(qkv[:, :, :, :, 16:], untouched)  # pass-through dims and v never written


def test_angles_are_fp32_for_half_inputs_at_long_positions():
    """A bf16/fp16 angle at position 2047 is off by ~8 radians; ours must match the fp32 reference."""
    _, q, k = _qk_views(1, 4, 1, 128, torch.float16)
    positions = torch.tensor([2044, 2045, 2046, 2047], device=DEVICE)
    qo, _ = rope(q.clone(), k.clone(), positions, rotary_dims=32, theta=10000.0)
    rq, _ = reference.rope(q.float(), k.float(), positions, rotary_dims=32, theta=10000.0)
    assert_close(qo, rq, atol=1e-3, rtol=1e-3, name="q")


def test_opcheck():
    _, q, k = _qk_views(1, 9, 2, 64, torch.float32)
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    positions = torch.arange(9, device=DEVICE)
    opcheck(rope_op, (q, k, positions, 16, 10000.0, True))
    opcheck(rope_backward_op, (torch.randn(1, 9, 2, 64, device=DEVICE), torch.randn(1, 9, 2, 64, device=DEVICE),
                               positions, 16, 10000.0, False))  # fmt: skip


def test_bad_inputs_are_refused():
    _, q, k = _qk_views(1, 9, 2, 64, torch.float32)
    with pytest.raises(ValueError, match="rotary_dims=15"):
        rope(q, k, torch.arange(9, device=DEVICE), rotary_dims=15, theta=10000.0)
    with pytest.raises(ValueError, match="positions must be integer"):
        rope(q, k, torch.arange(8, device=DEVICE), rotary_dims=16, theta=10000.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_long_shape_uses_64bit_offsets():
    """B*S*H*D > 2^31 elements; checks the last tokens."""
    h, d = 16, 128
    s = (2**31) // (h * d) + 5
    q = torch.randn(1, s, h, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn_like(q)
    positions = torch.arange(s, device="cuda") % 4096
    qo, ko = rope_op(q, k, positions, 32, 10000.0, True)
    rq, rk = reference.rope(q[:, -3:].float(), k[:, -3:].float(), positions[-3:], rotary_dims=32, theta=10000.0)
    assert_close(qo[:, -3:], rq, atol=1e-2, rtol=1e-2, name="q tail")
    assert_close(ko[:, -3:], rk, atol=1e-2, rtol=1e-2, name="k tail")
