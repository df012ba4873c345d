"""The tiny CrystalCoder with model.ops=triton against ops=torch: same loss, logits and gradients, also
under torch.compile (the kernels stay opaque custom ops in the graph)."""

from __future__ import annotations

import pytest
import torch

from crystal.config import ModelConfig
from crystal.model import build_model
from tests.kernels.helpers import DEVICE, assert_close, positions_from_docs, random_doc_ids

B, S = 2, 32


def _pair(n_layer=1, **overrides):
    torch_model = build_model(ModelConfig.from_name("tiny", n_layer=n_layer, **overrides), device=DEVICE, seed=1)
    triton_model = build_model(
        ModelConfig.from_name("tiny", n_layer=n_layer, ops="triton", **overrides), device=DEVICE, seed=1
    )
    triton_model.load_state_dict(torch_model.state_dict())
    return torch_model, triton_model


def _batch(vocab):
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, vocab, (B, S), generator=g)
    targets = torch.randint(0, vocab, (B, S), generator=g)
    targets[0, :5] = -100  # loss-masked tokens (FIM pad)
    doc_ids = random_doc_ids(B, S, 3, g)
    return idx.to(DEVICE), targets.to(DEVICE), positions_from_docs(doc_ids).to(DEVICE), doc_ids.to(DEVICE)


def _loss_and_grads(model, batch, step=None):
    """step: what to call (a compiled wrapper of model); gradients are read from model's own parameters."""
    idx, targets, positions, doc_ids = batch
    loss = (model if step is None else step)(idx, targets, positions=positions, doc_ids=doc_ids)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _assert_same_training_signal(ref, got, rel_tol):
    (ref_loss, ref_grads), (loss, grads) = ref, got
    assert_close(loss, ref_loss, atol=rel_tol, rtol=rel_tol, name="loss")
    for name, want in ref_grads.items():
        scale = max(want.abs().max().item(), 1e-12)
        assert_close(grads[name], want, atol=rel_tol * scale, rtol=rel_tol, name=f"grad {name}")


def test_triton_ops_match_torch_ops_on_the_tiny_model():
    torch_model, triton_model = _pair()
    batch = _batch(torch_model.cfg.vocab_size)
    _assert_same_training_signal(_loss_and_grads(torch_model, batch), _loss_and_grads(triton_model, batch), 1e-4)
    with torch.no_grad():  # the inference path: RoPE in place, no gradient work in any op
        assert_close(triton_model(batch[0]), torch_model(batch[0]), atol=1e-4, rtol=1e-4, name="logits")


def _compiled_matches_eager(backend):
    _, triton_model = _pair()
    batch = _batch(triton_model.cfg.vocab_size)
    eager = _loss_and_grads(triton_model, batch)
    compiled = torch.compile(triton_model, backend=backend, fullgraph=True)
    _assert_same_training_signal(eager, _loss_and_grads(triton_model, batch, step=compiled), 1e-5)


@pytest.mark.slow
def test_triton_ops_run_under_torch_compile_as_opaque_ops():
    """fullgraph=True: no graph breaks, so every kernel is a custom op with a working fake implementation.
    aot_eager traces forward and backward through the fakes without compiling C++ (CPU CI)."""
    _compiled_matches_eager("aot_eager")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_ops_run_under_inductor():
    """The real compiler: inductor fuses the torch ops around the opaque kernels."""
    _compiled_matches_eager("inductor")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_ops_match_torch_ops_under_bf16_autocast():
    """Training precision on a GPU: bf16 autocast over fp32 weights. Both sides round to bf16 in different
    places (the kernels keep u, g, scores in fp32), so the bound is bf16-sized."""
    torch_model, triton_model = _pair()
    batch = _batch(torch_model.cfg.vocab_size)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = _loss_and_grads(torch_model, batch)
        got = _loss_and_grads(triton_model, batch)
    _assert_same_training_signal(ref, got, 5e-2)
