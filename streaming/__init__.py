"""Execution engines for a stack of identical blocks: resident (plain), weight streaming (a CG-1
style host store + layer-by-layer executor), and adapters (Cerebras). Knows nothing of crystal:
models are driven through the small `StreamableModel` protocol in crystal.streaming.backends.base."""
