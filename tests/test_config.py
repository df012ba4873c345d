"""Every shipped config composes and builds; typos fail at composition with Hydra's message."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from crystal.config import ModelConfig, to_dataclass
from crystal.data.prepare import build_sources
from crystal.model import build_model, count_params
from crystal.trainer import lr_at
from tests.conftest import CONF_DIR, compose_config, compose_dict


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


MODELS, STAGES, BACKENDS, DATA = options("model"), options("stage"), options("backend"), options("data")


def test_groups_are_populated():
    assert {"tiny", "small", "1b", "crystalcoder_7b", "amber_7b"} <= set(MODELS)
    assert STAGES == ["1", "2", "3"]
    assert "resident" in BACKENDS and "local" in DATA


@pytest.mark.parametrize("model,stage,backend", list(itertools.product(MODELS, [None, *STAGES], BACKENDS)))
def test_every_shipped_config_composes_and_builds_on_meta(model, stage, backend):
    overrides = [f"model={model}", f"backend={backend}"] + ([f"+stage={stage}"] if stage else [])
    cfg = compose_config(overrides)
    assert cfg.model == ModelConfig.from_name(model)  # the YAML mirrors the registry entry exactly
    assert cfg.train.stage == (int(stage) if stage else 0)
    assert count_params(build_model(cfg.model, device="meta")) == cfg.model.num_params()


@pytest.mark.parametrize("data", DATA)
def test_every_data_config_composes_with_every_stage(data):
    for stage in STAGES:
        cfg = compose_config([f"data={data}", f"+stage={stage}"])
        assert abs(sum(cfg.data.source_mixture().values()) - 1) < 1e-9


def test_stage_files_carry_the_real_figures_at_full_scale():
    s1 = compose_config(["+stage=1", "scale=full"])
    assert (s1.train.steps, s1.optim.warmup_steps, s1.optim.decay_steps, s1.train.ckpt_every) == (
        79721,
        86,
        294337,
        1500,
    )
    assert s1.train.global_batch == 2112 and s1.optim.lr == 0.012 and s1.optim.final_lr == 0.00012408
    # Stage 1 stops before its decay horizon: the LR there is about stage 2's peak.
    assert lr_at(79721, s1.optim, s1.train.steps) == pytest.approx(0.0087869, abs=2e-7)
    s2 = compose_config(["+stage=2", "scale=full"])
    assert (s2.train.steps, s2.optim.decay_steps, s2.optim.lr, s2.data.fim_rate) == (214387, 214301, 0.0087825, 0.9)
    s3 = compose_config(["+stage=3", "scale=full"])
    assert (s3.train.steps, s3.optim.warmup_steps, s3.train.ckpt_every, s3.data.fim_rate) == (27728, 276, 1000, 0.3)
    assert s1.train.steps + s2.train.steps + s3.train.steps == 321_836
    tokens = 2112 * 2048 * 321_836
    assert tokens / 1e12 == pytest.approx(1.392, abs=0.001)


def test_stage_mixtures_are_crystalcoders():
    s2 = compose_dict(["+stage=2"])
    assert s2.data.mixture["starcoder"] == 0.62812
    assert sum(s2.data.mixture.values()) == pytest.approx(1.0, abs=1e-4)

    # On local data the subsets fold into the sources that exist: stage 1 English-heavy, stage 3 code-heavy
    # with Python the largest share (HTML, JS and CSS have small local stand-ins; absent ones fall back to Python).
    def share(stage: str, kind: str) -> float:
        cfg = compose_config([f"+stage={stage}"]).data
        kinds = {n: s.kind for n, s in build_sources(cfg).items()}
        return sum(w for n, w in cfg.source_mixture().items() if kinds[n] == kind)

    assert share("1", "english") > 0.9 and share("3", "code") > 0.8
    s3 = compose_config(["+stage=3"]).data.source_mixture()
    assert s3["python"] == max(s3.values())
    # The crystalcoder template names each subset as a source of its own: shares stay CrystalCoder's.
    cc = compose_config(["data=crystalcoder", "+stage=2"]).data
    assert cc.source_mixture()["starcoder"] == pytest.approx(0.62812, abs=1e-4) and cc.source_epochs() == {
        "starcoder": 2.0}  # fmt: skip


def test_tiny_scale_keeps_stage_proportions_small():
    cfg = compose_config(["+stage=2"])
    assert cfg.train.steps == 214 and cfg.train.global_batch == 8 and cfg.optim.warmup_steps == 1
    assert cfg.train.stage == 2


def test_resolved_config_shows_the_stage_schedule():
    from omegaconf import OmegaConf

    text = OmegaConf.to_yaml(compose_dict(["+stage=3"]), resolve=True)
    assert "steps: 28" in text and "lr: 0.002" in text and "sc_python: 0.3427" in text


def test_config_typo_fails_at_composition():
    with pytest.raises(ConfigCompositionException, match="stpes"):
        compose_dict(["train.stpes=5"])
    with pytest.raises(ConfigCompositionException, match="crystalcoder_13b"):
        compose_dict(["model=crystalcoder_13b"])
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        compose_dict(["model.n_layers=3"])


def test_invalid_values_fail_with_the_key_named():
    with pytest.raises(ValueError, match="model.d_model=100 is not divisible by model.n_head"):
        to_dataclass(compose_dict(["model.d_model=100", "model.n_head=3"]))
    with pytest.raises(ValueError, match="data.mixture names unknown source"):
        to_dataclass(compose_dict(["+data.mixture.nonexistent=1.0"]))


def test_conf_dir_is_complete():
    assert (CONF_DIR / "config.yaml").is_file()
    for group in ("model", "stage", "backend", "data", "optim", "scale"):
        assert list(Path(CONF_DIR / group).glob("*.yaml")), group
