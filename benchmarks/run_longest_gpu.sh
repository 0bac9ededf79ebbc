#!/bin/bash
# Longest context at micro batch 1 for 8B QLoRA and LoRA (benchmarks/longest_context.py), then a
# profile of the 8b-lora-auto24 step, in one device call (carry [".peers"] for bitsandbytes).
set -uo pipefail
source "$(dirname "$0")/device_env.sh" longest_out

timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_offload.py > "$OUT/test_offload_gpu.txt" 2>&1
tail -3 "$OUT/test_offload_gpu.txt"

timeout ${LONGEST_S:-330} python3 benchmarks/longest_context.py --budget-s $(( ${LONGEST_S:-330} - 20 )) --out "$OUT" 2>&1 | tail -12

timeout 120 python3 benchmarks/bench_train.py --workloads 8b-lora-auto24 --systems slipstream --no-matmul --profile \
  --profile-workload 8b-lora-auto24 --budget-s 110 --row-timeout 100 --out "$OUT" 2>&1 | sed -n '1,20p'
