#!/bin/bash
# 8B LoRA and QLoRA: Slipstream (full, offloaded and auto checkpointing) beside Unsloth, in one device call.
#
# 1. HERE, once (network):  bash benchmarks/run_gpu.sh --build-bundle
#                           bash /work/shared/bench/make_peer_bundle.sh .peers/unsloth
#                           cp /work/shared/bench/anchors.py /work/shared/bench/anchors_qlora_unsloth.py .peers/unsloth/
# 2. ON THE DEVICE, carry [".peers"]:  bash benchmarks/run_peft_gpu.sh
#    (fewer rows: WORKLOADS=8b-qlora-offload PEERS=8b-qlora-unsloth bash benchmarks/run_peft_gpu.sh)
# Unsloth runs from the peers' own script (it needs the random 8B model on disk, made first);
# Slipstream and HF + peft rows come from bench_train.py. Everything lands in $OUT.
set -uo pipefail
source "$(dirname "$0")/device_env.sh" peft_out
export UNSLOTH_DISABLE_STATISTICS=1

timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_offload.py tests/test_lora.py -k "offload or recomputation" \
  2>&1 | tail -3 | tee "$OUT/test_offload_gpu.txt"

# HF + peft (5.8k tok/s, 31.4 GiB on 2026-12-07) is left out to keep the call under 10 minutes: add hf to --systems.
timeout 270 python3 benchmarks/bench_train.py \
  --workloads ${WORKLOADS:-8b-lora,8b-lora-offload,8b-lora-auto24,8b-qlora,8b-qlora-offload} --systems ${SYSTEMS:-slipstream} \
  --no-matmul --budget-s 260 --row-timeout 120 --out "$OUT" 2>&1 | tee "$OUT/bench_train.log"

(cd .peers/unsloth && export PYTHONPATH=/tmp/peers &&
 python3 anchors_qlora_unsloth.py --make-model /tmp/llama8b &&
 timeout 280 python3 anchors_qlora_unsloth.py --timeout 135 ${PEERS:-8b-lora-unsloth 8b-qlora-unsloth}) 2>&1 | tee "$OUT/peers.log"
