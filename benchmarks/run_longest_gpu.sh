#!/bin/bash
# Longest context at micro batch 1 for 8B QLoRA and LoRA (benchmarks/longest_context.py), then a
# profile of the 8b-lora-auto24 step, in one device call (carry [".peers"] for bitsandbytes).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/longest_out}; export OUT; mkdir -p "$OUT"
rm -rf /tmp/site /tmp/peers
python3 -m zipfile -e .peers/bench_bundle.zip /tmp/site
python3 -m zipfile -e .peers/unsloth/peers.zip /tmp/peers && cp -r /tmp/peers/bitsandbytes /tmp/site/
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRITON_CACHE_DIR=/tmp/triton_cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
free -g | tee -a "$OUT/env.txt"

timeout ${LONGEST_S:-420} python3 benchmarks/longest_context.py --budget-s $(( ${LONGEST_S:-420} - 30 )) --out "$OUT" 2>&1 | tail -12

timeout 120 python3 benchmarks/bench_train.py --workloads 8b-lora-auto24 --systems slipstream --no-matmul --profile \
  --profile-workload 8b-lora-auto24 --budget-s 110 --row-timeout 100 --out "$OUT" 2>&1 | sed -n '1,20p'
