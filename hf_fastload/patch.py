"""Routing ``from_pretrained`` of transformers model classes through :func:`~hf_fastload.fast_from_pretrained`.

Example:
    ```python
    from hf_fastload import patch

    with patch.routed():                       # this thread, this block
        model = AutoModelForCausalLM.from_pretrained("path")   # loads through fast_from_pretrained
    ```

The ``from_pretrained`` classmethods of ``PreTrainedModel`` and of the Auto classes' base are wrapped once while any
routing is active (refcounted under a lock) and restored after the last user; the wrappers keep the originals' names,
signatures and docstrings. Routing is per thread (``routed()``) or process-wide (``route_globally``, used by
:mod:`hf_fastload.optin`, the ``HF_FASTLOAD=1`` opt-in). Inside a fast load, routing is suspended, and the load calls
the original ``from_pretrained`` of the class that was routed (not ``cls.from_pretrained`` again, which would run a
subclass's own override a second time).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator

from .patching import PatchSet

__all__ = ["is_routing", "route_globally", "routed", "suspended"]

_lock = threading.Lock()  # guards the global switch
_local = threading.local()
_global = False


def is_routing() -> bool:
    """Whether a ``from_pretrained`` call in this thread, right now, goes through fast_from_pretrained."""
    if getattr(_local, "suspended", 0):
        return False
    return _global or getattr(_local, "routed", 0) > 0


def _wrap(original: classmethod) -> classmethod:
    func = original.__func__

    @functools.wraps(func)
    def from_pretrained(cls, pretrained_model_name_or_path=None, *model_args, **kwargs):
        if is_routing() and pretrained_model_name_or_path is not None:
            from .loader import fast_from_pretrained

            # fast_from_pretrained calls this original, not cls.from_pretrained: a subclass's own from_pretrained
            # that called super() and got here must not run a second time
            _local.entry = functools.partial(func, cls)
            try:
                return fast_from_pretrained(pretrained_model_name_or_path, *model_args, model_class=cls, **kwargs)
            finally:
                _local.entry = None
        return func(cls, pretrained_model_name_or_path, *model_args, **kwargs)

    return classmethod(from_pretrained)


def _owners() -> list[type]:
    from transformers.modeling_utils import PreTrainedModel
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    return [PreTrainedModel, _BaseAutoModelClass]


def _targets():
    for owner in _owners():
        yield owner, "from_pretrained", _wrap


PATCHES = PatchSet(_targets)
_acquire, _release = PATCHES.acquire, PATCHES.release


def take_entry():
    """The original ``from_pretrained``, bound to its class, of the routed call now starting in this thread, or None.

    fast_from_pretrained calls it once at its start; a direct call of fast_from_pretrained finds None.
    """
    entry = getattr(_local, "entry", None)
    _local.entry = None
    return entry


def originals() -> dict[type, object]:
    """The unpatched classmethods, by owner class (for tests that check restoration by identity)."""
    return {owner: original for (owner, _), original in PATCHES.originals().items()}


@contextlib.contextmanager
def routed() -> Iterator[None]:
    """In this thread, inside the block, model ``from_pretrained`` calls load through fast_from_pretrained."""
    _acquire()
    _local.routed = getattr(_local, "routed", 0) + 1
    try:
        yield
    finally:
        _local.routed -= 1
        _release()


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Inside the block, in this thread, ``from_pretrained`` is the original (fast_from_pretrained uses this)."""
    _local.suspended = getattr(_local, "suspended", 0) + 1
    try:
        yield
    finally:
        _local.suspended -= 1


def route_globally(on: bool) -> bool:
    """Turns process-wide routing on or off; returns whether it changed. Idempotent."""
    global _global
    with _lock:
        if _global == on:
            return False
        _global = on
    (_acquire if on else _release)()
    return True
