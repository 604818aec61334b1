"""Post-import hooks: a callback right after a module is first imported, importing nothing itself.

Example:
    ```python
    from hf_fastload.features import hook

    hook.when_imported("transformers", lambda module: print("transformers is here"))
    import transformers      # the callback has run when this line returns
    ```

The ``HF_FASTLOAD=1`` startup hook (:mod:`hf_fastload.features.startup`) and the opt-in
(:mod:`hf_fastload.features.optin`, which patches ``transformers.modeling_utils`` and ``transformers.pipelines``
only once a program has imported them) are built on it.

The hook imports nothing heavy itself: a finder on ``sys.meta_path`` waits for ``transformers``, asks the finders
after it for the spec, and wraps that spec's loader's ``exec_module`` (of that loader instance only) so that the
callback runs right after transformers' ``__init__`` has run, before the importing line returns. A spec that is
only looked up (``importlib.util.find_spec``) and never executed changes nothing; the finder removes itself once the
module has been executed. Nothing here raises into the program: a failure is one line on stderr.
"""

from __future__ import annotations

import sys
from _thread import get_ident  # not threading: this runs at interpreter start, before anything imports threading
from collections.abc import Callable
from types import ModuleType

__all__ = ["forget", "when_imported"]


def _warn(what: str, error: BaseException) -> None:
    try:
        text = " ".join(f"{type(error).__name__}: {error}".split())
        sys.stderr.write(f"hf_fastload: {what} failed ({text}); running without hf_fastload\n")
    except Exception:  # no usable stderr: stay silent rather than break the program
        pass


class _PostImportFinder:
    """Calls ``callback(module)`` right after the module ``name`` is first executed; finds nothing."""

    def __init__(self, name: str, callback: Callable[[ModuleType], None]) -> None:
        self.name, self.callback = name, callback
        self.busy: set[int] = set()  # threads inside find_spec: a finder after us may call importlib.util.find_spec

    def find_spec(self, fullname, path=None, target=None):
        me = get_ident()
        if fullname != self.name or me in self.busy:
            return None
        self.busy.add(me)
        try:
            spec = None
            for finder in [f for f in sys.meta_path if f is not self]:
                find = getattr(finder, "find_spec", None)
                spec = find(fullname, path, target) if find is not None else None
                if spec is not None:
                    break
            loader = getattr(spec, "loader", None)
            if loader is None or isinstance(loader, type) or not hasattr(loader, "exec_module"):
                return spec  # not a loader instance we can wrap (a namespace package, a builtin): leave it alone
            exec_module = loader.exec_module

            def exec_and_call(module):
                try:  # once: a reload runs the loader's own exec_module
                    del loader.exec_module
                except AttributeError:
                    pass
                exec_module(module)
                self._remove()
                loaded = sys.modules.get(self.name, module)  # transformers replaces itself with a lazy module
                try:
                    self.callback(loaded)
                except Exception as e:
                    _warn(f"the post-import hook for {self.name}", e)

            loader.exec_module = exec_and_call
            return spec
        except Exception as e:
            _warn(f"the post-import hook for {fullname}", e)
            self._remove()
            return None
        finally:
            self.busy.discard(me)

    def _remove(self) -> None:
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass


def when_imported(name: str, callback: Callable[[ModuleType], None]) -> None:
    """Calls ``callback(module)`` right after the module ``name`` is first imported (now if it already is).

    Args:
        name (`str`): a module name, e.g. `"transformers"` or `"transformers.pipelines"`.
        callback (`Callable[[ModuleType], None]`): called once, with the module; what it raises becomes one line on
            stderr.
    """
    module = sys.modules.get(name)
    if module is not None:
        try:
            callback(module)
        except Exception as e:
            _warn(f"the post-import hook for {name}", e)
        return
    if not any(isinstance(f, _PostImportFinder) and f.name == name for f in sys.meta_path):  # one per module
        sys.meta_path.insert(0, _PostImportFinder(name, callback))


def forget(name: str, callback: Callable[[ModuleType], None]) -> None:
    """Cancels a :func:`when_imported` of ``name`` with ``callback`` that has not fired yet."""
    for finder in [f for f in sys.meta_path if isinstance(f, _PostImportFinder)]:
        if finder.name == name and finder.callback == callback:
            finder._remove()
