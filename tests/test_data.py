"""Tokenizer, preparation, mixtures and the loader on the fast slice of the local corpus."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from crystal.data.loader import BLOCK, IGNORE_INDEX, DataLoader, Mixture
from crystal.data.prepare import DataError, load_shard, prepare_data
from crystal.tokenizer import ADDED_TOKENS, BOS_ID, EOS_ID, UNK_ID, Tokenizer, train_sentencepiece


@pytest.fixture(scope="module")
def data(crystal_cache):
    from tests.conftest import FAST_DATA, compose_config

    cfg = compose_config(FAST_DATA)
    return prepare_data(cfg.data, cfg.model.vocab_size, log=lambda *_: None)


def make_loader(data, **kw) -> DataLoader:
    args = dict(seq_len=64, global_batch=8, micro_batch=4, seed=7)
    return DataLoader(data, **{**args, **kw})


# ----------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_ids_and_added_tokens(data):
    tok = data.tokenizer
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2)
    assert tok.sp.id_to_piece(1) == "<s>" and tok.sp.id_to_piece(2) == "</s>"
    assert tok.base_vocab == 1000 and tok.vocab_size == 4096
    for i, name in enumerate(ADDED_TOKENS):
        assert tok.token_id(name) == 1000 + i
    assert tok.token_id("<|fim_prefix|>") == 1000 and tok.token_id("<|sys_end|>") == 1021


def test_tokenizer_round_trips_text_outside_its_sample(data):
    tok = data.tokenizer
    text = "def f(x):\n\treturn x ** 2  # naïve 日本語 \u00e9\U0001f600\n    \n\x00\x7f"
    assert tok.decode(tok.encode(text)) == text  # byte fallback covers what the sample never had
    special = "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>pass"
    ids = tok.encode_with_special(special)
    assert tok.token_id("<|fim_prefix|>") in ids and tok.decode(ids) == special
    # No dummy-prefix space: pieces encoded separately decode to their exact concatenation (FIM relies on it).
    a, b = "  x = 1", "\nprint(x)"
    assert tok.decode(tok.encode(a) + tok.encode(b)) == a + b


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def llama_sized_model(src: Path, dst: Path, pieces: int = 32000) -> Path:
    """A sentencepiece model with exactly `pieces` pieces, like LLaMA's: our small model plus UNUSED
    pieces appended to its protobuf (ModelProto.pieces is field 1; appended entries extend the list)."""
    import sentencepiece as spm

    base = spm.SentencePieceProcessor(model_file=str(src)).get_piece_size()
    extra = bytearray()
    for i in range(base, pieces):
        name = f"<unused{i}>".encode()
        piece = b"\x0a" + _varint(len(name)) + name + b"\x15" + struct.pack("<f", 0.0) + b"\x18" + _varint(5)
        extra += b"\x0a" + _varint(len(piece)) + piece
    dst.write_bytes(src.read_bytes() + bytes(extra))
    return dst


def test_existing_32000_piece_model_places_added_tokens_at_32000_to_32021(tmp_path, data):
    path = llama_sized_model(data.tokenizer.path, tmp_path / "llama_like.model")
    tok = Tokenizer(path, vocab_size=32032)  # CrystalCoder: 32000 + 22 added + 10 padding rows
    assert tok.base_vocab == 32000
    assert [tok.token_id(t) for t in ADDED_TOKENS] == list(range(32000, 32022))
    assert tok.decode([32000, 32021, 32025]) == "<|fim_prefix|><|sys_end|>"  # padding rows decode to nothing
    text = "x = 'ü' + \"<unused5000>\"\n"
    assert tok.decode(tok.encode(text)) == text and max(tok.encode(text)) < 1000  # unused pieces never emitted
    with pytest.raises(ValueError, match="cannot hold"):
        Tokenizer(path, vocab_size=32021)


def test_tokenizer_training_is_reproducible(tmp_path):
    from crystal.data.sources import _stdlib_py_files, read_text

    lines = [line for f in _stdlib_py_files()[30:50] for line in read_text(f).split("\n") if line.strip()]
    train_sentencepiece(iter(lines), tmp_path / "a.model", 400, seed=1)
    train_sentencepiece(iter(lines), tmp_path / "b.model", 400, seed=1)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()


# ----------------------------------------------------------------------------------------------
# Prepare


def test_prepare_is_cached_fingerprinted_and_records_the_tokenizer(data):
    from tests.conftest import FAST_DATA, compose_config

    cfg = compose_config(FAST_DATA)
    again = prepare_data(cfg.data, cfg.model.vocab_size, log=lambda *_: None)
    assert again.fingerprint == data.fingerprint
    for name, shard in data.shards.items():
        tokens, offsets = shard.train.tokens, shard.train.offsets
        assert tokens.dtype == np.uint16 and offsets[-1] == len(tokens)  # vocab 4096 fits uint16
        assert np.all(tokens[offsets[1:] - 1] == EOS_ID)  # every document ends with EOS
        assert shard.manifest["tokenizer_sha256"] == data.tokenizer.sha256
        assert data.manifest["sources"][name]["tokenizer_sha256"] == data.tokenizer.sha256
    assert data.manifest["tokenizer"]["sha256"] == data.tokenizer.sha256


def test_manifest_records_languages_and_substitutes(data):
    m = data.manifest
    assert "python" in m["languages"]["code"] and "en" in m["languages"]["english"]
    subsets = m["subsets"]
    assert subsets["sc_python"] == {**subsets["sc_python"], "source": "python", "substitute": True,
                                    "same_language": True}  # fmt: skip
    assert subsets["sp0_commoncrawl"]["substitute"] and not subsets["sp0_commoncrawl"]["same_language"]
    for alias in ("sc_html", "sc_css", "sc_javascript"):  # local stand-ins or, where absent, their fallback
        want = alias[3:]
        source = subsets[alias]["source"]
        assert (source == want) == subsets[alias]["same_language"], subsets[alias]
        assert source == want or m["missing"].get(want)


def copy_shard(data, tmp_path: Path) -> Path:
    src = data.shards["python"].directory
    copy = tmp_path / src.name
    shutil.copytree(src, copy)
    return copy


def test_corrupt_shard_is_detected_and_named(data, tmp_path):
    copy = copy_shard(data, tmp_path)
    path = copy / "part-00000" / "train.bin"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"part-00000/train\.bin fails its sha256 check"):
        load_shard(copy)
    load_shard(copy, verify="size")  # a flipped byte keeps the size: only the full check sees it


def test_truncated_shard_is_detected_and_named(data, tmp_path):
    copy = copy_shard(data, tmp_path)
    for name in ("train.bin", "heldout.idx.npy"):
        path = copy / "part-00000" / name
        original = path.read_bytes()
        path.write_bytes(original[:-10])
        for verify in ("full", "size"):
            with pytest.raises(DataError, match=rf"part-00000/{name.replace('.', '[.]')} is truncated"):
                load_shard(copy, verify=verify)
        path.write_bytes(original)
    (copy / "part-00000" / "docs.json").unlink()
    with pytest.raises(DataError, match="docs.json is missing"):
        load_shard(copy)


def test_empty_source_list_is_one_clear_error():
    from crystal.config import DataConfig

    with pytest.raises(DataError, match="data.sources is empty"):
        prepare_data(DataConfig(sources={}), 4096)


def test_fim_shards_are_keyed_by_the_fim_setting(data):
    from tests.conftest import FAST_DATA, compose_config

    cfg = compose_config([*FAST_DATA, "+stage=2"])  # FIM 0.9 on code sources
    fim = prepare_data(cfg.data, cfg.model.vocab_size, log=lambda *_: None)
    assert fim.fingerprint != data.fingerprint
    code = [n for n, s in fim.shards.items() if s.kind == "code"]
    english = [n for n, s in fim.shards.items() if s.kind == "english"]
    for name in code:
        shard = fim.shards[name]
        assert shard.manifest["fim"] == {"fim_rate": 0.9, "fim_spm_rate": 0.5, "fim_seed": 0}
        assert shard.directory != data.shards[name].directory
        stats = shard.manifest["stats"]
        n_fim = stats.get("fim_psm_documents", 0) + stats.get("fim_spm_documents", 0)
        assert n_fim > 0.7 * (stats["read_documents"] - stats.get("empty_documents", 0))
        prefix = fim.tokenizer.token_id("<|fim_prefix|>")
        assert np.sum(shard.train.tokens == prefix) > 0
    for name in english:  # English is never transformed: the very same shards are reused
        assert fim.shards[name].directory == data.shards[name].directory
        assert fim.shards[name].manifest["fim"] is None


# ----------------------------------------------------------------------------------------------
# Loader: windows, order, resume


def test_windows_carry_positions_and_document_segments(data):
    loader = DataLoader(data, seq_len=64, global_batch=4, micro_batch=4, seed=1)
    (batch,) = loader.next_step()
    assert batch.input_ids.shape == (4, 64) and batch.targets.shape == (4, 64)
    torch.testing.assert_close(batch.input_ids[:, 1:], batch.targets[:, :-1])
    for row in range(4):
        ids, pos, seg = batch.input_ids[row], batch.positions[row], batch.doc_ids[row]
        restarts = torch.nonzero(pos == 0).flatten().tolist()
        assert restarts[0] == 0
        for r in restarts[1:]:
            assert ids[r - 1] == EOS_ID  # a new document starts right after an EOS
            assert seg[r] == seg[r - 1] + 1


def test_batch_segments_from_eos_equal_the_document_offsets(data):
    loader = make_loader(data)
    for step in range(20):
        for batch in loader.step_batches(step):
            for r, (s, j) in enumerate(zip(batch.source_index, batch.window_index)):
                tokens, positions, seg = loader.train[s].window(j)
                assert np.array_equal(batch.input_ids[r].numpy(), tokens[:-1])
                assert np.array_equal(batch.positions[r].numpy(), positions)
                assert np.array_equal(batch.doc_ids[r].numpy(), seg)


def test_fim_pad_targets_are_masked(data):
    loader = make_loader(data)
    pad = data.tokenizer.token_id("<|fim_pad|>")
    batch = loader._collate(np.array([[5, pad, 6, pad, 7]], dtype=np.int64), np.array([0]), [(0, 0, 0)])
    assert batch.targets.tolist() == [[IGNORE_INDEX, 6, IGNORE_INDEX, 7]]


def test_batch_at_step_n_direct_equals_iterated_and_resume_is_exact(data):
    a = make_loader(data)
    seen = [a.next_step() for _ in range(5)]
    direct = make_loader(data).step_batches(3)
    for x, y in zip(seen[3], direct):
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.targets, y.targets)
    # Resume mid-epoch from the state after 5 steps: the next batches are those of an uninterrupted run.
    state = json.loads(json.dumps(a.state_dict()))  # what a checkpoint stores survives JSON
    b = make_loader(data)
    b.load_state_dict(state)
    for _ in range(3):
        for x, y in zip(a.next_step(), b.next_step()):
            assert torch.equal(x.input_ids, y.input_ids) and np.array_equal(x.sample_index, y.sample_index)


def test_resume_with_other_data_is_refused_unless_allowed_and_then_recorded(data):
    a = make_loader(data)
    a.next_step()
    state = a.state_dict()
    for changed in (dict(seed=8), dict(stage=2), dict(mixture={"python": 1.0, "english": 1.0})):
        with pytest.raises(DataError, match="allow_data_change"):
            make_loader(data, **changed).load_state_dict(state)
    other = {**state, "fingerprint": "0" * 64}
    with pytest.raises(DataError, match="fingerprint"):
        make_loader(data).load_state_dict(other)
    b = make_loader(data)
    b.load_state_dict(other, allow_data_change=True)
    assert b.sample_index == 8
    assert b.state_dict()["data_changes"] == [
        {"at_sample": 8, "changed": {"fingerprint": {"was": "0" * 64, "now": data.fingerprint}}}
    ]


def test_data_config_knob_allows_the_change(data):
    from tests.conftest import FAST_DATA, compose_config

    cfg = compose_config([*FAST_DATA, "data.allow_data_change=true"])
    allowed = prepare_data(cfg.data, cfg.model.vocab_size, log=lambda *_: None)
    a = make_loader(data)
    state = {**a.state_dict(), "seed": 3}
    b = make_loader(allowed)
    b.load_state_dict(state)
    assert b.state_dict()["data_changes"][0]["changed"] == {"seed": {"was": 3, "now": 7}}


def test_stage_is_part_of_the_order(data):
    windows = lambda st: np.concatenate([b.window_index for b in make_loader(data, stage=st).step_batches(1)])
    assert not np.array_equal(windows(1), windows(2))
    assert np.array_equal(windows(2), windows(2))


# ----------------------------------------------------------------------------------------------
# Mixtures


def test_mixture_shares_are_exact_per_block():
    m = Mixture(["a", "b", "c"], [0.5, 0.3, 0.2], [100, 1000, 7], seed=1, fingerprint="x")
    labels = [m.locate(i)[0] for i in range(2 * BLOCK)]
    counts = np.bincount(labels)
    assert list(counts) == [BLOCK, round(0.6 * BLOCK), 2 * BLOCK - BLOCK - round(0.6 * BLOCK)]
    # Source c (7 windows) cycles through epochs, each epoch a full permutation of its windows.
    c_windows = [m.locate(i)[1] for i in range(2 * BLOCK) if m.locate(i)[0] == 2][:14]
    assert sorted(c_windows[:7]) == list(range(7)) and sorted(c_windows[7:]) == list(range(7))


def test_mixture_proportions_over_many_batches_match_the_weights(data):
    weights = {"python": 0.7, "english": 0.3}
    loader = make_loader(data, mixture=weights, global_batch=32, micro_batch=32)
    seen = np.concatenate([b.source_index for step in range(40) for b in loader.step_batches(step)])  # 1280
    shares = np.bincount(seen, minlength=len(loader.names)) / len(seen)
    for name, w in weights.items():
        assert abs(shares[loader.names.index(name)] - w) < 0.02, (name, shares)
    plan = loader.mixture.plan(len(seen))
    assert {n: plan[n]["samples"] for n in weights} == {n: int(np.sum(seen == loader.names.index(n))) for n in weights}


def test_epoch_cap_is_enforced_with_the_source_named(data):
    loader = make_loader(data, mixture={"python": 0.5, "english": 0.5}, epochs={"english": 1.0})
    n = loader.train[loader.names.index("english")].num_windows
    with pytest.raises(DataError, match="'english' past its data.epochs cap"):
        for step in range(n):  # half of each batch of 8 is English: one pass lasts about n / 4 steps
            loader.step_batches(step)
    assert loader.mixture.plan(8 * n)["english"]["epochs"] == pytest.approx(4.0, rel=0.05)


def test_absent_optional_source_hands_its_share_to_its_fallback(data):
    from crystal.data.prepare import resolve_fallbacks

    assert resolve_fallbacks({"js": 0.2, "py": 0.5, "en": 0.3}, {"js": "py"}) == {"py": 0.7, "en": 0.3}
    with pytest.raises(DataError, match="cycle"):
        resolve_fallbacks({"a": 1.0}, {"a": "b", "b": "a"})


def test_data_parallel_ranks_partition_the_global_batch(data):
    whole = DataLoader(data, seq_len=32, global_batch=8, micro_batch=2, seed=1)
    ranks = [DataLoader(data, seq_len=32, global_batch=8, micro_batch=2, seed=1, rank=r, world_size=2) for r in (0, 1)]
    all_samples = sorted(i for b in whole.step_batches(2) for i in b.sample_index)
    split = sorted(i for r in ranks for b in r.step_batches(2) for i in b.sample_index)
    assert all_samples == split == list(range(16, 24))
