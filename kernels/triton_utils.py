"""What every kernel launcher needs: interpreter detection, per-dtype dot precision, autotune configs
that collapse to one small config under the interpreter (no benchmarking there), and clear errors
for tensors Triton cannot run on."""

from __future__ import annotations

import functools
import os

import torch
import triton

# Decided when triton is first imported (tests/conftest.py sets it on machines without CUDA).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_configs(gpu: list[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    """GPU: the candidates to time. Interpreter: one config, so the autotuner never benchmarks."""
    return [interpreter] if INTERPRET else gpu


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: 3xTF32 on tensor cores, about fp32-accurate (the torch reference does not use TF32).
    Plain IEEE fp32 dots fall back to FMA loops that spill kilobytes of registers per thread in the attention
    backward when compiled for sm_90 (checked with bench/compile_sm90.py). 16-bit inputs ignore the setting."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def check_device(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type == "cpu" and not INTERPRET:
            raise RuntimeError(
                "Triton kernels got a CPU tensor but TRITON_INTERPRET=1 was not set before triton was imported; "
                "use model.ops=torch on CPU, or export TRITON_INTERPRET=1 (slow, for tests)"
            )


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_programs_for_reduction(device: torch.device, interpreter: int = 4) -> int:
    """Programs for row-parallel reductions (LayerNorm dW/db): a few waves over the SMs on a GPU."""
    if device.type != "cuda":
        return interpreter
    return 4 * sm_count(device.index if device.index is not None else torch.cuda.current_device())


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels take any strides except on the last dim, which must be 1 (coalesced loads)."""
    return t if t.stride(-1) == 1 else t.contiguous()
