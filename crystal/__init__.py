"""crystal: transparent, replayable CrystalCoder-style LLM training (LLM360's way)."""

__version__ = "0.1.0"
