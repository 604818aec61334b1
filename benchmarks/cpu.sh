#!/usr/bin/env bash
# The CPU cases of the streaming-engine issue, on a ~1B-parameter bf16 Llama checkpoint, under both transformers lines:
#   same dtype (bf16), bf16 -> fp32, disable_mmap=True (5.x), and 4.57's default (fp32).
# Stock and fast run in alternating fresh processes; the floor is measured in the same run. Results land in
# benchmarks/results/cpu-<transformers>-<case>-<date>.json. Takes ~10 minutes on a 2-core machine.
# Usage: bash benchmarks/cpu.sh [RUNS]    (environments from scripts/env.sh are created if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
setup_venv tf5 "transformers>=5,<6"
setup_venv tf457 "transformers>=4.57,<4.58"
RUNS=${1:-5}
CKPT=${HF_FASTLOAD_BENCH_CKPT:-$HOME/.cache/hf_fastload/bench-llama-1b-bf16}
OUT=benchmarks/results
DATE=$(date +%Y-%m-%d)
mkdir -p "$OUT"
[ -f "$CKPT/config.json" ] || "$VENVS/tf5/bin/python" benchmarks/make_checkpoint.py "$CKPT" --params 1e9 --dtype bf16
# Warm loads depend on how the file reached the page cache (after POSIX_FADV_WILLNEED, several threads reading at
# once, or a cold disable_mmap load, later mapped loads were 2-3x slower on the CI VM than after one sequential
# read): evict it, then read it once in order.
"$VENVS/tf5/bin/python" - "$CKPT" <<'EOF'
import glob, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.safetensors"))):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buf = bytearray(8 << 20)
        while os.readv(fd, [buf]):
            pass
    finally:
        os.close(fd)
EOF

run() {  # run ENV CASE ARGS...
  local env=$1 case=$2; shift 2
  local tf; tf=$("$VENVS/$env/bin/python" -c 'import transformers; print(transformers.__version__)')
  echo "=== transformers $tf: $case ==="
  "$VENVS/$env/bin/hf-fastload" bench "$CKPT" --runs "$RUNS" --json "$OUT/cpu-$tf-$case-$DATE.json" "$@"
}

run tf5 same-dtype --dtype bfloat16
run tf5 bf16-to-fp32 --dtype float32
run tf5 disable-mmap --dtype bfloat16 --disable-mmap
run tf457 default-fp32 --dtype none
run tf457 bf16-to-fp32 --dtype float32
