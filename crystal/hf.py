"""Hugging Face transformers export and import, in LLM360's own CrystalCoder layout.

    python -m crystal.hf export <checkpoint or run dir> <out dir> [--tokenizer PATH] [--dtype bfloat16]
    python -m crystal.hf import <hf dir> <checkpoint dir>

An export directory is what LLM360 published for CrystalCoder, written by this project:

    config.json                 LLM360's field names (n_embd, n_layer, n_head, n_inner, rotary_dim, mup_*, ...)
                                plus a "crystal" block: the exact ModelConfig and where the weights came from
    model.safetensors           transformer.wte.weight, transformer.h.{i}.{ln_1,attn.c_attn,attn.c_proj,ln_2,
                                mlp.c_fc,mlp.c_fc2,mlp.c_proj}.{weight,bias}, transformer.ln_f.*, lm_head.weight
                                (a copy of wte); GPT-2 Conv1D orientation, weights stored [in, out]
    configuration_crystalcoder.py modeling_crystalcoder.py tokenization_crystalcoder.py   (crystal/hf_remote/)
    tokenizer.model tokenizer_config.json special_tokens_map.json generation_config.json

so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` and `AutoTokenizer.from_pretrained(dir,
trust_remote_code=True)` load it offline. Import reads the same layout (this project's exports, or LLM360's
released CrystalCoder checkpoints in .bin or .safetensors shards) into a crystal checkpoint that
`train.resume=<checkpoint>` continues from (weights only; AdamW starts fresh, the schedule from step 0).

The conversion is a rename plus a transpose, both exact: import(export(x)) == x bit for bit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from crystal.checkpoint import find_latest, load_checkpoint, write_checkpoint
from crystal.config import MODEL_REGISTRY, Config, ModelConfig
from crystal.errors import CrystalError
from crystal.hf_remote import REMOTE_CODE_DIR, REMOTE_CODE_FILES
from crystal.tokenizer import ADDED_TOKENS, BOS_ID, EOS_ID, UNK_ID, file_sha256

IMPORT_STAGE = "hf-import"  # trainer.json "stage" of an imported checkpoint: resuming starts a new schedule
AUTO_MAP = {
    "AutoConfig": "configuration_crystalcoder.CrystalCoderConfig",
    "AutoModel": "modeling_crystalcoder.CrystalCoderModel",
    "AutoModelForCausalLM": "modeling_crystalcoder.CrystalCoderLMHeadModel",
}
# GPT-2 causal-mask buffers that LLM360's released .bin files carry next to the weights; not parameters.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_fc2", "mlp.c_proj")
BLOCK_PARAMS = ("ln_1", "ln_2", *CONV1D)


class HFError(CrystalError):
    """An export or import that cannot be done as asked; the message says what does not match."""


def import_transformers():
    """`import transformers` with Hugging Face's `kernels` package (which transformers imports) resolved first.

    A checkout keeps this project's kernels/ folder at its root (installed as crystal.kernels). Python run from
    the checkout root (python -m, python -c) puts that root first on sys.path, where the folder would shadow
    Hugging Face's top-level `kernels`, and transformers' hub-kernel integration would fail to import. So the
    checkout root is left off sys.path while transformers binds `kernels`; sys.modules keeps theirs after."""
    root = Path(__file__).resolve().parent.parent
    removed = [(i, p) for i, p in enumerate(sys.path) if Path(p or os.getcwd()).resolve() == root]
    for i, _ in reversed(removed):
        del sys.path[i]
    try:
        import transformers

        try:  # transformers >= 4.5x binds `kernels` here, on first import of any model
            import transformers.integrations.hub_kernels  # noqa: F401
        except ImportError:
            pass
    finally:
        for i, p in removed:
            sys.path.insert(i, p)
    return transformers


# ----------------------------------------------------------------------------------------------
# Names and config


def hf_names(cfg: ModelConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """crystal parameter name -> (LLM360 HF name, HF shape). lm_head.weight is added separately."""
    d, f = cfg.d_model, cfg.ffn_hidden
    shapes = {
        "ln_1": (d,), "ln_2": (d,), "attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d),
        "mlp.c_fc": (d, f), "mlp.c_fc2": (d, f), "mlp.c_proj": (f, d),
    }  # fmt: skip
    out = {"wte.weight": ("transformer.wte.weight", (cfg.vocab_size, d))}
    for i in range(cfg.n_layer):
        for part in BLOCK_PARAMS:
            w = shapes[part]
            out[f"blocks.{i}.{part}.weight"] = (f"transformer.h.{i}.{part}.weight", w)
            out[f"blocks.{i}.{part}.bias"] = (f"transformer.h.{i}.{part}.bias", (w[-1],))
    out["ln_f.weight"] = ("transformer.ln_f.weight", (d,))
    out["ln_f.bias"] = ("transformer.ln_f.bias", (d,))
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = ("lm_head.weight", (cfg.vocab_size, d))
    return out


def is_conv1d(crystal_name: str) -> bool:
    return crystal_name.endswith(".weight") and any(f".{p}." in crystal_name for p in CONV1D)


def check_exportable(cfg: ModelConfig) -> None:
    problems = []
    if cfg.norm != "layernorm":
        problems.append(f"model.norm={cfg.norm!r} (LLM360's layout has LayerNorm with bias)")
    if not cfg.bias:
        problems.append("model.bias=false (LLM360's Conv1D layers all carry biases)")
    if not cfg.rope_interleaved:
        problems.append("model.rope_interleaved=false (CrystalCoder rotates GPT-J interleaved pairs)")
    if problems:
        raise HFError(
            f"model {cfg.name!r} is not a CrystalCoder-family model: {'; '.join(problems)}. Only CrystalCoder-shaped "
            "models export to LLM360's CrystalCoder layout"
        )


def hf_config(cfg: ModelConfig, provenance: dict[str, Any], dtype: str = "float32") -> dict[str, Any]:
    """config.json in LLM360's field names (finetune/Megatron-LM/CrystalCoder/config.json), plus our block."""
    return {
        "architectures": ["CrystalCoderLMHeadModel"],
        "auto_map": AUTO_MAP,
        "model_type": "crystalcoder",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_seq_len,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.ffn_hidden,
        "activation_function": "swiglu",
        "layer_norm_epsilon": cfg.norm_eps,
        "position_embedding_type": "rotary",
        "rotary_dim": cfg.rotary_dims,
        "rope_theta": cfg.rope_theta,
        "scale_attn_weights": True,
        "mup_scale_qk_dot_by_d": cfg.attn_scale == "inv_head_dim",
        "mup_width_scale": cfg.width_scale,
        "mup_embeddings_scale": cfg.embed_scale,
        "mup_output_alpha": cfg.mup_output_alpha if cfg.mup else 1.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "attn_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "use_cache": True,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "torch_dtype": dtype,
        "crystal": {"model_config": dataclasses.asdict(cfg), **provenance},
    }


def model_config_from_hf(config: dict[str, Any], source: str) -> ModelConfig:
    """LLM360 config.json fields -> ModelConfig; raises HFError naming every field that cannot be mapped."""
    problems = []

    def need(key: str, want: Any, default: Any = None) -> None:
        got = config.get(key, default)
        if got != want:
            problems.append(f"{key}={got!r} (crystal needs {want!r})")

    need("activation_function", "swiglu", "gelu")
    need("position_embedding_type", "rotary", "learned")
    need("scale_attn_weights", True, True)
    for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        need(key, False, False)
    missing = [k for k in ("vocab_size", "n_embd", "n_layer", "n_head") if k not in config]
    if missing:
        problems.append(f"missing field(s) {missing}")
    if problems:
        raise HFError(f"{source}: not a CrystalCoder config: {'; '.join(problems)}")
    d, n_head = int(config["n_embd"]), int(config["n_head"])
    head_dim = d // n_head
    rotary_dim = config.get("rotary_dim") or head_dim
    width_scale = float(config.get("mup_width_scale", 1.0))
    base_width = width_scale * d
    if abs(base_width - round(base_width)) > 1e-6:
        raise HFError(f"{source}: mup_width_scale={width_scale} x n_embd={d} is not a whole base width")
    try:
        cfg = ModelConfig(
            name="custom",
            vocab_size=int(config["vocab_size"]),
            n_layer=int(config["n_layer"]),
            d_model=d,
            n_head=n_head,
            ffn_hidden=int(config.get("n_inner") or 4 * d),
            max_seq_len=int(config.get("n_positions", 2048)),
            norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
            rope_theta=float(config.get("rope_theta", 10000.0)),
            rotary_pct=rotary_dim / head_dim,
            tie_embeddings=bool(config.get("tie_word_embeddings", True)),
            mup=True,
            mup_base_width=int(round(base_width)),
            mup_embed_scale=float(config.get("mup_embeddings_scale", 1.0)),
            mup_output_alpha=float(config.get("mup_output_alpha", 1.0)),
            attn_scale="inv_head_dim" if config.get("mup_scale_qk_dot_by_d", False) else "inv_sqrt_head_dim",
        )
    except ValueError as e:
        raise HFError(f"{source}: {e}") from None
    if cfg.rotary_dims != rotary_dim:
        raise HFError(f"{source}: rotary_dim={rotary_dim} of head_dim {head_dim} is not representable")
    for name in MODEL_REGISTRY:  # name it after the registry entry it matches, if any
        if all(v == getattr(ModelConfig.from_name(name), k) for k, v in dataclasses.asdict(cfg).items()
               if k not in ("name", "init", "init_std")):  # fmt: skip
            cfg = dataclasses.replace(cfg, name=name)
            break
    return cfg


def _same_function(a: ModelConfig, b: ModelConfig) -> list[str]:
    """Fields where two configs compute different functions (name/ops/init are not the function)."""
    fa, fb = dataclasses.asdict(a), dataclasses.asdict(b)
    skip = {"name", "ops", "init", "init_std"}
    # muP settings are compared through what they compute (two spellings of the same scales are equal).
    derived = ("width_scale", "embed_scale", "logits_scale", "softmax_scale", "rotary_dims", "head_dim")
    diff = [k for k in fa if k not in skip and not k.startswith("mup") and k != "rotary_pct" and fa[k] != fb[k]]
    diff += [k for k in derived if abs(getattr(a, k) - getattr(b, k)) > 1e-9 * max(1.0, abs(getattr(a, k)))]
    return diff


# ----------------------------------------------------------------------------------------------
# Export


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    path = Path(path)
    if (path / "checkpoints").is_dir():
        found = find_latest(path)
        if found is None:
            raise HFError(f"run directory {path} holds no complete checkpoint")
        return found
    if not (path / "manifest.json").is_file():
        raise HFError(f"{path} is not a crystal checkpoint (no manifest.json) nor a run directory")
    return path


def find_tokenizer(ckpt: Path, meta: dict[str, Any], config_yaml: str) -> Path | None:
    """The sentencepiece model this checkpoint was trained with: next to a release, in data.tokenizer.path,
    or in the data cache, matched by the sha256 recorded in trainer.json."""
    want = meta.get("tokenizer_sha256")
    candidates = [p / "tokenizer" / "tokenizer.model" for p in ckpt.parents]
    try:
        from omegaconf import OmegaConf

        data = OmegaConf.create(config_yaml).get("data", {})
        if data.get("tokenizer", {}).get("path"):
            candidates.append(Path(data.tokenizer.path).expanduser())
        cache = Path(os.environ.get("CRYSTAL_CACHE") or data.get("cache_dir", "~/.cache/crystal")).expanduser()
        candidates += sorted((cache / "tokenizers").glob("*.model"))
    except Exception:  # an unreadable config only narrows the search
        pass
    for p in candidates:
        if p.is_file() and (want is None or file_sha256(p) == want):
            return p
    return None


def tokenizer_files(tokenizer_model: Path, out_dir: Path, max_len: int) -> None:
    shutil.copyfile(tokenizer_model, out_dir / "tokenizer.model")
    import sentencepiece as spm

    base = spm.SentencePieceProcessor(model_file=str(tokenizer_model)).get_piece_size()
    special = {"content": None, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
               "special": True}  # fmt: skip
    decoder = {str(i): {**special, "content": t} for i, t in ((UNK_ID, "<unk>"), (BOS_ID, "<s>"), (EOS_ID, "</s>"))}
    decoder.update({str(base + i): {**special, "content": t} for i, t in enumerate(ADDED_TOKENS)})
    config = {
        "tokenizer_class": "CrystalCoderTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_crystalcoder.CrystalCoderTokenizer", None]},
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(ADDED_TOKENS),
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "padding_side": "left",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    tokens_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                  "additional_special_tokens": list(ADDED_TOKENS)}  # fmt: skip
    (out_dir / "special_tokens_map.json").write_text(json.dumps(tokens_map, indent=2))


def to_hf_state(cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    names = hf_names(cfg)
    unknown = sorted(set(state) - set(names))
    missing = sorted(set(names) - set(state))
    if unknown or missing:
        raise HFError(f"checkpoint weights do not match model config: missing {missing[:4]}, unexpected {unknown[:4]}")
    out = {}
    for name, (hf_name, shape) in names.items():
        t = state[name].t() if is_conv1d(name) else state[name]  # nn.Linear [out, in] -> Conv1D [in, out]
        out[hf_name] = t.to(dtype).contiguous()
        assert tuple(out[hf_name].shape) == shape, (hf_name, out[hf_name].shape, shape)
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["transformer.wte.weight"].clone()  # LLM360 ships the tied head as a copy
    return out


def export(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    with_tokenizer: bool = True,
    dtype: str = "float32",
) -> Path:
    ckpt_dir = resolve_checkpoint(checkpoint)
    ckpt = load_checkpoint(ckpt_dir)
    cfg = ModelConfig(**ckpt.meta["model_config"])
    check_exportable(cfg)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise HFError(f"--dtype {dtype!r}: use float32, bfloat16 or float16")
    tok_path = None
    if with_tokenizer:
        tok_path = Path(tokenizer) if tokenizer else find_tokenizer(ckpt_dir, ckpt.meta, ckpt.config_yaml)
        if tok_path is None or not tok_path.is_file():
            raise HFError(
                f"tokenizer of {ckpt_dir} (sha256 {ckpt.meta.get('tokenizer_sha256', '?')[:12]}) not found next to "
                "it or in the data cache; pass --tokenizer PATH or --no-tokenizer"
            )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = to_hf_state(cfg, ckpt.tensors["model"], torch_dtype)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    provenance = {
        "checkpoint": str(ckpt_dir),
        "step": ckpt.meta.get("step"),
        "tokens": ckpt.meta.get("tokens"),
        "stage": ckpt.meta.get("stage"),
        "git_commit": ckpt.meta.get("git_commit"),
        "data_fingerprint": ckpt.meta.get("data_fingerprint"),
        "tokenizer_sha256": ckpt.meta.get("tokenizer_sha256"),
        "checkpoint_manifest_sha256": file_sha256(ckpt_dir / "manifest.json"),
    }
    (out_dir / "config.json").write_text(json.dumps(hf_config(cfg, provenance, dtype), indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": BOS_ID, "eos_token_id": EOS_ID}))
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(REMOTE_CODE_DIR / name, out_dir / name)
    if tok_path is not None:
        tokenizer_files(tok_path, out_dir, cfg.max_seq_len)
    return out_dir


# ----------------------------------------------------------------------------------------------
# Import


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, sharded safetensors (index), pytorch_model.bin, or sharded .bin (LLM360's release)."""
    files: list[str] = []
    for index_name, kind in (("model.safetensors.index.json", "st"), ("pytorch_model.bin.index.json", "bin")):
        index = hf_dir / index_name
        if not files and index.is_file():
            files, loader = sorted(set(json.loads(index.read_text())["weight_map"].values())), kind
    if not files:
        if (hf_dir / "model.safetensors").is_file():
            files, loader = ["model.safetensors"], "st"
        elif (hf_dir / "pytorch_model.bin").is_file():
            files, loader = ["pytorch_model.bin"], "bin"
        else:
            raise HFError(f"{hf_dir} has no model.safetensors, pytorch_model.bin or a shard index")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        path = hf_dir / name
        if not path.is_file():
            raise HFError(f"weight shard {path} named by the index is missing")
        try:
            part = load_file(str(path)) if loader == "st" else torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise HFError(f"cannot read {path}: {e}") from None
        state.update(part)
    return state


def from_hf_state(cfg: ModelConfig, hf_state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    names = hf_names(cfg)
    by_hf = {hf: (name, shape) for name, (hf, shape) in names.items()}
    present = {k for k in hf_state if not k.endswith(IGNORED_SUFFIXES)}
    expected = set(by_hf) | ({"lm_head.weight"} if cfg.tie_embeddings else set())
    missing = sorted(set(by_hf) - present)
    unexpected = sorted(present - expected)
    wrong = [f"{k} {tuple(hf_state[k].shape)} (expected {by_hf[k][1]})" for k in sorted(present & set(by_hf))
             if tuple(hf_state[k].shape) != by_hf[k][1]]  # fmt: skip
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing, e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}")
        if wrong:
            parts.append(f"{len(wrong)} with the wrong shape, e.g. {wrong[:3]}")
        raise HFError(f"{source}: weights do not match its config.json: {'; '.join(parts)}")
    if cfg.tie_embeddings and "lm_head.weight" in hf_state:
        if not torch.equal(hf_state["lm_head.weight"].float(), hf_state["transformer.wte.weight"].float()):
            raise HFError(f"{source}: tie_word_embeddings is true but lm_head.weight differs from the embedding")
    out = {}
    for hf_name, (name, _) in by_hf.items():
        t = hf_state[hf_name]
        if not torch.is_floating_point(t) or not torch.isfinite(t).all():
            raise HFError(f"{source}: {hf_name} is not a finite floating-point tensor")
        t = t.to(torch.float32)  # crystal keeps fp32 master weights
        out[name] = (t.t() if is_conv1d(name) else t).contiguous()
    return out


def import_(hf_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    hf_dir, out = Path(hf_dir), Path(out)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise HFError(f"{config_path} does not exist; point at a Hugging Face model directory")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise HFError(f"{config_path} is not valid JSON ({e})") from None
    cfg = model_config_from_hf(config, str(config_path))
    ours = config.get("crystal", {}).get("model_config")
    if ours:  # our own export: the exact ModelConfig, checked against the LLM360 fields it travelled with
        exact = ModelConfig(**ours)
        diff = _same_function(exact, cfg)
        if diff:
            raise HFError(f"{config_path}: its 'crystal' block disagrees with the LLM360 fields on {diff}")
        cfg = exact
    state = from_hf_state(cfg, read_hf_weights(hf_dir), str(hf_dir))
    if out.exists():
        raise HFError(f"{out} already exists; choose a new checkpoint directory")
    tok = hf_dir / "tokenizer.model"
    meta = {
        "step": 0,
        "tokens": 0,
        "stage": IMPORT_STAGE,
        "model_config": dataclasses.asdict(cfg),
        "tokenizer_sha256": file_sha256(tok) if tok.is_file() else None,
        "imported_from": {
            "path": str(hf_dir),
            "config_sha256": file_sha256(config_path),
            "crystal": config.get("crystal"),
        },  # fmt: skip
    }
    from omegaconf import OmegaConf

    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(Config(model=cfg)))
    # write_checkpoint's atomic layout (<run>/checkpoints/step-*), then one rename to the asked-for path.
    staging = out.with_name(out.name + ".import-tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        written = write_checkpoint(staging, 0, {"model": state, "optimizer": {}}, meta, config_yaml)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(written, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crystal.hf", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="crystal checkpoint -> LLM360 CrystalCoder HF directory")
    ex.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its latest checkpoint)")
    ex.add_argument("out_dir")
    ex.add_argument("--tokenizer", help="sentencepiece .model (default: found by the sha256 in trainer.json)")
    ex.add_argument("--no-tokenizer", action="store_true", help="weights and config only")
    ex.add_argument("--dtype", default="float32", help="float32 (default, exact), bfloat16 or float16")
    im = sub.add_parser("import", help="HF CrystalCoder directory (LLM360's or ours) -> crystal checkpoint")
    im.add_argument("hf_dir")
    im.add_argument("checkpoint", help="new checkpoint directory to write")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            path = export(args.checkpoint, args.out_dir, args.tokenizer, not args.no_tokenizer, args.dtype)
            print(f"exported to {path}; load with AutoModelForCausalLM.from_pretrained({str(path)!r}, "
                  "trust_remote_code=True)")  # fmt: skip
        else:
            path = import_(args.hf_dir, args.checkpoint)
            hint = ""
            if (Path(args.hf_dir) / "tokenizer.model").is_file():
                hint = f" data.tokenizer.path={Path(args.hf_dir) / 'tokenizer.model'}"
            print(f"imported to {path}; continue training with train.resume={path}{hint}")
    except (CrystalError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
