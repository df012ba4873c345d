#!/usr/bin/env bash
# Everything that needs a GPU, in one call (target: under 8 minutes on one H100):
#   bash bench/run_gpu.sh OUT_DIR
# 1. GPU correctness tests (tests marked `gpu`: bf16 kernels, model step, streaming executor);
# 2. every benchmark in bench/ (kernels, model step, streaming vs resident), CSV rows into OUT_DIR.
# On a machine without CUDA it stops at once with a clear message.
set -uo pipefail
out=${1:?usage: bash bench/run_gpu.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/run_gpu.sh needs a CUDA GPU')" || exit 2
export CRYSTAL_BENCH_DIR="$out"
status=0
python -m pytest tests/ -m gpu -q -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" || status=1
# Kernels and the model step first, weight streaming last (the 7B runs are the longest), so a run cut short
# still leaves the kernel rows. CPU-only benches (loader, simulator-vs-CPU validation, CPU streaming) are
# measured on CPU machines and skipped here.
python -m pytest bench/test_attention.py bench/test_rope.py bench/test_swiglu.py bench/test_layernorm.py \
  bench/test_cross_entropy.py bench/test_block.py bench/test_train_step.py bench/test_checkpoint.py \
  -q -s -p no:cacheprovider 2>&1 | tee "$out/bench.log" || status=1
python -m pytest bench/test_streaming.py -k "gpu or adamw" -q -s -p no:cacheprovider 2>&1 \
  | tee "$out/bench_streaming.log" || status=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/device.csv" 2>/dev/null || true
exit $status
