#!/usr/bin/env bash
# Sets up both test environments (if missing) and runs the test suite in each: transformers 4.57.x and newest 5.x.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
setup_venv tf5 "transformers>=5,<6"
setup_venv tf457 "transformers>=4.57,<4.58"

status=0
echo "=== import layers (lint-imports, .importlinter) ==="
(cd "$(dirname "$0")/.." && "$VENVS/tf5/bin/lint-imports") || status=1
for name in tf457 tf5; do
  echo "=== transformers $("$VENVS/$name/bin/python" -c 'import transformers; print(transformers.__version__)') ==="
  "$VENVS/$name/bin/python" -m pytest -q "$@" || status=1
done
exit $status
