"""sentencepiece BPE with byte fallback (LLaMA's recipe) plus CrystalCoder's 22 added tokens.

Ids: unk 0, bos 1, eos 2, no pad; the sentencepiece pieces are 0..base-1; the added tokens sit at
base+0 .. base+21 in the order below (base = 32000 for LLaMA's tokenizer, so <|fim_prefix|> = 32000);
rows from base+22 up to the model's vocab_size are unused padding (CrystalCoder: 10 rows, 32032).
The rule holds for any sentencepiece model, trained here or loaded (data.tokenizer.path): LLaMA's
32000-piece model puts <|fim_prefix|> at 32000 and <|sys_end|> at 32021.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

ADDED_TOKENS = (
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|filename|>", "<|gh_stars|>",
    "<|issue_start|>", "<|issue_comment|>", "<|issue_closed|>", "<|jupyter_start|>", "<|jupyter_text|>",
    "<|jupyter_code|>", "<|jupyter_output|>", "<|empty_output|>", "<|commit_before|>", "<|commit_msg|>",
    "<|commit_after|>", "<|reponame|>", "<|im_start|>", "<|im_end|>", "<|sys_start|>", "<|sys_end|>",
)  # fmt: skip
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

# Recorded in every tokenizer we train (and in its sidecar json) so the run can be reproduced.
TRAINER_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    remove_extra_whitespaces=False,
    # LLaMA's model adds a dummy "\u2581" before every encoded string, so decode(encode(a) + encode(b))
    # gains a space between a and b. FIM encodes prefix, middle and suffix separately and SPM puts
    # prefix and middle side by side: without the dummy prefix the concatenation decodes exactly.
    add_dummy_prefix=False,
    normalization_rule_name="identity",
    character_coverage=0.9999,
    unk_id=UNK_ID,
    bos_id=BOS_ID,
    eos_id=EOS_ID,
    pad_id=-1,
    max_sentence_length=8192,
    shuffle_input_sentence=False,
    num_threads=1,  # single-threaded so the learned merges do not depend on the machine
    minloglevel=2,
)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class Tokenizer:
    """Wraps a sentencepiece model; `vocab_size` is the model's (padded) embedding size."""

    def __init__(self, model_path: str | os.PathLike, vocab_size: int | None = None) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer model {path} does not exist; set data.tokenizer.path or remove it to train one"
            )
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.base_vocab = self.sp.get_piece_size()
        self.added = {tok: self.base_vocab + i for i, tok in enumerate(ADDED_TOKENS)}
        self.added_by_id = {i: tok for tok, i in self.added.items()}
        needed = self.base_vocab + len(ADDED_TOKENS)
        self.vocab_size = vocab_size if vocab_size is not None else needed
        if self.vocab_size < needed:
            raise ValueError(
                f"model.vocab_size={self.vocab_size} cannot hold tokenizer {path.name}'s {self.base_vocab} pieces "
                f"+ {len(ADDED_TOKENS)} added tokens; use at least {needed}"
            )
        self.sha256 = file_sha256(path)
        self._special_re = re.compile("(" + "|".join(re.escape(t) for t in ADDED_TOKENS) + ")")

    bos_id, eos_id, unk_id = BOS_ID, EOS_ID, UNK_ID

    def token_id(self, token: str) -> int:
        return self.added[token]

    def encode(self, text: str) -> list[int]:
        """Plain text (added-token strings inside it are encoded as text, not as special ids)."""
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def encode_with_special(self, text: str) -> list[int]:
        """Text in which added-token strings such as <|fim_prefix|> become their ids."""
        out: list[int] = []
        for part in self._special_re.split(text):
            if part in self.added:
                out.append(self.added[part])
            elif part:
                out.extend(self.sp.encode(part))
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; added tokens render as their strings, padding rows as nothing."""
        pieces: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i < self.base_vocab:
                run.append(i)
                continue
            if run:
                pieces.append(self.sp.decode(run))
                run = []
            pieces.append(self.added_by_id.get(i, ""))
        if run:
            pieces.append(self.sp.decode(run))
        return "".join(pieces)


def train_sentencepiece(
    sentences: Iterator[str], out_path: str | os.PathLike, vocab_size: int, seed: int = 1
) -> dict[str, object]:
    """Train a BPE model reproducibly; returns the options used (to be recorded next to it).

    Written to a temp file and renamed so a crash never leaves a half-written model in the cache.
    """
    spm.set_random_generator_seed(seed)
    options = {**TRAINER_OPTIONS, "vocab_size": vocab_size}
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=sentences, model_writer=buf, **options)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out_path)
    return {**options, "seed": seed}
