"""Data chunks: what the loader consumed between two checkpoints, regenerated from the recipe alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from crystal.data.chunks import (
    chunk_record,
    chunk_samples,
    iter_chunk,
    loader_from_config,
    loader_from_run,
    read_chunk,
    tokens_sha256,
    write_chunk,
)
from crystal.data.loader import IGNORE_INDEX
from crystal.errors import DataError
from tests.conftest import FAST_DATA, compose_config, compose_dict

RUN = [*FAST_DATA, "train.seq_len=64", "train.micro_batch=4", "train.global_batch=8", "+stage=2"]


@pytest.fixture(scope="module")
def consumed(crystal_cache):
    """What a 'training run' consumed: 6 steps from a loader built exactly as the trainer builds it."""
    loader = loader_from_config(compose_config(RUN))
    steps = [loader.next_step() for _ in range(6)]
    return loader, steps


def step_tokens(batches) -> torch.Tensor:
    """(B, S+1) token windows of one step, rebuilt from what the model saw (inputs + last target)."""
    out = []
    for b in batches:
        last = b.targets[:, -1:].clone()
        assert not (last == IGNORE_INDEX).any()  # no fim_pad in this data: the last target is the real token
        out.append(torch.cat([b.input_ids, last], dim=1))
    return torch.cat(out)


def test_chunk_regenerated_from_the_recipe_equals_what_the_loader_consumed(consumed, tmp_path):
    loader, steps = consumed
    cfg = compose_config(RUN)
    manifest = {**loader.data.manifest, "fingerprint": loader.data.fingerprint}
    fresh = loader_from_config(cfg, manifest)  # a new loader: nothing shared with the one that trained
    a, b = 2 * 8, 5 * 8  # chunk k = steps 2..4 (between checkpoints at steps 2 and 5)
    rows = list(iter_chunk(fresh, a, b))
    trained = torch.cat([step_tokens(steps[s]) for s in range(2, 5)])
    assert torch.equal(torch.tensor([r["token_ids"] for r in rows]), trained)
    assert [r["sample_index"] for r in rows] == list(range(a, b))
    names = [loader.names[s] for step in steps[2:5] for batch in step for s in batch.source_index]
    assert [r["source"] for r in rows] == names
    record = chunk_record(fresh, a, b)
    assert record == chunk_record(loader, a, b)
    assert record["tokens_sha256"] == tokens_sha256(rows) and record["num_samples"] == 24
    assert sum(record["tokens_per_source"].values()) == record["num_tokens"] == 24 * 64
    assert sum(v["samples"] for v in record["sources"].values()) == 24
    assert record["recipe"]["stage"] == 2 and record["data_fingerprint"] == loader.data.fingerprint
    for r in rows:
        assert set(r["doc_ids"]) <= set(record["documents"][r["source"]])


def test_chunk_files_in_ambers_layout_and_exclusions(consumed, tmp_path):
    loader, _ = consumed
    record = write_chunk(loader, 0, 16, tmp_path / "train_000.jsonl", excluded=[[4, 8], [100, 200]])
    rows = list(read_chunk(tmp_path / "train_000.jsonl"))
    assert [r["sample_index"] for r in rows] == chunk_samples(0, 16, [[4, 8]]) == [0, 1, 2, 3, *range(8, 16)]
    assert all(len(r["token_ids"]) == 65 and isinstance(r["source"], str) for r in rows)
    assert record["excluded"] == [[4, 8]] and record["num_samples"] == 12
    assert record["tokens_sha256"] == tokens_sha256(rows)


def test_loader_from_run_files_and_a_mismatched_manifest(consumed, tmp_path):
    loader, steps = consumed
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(compose_dict(RUN), resolve=True))
    manifest = {**loader.data.manifest, "fingerprint": loader.data.fingerprint}
    (tmp_path / "data_manifest.json").write_text(json.dumps(manifest))
    again = loader_from_run(tmp_path)
    assert np.array_equal(again.step_batches(1)[0].input_ids, steps[1][0].input_ids)
    (tmp_path / "data_manifest.json").write_text(json.dumps({**manifest, "fingerprint": "f" * 64}))
    with pytest.raises(DataError, match="fingerprint"):
        loader_from_run(tmp_path)
    with pytest.raises(DataError, match="config.yaml is missing"):
        loader_from_run(tmp_path / "nope")
