#!/usr/bin/env bash
# Sets up both test environments (if missing) and runs the test suite in each: transformers 4.57.x and newest 5.x.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENVS=${HF_FASTLOAD_VENVS:-.venvs}
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

setup() {  # setup NAME TRANSFORMERS_SPEC
  local dir="$VENVS/$1"
  if [ ! -x "$dir/bin/python" ] || ! "$dir/bin/python" -c "import hf_fastload, transformers, pytest" 2>/dev/null; then
    rm -rf "$dir"
    "$PY" -m venv "$dir"
    "$dir/bin/pip" install -q torch==2.13.0
    "$dir/bin/pip" install -q "$2" -e ".[test]"
  fi
}

setup tf5 "transformers>=5,<6"
setup tf457 "transformers>=4.57,<4.58"

status=0
for name in tf457 tf5; do
  echo "=== transformers $("$VENVS/$name/bin/python" -c 'import transformers; print(transformers.__version__)') ==="
  "$VENVS/$name/bin/python" -m pytest -q "$@" || status=1
done
exit $status
