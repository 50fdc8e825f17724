#!/usr/bin/env bash
# The GPU checks owed by the kernel and efficiency work, as one run for a lent GPU
# (the device tool: one command of at most 10 minutes). Each check has its own time
# limit and log under $OUT (default /tmp/gpu_checks); a failing check does not stop
# the others. Needs jax with CUDA; the data stack (tensorflow, seqio) is not needed.
#
#   bash scripts/gpu_checks.sh            # everything, about 9 minutes on an H100/H200
#   CHECKS="bench_train" bash scripts/gpu_checks.sh
#
# 1. flash_tests:    the flash-attention kernel tests compiled for the GPU (Triton), not
#                    interpreted; with pytest-xdist present, 8 workers share the compiles.
# 2. moe_tests:      the grouped-matmul and routing kernels compiled.
# 3. bench_attention: ours vs XLA, cuDNN and JAX's Pallas attention (causal, head_dim 128,
#                    bf16, 4k and 8k; goals >= 1.2x JAX's Pallas, >= 1.0x cuDNN).
# 4. bench_moe:      dropless vs capacity vs ragged_dot.
# 5. bench_train:    a 1B LLaMA-style decoder's tokens/s and MFU with flash attention on
#                    and off (synthetic tokens, bf16, 8 x 2048).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
CHECKS=${CHECKS:-flash_tests moe_tests bench_attention bench_moe bench_train}
XDIST=$(python -c 'import xdist' 2>/dev/null && echo '-n 8' || echo '')

check() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  case " $CHECKS " in *" $name "*|*" ${name%_*} "*) ;; *) return ;; esac
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - start)) s (log $OUT/$name.log)"
  tail -n 25 "$OUT/$name.log"
}

check flash_tests 200 env FLASH_TEST_COMPILED=1 T5X_LIKE_TEST_ROTATION=all \
  python -m pytest -q $XDIST tests/pallas_kernels/flash_attention/ops_test.py
check moe_tests 90 env GMM_TEST_COMPILED=1 ROUTING_TEST_COMPILED=1 \
  python -m pytest -q $XDIST tests/pallas_kernels/moe_routing
check bench_attention 100 python scripts/bench_attention.py --lengths=4096,8192 --head_dims=128 \
  --kv_heads=16,4 --causal=true --dtype=bfloat16 --append
check bench_moe 60 python scripts/bench_moe.py --append
for attention in xla flash; do
  check "bench_train_$attention" 120 python scripts/bench_train.py --model=models/llama/1b.gin --dtype=bfloat16 \
    --batch=8 --length=2048 --steps=5 --warmup=2 --synthetic --attention=$attention
done
git diff --stat -- docs/benchmarks.md 2>/dev/null | tail -1
cp docs/benchmarks.md "$OUT/benchmarks.md" 2>/dev/null || true
