"""Shared test setup. Triton kernels run in the interpreter when there is no GPU, which must be
decided before triton is first imported; data is prepared once per session into a temp cache."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import csv  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from crystal.config import CONFIG_DIR, Config, quote_numeric_group_choices, register_configs, to_dataclass  # noqa: E402

CONF_DIR = CONFIG_DIR

# A small slice of the embedded corpus: enough text for a tokenizer and a few hundred windows, prepared
# in a few seconds. Every test that trains uses it.
FAST_DATA = [
    "data.sources.python.max_mb=1.5",
    "data.sources.english.max_mb=1.5",
    "data.sources.docs.max_mb=0.4",
    "data.sources.man.max_docs=6",
    "data.sources.javascript.max_mb=0.4",
    "data.sources.html.max_mb=0.3",
    "data.tokenizer.vocab_size=1000",
    "data.tokenizer.sample_mb=1.0",
    "train.progress=false",
]


@pytest.fixture(scope="session", autouse=True)
def crystal_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data cache per test session, shared with subprocesses through CRYSTAL_CACHE."""
    path = Path(os.environ.get("CRYSTAL_TEST_CACHE") or tmp_path_factory.mktemp("crystal_cache"))
    os.environ["CRYSTAL_CACHE"] = str(path)
    return path


def compose_dict(overrides: list[str] | None = None, config_name: str = "config"):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name=config_name, overrides=quote_numeric_group_choices(list(overrides or [])))


def compose_config(overrides: list[str] | None = None) -> Config:
    return to_dataclass(compose_dict(overrides))


@pytest.fixture
def fast_config(tmp_path: Path):
    """compose(overrides) -> Config on the fast data slice, writing into tmp_path/outputs."""

    def make(*overrides: str) -> Config:
        return compose_config([*FAST_DATA, f"train.out_dir={tmp_path / 'outputs'}", *overrides])

    return make


@pytest.fixture(scope="session")
def small_tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 400-piece tokenizer trained in about a second on a few standard-library modules (for tests of
    readers and FIM that need some tokenizer, not the corpus's)."""
    from crystal.data.sources import _stdlib_py_files, read_text
    from crystal.tokenizer import train_sentencepiece

    lines = [line for f in _stdlib_py_files()[:30] for line in read_text(f).split("\n") if line.strip()]
    path = tmp_path_factory.mktemp("small_tokenizer") / "t.model"
    train_sentencepiece(iter(lines), path, 400, seed=1)
    return path


@pytest.fixture
def one_thread():
    """Tiny matmuls on a shared 2-core machine: one intra-op thread is 10-40x faster than two fighting.
    Modules of tiny-model tests use it for every test: pytestmark = pytest.mark.usefixtures("one_thread")."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def train_run(out_dir: Path, *overrides: str) -> Path:
    """Train on the fast data slice into out_dir with one torch thread (a module fixture runs before
    one_thread); returns the run directory."""
    from crystal.trainer import Trainer

    cfg = compose_config([*FAST_DATA, f"train.out_dir={out_dir}", *overrides])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    trainer = Trainer(cfg, log=lambda *_: None)
    try:
        trainer.fit()
    finally:
        trainer.close()
        torch.set_num_threads(threads)
    return trainer.run_dir
