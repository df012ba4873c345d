"""Hugging Face export/import in LLM360's CrystalCoder layout, loaded by transformers offline (issue 10)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

# Offline, and dynamic modules (the exported modeling file) cached under the test session, not ~/.cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_MODULES_CACHE", str(Path(os.environ.get("TMPDIR", "/tmp")) / "crystal-hf-modules"))

import torch  # noqa: E402

from crystal import hf  # noqa: E402
from crystal.analysis.decode import greedy_decode  # noqa: E402
from crystal.checkpoint import load_checkpoint, write_checkpoint  # noqa: E402
from crystal.config import ModelConfig  # noqa: E402
from crystal.model import build_model  # noqa: E402
from crystal.tokenizer import ADDED_TOKENS, Tokenizer, train_sentencepiece  # noqa: E402

pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[hf]')")
transformers = hf.import_transformers()

STDLIB = Path(os.__file__).parent
# LLM360's released config.json (crystalcoder-train finetune/Megatron-LM/CrystalCoder/config.json), field for
# field, with the sizes shrunk: this is the layout import must accept.
LLM360_CONFIG = {
    "attn_pdrop": 0.0, "scale_attn_weights": True, "resid_pdrop": 0.0, "mup_embeddings_scale": 14.6,
    "n_inner": 300, "n_embd": 256, "layer_norm_epsilon": 1e-05, "n_positions": 128,
    "activation_function": "swiglu", "n_head": 2, "n_layer": 2, "mup_output_alpha": 2.22, "mup_width_scale": 0.5,
    "position_embedding_type": "rotary", "rotary_dim": 32, "mup_scale_qk_dot_by_d": True,
    "tie_word_embeddings": True, "vocab_size": 320, "embd_pdrop": 0.0, "model_type": "crystalcoder",
    "use_cache": True, "bos_token_id": 1, "eos_token_id": 2,
    "auto_map": {
        "AutoConfig": "configuration_crystalcoder.CrystalCoderConfig",
        "AutoModel": "modeling_crystalcoder.CrystalCoderModel",
        "AutoModelForCausalLM": "modeling_crystalcoder.CrystalCoderLMHeadModel",
    },
    "architectures": ["CrystalCoderLMHeadModel"],
}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def perturbed_model(cfg: ModelConfig, seed: int = 3):
    """A model whose norms and biases are not 1/0, so a mix-up of any of them shows in the logits."""
    model = build_model(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def stdlib_lines(n_files: int = 40) -> list[str]:
    files = sorted(STDLIB.glob("*.py"))[:n_files]
    return [line for f in files for line in f.read_text(errors="ignore").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    tok_path = root / "tok.model"
    train_sentencepiece(iter(stdlib_lines()), tok_path, vocab_size=400)
    cfg = ModelConfig.from_name("tiny", n_layer=2, vocab_size=448, max_seq_len=128)
    model = perturbed_model(cfg)
    meta = {"step": 7, "tokens": 0, "stage": 1, "model_config": dataclasses.asdict(cfg),
            "tokenizer_sha256": Tokenizer(tok_path).sha256}  # fmt: skip
    ckpt = write_checkpoint(root / "run", 7, {"model": model.state_dict(), "optimizer": {}}, meta, "model: {}\n")
    out = hf.export(ckpt, root / "export", tokenizer=tok_path)
    return {"root": root, "cfg": cfg, "model": model, "ckpt": ckpt, "dir": out, "tok": tok_path}


def load_hf(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)


def test_export_writes_llm360_names_orientation_and_config_fields(exported):
    from safetensors.torch import load_file

    cfg, model, d = exported["cfg"], exported["model"], exported["dir"]
    state = load_file(str(d / "model.safetensors"))
    expected = {"transformer.wte.weight", "transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight"}
    for i in range(cfg.n_layer):
        for part in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_fc2", "mlp.c_proj"):
            expected |= {f"transformer.h.{i}.{part}.weight", f"transformer.h.{i}.{part}.bias"}
    assert set(state) == expected
    c, f = cfg.d_model, cfg.ffn_hidden
    assert state["transformer.h.0.attn.c_attn.weight"].shape == (c, 3 * c)  # Conv1D [in, out]
    assert state["transformer.h.1.mlp.c_proj.weight"].shape == (f, c)
    assert torch.equal(state["transformer.h.0.mlp.c_fc2.weight"], model.blocks[0].mlp.c_fc2.weight.T)  # gate
    # q | k | v columns, head-major: the k block's first head is rows C..C+D of crystal's fused weight
    assert torch.equal(state["transformer.h.0.attn.c_attn.weight"][:, c : c + cfg.head_dim],
                       model.blocks[0].attn.c_attn.weight[c : c + cfg.head_dim].T)  # fmt: skip
    assert torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])
    config = json.loads((d / "config.json").read_text())
    for key in LLM360_CONFIG:  # every field LLM360's config.json has, under the same name
        assert key in config, key
    assert (config["n_embd"], config["n_inner"], config["rotary_dim"], config["mup_width_scale"]) == (256, 682, 32, 1.0)
    assert config["mup_scale_qk_dot_by_d"] is True and config["auto_map"] == LLM360_CONFIG["auto_map"]
    assert {p.name for p in d.iterdir()} >= {"modeling_crystalcoder.py", "tokenizer.model", "tokenizer_config.json"}


def test_transformers_loads_the_export_offline_with_crystals_logits(exported):
    hm = load_hf(exported["dir"])
    ids = torch.randint(0, exported["cfg"].vocab_size, (2, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = exported["model"](ids), hm(ids).logits
    rel = ((ours - theirs).abs().max() / ours.abs().max()).item()
    assert rel <= 1e-4, rel
    # the loss path agrees too (labels shifted inside, like every transformers causal LM)
    with torch.no_grad():
        hf_loss = hm(ids, labels=ids).loss
    assert hf_loss.item() == pytest.approx(exported["model"](ids[:, :-1], ids[:, 1:]).item(), rel=1e-5)


def test_generate_with_the_kv_cache_matches_crystal_greedy_decoding(exported):
    hm = load_hf(exported["dir"])
    model = exported["model"]
    prompts = torch.randint(3, 400, (3, 12), generator=torch.Generator().manual_seed(1))
    mine = greedy_decode(model, prompts, 10)
    ones = torch.ones_like(prompts)
    theirs = hm.generate(prompts, attention_mask=ones, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert torch.equal(theirs[:, 12:], mine)
    # left padding (how batched generation pads): row 0 shorter by 4, same continuation as alone
    short = prompts[0, 4:]
    padded = torch.cat([torch.zeros(4, dtype=torch.long), short])[None]
    mask = torch.cat([torch.zeros(4, dtype=torch.long), torch.ones(8, dtype=torch.long)])[None]
    batch = hm.generate(torch.cat([padded, prompts[1:2]]), attention_mask=torch.cat([mask, ones[1:2]]),
                        max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)  # fmt: skip
    assert torch.equal(batch[0, 12:], greedy_decode(model, short[None], 6)[0])
    assert torch.equal(batch[1, 12:], mine[1, :6])


def test_import_of_an_export_is_bitwise_the_original(exported):
    out = hf.import_(exported["dir"], exported["root"] / "imported")
    ckpt = load_checkpoint(out)  # a valid crystal checkpoint: manifest and hashes verify
    original = exported["model"].state_dict()
    assert set(ckpt.tensors["model"]) == set(original)
    for name, t in original.items():
        assert torch.equal(ckpt.tensors["model"][name], t), name
    assert ModelConfig(**ckpt.meta["model_config"]) == exported["cfg"]
    assert ckpt.meta["stage"] == hf.IMPORT_STAGE and ckpt.tensors["optimizer"] == {}


def llm360_reference_logits(state: dict, config: dict, ids: torch.Tensor) -> torch.Tensor:
    """LLM360's CrystalCoder forward as their modeling_crystalcoder.py computes it, written independently of
    crystal's model: sin/cos tables duplicated pairwise, x * cos + rotate_every_two(x) * sin on the first
    rotary_dim dims, scores / head_dim, Conv1D x @ W + b, logits x mup_output_alpha x mup_width_scale."""
    d, nh, rd = config["n_embd"], config["n_head"], config["rotary_dim"]
    hd = d // nh
    b, t = ids.shape
    x = state["transformer.wte.weight"][ids] * config["mup_embeddings_scale"]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rd, 2) / rd))
    angles = torch.einsum("i,j->ij", torch.arange(t), inv_freq)
    sin = angles.sin().repeat_interleave(2, dim=-1)[None, :, None, :]
    cos = angles.cos().repeat_interleave(2, dim=-1)[None, :, None, :]

    def rope(z):  # (B, T, H, D)
        zr = z[..., :rd]
        every_two = torch.stack((-zr[..., 1::2], zr[..., ::2]), dim=-1).flatten(-2)
        return torch.cat([zr * cos + every_two * sin, z[..., rd:]], dim=-1)

    def ln(z, name):
        return torch.nn.functional.layer_norm(z, (d,), state[f"{name}.weight"], state[f"{name}.bias"], 1e-5)

    def conv(z, name):
        return z @ state[f"{name}.weight"] + state[f"{name}.bias"]

    mask = torch.ones(t, t, dtype=torch.bool).tril()
    for i in range(config["n_layer"]):
        p = f"transformer.h.{i}"
        q, k, v = conv(ln(x, f"{p}.ln_1"), f"{p}.attn.c_attn").split(d, dim=2)
        q, k, v = (z.view(b, t, nh, hd) for z in (q, k, v))
        q, k = rope(q).transpose(1, 2), rope(k).transpose(1, 2)
        w = (q @ k.transpose(-1, -2)) / hd
        w = torch.where(mask, w, torch.finfo(w.dtype).min).softmax(-1)
        a = (w @ v.transpose(1, 2)).transpose(1, 2).reshape(b, t, d)
        x = x + conv(a, f"{p}.attn.c_proj")
        h = ln(x, f"{p}.ln_2")
        x = x + conv(conv(h, f"{p}.mlp.c_fc") * torch.nn.functional.silu(conv(h, f"{p}.mlp.c_fc2")), f"{p}.mlp.c_proj")
    x = ln(x, "transformer.ln_f")
    return (x @ state["lm_head.weight"].T) * config["mup_output_alpha"] * config["mup_width_scale"]


def write_llm360_checkpoint(path: Path, config: dict, seed: int = 0) -> dict:
    """A checkpoint in LLM360's released layout: their config.json fields, sharded pytorch_model-*.bin with an
    index, GPT-2's attn.bias / attn.masked_bias buffers next to the weights, lm_head a copy of wte."""
    gen = torch.Generator().manual_seed(seed)
    d, f, v = config["n_embd"], config["n_inner"], config["vocab_size"]
    rnd = lambda *shape, s=0.05: torch.randn(*shape, generator=gen) * s
    state = {"transformer.wte.weight": rnd(v, d, s=0.07)}
    shapes = {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d), "mlp.c_fc": (d, f), "mlp.c_fc2": (d, f),
              "mlp.c_proj": (f, d)}  # fmt: skip
    for i in range(config["n_layer"]):
        p = f"transformer.h.{i}"
        for ln in ("ln_1", "ln_2"):
            state[f"{p}.{ln}.weight"], state[f"{p}.{ln}.bias"] = 1 + rnd(d, s=0.1), rnd(d, s=0.1)
        for name, shape in shapes.items():
            state[f"{p}.{name}.weight"], state[f"{p}.{name}.bias"] = rnd(*shape), rnd(shape[1], s=0.02)
        n = config["n_positions"]
        state[f"{p}.attn.bias"] = torch.ones(n, n, dtype=torch.bool).tril().view(1, 1, n, n)
        state[f"{p}.attn.masked_bias"] = torch.tensor(-1e4)
    state["transformer.ln_f.weight"], state["transformer.ln_f.bias"] = 1 + rnd(d, s=0.1), rnd(d, s=0.1)
    state["lm_head.weight"] = state["transformer.wte.weight"].clone()
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config, indent=4))
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :]}  # fmt: skip
    for file, keys in shards.items():
        torch.save({k: state[k] for k in keys}, path / file)
    index = {"metadata": {"total_size": 0}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return state


def test_a_checkpoint_in_llm360s_layout_imports_and_computes_their_function(tmp_path):
    state = write_llm360_checkpoint(tmp_path / "llm360", LLM360_CONFIG)
    out = hf.import_(tmp_path / "llm360", tmp_path / "ckpt")
    ckpt = load_checkpoint(out)
    cfg = ModelConfig(**ckpt.meta["model_config"])
    assert (cfg.d_model, cfg.ffn_hidden, cfg.rotary_dims, cfg.width_scale, cfg.logits_scale, cfg.softmax_scale) == (
        256, 300, 32, 0.5, pytest.approx(2.22 * 0.5), 1 / 128)  # fmt: skip
    model = build_model(cfg, device="meta")
    model.load_state_dict(ckpt.tensors["model"], assign=True)
    ids = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(ids)
        ref = llm360_reference_logits(state, LLM360_CONFIG, ids)
    assert ((ours - ref).abs().max() / ref.abs().max()).item() <= 1e-4
    # our modeling file also loads their directory as it is (.bin shards, mask buffers and all)
    import shutil

    from crystal.hf_remote import REMOTE_CODE_DIR, REMOTE_CODE_FILES

    for name in REMOTE_CODE_FILES[:2]:
        shutil.copyfile(REMOTE_CODE_DIR / name, tmp_path / "llm360" / name)
    with torch.no_grad():
        theirs = load_hf(tmp_path / "llm360")(ids).logits
    assert ((theirs - ref).abs().max() / ref.abs().max()).item() <= 1e-4


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda c, s: s.pop("transformer.h.1.mlp.c_fc2.weight"), r"1 missing.*h\.1\.mlp\.c_fc2\.weight"),
        (lambda c, s: s.__setitem__("transformer.h.0.attn.c_proj.weight", torch.zeros(3, 3)), r"wrong shape.*c_proj"),
        (lambda c, s: s.__setitem__("transformer.wpe.weight", torch.zeros(3)), r"unexpected.*transformer\.wpe"),
        (lambda c, s: c.__setitem__("activation_function", "gelu"), r"activation_function='gelu'"),
        (lambda c, s: c.__setitem__("position_embedding_type", "alibi"), r"position_embedding_type='alibi'"),
        (lambda c, s: s.__setitem__("lm_head.weight", torch.zeros(320, 256)), r"lm_head\.weight differs"),
    ],
)
def test_import_says_what_does_not_match(tmp_path, change, message):
    config = dict(LLM360_CONFIG)
    state = write_llm360_checkpoint(tmp_path / "src", config)
    change(config, state)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps(config))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items() if v.dtype != torch.bool and v.dim()},
              str(broken / "model.safetensors"))  # fmt: skip
    with pytest.raises(hf.HFError, match=message):
        hf.import_(broken, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_only_crystalcoder_family_models_export():
    with pytest.raises(hf.HFError, match="not a CrystalCoder-family model.*rmsnorm.*bias=false.*rope_interleaved"):
        hf.check_exportable(ModelConfig.from_name("amber_7b"))
    hf.check_exportable(ModelConfig.from_name("crystalcoder_7b"))
    cfg = hf.model_config_from_hf(hf.hf_config(ModelConfig.from_name("crystalcoder_7b"), {}), "7b")
    assert cfg.name == "crystalcoder_7b" and cfg.num_params() == 6_575_278_720


def test_autotokenizer_round_trips_text_and_special_tokens(exported):
    tok = transformers.AutoTokenizer.from_pretrained(exported["dir"], trust_remote_code=True)
    ours = Tokenizer(exported["tok"], exported["cfg"].vocab_size)
    assert len(tok) == ours.base_vocab + len(ADDED_TOKENS)
    assert [tok.convert_tokens_to_ids(t) for t in ADDED_TOKENS] == [ours.token_id(t) for t in ADDED_TOKENS]
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    texts = [
        "def f(x):\n    return x  # comment\n",
        "<|fim_prefix|>def add(a, b):\n<|fim_suffix|>    return c\n<|fim_middle|>    c = a + b\n",
        "  two  spaces,\ttabs\t\tand\n\n\nnewlines ",
        "HTML keeps <s> and </s> as text; only the added tokens are special. <|im_start|>user<|im_end|>",
        "unicode: caf\u00e9, \u4e2d\u6587, emoji \U0001f600, digits 1234567890",
        "",
    ]
    texts += ["\n".join(f.read_text(errors="ignore") for f in sorted(STDLIB.glob("*.py"))[60:64])]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids == ours.encode_with_special(text), text[:60]
        assert tok.decode(ids) == ours.decode(ids) == text
    specials = tok("<|fim_prefix|>x<|fim_middle|>", add_special_tokens=True)["input_ids"]
    assert specials[0] == ours.token_id("<|fim_prefix|>") and specials[-1] == ours.token_id("<|fim_middle|>")
    assert tok.decode(specials, skip_special_tokens=True) == ours.decode(specials[1:-1])


def test_cli_exports_a_run_and_imports_it_back(exported, tmp_path, capsys):
    run = exported["ckpt"].parent.parent  # a run directory: export takes its latest checkpoint
    assert hf.main(["export", str(run), str(tmp_path / "e"), "--tokenizer", str(exported["tok"])]) == 0
    assert hf.main(["import", str(tmp_path / "e"), str(tmp_path / "c")]) == 0
    assert "train.resume=" in capsys.readouterr().out
    assert hf.main(["import", str(tmp_path / "e"), str(tmp_path / "c")]) == 1  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err
    assert hf.main(["export", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 1


@pytest.mark.slow
def test_an_imported_checkpoint_continues_training_in_crystal(fast_config, tmp_path):
    from crystal.checkpoint import find_latest
    from crystal.trainer import Trainer

    small = ["model.n_layer=2", "train.seq_len=64", "train.micro_batch=4", "train.global_batch=8",
             "train.eval_every=1000", "optim.warmup_steps=1"]  # fmt: skip
    first = Trainer(fast_config(*small, "train.steps=1", "train.ckpt_every=1", "train.run_name=a"), log=lambda *_: 0)
    first.fit()
    first.close()
    export_dir = hf.export(find_latest(first.run_dir), tmp_path / "export")  # tokenizer found in the data cache
    imported = hf.import_(export_dir, tmp_path / "imported")
    again = Trainer(fast_config(*small, "train.steps=1", "train.run_name=b", f"train.resume={imported}"),
                    log=lambda *_: 0)  # fmt: skip
    try:
        assert again.step == 0
        weights = first.engine.state_dict()["model"]
        for name, t in again.engine.state_dict()["model"].items():
            assert torch.equal(t, weights[name]), name
        again.fit()
    finally:
        again.close()
