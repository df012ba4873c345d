"""backend=fsdp on a GPU (NCCL, bf16 mixed precision), one rank, against backend=resident under bf16 autocast.
Not yet run (no GPU has been lent to this work); not in bench/run_gpu.sh, whose 8-minute budget has 15 s left.

    pytest bench/test_fsdp_gpu.py -s

Checks what the CPU tests cannot: NCCL as the default group, bf16 gathered weights with fp32 reduction and fp32
master shards, autocast beside them, the step's time printed for both engines.
"""

from __future__ import annotations

import math
import socket
import time

import pytest
import torch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _engine(kind: str, amp: torch.dtype):
    from crystal.streaming.backends.base import AdamWSettings

    from crystal.config import ModelConfig
    from crystal.model import build_model
    from crystal.trainer import CrystalAdapter, param_group_specs

    model = build_model(ModelConfig.from_name("small", n_layer=4), device="cpu", seed=0)
    adapter = CrystalAdapter(model, doc_masking=False)
    args = (adapter, param_group_specs(model, 0.1), AdamWSettings(), torch.device("cuda"), amp)
    if kind == "resident":
        from crystal.streaming.backends.resident import ResidentEngine

        return ResidentEngine(*args)
    from crystal.streaming.backends.fsdp import FSDPEngine

    return FSDPEngine(*args, activation_checkpointing=True)


@needs_cuda
def test_gpu_fsdp_one_rank_bf16_tracks_resident(tmp_path):
    import numpy as np
    import torch.distributed as dist

    from crystal.data.loader import Batch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        resident, sharded = _engine("resident", torch.bfloat16), _engine("fsdp", torch.bfloat16)
        assert sharded.param_dtype == torch.bfloat16
        g = torch.Generator().manual_seed(0)
        for step in range(3):
            ids = torch.randint(0, 32032, (4, 1025), generator=g)
            pos, doc = torch.arange(1024).repeat(4, 1), torch.zeros(4, 1024, dtype=torch.int32)
            idx = np.arange(4)
            mbs = [Batch(ids[:, :-1], ids[:, 1:].clone(), pos, doc, idx, idx * 0, idx)]
            times = []
            for engine in (resident, sharded):
                torch.cuda.synchronize()
                t = time.perf_counter()
                times.append((engine.train_step(mbs, 1e-4), time.perf_counter() - t))
                torch.cuda.synchronize()
            (a, ta), (b, tb) = times
            print(f"step {step}: resident {a.loss:.4f} in {ta * 1e3:.1f} ms, fsdp {b.loss:.4f} in {tb * 1e3:.1f} ms")
            assert math.isfinite(b.loss) and b.loss == pytest.approx(a.loss, rel=2e-2)
        state = sharded.state_dict()
        assert state["model"]["wte.weight"].dtype == torch.float32  # fp32 master weights in the checkpoint
        sharded.load_state_dict(state)
    finally:
        dist.destroy_process_group()
