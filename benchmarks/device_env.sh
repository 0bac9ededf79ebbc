# Sourced first by the run_*_gpu.sh scripts on the device: unpacks the carried wheels (.peers:
# see run_gpu.sh --build-bundle and run_peft_gpu.sh), sets the offline and cache variables
# and records the card. $1: the default output folder's name under /tmp.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/$1}; export OUT; mkdir -p "$OUT"
rm -rf /tmp/site /tmp/peers
python3 -m zipfile -e .peers/bench_bundle.zip /tmp/site
python3 -m zipfile -e .peers/unsloth/peers.zip /tmp/peers
cp -r /tmp/peers/bitsandbytes /tmp/site/  # Slipstream's QLoRA quantises with bitsandbytes too
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRITON_CACHE_DIR=/tmp/triton_cache  # shared by the subprocesses
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
free -g >> "$OUT/env.txt"
