"""Compile every GPU config of every kernel for an H100 (sm_90) on any machine, GPU or not, and print
shared memory, registers and spill (stack) bytes per config: the evidence behind the autotune lists.

    python bench/compile_sm90.py [attention|rope|swiglu|layernorm|cross_entropy ...] [--fp32]

Not a benchmark and not a test (it uses Triton's ahead-of-time compiler API, which moves between
releases; written against Triton 3.9). Integer arguments are marked divisible by 16 as the JIT does for
CrystalCoder's shapes, except FFN 10922 and its row stride; without that hint loads are not vectorised
and the software pipeliner does nothing, so the figures would not describe a real launch.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter cannot compile kernels")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from crystal.kernels import attention, cross_entropy, layernorm, rope, swiglu  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
NOT_DIVISIBLE = {"N_FFN", "stride_hm"}  # 10922
FLOATS = {"qk_scale", "sm_scale", "eps", "logits_scale"}


def compile_one(fn, pointers: dict[str, str], constexprs: dict, num_warps: int, num_stages: int, label: str) -> None:
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        else:
            signature[name] = "fp32" if name in FLOATS else "i32"
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if signature[name] not in ("constexpr", "fp32") and name not in NOT_DIVISIBLE
    }
    backend = make_backend(TARGET)
    options = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages})
    try:
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
    except Exception as e:  # noqa: BLE001 - report and go on to the next config
        print(f"FAIL {label}: {type(e).__name__}: {str(e)[:300]}")
        return
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    print(f"ok   {label}: shared {kernel.metadata.shared / 1024:.0f} KB, registers {regs[1] if regs else '?'}, "
          f"spill stack {stack[1] if stack else '?'} B")  # fmt: skip


def configs(kernel) -> list[triton.Config]:
    return list(kernel.configs)


def check_attention(dt: str) -> None:
    precision = "tf32x3" if dt == "fp32" else "tf32"
    for d in (64, 128):
        for has_doc in (False, True):
            common = dict(HEAD_DIM=d, BLOCK_D=d, HAS_DOC=has_doc, DOT_PRECISION=precision)
            meta = dict(LSE="fp32", DELTA="fp32", DOC="i32", FIRST="i32", LAST="i32")
            for name, kernel, tensors in (
                ("attn_fwd", attention._attn_fwd_kernel, "Q K V O"),
                ("attn_dkdv", attention._attn_bwd_dkdv_kernel, "Q K V DO DK DV"),
                ("attn_dq", attention._attn_bwd_dq_kernel, "Q K V DO DQ"),
            ):
                pointers = {**meta, **dict.fromkeys(tensors.split(), dt)}
                for c in configs(kernel):
                    label = f"{name} {dt} D{d} doc={has_doc} {c}"
                    compile_one(kernel.fn, pointers, {**common, **c.kwargs}, c.num_warps, c.num_stages, label)


def check_rope(dt: str) -> None:
    pointers = dict(Q=dt, K=dt, QO=dt, KO=dt, POS="i64", INV_FREQ="fp32")
    for interleaved in (True, False):
        for rotary_only, block_d, block_t in ((False, 128, 1), (True, 32, 4)):
            constexprs = dict(HEAD_DIM=32 if rotary_only else 128, ROTARY_DIMS=32, INTERLEAVED=interleaved,
                              BACKWARD=False, BLOCK_T=block_t, BLOCK_H=32, BLOCK_D=block_d)  # fmt: skip
            compile_one(rope._rope_kernel, pointers, constexprs, 8, 3,
                        f"rope {dt} interleaved={interleaved} in_place={rotary_only}")  # fmt: skip


def check_swiglu(dt: str) -> None:
    pointers = dict.fromkeys("X WU BU WG BG H DH DU DG".split(), dt)
    for backward in (False, True):
        for c in configs(swiglu._swiglu_kernel):
            constexprs = dict(HAS_BIAS=True, BACKWARD=backward, DOT_PRECISION="tf32x3" if dt == "fp32" else "tf32")
            label = f"swiglu {dt} backward={backward} {c}"
            compile_one(
                swiglu._swiglu_kernel.fn, pointers, {**constexprs, **c.kwargs}, c.num_warps, c.num_stages, label
            )


def check_layernorm(dt: str) -> None:
    pointers = dict(X=dt, Y=dt, DY=dt, DX=dt, W="fp32", B="fp32", MEAN="fp32", RSTD="fp32", DW_PART="fp32",
                    DB_PART="fp32")  # fmt: skip
    compile_one(layernorm._ln_fwd_kernel, pointers, dict(HAS_BIAS=True, BLOCK_R=1, BLOCK_C=4096), 8, 3,
                f"layernorm_fwd {dt} C4096")  # fmt: skip
    compile_one(layernorm._ln_bwd_kernel, pointers, dict(BLOCK_R=1, BLOCK_C=4096), 8, 3, f"layernorm_bwd {dt} C4096")


def check_cross_entropy(dt: str) -> None:
    pointers = dict(LOGITS=dt, TARGETS="i64", LOSS="fp32", N_VALID="i64")
    compile_one(cross_entropy._ce_rows_kernel, pointers, dict(COMPUTE_GRAD=True, BLOCK_V=4096), 8, 3,
                f"ce_rows {dt} V-block 4096")  # fmt: skip


CHECKS = {"attention": check_attention, "rope": check_rope, "swiglu": check_swiglu, "layernorm": check_layernorm,
          "cross_entropy": check_cross_entropy}  # fmt: skip

if __name__ == "__main__":
    wanted = [a for a in sys.argv[1:] if not a.startswith("--")] or list(CHECKS)
    dtype = "fp32" if "--fp32" in sys.argv else "bf16"
    for op in wanted:
        CHECKS[op](dtype)
