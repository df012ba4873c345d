"""python -m crystal.analysis {memorization,evaluate,all,code-eval} PATH [PATH ...] [--out DIR] [key=value ...]

PATH: a run directory (outputs/<run>) or a release directory; several in training order (stage 1, 2, 3)
continue each other. key=value: any field of AnalysisConfig (crystal/config.py, defaults in
conf/analysis/default.yaml), e.g. sequences=200 checkpoints=[100,300] device=cuda code.samples=20.

code-eval (crystal/analysis/code_eval.py): HumanEval pass@k and HumanEval infilling per checkpoint, run in
a sandbox; `code-eval --reference` scores the canonical solutions (no PATH), `code-eval --hf DIR` a
transformers export.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from crystal.config import CONFIG_DIR, AnalysisConfig
from crystal.errors import USER_ERRORS


def analysis_config(overrides: list[str]) -> AnalysisConfig:
    """Schema <- conf/analysis/default.yaml <- key=value overrides; unknown keys fail with OmegaConf's message."""
    schema = OmegaConf.structured(AnalysisConfig)
    try:
        merged = OmegaConf.merge(schema, OmegaConf.load(CONFIG_DIR / "analysis" / "default.yaml"),
                                 OmegaConf.from_dotlist(overrides))  # fmt: skip
    except OmegaConfBaseException as e:
        raise ValueError(f"analysis config: {e}".splitlines()[0]) from None
    return OmegaConf.to_object(merged)


def run(command: str, paths: list[str], out: Path, acfg: AnalysisConfig) -> dict[str, Path]:
    from crystal.analysis import evaluation, memorization
    from crystal.analysis.timeline import build_timeline

    if acfg.threads:
        torch.set_num_threads(acfg.threads)
    timeline = build_timeline(paths).select(acfg.checkpoints)
    print(f"{len(timeline.checkpoints)} checkpoints x {len(timeline.chunks)} chunks from {', '.join(paths)}")
    files: dict[str, Path] = {}
    if command in ("memorization", "all"):
        table = memorization.memorization(timeline, acfg)
        files.update(memorization.save_outputs(table, out, acfg.curves))
    if command in ("evaluate", "all"):
        if acfg.eval_batches:
            files.update(evaluation.save_heldout(evaluation.heldout_loss(timeline, acfg), timeline, out))
        if acfg.loss_sequences:
            rows, matrix = evaluation.chunk_loss(timeline, acfg)
            files.update(evaluation.save_chunk_loss(rows, matrix, timeline, out))
    return files


def code_eval_command(args, paths: list[str], acfg: AnalysisConfig) -> tuple[int, dict[str, Path]]:
    from crystal.analysis import code_eval

    if acfg.threads:
        torch.set_num_threads(acfg.threads)
    out = Path(args.out) if args.out else None
    if args.reference:
        return (0 if code_eval.reference(acfg) else 1), {}
    if args.hf:
        return 0, code_eval.code_eval_hf(Path(args.hf), acfg, out)
    if not paths:
        raise ValueError("code-eval needs a run or release directory (or --reference, or --hf DIR)")
    return 0, code_eval.code_eval(paths, acfg, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crystal.analysis", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("memorization", "evaluate", "all", "code-eval"))
    parser.add_argument("paths", nargs="*", help="run or release directories, then key=value overrides")
    parser.add_argument("--out", help="output directory (default: <first path>/analysis; code-eval: see its doc)")
    parser.add_argument("--reference", action="store_true", help="code-eval: score the canonical solutions")
    parser.add_argument("--hf", metavar="DIR", help="code-eval: a transformers model directory instead of PATHs")
    args = parser.parse_intermixed_args(argv)
    paths = [p for p in args.paths if "=" not in p]
    overrides = [p for p in args.paths if "=" in p]
    rc = 0
    try:
        acfg = analysis_config(overrides)
        if args.command == "code-eval":
            rc, files = code_eval_command(args, paths, acfg)
        elif not paths:
            raise ValueError(f"{args.command} needs at least one run or release directory")
        else:
            out = Path(args.out) if args.out else Path(paths[0]) / "analysis"
            files = run(args.command, paths, out, acfg)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, path in files.items():
        print(f"{name:>12}: {path}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
