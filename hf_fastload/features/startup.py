"""What ``HF_FASTLOAD=1`` does at interpreter start: ``hf_fastload.enable()`` as soon as transformers is imported.

Example:
    ```python
    from hf_fastload.features import startup

    startup.install()        # what hf_fastload_startup does at interpreter start when HF_FASTLOAD is true
    import transformers      # hf_fastload.enable() has run when this line returns
    ```

Runs at interpreter start (from ``hf_fastload_startup.pth``), so it imports only the post-import hook machinery
(:mod:`hf_fastload.features.hook`: ``sys`` and ``_thread``); the opt-in itself (:mod:`hf_fastload.features.optin`,
which imports ``threading``) is imported when transformers is.
"""

from __future__ import annotations

from types import ModuleType

from . import hook

__all__ = ["install"]


def _enable(_module: ModuleType) -> None:
    from .optin import enable  # not at interpreter start: only once the program imports transformers

    enable()


def install() -> None:
    """Arranges for ``hf_fastload.enable()`` to run right after ``transformers`` is imported (now if it is)."""
    hook.when_imported("transformers", _enable)
