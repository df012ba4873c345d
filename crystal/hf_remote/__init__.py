"""Files that `python -m crystal.hf export` copies into an export directory, next to config.json and the
weights, so that `transformers` loads the export with `trust_remote_code=True` and no crystal installed.

They import only torch, transformers and sentencepiece (never crystal): an export must work on a machine
that has never seen this project. The file and class names are LLM360's (configuration_crystalcoder.py,
modeling_crystalcoder.py, CrystalCoderConfig, CrystalCoderLMHeadModel), so a config.json written by
LLM360 and one written by crystal point at the same classes through the same `auto_map`.
"""

from pathlib import Path

REMOTE_CODE_DIR = Path(__file__).resolve().parent
REMOTE_CODE_FILES = ("configuration_crystalcoder.py", "modeling_crystalcoder.py", "tokenization_crystalcoder.py")
