"""The process-wide opt-in: :func:`enable`, :func:`disable`, :func:`enabled` (``HF_FASTLOAD=1`` calls `enable`).

Example:
    ```python
    import hf_fastload
    import transformers

    hf_fastload.enable()        # from here on, in every thread
    model = transformers.AutoModelForCausalLM.from_pretrained("path/to/llama")   # loads through hf_fastload
    pipe = transformers.pipeline("text-generation", model="path/to/llama")        # hf_fastload.fast_pipeline
    hf_fastload.disable()       # the original from_pretrained and transformers.pipeline are back

    with hf_fastload.enabled():  # or for one block
        ...
    ```

While enabled, ``from_pretrained`` of every transformers model class (``PreTrainedModel`` and the Auto classes, so
subclasses and remote-code models too) loads through :func:`~hf_fastload.fast_from_pretrained` (see
:mod:`hf_fastload.patch`), and ``transformers.pipeline`` (also ``transformers.pipelines.pipeline``) calls
:func:`~hf_fastload.fast_pipeline`. Names bound before enabling (``from transformers import pipeline``) keep the stock
function; the ``HF_FASTLOAD=1`` startup hook enables right after ``transformers`` is imported, before any such line.

:func:`enable` and :func:`disable` are an idempotent switch; :func:`enabled` blocks nest and count, and the patches
stay while the switch is on or any block is open. Everything is installed on the first use and removed after the
last, under a lock; the originals are restored by identity.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator

__all__ = ["disable", "enable", "enabled", "is_enabled"]

_lock = threading.Lock()
_switch = False
_blocks = 0
_pipelines: tuple | None = None  # (transformers.pipeline, transformers.pipelines.pipeline, our wrapper) while on


def is_enabled() -> bool:
    """Whether the opt-in is on (by :func:`enable` or an open :func:`enabled` block)."""
    return _pipelines is not None


def _preload() -> None:
    """Imports what the patches touch, before taking the lock (an import may wait on another thread's import)."""
    import transformers.modeling_utils  # noqa: F401
    import transformers.models.auto.auto_factory  # noqa: F401
    import transformers.pipelines  # noqa: F401

    from . import pipeline  # noqa: F401


def _wrap_pipeline(original):
    @functools.wraps(original)
    def pipeline(*args, **kwargs):
        from .pipeline import fast_pipeline

        # The opt-in promises that a program behaves as without it: the pipeline's model stays as stock leaves it
        # (trainable parameters, stock no_grad forward); only the load goes through the fast path.
        kwargs.setdefault("inference", False)
        return fast_pipeline(*args, **kwargs)

    return pipeline


def _install() -> None:
    global _pipelines
    import transformers
    import transformers.pipelines as pipelines

    from . import patch

    top, sub = transformers.pipeline, pipelines.pipeline  # the first read resolves transformers' lazy attribute
    wrapper = _wrap_pipeline(sub)
    patch.route_globally(True)
    transformers.pipeline = pipelines.pipeline = wrapper
    _pipelines = (top, sub, wrapper)


def _uninstall() -> None:
    global _pipelines
    import transformers
    import transformers.pipelines as pipelines

    from . import patch

    top, sub, wrapper = _pipelines
    if transformers.__dict__.get("pipeline") is wrapper:  # someone else's later patch is theirs to undo
        transformers.pipeline = top
    if pipelines.__dict__.get("pipeline") is wrapper:
        pipelines.pipeline = sub
    patch.route_globally(False)
    _pipelines = None


def _update() -> None:
    """Installs or removes the patches to match the switch and the open blocks; call with ``_lock`` held."""
    want = _switch or _blocks > 0
    if want and _pipelines is None:
        _install()
    elif not want and _pipelines is not None:
        _uninstall()


def enable() -> None:
    """Turns the opt-in on for the whole process, every thread; does nothing if it is on. Undo with :func:`disable`.

    Example:
        ```python
        hf_fastload.enable()
        model = AutoModelForCausalLM.from_pretrained("path")   # loads through hf_fastload.fast_from_pretrained
        ```
    """
    global _switch
    _preload()
    with _lock:
        previous, _switch = _switch, True
        try:
            _update()
        except BaseException:
            _switch = previous
            raise


def disable() -> None:
    """Turns the switch :func:`enable` set off, restoring the originals; open :func:`enabled` blocks keep it on."""
    global _switch
    with _lock:
        _switch = False
        _update()


@contextlib.contextmanager
def enabled() -> Iterator[None]:
    """Inside the block the opt-in is on, process-wide; blocks nest, and the outermost one's exit turns it off.

    Example:
        ```python
        with hf_fastload.enabled():
            pipe = transformers.pipeline("text-generation", model="path")   # hf_fastload.fast_pipeline
        ```
    """
    global _blocks
    _preload()
    with _lock:
        _blocks += 1
        try:
            _update()
        except BaseException:
            _blocks -= 1
            raise
    try:
        yield
    finally:
        with _lock:
            _blocks -= 1
            _update()
