#!/usr/bin/env bash
# Sets up the test environments (if missing) and runs the test suite in each: transformers 4.57.x, 5.17.0 (the oldest
# 5.x that pyproject.toml admits) and the newest 5.x. The suite runs with peft installed (test extras). A full run (no
# arguments) also runs, on the newest 5.x, the opt-in and fallback tests again with peft hidden (tests/nopeft), and on
# 4.57.x and the newest 5.x transformers' own save/load model tests without and with HF_FASTLOAD=1
# (scripts/hf_model_tests.py, which downloads the installed transformers' sdist).
# The suite runs on HF_FASTLOAD_TEST_WORKERS pytest-xdist workers (default: one per core; 0 runs it in one process).
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
  py="$VENVS/$name/bin/python"
  echo "=== transformers $("$py" -c 'import transformers; print(transformers.__version__)') ==="
  start=$SECONDS
  "$py" -m pytest -q -n "${HF_FASTLOAD_TEST_WORKERS:-auto}" "$@" || status=1
  if [ $# -eq 0 ] && [ "$name" = tf5 ]; then
    echo "--- without peft: the opt-in and fallback tests (those that load models) ---"
    PYTHONPATH="$PWD/tests/nopeft${PYTHONPATH:+:$PYTHONPATH}" "$py" -m pytest -q tests/test_optin.py \
      tests/test_fallback_and_report.py -k "not off_patches and not wheel and not nothing_heavy and not budget" \
      || status=1
  fi
  if [ $# -eq 0 ] && [ "$name" != tf517 ]; then
    echo "--- transformers' own save/load model tests, without and with HF_FASTLOAD=1 ---"
    "$py" scripts/hf_model_tests.py || status=1
  fi
  echo "=== $name: $((SECONDS - start)) s"
done
exit $status
