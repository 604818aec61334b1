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
:mod:`hf_fastload.integration.routing`), and ``transformers.pipeline`` (also ``transformers.pipelines.pipeline``) calls
:func:`~hf_fastload.fast_pipeline`. Names bound before enabling (``from transformers import pipeline``) keep the stock
function; the ``HF_FASTLOAD=1`` startup hook enables right after ``transformers`` is imported, before any such line.

:func:`enable` and :func:`disable` are an idempotent switch; :func:`enabled` blocks nest and count, and the patches
stay while the switch is on or any block is open. Everything is installed on the first use and removed after the
last, under a lock; the originals are restored by identity. Enabling imports nothing heavy: each patch goes in as
soon as the module it patches (``transformers.modeling_utils``, ``transformers.pipelines``) has been imported.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections.abc import Iterator

from . import hook

__all__ = ["disable", "enable", "enabled", "is_enabled"]

# The modules the patches go into. Neither is imported by enabling: a program that imports transformers only for a
# tokenizer must not pay for torch and the pipelines (about 5 s on the CI VM); each patch goes in when its module has
# been imported, by then or later (a post-import hook), before the importing line returns.
MODELING = "transformers.modeling_utils"
PIPELINES = "transformers.pipelines"

_lock = threading.Lock()
_switch = False
_blocks = 0
_active = False  # the opt-in is on (the patches are in, or waiting for their modules)
_routing = False  # from_pretrained routing installed
_pipelines: tuple | None = None  # (transformers.pipeline, transformers.pipelines.pipeline, our wrapper) while on


def is_enabled() -> bool:
    """Whether the opt-in is on (by :func:`enable` or an open :func:`enabled` block)."""
    return _active


def _preload() -> None:
    """Imports the routing patch (and what it touches besides modeling_utils) before taking the lock (an import may
    wait on another thread's import), and only once modeling_utils is there: enabling never imports torch itself."""
    if MODELING in sys.modules:
        from ..integration import routing  # noqa: F401  (import cost: it imports torch and transformers' models)


def _wrap_pipeline(original):
    @functools.wraps(original)
    def pipeline(*args, **kwargs):
        from .pipeline import fast_pipeline  # import cost: transformers.pipelines, only once a pipeline is made

        # The opt-in promises that a program behaves as without it: the pipeline's model stays as stock leaves it
        # (trainable parameters, stock no_grad forward); only the load goes through the fast path.
        kwargs.setdefault("inference", False)
        return fast_pipeline(*args, **kwargs)

    pipeline.__hf_fastload_original__ = original  # fast_pipeline calls the original, never this wrapper
    return pipeline


def _install_pipelines() -> None:
    global _pipelines
    transformers, pipelines = sys.modules["transformers"], sys.modules[PIPELINES]
    top, sub = transformers.pipeline, pipelines.pipeline  # the first read resolves transformers' lazy attribute
    wrapper = _wrap_pipeline(sub)
    transformers.pipeline = pipelines.pipeline = wrapper
    _pipelines = (top, sub, wrapper)


def _uninstall_pipelines() -> None:
    global _pipelines
    transformers, pipelines = sys.modules["transformers"], sys.modules[PIPELINES]
    top, sub, wrapper = _pipelines
    if transformers.__dict__.get("pipeline") is wrapper:  # someone else's later patch is theirs to undo
        transformers.pipeline = top
    if pipelines.__dict__.get("pipeline") is wrapper:
        pipelines.pipeline = sub
    _pipelines = None


def _on_import(module) -> None:
    """Post-import hook of MODELING and PIPELINES: puts in the patch that was waiting for that module."""
    _preload()
    with _lock:
        _update(done=getattr(module, "__name__", None))


def _update(done: str | None = None) -> None:
    """Installs or removes the patches to match the switch and the open blocks; call with ``_lock`` held.

    ``done`` names a module whose code has just finished running (the post-import hook's module), which counts as
    imported even though the import machinery has not marked it so yet.
    """
    global _active, _routing
    def importing(name: str) -> bool:  # in sys.modules, its code still running
        spec = getattr(sys.modules.get(name), "__spec__", None)
        return name != done and bool(getattr(spec, "_initializing", False))

    want = _switch or _blocks > 0
    if want:
        _active = True
        if not _routing and MODELING in sys.modules:
            from ..integration import routing  # import cost: torch and transformers' models (imported by now)

            routing.route_globally(True)
            _routing = True
        # transformers.pipelines imports modeling_utils while it runs: that hook must not read its half-made names
        # (`from transformers import pipeline` did, and printed a false "running without hf_fastload"); the hook
        # that waits for the pipelines module installs the patch once the module has run
        if _pipelines is None and PIPELINES in sys.modules and not importing(PIPELINES):
            _install_pipelines()
        for name, installed in ((MODELING, _routing), (PIPELINES, _pipelines is not None)):
            if not installed and not importing(name):
                hook.when_imported(name, _on_import)
    elif _active:
        for name in (MODELING, PIPELINES):
            hook.forget(name, _on_import)
        if _pipelines is not None:
            _uninstall_pipelines()
        if _routing:
            from ..integration import routing  # imported when routing went in: a lookup in sys.modules

            routing.route_globally(False)
            _routing = False
        _active = False


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
