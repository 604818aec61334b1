"""Skipping random weight init: :func:`skip_init` (scoped) and :func:`disable_torch_init` (global, LLaVA/FastChat).

Example:
    ```python
    import torch
    import hf_fastload

    with hf_fastload.skip_init():
        layer = torch.nn.Linear(4096, 4096)  # no kaiming_uniform_: the weights are whatever memory held
    layer.load_state_dict(weights)           # so fill every one of them
    ```

While init is skipped, the ``reset_parameters`` of every ``torch.nn`` module class that defines one, and the in-place
``torch.nn.init`` functions, return without writing. The patches are installed once (refcounted under a lock), stay
transparent for threads that are not skipping, and are removed when the last user leaves, also on exceptions.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator

from .patching import PatchSet

__all__ = ["disable_torch_init", "init_skipped", "restore_torch_init", "skip_init"]

_INIT_FUNCTIONS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_", "xavier_uniform_",
    "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_",
)  # fmt: skip

_lock = threading.Lock()  # guards the global switch
_local = threading.local()
_global = False


def init_skipped() -> bool:
    """Whether random init is skipped right now, in this thread."""
    return _global or getattr(_local, "depth", 0) > 0


def _skipping_reset(original):
    @functools.wraps(original)
    def reset_parameters(self, *args, **kwargs):
        if init_skipped():
            return None
        return original(self, *args, **kwargs)

    return reset_parameters


def _skipping_init(original):
    @functools.wraps(original)
    def init_fn(tensor, *args, **kwargs):
        if init_skipped():
            return tensor
        return original(tensor, *args, **kwargs)

    return init_fn


def _module_classes():
    import torch.nn as nn  # import cost: `from hf_fastload import skip_init` does not import torch

    seen = set()
    for name in dir(nn):
        cls = getattr(nn, name)
        if (
            isinstance(cls, type)
            and issubclass(cls, nn.Module)
            and "reset_parameters" in cls.__dict__
            and not name.startswith("Lazy")  # lazy modules init when they first see an input
            and cls not in seen
        ):
            seen.add(cls)
            yield cls


def _targets():
    import torch.nn.init as init  # import cost, as in _module_classes

    for cls in _module_classes():
        yield cls, "reset_parameters", _skipping_reset
    for name in _INIT_FUNCTIONS:
        if hasattr(init, name):
            yield init, name, _skipping_init


# Installed while any scope (any thread) or the global switch is on; transparent for threads that are not skipping.
PATCHES = PatchSet(_targets)
_acquire, _release = PATCHES.acquire, PATCHES.release


@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """Context manager: modules built inside it (in this thread) skip their random weight init.

    Nests, is thread-safe (other threads keep normal init) and restores everything on exit, also on exceptions.
    Every weight built inside must then be loaded or initialized by the caller.
    """
    _acquire()
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1
        _release()


def disable_torch_init() -> None:
    """Skips random init process-wide until :func:`restore_torch_init`, as LLaVA's and FastChat's function of this
    name does (there it is never undone). Idempotent."""
    global _global
    with _lock:
        if _global:
            return
        _global = True
    _acquire()


def restore_torch_init() -> None:
    """Undoes :func:`disable_torch_init`; the original ``reset_parameters`` and ``torch.nn.init`` functions return
    once no :func:`skip_init` scope is open. Idempotent."""
    global _global
    with _lock:
        if not _global:
            return
        _global = False
    _release()
