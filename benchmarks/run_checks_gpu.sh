#!/bin/bash
# The GPU half of the test suite and the 8B LoRA profile, in one device call (carry [".peers"]):
# kernel, model, offload, LoRA/QLoRA, precision and auto-size tests on CUDA, ZeRO-2 in fp16 through
# `launch`, SDPA backends' speed, then Slipstream's 8b-lora and 8b-lora-offload rows and a profile of the latter.
# Needs .peers/bench_bundle.zip and .peers/unsloth/peers.zip (bitsandbytes for QLoRA), see
# run_gpu.sh and run_peft_gpu.sh.
set -uo pipefail
source "$(dirname "$0")/device_env.sh" checks_out

timeout 220 python3 -m pytest -q -rfEs -p no:cacheprovider -m "not slow" -k "not fsdp" \
  tests/test_offload.py tests/test_ops.py tests/test_model_kernels.py tests/test_lora.py tests/test_precision.py \
  tests/test_auto_batch.py > "$OUT/gpu_tests.txt" 2>&1
echo "gpu tests rc=$?"; tail -15 "$OUT/gpu_tests.txt"

timeout 60 python3 benchmarks/attention_backends.py 2>&1 | tail -12

timeout 100 python3 -m launcher strategy=zero2 trainer.precision=fp16_autocast trainer.max_steps=20 trainer.log_every=5 \
  trainer.export_hf=false logger.progress_bar=false hydra.run.dir="$OUT/zero2_fp16" > "$OUT/zero2_fp16.log" 2>&1
echo "zero2 fp16 rc=$?"; tail -4 "$OUT/zero2_fp16.log"; rm -rf "$OUT/zero2_fp16/checkpoints"

timeout 230 python3 benchmarks/bench_train.py --workloads 8b-lora,8b-lora-offload --systems slipstream --no-matmul \
  --profile --profile-workload 8b-lora-offload --budget-s 220 --row-timeout 110 --out "$OUT" 2>&1 | tail -45
