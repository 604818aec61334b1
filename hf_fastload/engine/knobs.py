"""The engine's knobs, read from the environment at the start of each load.

Example:
    ```python
    from hf_fastload.engine.knobs import settings

    settings()   # {"threads": 8, "io": "auto"}: HF_FASTLOAD_THREADS, HF_FASTLOAD_IO
    ```
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import FastLoadError

__all__ = ["IO_MODES", "settings"]

IO_MODES = ("auto", "mmap", "pread", "direct")


def settings() -> dict[str, Any]:
    """The knobs, from the environment: ``HF_FASTLOAD_THREADS`` and ``HF_FASTLOAD_IO``."""
    threads = os.environ.get("HF_FASTLOAD_THREADS", "").strip()
    io = os.environ.get("HF_FASTLOAD_IO", "auto").strip().lower() or "auto"
    if io not in IO_MODES:
        raise FastLoadError(f"HF_FASTLOAD_IO={io!r} is not one of {', '.join(IO_MODES)}")
    return {"threads": int(threads) if threads else min(8, max(2, os.cpu_count() or 2)), "io": io}
