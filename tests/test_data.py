"""Tokenizer, preparation and loader (the foundation's data path)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crystal.data.loader import BLOCK, DataLoader, Mixture
from crystal.data.prepare import DataError, load_shard, prepare_data
from crystal.tokenizer import ADDED_TOKENS, BOS_ID, EOS_ID, UNK_ID, Tokenizer


@pytest.fixture(scope="module")
def data(crystal_cache):
    from tests.conftest import FAST_DATA, compose_config

    cfg = compose_config(FAST_DATA)
    return prepare_data(cfg.data, cfg.model.vocab_size, log=lambda *_: None)


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
    text = "def f(x):\n\treturn x ** 2  # naïve 日本語 \u00e9\U0001f600\n    \n"
    assert tok.decode(tok.encode(text)) == text  # byte fallback covers what the sample never had
    special = "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>pass"
    ids = tok.encode_with_special(special)
    assert tok.token_id("<|fim_prefix|>") in ids and tok.decode(ids) == special


def test_llama_sized_vocab_places_added_tokens_at_32000(tmp_path, data):
    # A 32000-piece model is what LLaMA ships; train a small one and pad it the same way: ids land at base + i.
    tok = Tokenizer(data.tokenizer.path, vocab_size=32032)
    assert tok.token_id("<|fim_prefix|>") == tok.base_vocab
    with pytest.raises(ValueError, match="cannot hold"):
        Tokenizer(data.tokenizer.path, vocab_size=1010)


def test_prepare_is_cached_and_fingerprinted(data):
    from tests.conftest import FAST_DATA, compose_config

    cfg = compose_config(FAST_DATA)
    again = prepare_data(cfg.data, cfg.model.vocab_size, log=lambda *_: None)
    assert again.fingerprint == data.fingerprint
    for shard in data.shards.values():
        tokens, offsets = shard.train.tokens, shard.train.offsets
        assert tokens.dtype == np.uint16 and offsets[-1] == len(tokens)
        assert np.all(tokens[offsets[1:] - 1] == EOS_ID)  # every document ends with EOS


def test_corrupt_shard_is_detected_and_named(data, tmp_path):
    import shutil

    src = next(iter(data.shards.values())).directory
    copy = tmp_path / src.name
    shutil.copytree(src, copy)
    raw = bytearray((copy / "train.bin").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (copy / "train.bin").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"train\.bin fails its sha256 check"):
        load_shard(copy)
    (copy / "train.bin").write_bytes(bytes(raw[:-100]))  # truncated
    with pytest.raises(DataError, match="train.bin"):
        load_shard(copy)


def test_missing_source_path_is_one_clear_error(tmp_path):
    from crystal.config import DataConfig

    with pytest.raises(DataError, match="data.sources is empty"):
        prepare_data(DataConfig(sources={}), 4096)


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


def test_order_is_a_pure_function_of_step_and_resume_is_exact(data):
    make = lambda: DataLoader(data, seq_len=64, global_batch=8, micro_batch=4, seed=7)
    a = make()
    seen = [a.next_step() for _ in range(5)]
    direct = make().step_batches(3)
    for x, y in zip(seen[3], direct):
        assert torch.equal(x.input_ids, y.input_ids)
    b = make()
    b.load_state_dict(a.state_dict())
    c = make()
    for _ in range(5):
        c.next_step()
    assert torch.equal(b.next_step()[0].input_ids, c.next_step()[0].input_ids)
    other_seed = DataLoader(data, seq_len=64, global_batch=8, micro_batch=4, seed=8)
    with pytest.raises(DataError, match="seed"):
        other_seed.load_state_dict(a.state_dict())


def test_mixture_shares_are_exact_per_block():
    m = Mixture(["a", "b", "c"], [0.5, 0.3, 0.2], [100, 1000, 7], seed=1, fingerprint="x")
    labels = [m.locate(i)[0] for i in range(2 * BLOCK)]
    counts = np.bincount(labels)
    assert list(counts) == [BLOCK, round(0.6 * BLOCK), 2 * BLOCK - BLOCK - round(0.6 * BLOCK)]
    # Source c (7 windows) cycles through epochs, each epoch a full permutation of its windows.
    c_windows = [m.locate(i)[1] for i in range(2 * BLOCK) if m.locate(i)[0] == 2][:14]
    assert sorted(c_windows[:7]) == list(range(7)) and sorted(c_windows[7:]) == list(range(7))


def test_data_parallel_ranks_partition_the_global_batch(data):
    whole = DataLoader(data, seq_len=32, global_batch=8, micro_batch=2, seed=1)
    ranks = [DataLoader(data, seq_len=32, global_batch=8, micro_batch=2, seed=1, rank=r, world_size=2) for r in (0, 1)]
    all_samples = sorted(i for b in whole.step_batches(2) for i in b.sample_index)
    split = sorted(i for r in ranks for b in r.step_batches(2) for i in b.sample_index)
    assert all_samples == split == list(range(16, 24))
