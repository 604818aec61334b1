#!/usr/bin/env bash
# Sets up the transformers 5 environment (if missing), builds a ~150M-parameter bf16 Llama checkpoint locally, and
# loads it with stock from_pretrained and with hf_fastload (bf16 -> fp32), in alternating fresh processes.
# Usage: bash scripts/demo.sh [hf-fastload demo args...]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
setup_venv tf5 "transformers>=5,<6"
exec "$VENVS/tf5/bin/hf-fastload" demo "$@"
