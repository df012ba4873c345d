"""Entry point: `python -m crystal.train [overrides]`. Reads the config, builds a Trainer, runs it.

python -m crystal.train                          tiny CrystalCoder on this machine's own text, CPU
python -m crystal.train +stage=2                 CrystalCoder's stage 2 (scaled down for tiny)
python -m crystal.train train.resume=latest      continue the run in outputs/<run_name>
"""

from __future__ import annotations

import json
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from crystal.config import CONFIG_DIR, quote_numeric_group_choices, register_configs, to_dataclass


def train(dcfg: DictConfig) -> dict:
    from crystal.trainer import Trainer, unigram_entropy

    cfg = to_dataclass(dcfg)
    trainer = Trainer(cfg, config_yaml=OmegaConf.to_yaml(dcfg, resolve=True))
    try:
        last = trainer.fit()
        ev = last.get("eval") or trainer.evaluate()
        entropy = unigram_entropy(trainer.data, trainer.loader.mixture_weights)
        trainer.metrics.log("summary", step=trainer.step, heldout_loss=ev.get("heldout"), unigram_entropy=entropy,
                            skipped_steps=trainer.skipped_steps, rollbacks=trainer.rollbacks)  # fmt: skip
    finally:
        trainer.close()
    if not trainer.writer:  # a data-parallel replica: rank 0 writes and reports the run
        return {"eval": ev, "unigram_entropy": entropy}
    from crystal.errors import CrystalError
    from crystal.release import describe_run

    try:
        (trainer.run_dir / "release_manifest.json").write_text(json.dumps(describe_run(trainer.run_dir), indent=1))
    except CrystalError as e:  # training itself succeeded: say why the run is not release-ready, do not fail
        print(f"warning: no release_manifest.json: {e}", file=sys.stderr)
    if cfg.train.plots:
        from crystal.metrics import plot_runs

        plot_runs([trainer.run_dir], trainer.run_dir / "plots")
    if "heldout" in ev:
        heldout = f"held-out loss {ev['heldout']:.4f} nats vs unigram entropy {entropy:.4f} nats"
    else:  # never a bare nan: say which sources have nothing held out and why
        heldout = trainer.no_heldout or "no held-out loss (train.eval_batches=0)"
    print(f"done: step {trainer.step}, {trainer.tokens:,} tokens; {heldout}; run in {trainer.run_dir}")
    return {"eval": ev, "unigram_entropy": entropy}


def run(dcfg: DictConfig) -> None:
    """Hydra task: known user errors end as one line on stderr and exit status 1, not a traceback."""
    from crystal.errors import USER_ERRORS

    try:
        train(dcfg)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    sys.argv[1:] = quote_numeric_group_choices(sys.argv[1:])
    register_configs()
    hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)(run)()


if __name__ == "__main__":
    sys.exit(main())
