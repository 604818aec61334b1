"""One mechanism for every patch hf_fastload installs: a :class:`PatchSet`, installed by its first user and removed
by its last, under a lock.

Example:
    ```python
    PATCHES = PatchSet(lambda: [(SomeClass, "method", make_wrapper)])

    with PATCHES.active():   # installed here, unless another user already holds it
        ...
    ```

Removal restores an attribute only while it still holds our patch: whoever patched on top of us keeps their patch,
and ours beneath it must then be transparent for callers that are not ours.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator

__all__ = ["PatchSet"]

Target = tuple[object, str, Callable[[object], object]]  # (owner, attribute, make(original) -> replacement)


def _current(owner: object, name: str) -> object:
    # A class's own __dict__ entry, so classmethods and staticmethods are saved and restored as the raw objects.
    return owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)


class PatchSet:
    """A refcounted set of attribute replacements.

    Args:
        targets (`Callable[[], Iterable[tuple[object, str, Callable]]]`): called at each installation; yields
            `(owner, attribute name, make)` where `make(original)` returns the replacement.
    """

    def __init__(self, targets: Callable[[], Iterable[Target]]):
        self._targets = targets
        self._lock = threading.Lock()
        self.users = 0
        self.saved: list[tuple[object, str, object, object]] = []  # (owner, name, original, replacement)

    def acquire(self) -> None:
        with self._lock:
            if self.users == 0:
                try:
                    for owner, name, make in self._targets():
                        original = _current(owner, name)
                        patched = make(original)
                        self.saved.append((owner, name, original, patched))
                        setattr(owner, name, patched)
                except BaseException:
                    self._restore()
                    raise
            self.users += 1

    def release(self) -> None:
        with self._lock:
            self.users -= 1
            if self.users == 0:
                self._restore()

    def _restore(self) -> None:
        while self.saved:
            owner, name, original, patched = self.saved.pop()
            if _current(owner, name) is patched:
                setattr(owner, name, original)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Holds the patches installed for the duration of the block."""
        self.acquire()
        try:
            yield
        finally:
            self.release()

    def originals(self) -> dict[tuple[object, str], object]:
        """The replaced objects by (owner, name), while installed."""
        with self._lock:
            return {(owner, name): original for owner, name, original, _ in self.saved}
