#!/usr/bin/env bash
# Sets up both test environments (if missing) and runs the test suite in each: transformers 4.57.x and newest 5.x.
# The suite runs with peft installed (test extras); a full run (no arguments) then runs the opt-in and fallback tests
# again with peft hidden (tests/nopeft), and transformers' own save/load model tests without and with HF_FASTLOAD=1
# (scripts/hf_model_tests.py, which downloads the installed transformers' sdist).
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
setup_venv tf5 "transformers>=5,<6"
setup_venv tf457 "transformers>=4.57,<4.58"

status=0
for name in tf457 tf5; do
  py="$VENVS/$name/bin/python"
  echo "=== transformers $("$py" -c 'import transformers; print(transformers.__version__)') ==="
  "$py" -m pytest -q "$@" || status=1
  if [ $# -eq 0 ]; then
    echo "--- without peft: the opt-in and fallback tests (those that load models) ---"
    PYTHONPATH="$PWD/tests/nopeft${PYTHONPATH:+:$PYTHONPATH}" "$py" -m pytest -q tests/test_optin.py \
      tests/test_fallback_and_report.py -k "not off_patches and not wheel and not nothing_heavy and not budget" \
      || status=1
    echo "--- transformers' own save/load model tests, without and with HF_FASTLOAD=1 ---"
    "$py" scripts/hf_model_tests.py || status=1
  fi
done
exit $status
