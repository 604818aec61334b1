"""Routing ``from_pretrained`` of transformers model classes through :func:`~hf_fastload.fast_from_pretrained`.

Example:
    ```python
    from hf_fastload.integration import routing

    with routing.routed():                       # this thread, this block
        model = AutoModelForCausalLM.from_pretrained("path")   # loads through fast_from_pretrained
    ```

The ``from_pretrained`` classmethods of ``PreTrainedModel`` and of the Auto classes' base are wrapped once while any
routing is active (refcounted under a lock) and restored after the last user; the wrappers keep the originals' names,
signatures and docstrings. Routing is per thread (``routed()``) or process-wide (``route_globally``, used by
:mod:`hf_fastload.features.optin`, the ``HF_FASTLOAD=1`` opt-in). Inside a fast load, routing is off
(:func:`~hf_fastload.integration.loader.in_fast_load`), and the load calls the original ``from_pretrained`` of the
class that was routed (not ``cls.from_pretrained`` again, which would run a subclass's own override a second time).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator

from transformers.modeling_utils import PreTrainedModel
from transformers.models.auto.auto_factory import _BaseAutoModelClass

from .loader import fast_load, in_fast_load
from .patching import PatchSet

__all__ = ["is_routing", "originals", "route_globally", "routed"]

_lock = threading.Lock()  # guards the global switch
_local = threading.local()
_global = False


def is_routing() -> bool:
    """Whether a ``from_pretrained`` call in this thread, right now, goes through fast_from_pretrained."""
    if in_fast_load():
        return False
    return _global or getattr(_local, "routed", 0) > 0


def _wrap(original: classmethod) -> classmethod:
    func = original.__func__

    @functools.wraps(func)
    def from_pretrained(cls, pretrained_model_name_or_path=None, *model_args, **kwargs):
        if is_routing() and pretrained_model_name_or_path is not None:
            # the fast load calls this original, not cls.from_pretrained: a subclass's own from_pretrained that
            # called super() and got here must not run a second time
            return fast_load(pretrained_model_name_or_path, model_args, kwargs, model_class=cls,
                             entry=functools.partial(func, cls))
        return func(cls, pretrained_model_name_or_path, *model_args, **kwargs)

    return classmethod(from_pretrained)


def _targets():
    for owner in (PreTrainedModel, _BaseAutoModelClass):
        yield owner, "from_pretrained", _wrap


PATCHES = PatchSet(_targets)
_acquire, _release = PATCHES.acquire, PATCHES.release


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


def route_globally(on: bool) -> bool:
    """Turns process-wide routing on or off; returns whether it changed. Idempotent."""
    global _global
    with _lock:
        if _global == on:
            return False
        _global = on
    (_acquire if on else _release)()
    return True
