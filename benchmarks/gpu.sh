#!/usr/bin/env bash
# One prepared run for a lent H200 (finishes well inside 8 minutes): writes a 16 GB bf16 Llama-8B-shaped checkpoint on
# local disk, warms the page cache, measures pinned host-to-device bandwidth, and loads it with stock
# from_pretrained(device_map="cuda") and with hf_fastload, alternating fresh processes; prints the table last and
# writes the JSON under $OUT (the device tool's folder) or benchmarks/results/.
# Usage on the device machine: bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
"$PY" -c "import torch, transformers, safetensors, accelerate" 2>/dev/null || "$PY" -m pip install -q -e .
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the device image has torch and transformers, not hf_fastload
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
# correctness on the GPU first (device pipeline vs stock, bit for bit), then speed
"$PY" -m pytest -q -p no:cacheprovider tests/test_stream.py -k cuda 2>&1 | tail -5 || true
CKPT=${HF_FASTLOAD_BENCH_CKPT:-/tmp/hf_fastload-llama-8b-bf16}
RESULTS=${OUT:-benchmarks/results}
mkdir -p "$RESULTS"
[ -f "$CKPT/config.json" ] || "$PY" benchmarks/make_checkpoint.py "$CKPT" --params 8e9 --dtype bf16 --shards 4
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -m hf_fastload.tools.cli bench "$CKPT" --device cuda --dtype bfloat16 --runs 3 \
  --json "$RESULTS/gpu-h200-$(date +%Y-%m-%d).json"
