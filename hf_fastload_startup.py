"""The ``HF_FASTLOAD=1`` startup hook, run by ``hf_fastload_startup.pth`` when an interpreter starts.

Example:
    ```bash
    HF_FASTLOAD=1 python train.py          # every from_pretrained and pipeline() in train.py loads through hf_fastload
    HF_FASTLOAD=1 torchrun --nproc-per-node 8 train.py     # child processes inherit the variable, and so the hook
    ```

The ``.pth`` line, ``import os; os.environ.get("HF_FASTLOAD") and __import__("hf_fastload_startup").main()``,
imports this module only where ``HF_FASTLOAD`` is set: unset, the hook costs one environment lookup. Set but false,
this module imports only ``os`` and ``sys`` (both loaded by ``site`` already) and changes nothing. True (``1``,
``true``, ``yes``, ``on``, in any case) runs :func:`hf_fastload.features.startup.install`, which waits for
``transformers`` to be imported and then calls ``hf_fastload.enable()``; transformers is not imported here. Nothing
here raises into the program: a failure is one line on stderr, and the program runs unmodified. A top-level module,
kept small, because ``site`` imports it while the interpreter starts.
"""

import os
import sys

__all__ = ["ENV_VAR", "main", "requested"]

ENV_VAR = "HF_FASTLOAD"


def requested(environ=None) -> bool:
    """Whether ``HF_FASTLOAD`` (in ``environ``, default ``os.environ``) asks for the opt-in."""
    return (os.environ if environ is None else environ).get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


def main() -> None:
    """The ``.pth`` line's entry point: installs the hook if ``HF_FASTLOAD`` is true; never raises."""
    try:
        if requested():
            from hf_fastload.features import startup

            startup.install()
    except Exception as e:
        try:
            text = " ".join(f"{type(e).__name__}: {e}".split())
            sys.stderr.write(f"hf_fastload: the HF_FASTLOAD startup hook failed ({text}); running without it\n")
        except Exception:  # no usable stderr: stay silent rather than break the program
            pass
