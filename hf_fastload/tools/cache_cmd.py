"""``hf-fastload cache ls | verify | clear``: the converted-tensor cache's entries, their sources, and their sizes.

Example:
    ```bash
    hf-fastload cache ls                      # the folder in HF_FASTLOAD_CACHE, or --dir DIR
    hf-fastload cache verify                  # converts each entry's source again and compares every byte
    hf-fastload cache clear --stale           # removes entries no load can use any more; without --stale, all
    ```

An entry is ``current`` (its source file is unchanged: loads map it), ``stale`` (the source changed since),
``orphan`` (the source is gone) or ``corrupt`` (unreadable, truncated, or, for ``verify``, bytes that differ from
the source converted again). Loads check an entry's structure and key, not every byte; ``verify`` does, removes the
corrupt entries it finds (the next load rebuilds them) and exits with status 1. Importing this module is cheap: the
engine (and torch) is imported by the commands.
"""

from __future__ import annotations

import datetime
import os
import sys
from typing import Any

__all__ = ["cache_command", "resolve_dir"]


def resolve_dir(directory: str | None) -> str:
    """``--dir``, else ``HF_FASTLOAD_CACHE``; ValueError naming both when neither is given."""
    directory = directory or os.environ.get("HF_FASTLOAD_CACHE", "").strip()
    if not directory:
        raise ValueError("no cache folder: pass --dir DIR or set HF_FASTLOAD_CACHE=DIR")
    return directory


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _line(status: Any) -> str:
    used = datetime.datetime.fromtimestamp(status.last_used).isoformat(sep=" ", timespec="minutes")
    what = f"{status.tensors} tensors {'+'.join(status.dtypes)}" if status.tensors else "-"
    detail = f" ({status.detail})" if status.detail else ""
    return (f"{status.state:<8} {_gb(status.size):>10}  used {used}  {what}  {status.source or '?'}{detail}\n"
            f"         {status.path}")  # fmt: skip


def cache_command(action: str, directory: str | None = None, stale: bool = False, out=None) -> int:
    """Runs ``hf-fastload cache ACTION``; returns the exit status.

    Args:
        action (`str`): `ls`, `verify` or `clear`.
        directory (`str`, *optional*): the cache folder; defaults to ``HF_FASTLOAD_CACHE``.
        stale (`bool`, *optional*, defaults to `False`): `clear` only the entries no load can use (stale, orphan,
            corrupt).
    """
    from ..engine.cache_store import CacheStore, check_entry  # import cost: the engine imports torch

    out = out or sys.stdout
    store = CacheStore(resolve_dir(directory))
    entries = store.entries()
    if action == "clear" and not stale:
        removed = store.clear()
        print(f"removed {len(removed)} entries ({_gb(sum(e.size for e in entries if e.path in removed))}) "
              f"from {store.root}", file=out)  # fmt: skip
        return 0
    statuses = [check_entry(e, verify=action == "verify") for e in entries]
    if action == "clear":
        gone = [s for s in statuses if s.state != "current" and store.remove(s.path)]
        print(f"removed {len(gone)} entries no load can use ({_gb(sum(s.size for s in gone))}) from {store.root}; "
              f"{len(statuses) - len(gone)} kept", file=out)  # fmt: skip
        return 0
    for s in statuses:
        print(_line(s), file=out)
    by_state: dict[str, int] = {}
    for s in statuses:
        by_state[s.state] = by_state.get(s.state, 0) + 1
    states = ", ".join(f"{n} {state}" for state, n in sorted(by_state.items())) or "no entries"
    print(f"{store.root}: {len(statuses)} entries, {_gb(sum(s.size for s in statuses))} ({states})", file=out)
    if action == "verify":
        bad = [s for s in statuses if s.state == "corrupt"]
        if bad:
            removed = sum(store.remove(s.path) for s in bad)  # a load must never map them
            print(f"{len(bad)} corrupt entries, {removed} removed (the next loads of their sources rebuild them)",
                  file=out)  # fmt: skip
            return 1
        print("every current entry equals its source converted again, byte for byte", file=out)
    return 0
