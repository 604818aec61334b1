"""The converted-tensor cache in a load: whether it is on, where, which loads use it, and what the report says.

Example:
    ```python
    import hf_fastload

    # a bf16 checkpoint loaded as fp32: the first load converts and writes the cache, later ones map it
    model = hf_fastload.fast_from_pretrained("./llama", dtype="float32", fastload_cache="~/hf-converted")
    print(hf_fastload.last_report().cache["status"])    # "miss" the first time, then "hit"
    ```

On when ``fastload_cache=DIR`` is given (``True``: ``HF_FASTLOAD_CACHE``, else ``~/.cache/hf_fastload/converted``;
``False``: off), or ``HF_FASTLOAD_CACHE=DIR`` is set, or inside :func:`using` (what ``fast_pipeline``'s
``fastload_cache`` does). The keyword is not ``cache_dir``: that is ``from_pretrained``'s own argument (the Hugging
Face hub's download folder), and keeps its meaning.

**What a load's cache key contains about transformers: nothing, by construction.** The cache holds the result of
the engine's materialize step: one checkpoint tensor, by its name in the checkpoint file, converted to the dtype
transformers asked for that tensor, byte for byte ``stored.to(dtype)`` (:mod:`hf_fastload.engine.cache`). All that
transformers decides (each tensor's dtype from ``dtype``, ``"auto"``, ``_keep_in_fp32_modules`` and 5.x's
``dtype_plan``; key renames; 5.x weight conversions such as merging MoE experts, which run after this step; tying;
missing keys; devices) is decided again at every load by the installed transformers, on the cached tensors exactly
as on freshly converted ones. A different rule can only ask for a different ``(tensor, dtype)``, never get other
bytes for the same one; so entries are shared by the 4.57 and 5.x lines. What the bytes do depend on is in the key:
the source file (identity and header, or its content), torch's release (the conversion code), the format version.

Loads that do not use it: fallbacks (stock reads the files), tensor-parallel loads (each rank reads only its own
slices of the mapped checkpoint, so a per-rank entry would save little: a 2-rank bf16 -> fp32 load of a 0.5 B model
took 1.58 s against 1.32 s same-dtype on the CI VM, 2026-11-29, while each rank would need its own entry on disk),
and tensors bound for a device other than the CPU (the device pipeline casts on the device).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

from ..engine.cache import CacheSession
from ..engine.context import LoadContext
from ..report import LoadReport
from . import distributed

__all__ = ["KWARG", "bypass", "cache_dir", "default_dir", "fell_back", "finish", "start", "using"]

KWARG = "fastload_cache"
_local = threading.local()


def default_dir() -> str:
    """``$XDG_CACHE_HOME/hf_fastload/converted`` (``~/.cache/...`` without it)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hf_fastload", "converted")


@contextlib.contextmanager
def using(directory: str | os.PathLike | bool | None) -> Iterator[None]:
    """Loads in this thread inside the block use ``directory`` when they do not say otherwise (None: no change)."""
    outer = getattr(_local, "dir", None)
    if directory is not None:
        _local.dir = directory
    try:
        yield
    finally:
        _local.dir = outer


def cache_dir(kwargs: dict[str, Any]) -> str | None:
    """Removes ``fastload_cache`` from ``kwargs`` (stock must not see it) and returns the cache folder, or None."""
    value = kwargs.pop(KWARG, None)
    if value is None:
        value = getattr(_local, "dir", None)
    env = os.environ.get("HF_FASTLOAD_CACHE", "").strip()
    if value is False:
        return None
    if value is None:
        return env or None
    if value is True:
        return env or default_dir()
    return os.fspath(value)


def bypass(kwargs: dict[str, Any]) -> str | None:
    """Why this fast load does not use the cache at all, or None."""
    if distributed.tp_requested(kwargs):
        return "tensor-parallel load: each rank reads only its own slices (no per-rank entries)"
    return None


def start(directory: str, kwargs: dict[str, Any], ctx: LoadContext, report: LoadReport) -> CacheSession | None:
    """The load's cache session, attached to ``ctx`` (the engine then serves and writes its tensors), or None with
    the reason in the report. Raises FastLoadError for a malformed ``HF_FASTLOAD_CACHE_MAX_GB`` or ``_KEY``."""
    reason = bypass(kwargs)
    if reason is not None:
        report.cache = {"dir": os.path.abspath(os.path.expanduser(directory)), "status": "bypassed", "reason": reason}
        return None
    session = CacheSession(directory)
    ctx.cache = session
    return session


def finish(session: CacheSession | None, ok: bool, report: LoadReport, logger: Any) -> None:
    """After the load (its files closed): publishes or drops what was written, fills ``report.cache``, and logs
    each warning once (a read-only or full folder, a corrupt entry); never raises."""
    if session is None:
        return
    session.finish(ok)
    report.cache = session.summary()
    for warning in session.warnings:
        logger.warning(f"hf_fastload: {report.source}: cache {session.store.root}: {warning}")


def fell_back(directory: str | None, report: LoadReport) -> None:
    """Notes in the report that a fallback load did not use the cache."""
    if directory:
        report.cache = {
            "dir": os.path.abspath(os.path.expanduser(directory)),
            "status": "bypassed",
            "reason": "the load fell back to stock from_pretrained",
        }
