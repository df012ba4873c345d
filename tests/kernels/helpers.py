"""Shared by the kernel tests: the device, the GPU-only mark, and one assert that names what differs.

On a machine without CUDA the kernels run in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported). bf16 tl.dot is wrong in the interpreter, so bf16
cases and long shapes (64-bit offsets, gigabytes) carry GPU_ONLY: `pytest tests/ -m gpu` on a GPU.
"""

from __future__ import annotations

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU_ONLY = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ON_GPU = torch.cuda.is_available()


def gpu_param(*values, id: str | None = None):
    """A parametrize case that only runs on a GPU (bf16, or shapes too big for the interpreter)."""
    return pytest.param(*values, marks=GPU_ONLY, id=id)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, name: str = "") -> None:
    """torch.isclose everywhere, with non-finite values compared by kind (a NaN where the reference is
    finite fails loudly, with its position), and a message giving the worst element and the count."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().float().cpu(), expected.detach().float().cpu()
    bad_a, bad_e = ~torch.isfinite(a), ~torch.isfinite(e)
    nonfinite_mismatch = bad_a & ~(bad_e & ((a == e) | (a.isnan() & e.isnan())))
    if nonfinite_mismatch.any():
        idx = tuple(int(i) for i in nonfinite_mismatch.nonzero()[0])
        raise AssertionError(
            f"{name}: {int(nonfinite_mismatch.sum())} non-finite values where the reference has "
            f"{'other values' if bad_e.any() else 'finite ones'}; first at {idx}: got {a[idx].item()}, "
            f"expected {e[idx].item()}"
        )
    if bad_e.any() and (bad_e & ~bad_a).any():
        idx = tuple(int(i) for i in (bad_e & ~bad_a).nonzero()[0])
        raise AssertionError(f"{name}: reference is non-finite at {idx} ({e[idx].item()}) but got {a[idx].item()}")
    finite = ~bad_e
    close = torch.isclose(a, e, atol=atol, rtol=rtol) | ~finite
    if not close.all():
        err = (a - e).abs().where(finite, 0.0)
        idx = tuple(int(i) for i in (err == err.max()).nonzero()[0])
        raise AssertionError(
            f"{name}: {int((~close).sum())}/{a.numel()} elements differ beyond atol={atol}, rtol={rtol}; worst at "
            f"{idx}: got {a[idx].item():.6g}, expected {e[idx].item():.6g} (abs err {err.max().item():.3g})"
        )


def random_doc_ids(batch: int, seq: int, n_docs: int, generator: torch.Generator) -> torch.Tensor:
    """(B, S) packed-document ids: n_docs contiguous runs of random lengths per row."""
    rows = []
    for _ in range(batch):
        cuts = torch.randperm(seq - 1, generator=generator)[: n_docs - 1].add(1).sort().values
        lengths = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([seq])]))
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), lengths))
    return torch.stack(rows)


def positions_from_docs(doc_ids: torch.Tensor) -> torch.Tensor:
    """Per-token positions that restart at 0 at every document start (as the packed loader gives them)."""
    b, s = doc_ids.shape
    idx = torch.arange(s).expand(b, s)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return idx - torch.where(starts, idx, 0).cummax(-1).values
