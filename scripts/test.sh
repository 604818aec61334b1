#!/usr/bin/env bash
# Sets up the test environments (if missing) and runs the test suite in each: transformers 4.57.x, 5.17.0 (the oldest
# 5.x that pyproject.toml admits) and the newest 5.x.
# Usage: bash scripts/test.sh [pytest args...]
#        HF_FASTLOAD_TEST_ENVS="tf5 tf457" bash scripts/test.sh ...   # only these environments, in this order
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
declare -A SPECS=(
  [tf457]="transformers>=4.57,<4.58"
  [tf517]="transformers==5.17.0"  # keep equal to the oldest 5.x in pyproject.toml's dependencies
  [tf5]="transformers>=5,<6"
)
ENVS=${HF_FASTLOAD_TEST_ENVS:-tf457 tf517 tf5}
for name in $ENVS; do
  setup_venv "$name" "${SPECS[$name]:?unknown test environment $name (known: ${!SPECS[*]})}"
done

status=0
read -r first _ <<< "$ENVS"
echo "=== import layers (lint-imports, .importlinter) ==="
"$VENVS/$first/bin/lint-imports" || status=1
for name in $ENVS; do
  echo "=== transformers $("$VENVS/$name/bin/python" -c 'import transformers; print(transformers.__version__)') ==="
  start=$SECONDS
  "$VENVS/$name/bin/python" -m pytest -q "$@" || status=1
  echo "=== $name: $((SECONDS - start)) s"
done
exit $status
