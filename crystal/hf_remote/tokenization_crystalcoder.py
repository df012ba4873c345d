"""CrystalCoder's tokenizer for transformers: the sentencepiece model itself plus the 22 added tokens.

It encodes exactly like crystal's `Tokenizer.encode_with_special`: text is split on the added tokens
(<|fim_prefix|> ... <|sys_end|>, ids base+0 .. base+21 where base is the sentencepiece vocabulary size, 32000
for LLaMA's), each piece of text between them goes through sentencepiece unchanged (BPE, byte fallback),
and nothing is added around the sequence unless `add_bos_token` / `add_eos_token` say so (crystal's training
documents carry no BOS; each ends with EOS). `<s>`, `</s>` and `<unk>` written in text stay text, as they
did in training: only the added tokens are split out. Decoding renders added tokens as their strings and
ids past the added tokens (the model's padding rows) as nothing.

Calling sentencepiece directly, rather than a converted `tokenizer.json`, is what makes the round trip
exact. Works with transformers 4.40+ and 5.x.
"""

from __future__ import annotations

import os
import re
import shutil

import sentencepiece as spm
from transformers import AddedToken, PreTrainedTokenizer

ADDED_TOKENS = (
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|filename|>", "<|gh_stars|>",
    "<|issue_start|>", "<|issue_comment|>", "<|issue_closed|>", "<|jupyter_start|>", "<|jupyter_text|>",
    "<|jupyter_code|>", "<|jupyter_output|>", "<|empty_output|>", "<|commit_before|>", "<|commit_msg|>",
    "<|commit_after|>", "<|reponame|>", "<|im_start|>", "<|im_end|>", "<|sys_start|>", "<|sys_end|>",
)  # fmt: skip


class CrystalCoderTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str,
        unk_token: str = "<unk>",
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        pad_token: str | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        **kwargs,
    ) -> None:
        self.vocab_file = vocab_file
        self.sp_model = spm.SentencePieceProcessor(model_file=vocab_file)
        self.base_vocab = self.sp_model.get_piece_size()
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self.crystal_added = {tok: self.base_vocab + i for i, tok in enumerate(ADDED_TOKENS)}
        self.crystal_added_by_id = {i: tok for tok, i in self.crystal_added.items()}
        self._added_re = re.compile("(" + "|".join(re.escape(t) for t in ADDED_TOKENS) + ")")
        # The added tokens sit at fixed ids whatever a saved config says; special, never normalised or stripped.
        decoder = {i: AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False)
                   for t, i in self.crystal_added.items()}  # fmt: skip
        kwargs["added_tokens_decoder"] = decoder
        kwargs.setdefault("additional_special_tokens", list(ADDED_TOKENS))
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(unk_token=unk_token, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token, **kwargs)

    # -- vocabulary ---------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.base_vocab

    def __len__(self) -> int:
        return self.base_vocab + len(ADDED_TOKENS)

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.base_vocab)}
        vocab.update(self.crystal_added)
        return vocab

    def _convert_token_to_id(self, token: str) -> int:
        if token in self.crystal_added:
            return self.crystal_added[token]
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        if index in self.crystal_added_by_id:
            return self.crystal_added_by_id[index]
        if index < self.base_vocab:
            return self.sp_model.id_to_piece(index)
        return ""  # a padding row of the embedding: no text

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self._convert_token_to_id(tokens)
        return [self._convert_token_to_id(t) for t in tokens]

    # -- encoding -----------------------------------------------------------------------------------

    def tokenize(self, text: str, **kwargs) -> list[str]:
        """Split on the added tokens only, sentencepiece for the rest (crystal's encode_with_special)."""
        pieces: list[str] = []
        for part in self._added_re.split(text):
            if part in self.crystal_added:
                pieces.append(part)
            elif part:
                pieces.extend(self.sp_model.encode(part, out_type=str))
        return pieces

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        out = bos + list(token_ids_0) + eos
        if token_ids_1 is not None:
            out += bos + list(token_ids_1) + eos
        return out

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return (int(self.add_bos_token) + int(self.add_eos_token)) * (2 if pair else 1)

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            special = set(self.all_special_ids)
            return [int(i in special) for i in token_ids_0]
        bos, eos = [1] if self.add_bos_token else [], [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask += bos + [0] * len(token_ids_1) + eos
        return mask

    def create_token_type_ids_from_sequences(self, token_ids_0, token_ids_1=None):
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    # -- decoding -----------------------------------------------------------------------------------

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        ids = [self._convert_token_to_id(t) for t in tokens if t]
        return self._render(ids)

    def _render(self, ids) -> str:
        """crystal's Tokenizer.decode: sentencepiece for runs of base ids, added tokens as their strings."""
        out, run = [], []
        for i in ids:
            i = int(i)
            if i < self.base_vocab:
                run.append(i)
                continue
            if run:
                out.append(self.sp_model.decode(run))
                run = []
            out.append(self.crystal_added_by_id.get(i, ""))
        if run:
            out.append(self.sp_model.decode(run))
        return "".join(out)

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None, **kwargs):
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if skip_special_tokens:
            special = set(self.all_special_ids)
            token_ids = [i for i in token_ids if int(i) not in special]
        return self._render(token_ids)

    # -- saving -------------------------------------------------------------------------------------

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model"
        out = os.path.join(save_directory, name)
        if os.path.abspath(self.vocab_file) != os.path.abspath(out):
            shutil.copyfile(self.vocab_file, out)
        return (out,)
