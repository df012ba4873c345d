"""LM head + cross-entropy, forward+backward: our fused chunked kernel vs the reference that materialises
(N, V) fp32 logits (eager, compiled) vs Liger's fused linear cross-entropy. TFLOP/s use the three
N*C*V matmuls (6*N*C*V). Issue 6 target (H100): <= 0.25x torch's peak memory at >= 0.9x its speed."""

from __future__ import annotations

import pytest
import torch
from crystal.kernels import reference

from bench.kernel_bench import DEVICE, ON_GPU, compiled, liger, measure, require_gpu

LOGITS_SCALE = 0.13875

# (tokens, d_model, vocab): CrystalCoder 7B at 16k tokens, half the tokens, the 1b member's width.
GPU_CASES = [(16384, 4096, 32032), (8192, 4096, 32032), (16384, 2048, 32032)]
CPU_CASES = [(512, 256, 4096)]
CASES = GPU_CASES if ON_GPU else CPU_CASES
IMPLS = ["triton", "reference", "reference_compiled", "liger"]


def _loss_fn(impl, main_shape):
    if impl == "triton":
        from crystal.kernels.cross_entropy import linear_cross_entropy

        return lambda x, w, t: linear_cross_entropy(x, w, t, logits_scale=LOGITS_SCALE)
    if impl == "liger":
        mod = liger("ops.fused_linear_cross_entropy")
        # Liger's softcap/scale options differ by version; scale the input instead (same logits).
        return lambda x, w, t: mod.LigerFusedLinearCrossEntropyFunction.apply(x * LOGITS_SCALE, w, t)[0]
    ref = (
        compiled(reference.linear_cross_entropy, main_shape)
        if impl == "reference_compiled"
        else reference.linear_cross_entropy
    )
    return lambda x, w, t: ref(x, w, t, logits_scale=LOGITS_SCALE)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "N{}_C{}_V{}".format(*c))
def test_linear_cross_entropy(case, impl):
    require_gpu(impl)
    n, c, v = case
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    x = torch.randn(n, c, device=DEVICE, dtype=dtype, requires_grad=True)
    w = (torch.randn(v, c, device=DEVICE, dtype=dtype) * 0.02).requires_grad_()
    targets = torch.randint(0, v, (n,), device=DEVICE)
    targets[::50] = -100
    fn = _loss_fn(impl, case == CASES[0])
    step = lambda: torch.autograd.grad(fn(x, w, targets), [x, w])  # noqa: E731
    try:
        step()
    except Exception as e:  # noqa: BLE001 - an optional implementation we cannot run here
        pytest.skip(f"{impl} failed here: {str(e).splitlines()[0][:200]}")
    measure("cross_entropy", op="linear_ce.fwd+bwd", shape=f"N{n} C{c} V{v}", dtype=dtype, impl=impl, fn=step,
            flops=6.0 * n * c * v)  # fmt: skip
