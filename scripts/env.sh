# Sourced by scripts/*.sh: creates (once) a virtual environment with torch 2.13.0 (CPU build on this machine's disk),
# the given transformers, and hf_fastload installed editable with its test extras.
PY=${PYTHON:-python3}
VENVS=${HF_FASTLOAD_VENVS:-.venvs}
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

setup_venv() {  # setup_venv NAME TRANSFORMERS_SPEC
  local dir="$VENVS/$1"
  if [ ! -x "$dir/bin/python" ] || ! "$dir/bin/python" -c "import hf_fastload, transformers, pytest, importlinter" 2>/dev/null; then
    rm -rf "$dir"
    "$PY" -m venv "$dir"
    "$dir/bin/pip" install -q torch==2.13.0
    "$dir/bin/pip" install -q "$2" -e ".[test]"
  elif ! "$dir/bin/python" -c "from hf_fastload.tools import run; assert run.startup_hook_installed()" 2>/dev/null; then
    "$dir/bin/pip" install -q --no-deps -e .  # an environment from before hf_fastload_startup.pth existed
  fi
  if ! "$dir/bin/python" -c "import peft, bitsandbytes, torchao, parameterized, xdist" 2>/dev/null; then
    "$dir/bin/pip" install -q "$2" -e ".[test]"  # an environment from before they joined the test extras
  fi
}
