"""Fill-in-the-middle: CrystalCoder's transform, deterministic per (seed, document id)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from crystal.data.fim import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, FimSpec, fim_encode, fim_split

SENTINELS = (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX)
CODE = 'def area(r):\n    """Circle area."""\n    return 3.14159 * r ** 2  # pi r^2 \u00e9\U0001f600\n'


@pytest.fixture(scope="module")
def tok(small_tokenizer_path):
    from crystal.tokenizer import Tokenizer

    return Tokenizer(small_tokenizer_path)


def test_split_is_deterministic_per_seed_and_document():
    spec = FimSpec(rate=1.0, spm_rate=0.5, seed=0)
    assert fim_split(CODE, "python:a.py", spec) == fim_split(CODE, "python:a.py", spec)
    outcomes = {fim_split(CODE, f"python:{i}.py", spec) for i in range(20)}
    assert len(outcomes) > 10  # other documents get other cuts
    assert fim_split(CODE, "python:a.py", spec) != fim_split(CODE, "python:a.py", FimSpec(1.0, 0.5, seed=1))


def test_split_is_a_character_level_cut_into_three_parts():
    spec = FimSpec(rate=1.0, spm_rate=0.5, seed=0)
    for i in range(200):
        mode, prefix, middle, suffix = fim_split(CODE, f"d{i}", spec)
        assert mode in ("psm", "spm") and prefix + middle + suffix == CODE


def test_rates_match_fim_rate_and_spm_share():
    spec = FimSpec(rate=0.3, spm_rate=0.5, seed=0)
    modes = Counter(r[0] if (r := fim_split(CODE, f"doc{i}", spec)) else None for i in range(4000))
    assert modes[None] / 4000 == pytest.approx(0.7, abs=0.03)
    assert modes["spm"] / (modes["spm"] + modes["psm"]) == pytest.approx(0.5, abs=0.04)
    assert fim_split(CODE, "x", FimSpec(0.0, 0.5, 0)) is None and fim_split("", "x", FimSpec(1.0, 0.5, 0)) is None


def pieces(ids, tok) -> list[str]:
    """Decode runs between sentinels separately: [text, sentinel, text, ...]."""
    out, run = [], []
    for i in ids:
        if i >= tok.base_vocab:
            out += [tok.decode(run), tok.decode([i])]
            run = []
        else:
            run.append(i)
    return out + [tok.decode(run)]


@pytest.mark.parametrize("mode", ["psm", "spm"])
def test_encoding_is_a_permutation_of_the_characters_plus_sentinels_in_crystalcoders_order(tok, mode):
    spec = FimSpec(rate=1.0, spm_rate=1.0 if mode == "spm" else 0.0, seed=0)
    for i in range(30):
        doc_id = f"python:{i}.py"
        ids, used = fim_encode(CODE, doc_id, spec, tok)
        assert used == mode and ids == fim_encode(CODE, doc_id, spec, tok)[0]
        _, prefix, middle, suffix = fim_split(CODE, doc_id, spec)
        text = pieces(ids, tok)
        if mode == "psm":  # <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|> middle
            assert text == ["", FIM_PREFIX, prefix, FIM_SUFFIX, suffix, FIM_MIDDLE, middle]
        else:  # <|fim_prefix|> <|fim_suffix|> suffix <|fim_middle|> prefix middle
            assert text == ["", FIM_PREFIX, "", FIM_SUFFIX, suffix, FIM_MIDDLE, prefix + middle]
        decoded = tok.decode(ids)
        for s in SENTINELS:
            assert decoded.count(s) == 1
            decoded = decoded.replace(s, "")
        assert sorted(decoded) == sorted(CODE)


def test_documents_left_alone_encode_plainly(tok):
    ids, mode = fim_encode(CODE, "d", FimSpec(rate=0.0, spm_rate=0.5, seed=0), tok)
    assert mode is None and ids == tok.encode(CODE)
    assert not np.any(np.asarray(ids) >= tok.base_vocab)
