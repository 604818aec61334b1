"""``hf-fastload run``: a Python program, unmodified, with the ``HF_FASTLOAD=1`` opt-in on.

Example:
    ```bash
    hf-fastload run --report loads.jsonl train.py --lr 3e-4   # train.py unchanged; its loads go through hf_fastload
    hf-fastload run -m my_package.serve --port 8000
    ```

``run`` replaces itself (``exec``) with ``python SCRIPT ARGS...`` (or ``python -m MODULE ARGS...``) under
``HF_FASTLOAD=1``, so the startup hook turns the opt-in on exactly as the environment variable does, child processes
inherit it, and the exit code is the program's.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys

__all__ = ["run", "run_command", "split_run_argv", "startup_hook_installed"]


# Runs the program where site-packages lacks hf_fastload_startup.pth (hf_fastload imported from a source tree on
# PYTHONPATH, not installed): the hook is installed here, in the program's process only.
_BOOTSTRAP = """\
import os, runpy, sys
from hf_fastload.features import startup
startup.install()
if sys.argv[1] == "-m":
    sys.argv = sys.argv[2:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_command(
    program: list[str], module: str | None = None, report: str | None = None, verbose: bool = False
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment `run` executes: ``python SCRIPT ARGS...`` or ``python -m MODULE ARGS...``."""
    env = dict(os.environ, HF_FASTLOAD="1")
    if report:
        env["HF_FASTLOAD_REPORT"] = os.path.abspath(report)  # the program or its children may change directory
    if verbose:
        env["HF_FASTLOAD_VERBOSE"] = "1"
    target = ["-m", module, *program] if module else list(program)
    if startup_hook_installed():
        return [sys.executable, *target], env
    return [sys.executable, "-c", _BOOTSTRAP, *target], env


def startup_hook_installed() -> bool:
    """Whether ``site`` runs ``hf_fastload_startup.pth`` in this Python: it is in one of its site-packages folders."""
    if sys.flags.no_site:
        return False
    folders = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    if site.ENABLE_USER_SITE:
        folders.append(site.getusersitepackages())
    return any(os.path.isfile(os.path.join(folder, "hf_fastload_startup.pth")) for folder in folders)


def run(program: list[str], module: str | None = None, report: str | None = None, verbose: bool = False) -> int:
    """Runs ``python SCRIPT ARGS...`` (``program``), or ``python -m MODULE ARGS...``, with ``HF_FASTLOAD=1``.

    On POSIX this process becomes the program (``exec``): it never returns, and the exit code is the program's.

    Args:
        program (`list[str]`): the script and its arguments, or the module's arguments when `module` is given.
        module (`str`, *optional*): run this module as ``python -m`` does.
        report (`str`, *optional*): append one JSON line per load to this file (``HF_FASTLOAD_REPORT``).
        verbose (`bool`, *optional*, defaults to `False`): log each load's report (``HF_FASTLOAD_VERBOSE=1``).
    """
    if not module and not program:
        raise ValueError("hf-fastload run needs a script to run (hf-fastload run SCRIPT [ARGS...]) or -m MODULE")
    cmd, env = run_command(program, module, report, verbose)
    if not startup_hook_installed():
        print(
            "hf-fastload run: warning: hf_fastload_startup.pth is not in this Python's site-packages (hf_fastload "
            "is not installed there), so the opt-in is on in the program's own process only; child processes do "
            "not inherit it. Install hf_fastload (pip install -e .) to fix this.",
            file=sys.stderr,
        )
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name != "posix":  # Windows' exec starts a new process and returns at once: wait for it instead
        return subprocess.call(cmd, env=env)
    os.execve(cmd[0], cmd, env)
    raise AssertionError("unreachable: os.execve returned")


def split_run_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """``hf-fastload run``'s own options (with ``-m MODULE``), and the program's arguments after them, verbatim."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return argv[:i], argv[i + 1 :]
        if arg == "-m":
            return argv[: i + 2], argv[i + 2 :]
        if arg.startswith("-m"):  # -mMODULE
            return argv[: i + 1], argv[i + 1 :]
        if not arg.startswith("-"):  # the script
            break
        i += 2 if arg == "--report" else 1  # other options, known or not: argparse judges them
    return argv[:i], argv[i:]
