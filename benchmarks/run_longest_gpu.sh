#!/bin/bash
# Longest context at micro batch 1 (benchmarks/longest_context.py) in one device call, carry [".peers"]
# (bitsandbytes for QLoRA). A step near the card's limit takes minutes (attention grows with the
# square of the length), so one call checks one mode, from START doubling up to MAX_SEQ:
#   MODES=lora START=16384 bash benchmarks/run_longest_gpu.sh                      # the doubling search
#   MODES=qlora TOP_DOWN=352256,344064,327680 bash benchmarks/run_longest_gpu.sh   # near the limit, longest first
#   CAP_GIB=79.18 ...                                     # on a larger card: only an H100 80GB's memory
#   TESTS='tests/test_lora.py -k quantised' ...            # other GPU tests first (TESTS= none)
set -uo pipefail
source "$(dirname "$0")/device_env.sh" longest_out

# GPU tests run first (TESTS: pytest arguments; empty skips them, leaving a long step the whole call).
if [ -n "${TESTS-tests/test_offload.py}" ]; then
  timeout 90 python3 -m pytest -q -p no:cacheprovider ${TESTS-tests/test_offload.py} > "$OUT/tests_gpu.txt" 2>&1
  tail -1 "$OUT/tests_gpu.txt"
fi

budget=${LONGEST_S:-520}
timeout "$budget" python3 benchmarks/longest_context.py --modes "${MODES:-qlora,lora}" --start "${START:-16384}" \
  --max-seq "${MAX_SEQ:-1048576}" ${TOP_DOWN:+--top-down $TOP_DOWN} ${CAP_GIB:+--cap-gib $CAP_GIB} --budget-s $(( budget - 20 )) --out "$OUT" 2>&1 | tail -12
free -g | head -2
