"""Fill-in-the-middle, as CrystalCoder's data preparation did it, made deterministic per document.

LLM360/crystalcoder-data-prep (fim_hdf5_stage2.py / fim_hdf5_stage3.py, after bigcode's and
EleutherAI's Megatron FIM) transforms a document with probability fim_rate: decode it to text, pick
two cut points uniformly in [0, len(text)] (np.random.randint(0, len + 1, size=2), sorted) at
character level, tokenize prefix, middle and suffix separately, then with probability spm_rate emit

    SPM  <|fim_prefix|> <|fim_suffix|> suffix <|fim_middle|> prefix middle
    else PSM  <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|> middle

Rates: 0.9 in stage 2, 0.3 in stage 3, SPM share 0.5. The draws come in that order (apply?, cuts,
SPM?). What differs here, on purpose:

- Randomness: theirs came from np.random seeded once per worker (SEED + rank), so a document's
  fate depended on which process read which file. Here every document gets its own generator seeded
  by (data.fim_seed, document id): the same document is transformed the same way on any machine, in
  any order, with any number of workers.
- Unit: they split already-packed 2048-token sequences at EOS, so a document cut by a sequence
  boundary was transformed as two pieces, and then truncated the sequence back to 2048 tokens (or
  padded it with <|fim_pad|>, loss-masked). Here the whole document is transformed before packing,
  so nothing is truncated and no padding is needed; the loader still masks <|fim_pad|> targets.
- Epochs: they stored one independently transformed copy per epoch (2 in stage 2, 3 in stage 3).
  Here the transform is baked into the shards once (keyed by rate, SPM rate and seed), so a repeated
  epoch repeats the same transform.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD = "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>"


@dataclass(frozen=True)
class FimSpec:
    rate: float
    spm_rate: float
    seed: int

    def key(self) -> dict[str, float | int]:
        return {"fim_rate": self.rate, "fim_spm_rate": self.spm_rate, "fim_seed": self.seed}


def document_rng(seed: int, doc_id: str) -> np.random.Generator:
    digest = hashlib.sha256(f"fim\0{seed}\0{doc_id}".encode()).digest()
    return np.random.default_rng([int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)])


def fim_split(text: str, doc_id: str, spec: FimSpec) -> tuple[str, str, str, str] | None:
    """(mode, prefix, middle, suffix) with mode 'psm' or 'spm', or None when the document stays as is."""
    if not text or spec.rate <= 0:
        return None
    rng = document_rng(spec.seed, doc_id)
    if rng.random() >= spec.rate:  # Bernoulli(fim_rate), as np.random.binomial(1, fim_rate)
        return None
    lo, hi = sorted(int(b) for b in rng.integers(0, len(text) + 1, size=2))
    mode = "spm" if rng.random() < spec.spm_rate else "psm"
    return mode, text[:lo], text[lo:hi], text[hi:]


def fim_encode(text: str, doc_id: str, spec: FimSpec, tok) -> tuple[list[int], str | None]:
    """Token ids of a document after FIM, and the mode used (None: plain encoding)."""
    parts = fim_split(text, doc_id, spec)
    if parts is None:
        return tok.encode(text), None
    mode, prefix, middle, suffix = parts
    enc = tok.encode_batch([prefix, middle, suffix])
    return fim_layout(mode, enc[0], enc[1], enc[2], tok), mode


def fim_layout(mode: str, prefix: list[int], middle: list[int], suffix: list[int], tok) -> list[int]:
    """The token layout of one FIM example from its separately encoded parts. With an empty middle it is the
    prompt an infilling evaluation gives the model (crystal.analysis.humaneval): what training put before
    the middle, exactly."""
    p, m, s = tok.token_id(FIM_PREFIX), tok.token_id(FIM_MIDDLE), tok.token_id(FIM_SUFFIX)
    if mode == "spm":
        return [p, s, *suffix, m, *prefix, *middle]
    if mode == "psm":
        return [p, *prefix, s, *suffix, m, *middle]
    raise ValueError(f"FIM mode {mode!r}: use psm or spm")
