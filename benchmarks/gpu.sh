#!/usr/bin/env bash
# The prepared run for a lent GPU machine (one H200): correctness first, then speed, in at most 6 minutes.
#
#   bash benchmarks/gpu.sh              # on the GPU machine: needs torch (CUDA), transformers, safetensors, accelerate
#   bash benchmarks/gpu.sh --dry-run    # anywhere (or HF_FASTLOAD_GPU_DRY_RUN=1): the same steps on the CPU with a
#                                       # small checkpoint and the stand-in device; reports the missing GPU at the end
#
# Steps, each with a timeout, each timed (steps.tsv), every result file written as soon as it exists:
#   1. environment: the packages are imported (nothing is installed: a missing one is named, exit 2); a CUDA device
#      is required unless --dry-run (exit 3)
#   2. in the background: a 16 GB bf16 Llama-8B-shaped checkpoint and an 8 GB fp32 one (2B) for the fp32 -> bf16 case
#   3. correctness, without pytest: benchmarks/gpu_check.py (every conversion direction incl. NaNs, multi-chunk
#      tensors, every stored x requested dtype, sharded files, HF_FASTLOAD_IO=direct, a device_map over cuda:0 and
#      cuda:1 or "cuda"/"cuda:0"/0), bit for bit against stock; then the same (--quick) under TORCH_CUDA_SANITIZER=1;
#      then the `cuda` tests of tests/test_stream.py if pytest is there and time allows
#   4. stock vs fast vs floor on the 16 GB bf16 checkpoint, device_map="cuda", 3 rounds of fresh processes, with the
#      pinned host-to-device bandwidth and per-tensor checksums of fast's model against stock's
#   5. the sweep HF_FASTLOAD_THREADS {4,8,16} x ring {128,256,1024} MiB x chunk {4,16,64} MiB (in one process, one
#      load each), then bf16 -> fp32 and fp32 -> bf16, stock and fast, until the time is up
#   6. the table (benchmarks/gpu_report.py)
# Results: $OUT (the device tool's folder) if set, else benchmarks/results/gpu-run-DATE/: gpu.log, steps.tsv,
# gpu-check.json, gpu-check-sanitizer.json, gpu-bench-bf16.json, gpu-sweep.json, report.md (7 files).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=${HF_FASTLOAD_GPU_DRY_RUN:-0}
[ "${1:-}" = "--dry-run" ] && DRY=1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the device image has torch and transformers, not hf_fastload
PY=${PYTHON:-python3}
BUDGET=${HF_FASTLOAD_GPU_BUDGET:-350}  # seconds for the whole script (a dry run on a small CPU machine: 900)
[ "$DRY" = 1 ] && BUDGET=${HF_FASTLOAD_GPU_BUDGET:-900}
START=$(date +%s)
RESULTS=${OUT:-benchmarks/results/gpu-run-$(date +%Y-%m-%d)}
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu.log"
STEPS="$RESULTS/steps.tsv"
printf 'step\tstatus\tseconds\n' > "$STEPS"
exec > >(tee -a "$LOG") 2>&1

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# step NAME MAX_SECONDS CMD...: runs CMD with a timeout of min(MAX_SECONDS, time left - 5), records status and time
step() {
  local name=$1 max=$2; shift 2
  local limit; limit=$(left); limit=$(( limit - 5 )); [ "$limit" -gt "$max" ] && limit=$max
  if [ "$limit" -lt 10 ]; then
    echo "=== $name: skipped, out of time"; printf '%s\tskipped\t0\n' "$name" >> "$STEPS"; return 99
  fi
  echo "=== $name (timeout ${limit}s, $(left)s left)"
  local t0 rc; t0=$(date +%s.%N)
  timeout --kill-after=10 "$limit" "$@"; rc=$?
  local dt; dt=$(awk "BEGIN {printf \"%.1f\", $(date +%s.%N) - $t0}")
  local status=ok; [ $rc -ne 0 ] && status="failed($rc)"; [ $rc -eq 124 ] && status="timeout"
  printf '%s\t%s\t%s\n' "$name" "$status" "$dt" >> "$STEPS"
  echo "=== $name: $status in ${dt}s"
  return $rc
}

# 1. environment: nothing is installed here (there is no network on the GPU machine)
step environment 60 "$PY" - "$DRY" <<'EOF'
import importlib, sys
missing = []
for name in ("torch", "transformers", "safetensors", "accelerate"):
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001
        missing.append(f"{name} ({type(e).__name__}: {e})")
if missing:
    print("missing Python packages: " + "; ".join(missing) + ". Nothing is installed by this script (the GPU machine "
          "has no network): carry wheels with the working tree, or run where they are installed.")
    sys.exit(2)
import torch, transformers, safetensors, accelerate
try:
    import pytest
    have_pytest = pytest.__version__
except ImportError:
    have_pytest = "missing (correctness runs without it)"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"safetensors {safetensors.__version__}, accelerate {accelerate.__version__}, pytest {have_pytest}")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i}: {p.name}, {p.total_memory / 2**30:.0f} GiB")
elif sys.argv[1] != "1":
    print("no CUDA device: torch.cuda.is_available() is False. This run needs a GPU; `bash benchmarks/gpu.sh "
          "--dry-run` rehearses it on the CPU.")
    sys.exit(3)
else:
    print("dry run: no CUDA device; the GPU steps run on the CPU and the stand-in device")
EOF
rc=$?
if [ $rc -ne 0 ]; then exit $rc; fi
CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv,noheader

# 2. the checkpoints, in the background while the correctness checks run
if [ "$DRY" = 1 ]; then
  BF16=${HF_FASTLOAD_BENCH_CKPT:-/tmp/hf_fastload-dry-llama-bf16}; FP32=/tmp/hf_fastload-dry-llama-fp32
  BF16_PARAMS=1e8; FP32_PARAMS=5e7; DEVICE=cpu; SWEEP="--threads 4,8 --ring 128,256 --chunk 4,16"; RUNS=1
else
  BF16=${HF_FASTLOAD_BENCH_CKPT:-/tmp/hf_fastload-llama-8b-bf16}; FP32=/tmp/hf_fastload-llama-2b-fp32
  BF16_PARAMS=8e9; FP32_PARAMS=2e9; DEVICE=cuda; SWEEP=""; RUNS=3
fi
write_ckpt() {  # folder params dtype
  [ -f "$1/config.json" ] && return 0
  timeout 240 "$PY" benchmarks/make_checkpoint.py "$1" --params "$2" --dtype "$3" --shards 4
}
T_WRITE=$(date +%s)
WLOG=$(mktemp -d)  # the writers' logs (not in $RESULTS: the device tool brings back 8 files at most)
( write_ckpt "$BF16" "$BF16_PARAMS" bf16 > "$WLOG/write-bf16.log" 2>&1; echo $? > "$WLOG/write-bf16.rc" ) &
PID_BF16=$!
( write_ckpt "$FP32" "$FP32_PARAMS" fp32 > "$WLOG/write-fp32.log" 2>&1; echo $? > "$WLOG/write-fp32.rc" ) &
PID_FP32=$!

# 3. correctness
FAILED=0
step "correctness" 100 "$PY" benchmarks/gpu_check.py --json "$RESULTS/gpu-check.json" || FAILED=1
if [ "$CUDA" = 1 ] && [ "$(left)" -gt 200 ]; then
  TORCH_CUDA_SANITIZER=1 step "correctness under TORCH_CUDA_SANITIZER=1" 70 \
    "$PY" benchmarks/gpu_check.py --quick --json "$RESULTS/gpu-check-sanitizer.json" || FAILED=1
else
  echo "=== sanitizer run skipped: $([ "$CUDA" = 1 ] && echo 'out of time' || echo 'no CUDA (it checks CUDA streams)')"
  printf 'correctness under TORCH_CUDA_SANITIZER=1\tskipped\t0\n' >> "$STEPS"
fi
if "$PY" -c "import pytest" 2>/dev/null && [ "$(left)" -gt 210 ]; then
  step "pytest -m cuda tests/test_stream.py" 60 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_stream.py \
    || FAILED=1
fi

# 4. stock vs fast vs floor, 16 GB bf16
wait $PID_BF16; wait $PID_FP32
echo "=== checkpoints ready $(( $(date +%s) - T_WRITE ))s after their writers started (in the background): bf16 rc $(cat "$WLOG/write-bf16.rc"), fp32 rc $(cat "$WLOG/write-fp32.rc")"
tail -n 2 "$WLOG/write-bf16.log" "$WLOG/write-fp32.log"
if [ "$(cat "$WLOG/write-bf16.rc")" != 0 ]; then echo "the bf16 checkpoint could not be written"; FAILED=1; fi
step "stock vs fast vs floor, bf16" 150 "$PY" -m hf_fastload.tools.cli bench "$BF16" --device "$DEVICE" --dtype bfloat16 \
  --runs "$RUNS" --checksums --timeout 60 --json "$RESULTS/gpu-bench-bf16.json" || FAILED=1

# 5. the sweep and the conversions, until the time is up
CASTS=""; [ "$(cat "$WLOG/write-fp32.rc")" = 0 ] && CASTS="--casts $FP32"
SWEEP_SECONDS=$(( $(left) - 40 ))  # no load starts after this; one load (and the report) fit in the rest
# shellcheck disable=SC2086
step "sweep and conversions" $(( SWEEP_SECONDS + 30 )) "$PY" benchmarks/gpu_sweep.py "$BF16" \
  --json "$RESULTS/gpu-sweep.json" --seconds "$SWEEP_SECONDS" $SWEEP $CASTS || FAILED=1

# 6. the table
timeout 30 "$PY" benchmarks/gpu_report.py "$RESULTS" > "$RESULTS/report.md"; cat "$RESULTS/report.md"
echo "total: $(( $(date +%s) - START ))s; results in $RESULTS"
if [ "$CUDA" != 1 ]; then
  echo "dry run: there is no CUDA device here, so the GPU itself was not exercised (the CPU parts and the stand-in" \
       "device were). On the GPU machine: bash benchmarks/gpu.sh"
fi
exit $FAILED
