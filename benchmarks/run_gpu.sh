#!/bin/bash
# Slipstream vs HF transformers vs HF + Liger-Kernel training benchmark, in one device call.
#
# 1. HERE (the CPU machine, with network), once:   bash benchmarks/run_gpu.sh --build-bundle
#    -> .peers/bench_bundle.zip (git-ignored): the wheels the GPU image lacks, unpacked and
#    zipped: liger-kernel (the peer), hydra-core + omegaconf + antlr4-python3-runtime (launcher.loop
#    imports launcher.config, which imports hydra), datasets + dill + multiprocess (launcher.data), deepspeed + pydantic + hjson (strategy=zero*). Everything else the benchmark imports
#    (torch, triton, transformers, peft, safetensors, tqdm, pyyaml, pytest) is on the image.
# 2. ON THE DEVICE (repo root), with carry [".peers"]:   bash benchmarks/run_gpu.sh [bench_train.py args]
#    default args: --tests --profile  (tests/test_ops.py on the GPU, then 1b-full and 1b-full-ckpt
#    for slipstream, liger, hf, then the profile). Everything lands in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
BUNDLE=.peers/bench_bundle.zip

if [ "${1:-}" = "--build-bundle" ]; then
  set -e
  work=$(mktemp -d); mkdir -p .peers
  py=${PYTHON:-python3}
  # the GPU image runs Python 3.12 on x86_64; all four are pure-Python (py3-none-any)
  $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$work/w" \
    liger-kernel==0.8.5 hydra-core==1.3.2 omegaconf==2.3.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
    pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0
  # DeepSpeed (strategy=zero*) is an sdist: build its pure-Python wheel, ops compiled just in time
  DS_BUILD_OPS=0 $py -m pip wheel -q --no-deps -w "$work/w" deepspeed==0.19.8
  # antlr4-python3-runtime 4.9.3 (omegaconf 2.3 pins 4.9.*) is published as an sdist only: build its wheel
  $py -m pip wheel -q --no-deps -w "$work/w" antlr4-python3-runtime==4.9.3
  mkdir -p "$work/site"
  for w in "$work"/w/*.whl; do $py -m zipfile -e "$w" "$work/site"; done
  find "$work/site" -name __pycache__ -prune -exec rm -rf {} +
  rm -f "$BUNDLE"
  (cd "$work/site" && $py -m zipfile -c "$OLDPWD/$BUNDLE" .)
  ls "$work/w"; rm -rf "$work"
  ls -la "$BUNDLE"
  exit 0
fi

OUT=${OUT:-/tmp/bench_out}; export OUT; mkdir -p "$OUT"
if [ ! -f "$BUNDLE" ]; then
  echo "missing $BUNDLE: run 'bash benchmarks/run_gpu.sh --build-bundle' on the CPU machine and carry .peers" >&2
  exit 2
fi
rm -rf /tmp/site && python3 -m zipfile -e "$BUNDLE" /tmp/site
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache}  # shared by the subprocesses

{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
  python3 - <<'EOF'
import sys, torch
from importlib.metadata import version
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for d in ("triton", "transformers", "peft", "liger-kernel", "hydra-core", "omegaconf", "pytest"):
    try:
        print(f"  {d} {version(d)}")
    except Exception as e:
        print(f"  {d} MISSING ({e})")
import launcher.loop, liger_kernel.transformers  # noqa: F401  the imports the rows need
print("imports ok")
EOF
} 2>&1 | tee "$OUT/env.txt"

args=("$@")
[ ${#args[@]} -eq 0 ] && args=(--tests --profile)
# bench_train.py keeps itself inside --budget-s (default 530 s) and rewrites bench_train.json after each row
timeout 580 python3 benchmarks/bench_train.py "${args[@]}" --out "$OUT" 2>&1 | tee "$OUT/bench_train.log"
exit "${PIPESTATUS[0]}"
