"""Analysis360 for crystal runs and releases: memorization across checkpoints and data chunks, held-out
loss per source, loss on every training chunk (forgetting), and code evaluation (HumanEval pass@k and
infilling, run in a sandbox). `python -m crystal.analysis --help`."""
