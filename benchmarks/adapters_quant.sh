#!/usr/bin/env bash
# Issue 15's cases on a ~1B-parameter bf16 Llama checkpoint, under both transformers lines: the base plus a LoRA
# adapter (r=16 on q/k/v/o, AutoModelForCausalLM.from_pretrained(adapter)), and the checkpoint quantized on load with
# bitsandbytes 8-bit and 4-bit (device_map="cpu", default dtype). Stock and fast in alternating fresh processes,
# medians, peak RSS over the pre-load RSS; results in benchmarks/results/quant-<transformers>-<case>-<date>.json.
# Usage: bash benchmarks/adapters_quant.sh [RUNS]    (environments from scripts/env.sh are created if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
setup_venv tf5 "transformers>=5,<6"
setup_venv tf457 "transformers>=4.57,<4.58"
RUNS=${1:-5}
CKPT=${HF_FASTLOAD_BENCH_CKPT:-$HOME/.cache/hf_fastload/bench-llama-1b-bf16}
PARAMS=${HF_FASTLOAD_BENCH_PARAMS:-1e9}
ADAPTER=$CKPT-lora
OUT=${HF_FASTLOAD_BENCH_OUT:-benchmarks/results}
DATE=$(date +%Y-%m-%d)
mkdir -p "$OUT"
[ -f "$CKPT/config.json" ] || "$VENVS/tf5/bin/python" benchmarks/make_checkpoint.py "$CKPT" --params "$PARAMS" --dtype bf16
[ -f "$ADAPTER/adapter_config.json" ] || "$VENVS/tf5/bin/python" benchmarks/make_adapter.py "$CKPT" "$ADAPTER"

run() {  # run ENV CASE ARGS...
  local env=$1 case=$2; shift 2
  local tf; tf=$("$VENVS/$env/bin/python" -c 'import transformers; print(transformers.__version__)')
  echo "=== transformers $tf: $case ==="
  "$VENVS/$env/bin/hf-fastload" bench "$CKPT" --runs "$RUNS" --json "$OUT/quant-$tf-$case-$DATE.json" "$@"
}

for env in tf5 tf457; do
  run $env lora --dtype auto --adapter "$ADAPTER"
  run $env bnb-8bit --dtype none --quantize 8bit
  run $env bnb-4bit --dtype none --quantize 4bit
done
