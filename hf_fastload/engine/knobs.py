"""The engine's knobs, read from the environment at the start of each load.

Example:
    ```python
    from hf_fastload.engine.knobs import settings

    settings()   # {"threads": 8, "io": "auto", "readahead": "entry"}
    ```
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import FastLoadError

__all__ = ["IO_MODES", "READAHEAD_MODES", "settings"]

IO_MODES = ("auto", "mmap", "pread", "direct")
# HF_FASTLOAD_READAHEAD: when the kernel readahead of the checkpoint's files starts
READAHEAD_MODES = {"1": "entry", "entry": "entry", "open": "open", "0": "off", "off": "off"}


def settings() -> dict[str, Any]:
    """The knobs, from the environment.

    - ``threads``: ``HF_FASTLOAD_THREADS``, default ``min(8, max(2, cores))``;
    - ``io``: ``HF_FASTLOAD_IO``, one of :data:`IO_MODES`;
    - ``readahead``: ``HF_FASTLOAD_READAHEAD``: ``"off"`` (``0``, the default), ``"entry"`` (``1``: at the entry of
      the load, for the files the folder or index names) or ``"open"`` (as each file is opened). Off by default: on
      the only machine it was measured on (2 cores, virtio disk) a whole-file readahead beside the load made cold
      loads slower (bf16 -> fp32 6.8 s vs 5.2 s, ``disable_mmap`` 4.4 s vs 3.3 s) and a cold start no faster.
    """
    threads = os.environ.get("HF_FASTLOAD_THREADS", "").strip()
    io = os.environ.get("HF_FASTLOAD_IO", "auto").strip().lower() or "auto"
    if io not in IO_MODES:
        raise FastLoadError(f"HF_FASTLOAD_IO={io!r} is not one of {', '.join(IO_MODES)}")
    raw = os.environ.get("HF_FASTLOAD_READAHEAD", "0").strip().lower() or "0"
    if raw not in READAHEAD_MODES:
        raise FastLoadError(f"HF_FASTLOAD_READAHEAD={raw!r} is not one of {', '.join(READAHEAD_MODES)}")
    threads_n = int(threads) if threads else min(8, max(2, os.cpu_count() or 2))
    return {"threads": threads_n, "io": io, "readahead": READAHEAD_MODES[raw]}
