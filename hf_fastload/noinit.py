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

__all__ = ["disable_torch_init", "init_skipped", "restore_torch_init", "skip_init"]

_INIT_FUNCTIONS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_", "xavier_uniform_",
    "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_",
)  # fmt: skip

_lock = threading.Lock()
_local = threading.local()
_users = 0  # scopes (any thread) plus the global switch, while the patches are installed
_global = False
_originals: list[tuple[object, str, object, object]] = []  # (owner, name, original, patched)


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
    import torch.nn as nn

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


def _install() -> None:
    import torch.nn.init as init

    for cls in _module_classes():
        original = cls.__dict__["reset_parameters"]
        patched = _skipping_reset(original)
        _originals.append((cls, "reset_parameters", original, patched))
        cls.reset_parameters = patched
    for name in _INIT_FUNCTIONS:
        original = getattr(init, name, None)
        if original is not None:
            patched = _skipping_init(original)
            _originals.append((init, name, original, patched))
            setattr(init, name, patched)


def _uninstall() -> None:
    while _originals:
        owner, name, original, patched = _originals.pop()
        # Someone who patched on top of us keeps their patch; ours below it is transparent when not skipping.
        current = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
        if current is patched:
            setattr(owner, name, original)


def _acquire() -> None:
    global _users
    with _lock:
        if _users == 0:
            _install()
        _users += 1


def _release() -> None:
    global _users
    with _lock:
        _users -= 1
        if _users == 0:
            _uninstall()


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
