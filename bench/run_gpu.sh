#!/usr/bin/env bash
# Everything that needs a GPU, in one call, within an 8-minute budget on one H100:
#   bash bench/run_gpu.sh OUT_DIR
# Sections run in this order, each under its own `timeout` (a section cut short keeps the CSV rows it wrote,
# says TIMED OUT, and the next one starts); each prints its wall time, and the total is printed against the
# budget at the end. The limits add up to less than the budget, so the whole run ends within it.
#   1. weight streaming (the figures most needed): 8-layer 1.74B streamed vs resident, 7B at 8/16/32 layers,
#      the 7B host-memory plan, the host AdamW
#   2. GPU correctness tests (tests marked `gpu`: bf16 kernels, model step, streaming executor)
#   3. the benches' data, prepared once (the corpus subset the tests use) into OUT_DIR/cache
#   4. kernel benches (torch.compile'd references only with CRYSTAL_BENCH_COMPILE=1: compiling dominates)
#   5. model step and checkpoint benches (they read the data of section 3)
# CSV rows go to OUT_DIR, logs to OUT_DIR/<section>.log, wall times to OUT_DIR/sections.txt. On a machine
# without CUDA it stops at once with a clear message.
set -uo pipefail
out=${1:?usage: bash bench/run_gpu.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/run_gpu.sh needs a CUDA GPU')" || exit 2
export CRYSTAL_BENCH_DIR="$out"
export CRYSTAL_CACHE="$out/cache" CRYSTAL_TEST_CACHE="$out/cache"  # one data cache for benches and tests
budget=480
start=$SECONDS
status=0
: > "$out/sections.txt"

section() {  # section NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit} s)"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    local note="rc $rc"
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        note="TIMED OUT after ${limit} s"
    fi
    [ "$rc" = 0 ] || status=1
    echo "== $name: $((SECONDS - t0)) s ($note)" | tee -a "$out/sections.txt"
}

pytest_q=(python -m pytest -q -s -p no:cacheprovider)
section streaming_8_layer 100 "${pytest_q[@]}" bench/test_streaming.py -k "test_gpu_8_layer"
section streaming_7b 140 "${pytest_q[@]}" bench/test_streaming.py -k "test_gpu_7b"
section streaming_host 30 "${pytest_q[@]}" bench/test_streaming.py -k "host_memory_plan or adamw"
section gpu_tests 65 python -m pytest tests/ -m gpu -q -p no:cacheprovider
section bench_data 25 python -c "from bench.conftest import prepare_bench_data; prepare_bench_data()"
section kernels 70 "${pytest_q[@]}" bench/test_attention.py bench/test_rope.py bench/test_swiglu.py \
    bench/test_layernorm.py bench/test_cross_entropy.py bench/test_block.py
section step_and_checkpoint 25 "${pytest_q[@]}" bench/test_train_step.py bench/test_checkpoint.py
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/device.csv" 2>/dev/null || true
total=$((SECONDS - start))
verdict="within"
[ "$total" -le "$budget" ] || verdict="OVER"
echo "== total: ${total} s of the ${budget} s budget (${verdict})" | tee -a "$out/sections.txt"
exit $status
