"""CrystalCoder model facts (DESIGN.md "The model"), checked on CPU."""

from __future__ import annotations

import math

import pytest
import torch
from crystal.kernels import reference

from crystal.config import MODEL_REGISTRY, ModelConfig
from crystal.model import GROUP_EMBEDDING, GROUP_HIDDEN, GROUP_NO_DECAY, build_model, count_params, param_groups


def test_crystalcoder_7b_has_exactly_the_released_parameter_count():
    model = build_model(ModelConfig.from_name("crystalcoder_7b"), device="meta")
    assert count_params(model) == 6_575_278_720
    per_layer = sum(p.numel() for p in model.blocks[0].parameters())
    assert per_layer == 201_377_108


def test_amber_is_the_same_block_with_llama_switches():
    cfg = ModelConfig.from_name("amber_7b")
    model = build_model(cfg, device="meta")
    assert count_params(model) == 6_738_415_616  # LLaMA-7B
    assert model.lm_head is not None and model.blocks[0].attn.c_attn.bias is None
    assert model.blocks[0].ln_1.bias is None  # RMSNorm
    assert (cfg.rotary_dims, cfg.rope_interleaved, cfg.logits_scale, cfg.embed_scale) == (128, False, 1.0, 1.0)


def test_unknown_model_name_lists_known_ones():
    with pytest.raises(ValueError, match="unknown model 'crystalcoder_13b'.*amber_7b.*crystalcoder_7b.*tiny"):
        ModelConfig.from_name("crystalcoder_13b")


@pytest.mark.parametrize("name", sorted(MODEL_REGISTRY))
def test_registry_members_keep_the_shape_rules(name):
    cfg = ModelConfig.from_name(name)
    assert cfg.num_params() == count_params(build_model(cfg, device="meta"))
    if name != "amber_7b":
        assert cfg.head_dim == 128 and cfg.rotary_dims == 32 and cfg.rope_interleaved and cfg.bias
        assert cfg.width_scale == pytest.approx(256 / cfg.d_model)
        assert cfg.logits_scale == pytest.approx(2.22 * cfg.width_scale)


def test_7b_muP_figures():
    cfg = ModelConfig.from_name("crystalcoder_7b")
    assert cfg.width_scale == 0.0625
    assert cfg.logits_scale == pytest.approx(0.13875)
    assert cfg.softmax_scale == 1 / 128
    assert cfg.hidden_init_std == pytest.approx(0.01825)
    assert cfg.out_init_std == pytest.approx(0.00228125)
    assert cfg.flops_per_token() / 1e9 == pytest.approx(42.7, abs=0.05)


def test_overrides_apply():
    cfg = ModelConfig.from_name("tiny", n_layer=2, ops="torch")
    assert cfg.n_layer == 2 and cfg.name == "tiny"
    with pytest.raises(ValueError, match="model.ops"):
        ModelConfig.from_name("tiny", ops="cuda")


# -- RoPE ------------------------------------------------------------------------------------------


def rope_by_complex_numbers(x: torch.Tensor, positions: torch.Tensor, rotary_dims: int, theta: float) -> torch.Tensor:
    """GPT-J rotary as complex multiplication: pair (x_2i, x_2i+1) is z_i, rotated by e^{i p theta^(-2i/R)}."""
    b, s, h, d = x.shape
    z = torch.view_as_complex(x[..., :rotary_dims].double().reshape(b, s, h, rotary_dims // 2, 2).contiguous())
    freqs = theta ** (-torch.arange(0, rotary_dims, 2, dtype=torch.float64) / rotary_dims)
    angle = positions.double()[..., None] * freqs  # (B, S, R/2)
    rotated = torch.view_as_real(z * torch.polar(torch.ones_like(angle), angle)[:, :, None, :]).reshape(
        b, s, h, rotary_dims
    )
    return torch.cat([rotated.to(x.dtype), x[..., rotary_dims:]], dim=-1)


def test_rope_is_gptj_interleaved_on_the_first_quarter_only():
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny")
    q, k = torch.randn(2, 2, 7, 2, cfg.head_dim, dtype=torch.float64).unbind(0)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])  # a document restart in the middle
    q2, k2 = reference.rope(q, k, positions, rotary_dims=cfg.rotary_dims, theta=cfg.rope_theta, interleaved=True)
    assert torch.equal(q2[..., cfg.rotary_dims :], q[..., cfg.rotary_dims :])  # last 75% untouched
    expected = rope_by_complex_numbers(q, positions, cfg.rotary_dims, cfg.rope_theta)
    torch.testing.assert_close(q2, expected, atol=1e-6, rtol=1e-6)  # fp32 angles vs fp64 formula
    torch.testing.assert_close(
        k2, rope_by_complex_numbers(k, positions, cfg.rotary_dims, cfg.rope_theta), atol=1e-6, rtol=1e-6
    )


def test_rope_rotate_half_option_differs_from_interleaved():
    x = torch.randn(1, 5, 1, 8)
    pos = torch.arange(5)
    a, _ = reference.rope(x, x, pos, rotary_dims=8, theta=10000.0, interleaved=True)
    b, _ = reference.rope(x, x, pos, rotary_dims=8, theta=10000.0, interleaved=False)
    assert not torch.allclose(a, b)
    # rotate-half pairs x_i with x_{i+R/2}: permuting the input into interleaved order gives the same result
    perm = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])
    a2, _ = reference.rope(x[..., perm], x[..., perm], pos, rotary_dims=8, theta=10000.0, interleaved=True)
    torch.testing.assert_close(a2[..., perm.argsort()], b)


def test_rope_angles_stay_fp32_under_bf16_autocast():
    positions = torch.arange(2048)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos, sin = reference.rope_angles(positions, 32, 10000.0)
        q = torch.randn(1, 2048, 1, 128, dtype=torch.bfloat16)
        out, _ = reference.rope(q, q, positions, rotary_dims=32, theta=10000.0)
    assert cos.dtype == torch.float32 and sin.dtype == torch.float32
    assert out.dtype == torch.bfloat16
    # At position 2047 a bf16 angle would be off by several radians' worth of ulps; fp32 is exact to ~1e-4.
    exact = torch.tensor(2047.0, dtype=torch.float64)
    assert abs(cos[2047, 0].item() - math.cos(exact)) < 1e-3


# -- attention, muP scales -------------------------------------------------------------------------


def test_attention_scale_is_one_over_head_dim_and_softmax_fp32():
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", n_layer=1)
    model = build_model(cfg, seed=1)
    attn = model.blocks[0].attn
    x = torch.randn(2, 9, cfg.d_model)
    positions = torch.arange(9)
    qkv = attn.c_attn(x).view(2, 9, 3, cfg.n_head, cfg.head_dim)
    q, k, v = qkv.unbind(2)
    q, k = reference.rope(q, k, positions, rotary_dims=cfg.rotary_dims, theta=cfg.rope_theta)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scores = (q.double() @ k.double().transpose(-1, -2)) / cfg.head_dim  # 1/d, not 1/sqrt(d)
    scores = scores.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))
    y = (scores.softmax(-1) @ v.double()).transpose(1, 2).reshape(2, 9, cfg.d_model)
    expected = attn.c_proj(y.float())
    torch.testing.assert_close(attn(x, positions, None), expected, atol=1e-5, rtol=1e-5)
    out, lse = reference.attention_math(q, k, v, scale=cfg.softmax_scale)
    assert lse.dtype == torch.float32


def test_document_mask_blocks_attention_across_documents():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 6, 16).unbind(0)
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1]])
    out = reference.attention(q, k, v, scale=0.25, doc_ids=doc_ids)
    second_alone = reference.attention(q[..., 3:, :], k[..., 3:, :], v[..., 3:, :], scale=0.25)
    torch.testing.assert_close(out[..., 3:, :], second_alone)
    math_out, _ = reference.attention_math(q, k, v, scale=0.25, doc_ids=doc_ids)
    torch.testing.assert_close(out, math_out, atol=1e-6, rtol=1e-5)


def test_mup_embedding_and_logit_scales_are_applied():
    cfg = ModelConfig.from_name("tiny", n_layer=1, d_model=512)  # width_scale 0.5
    model = build_model(cfg, seed=1)
    ids = torch.tensor([[5, 17, 99]])
    torch.testing.assert_close(model.embed(ids), model.wte.weight[ids] * 14.6)
    x = torch.randn(1, 3, 512)
    expected = torch.nn.functional.layer_norm(x, (512,), model.ln_f.weight, model.ln_f.bias, 1e-5) @ model.wte.weight.T
    torch.testing.assert_close(model.head_logits(x), expected * 2.22 * 0.5)


def test_init_matches_the_cerebras_run():
    cfg = ModelConfig.from_name("tiny", d_model=512, n_layer=8)  # width_scale 0.5
    model = build_model(cfg, seed=1)
    w = model.wte.weight
    assert abs(w.std().item() - 0.073 * 0.88) < 0.004  # truncation at 2 std shrinks std by ~0.88
    assert w.abs().max().item() <= 2 * 0.073 + 1e-6
    hidden = model.blocks[0].mlp.c_fc.weight
    assert hidden.abs().max().item() <= 2 * cfg.hidden_init_std + 1e-6
    assert abs(hidden.std().item() / 0.88 - 0.073 * math.sqrt(0.5)) < 0.002
    out = model.blocks[0].mlp.c_proj.weight
    assert abs(out.std().item() / 0.88 - 0.073 * math.sqrt(0.5) / 4) < 0.0005  # / sqrt(2 * 8)
    assert torch.count_nonzero(model.blocks[0].attn.c_attn.bias) == 0
    assert torch.all(model.blocks[0].ln_1.weight == 1)


def test_mup_param_groups():
    cfg = ModelConfig.from_name("tiny", d_model=512)
    model = build_model(cfg, device="meta")
    groups = {g["name"]: g for g in param_groups(model, weight_decay=0.1)}
    assert groups[GROUP_HIDDEN]["lr_scale"] == 0.5 and groups[GROUP_HIDDEN]["weight_decay"] == 0.1
    assert groups[GROUP_EMBEDDING]["lr_scale"] == 1.0 and groups[GROUP_EMBEDDING]["weight_decay"] == 0.1
    assert groups[GROUP_NO_DECAY]["lr_scale"] == 1.0 and groups[GROUP_NO_DECAY]["weight_decay"] == 0.0
    assert [p.shape for p in groups[GROUP_EMBEDDING]["params"]] == [model.wte.weight.shape]
    n_hidden = 5 * cfg.n_layer  # c_attn, attn c_proj, c_fc, c_fc2, mlp c_proj
    assert len(groups[GROUP_HIDDEN]["params"]) == n_hidden
    assert all(p.dim() == 1 for p in groups[GROUP_NO_DECAY]["params"])


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", n_layer=2, vocab_size=512)
    model = build_model(cfg, seed=1)
    ids = torch.randint(0, 512, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(ids[:, :-1], ids[:, 1:])
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.3 * losses[0]


def test_ignored_targets_do_not_count():
    cfg = ModelConfig.from_name("tiny", n_layer=1, vocab_size=256)
    model = build_model(cfg, seed=1)
    ids = torch.randint(0, 256, (2, 9))
    targets = ids[:, 1:].clone()
    full = model(ids[:, :-1], targets)
    targets[:, :4] = -100
    part = model(ids[:, :-1], targets)
    logits = model(ids[:, :-1]).float()
    expected = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 256), ids[:, 5:].reshape(-1))
    torch.testing.assert_close(part, expected)
    assert not torch.equal(full, part)
    assert model(ids[:, :-1], torch.full_like(targets, -100)).item() == 0.0
