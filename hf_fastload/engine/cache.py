"""One load's use of the converted-tensor cache: hits mapped zero-copy, misses written to a new entry.

Example:
    ```python
    import torch
    from hf_fastload.engine.cache import CacheSession, wait_for_writes
    from hf_fastload.engine.context import LoadContext

    ctx = LoadContext(threads=8)
    ctx.cache = CacheSession("~/.cache/hf_fastload/converted")   # HF_FASTLOAD_CACHE_MAX_GB, _KEY: from the env
    f = ctx.open("llama/model.safetensors")
    w = ctx.materialize(f.get_slice("lm_head.weight"), device="cpu", dtype=torch.float32)   # converted and written
    ctx.close()
    ctx.cache.finish(ok=True)      # the entry is published (fsync, then rename) by a background thread
    wait_for_writes()
    print(ctx.cache.summary())     # {"status": "miss", "written": 1, ...}; the next load's tensor is a hit
    ```

The unit is one checkpoint tensor converted to one dtype: ``(source file, tensor name, dtype) -> bytes``, exactly
``stored.to(dtype)``, whatever the caller does with it afterwards. A :class:`CacheSession` serves a load:

- **hit**: the tensor is a view of a private (copy-on-write) mapping of a published entry, as a same-dtype load of
  a checkpoint file is; nothing is read until it is touched, writing to it never reaches the file, and processes
  that map one entry share its pages in the page cache;
- **miss**: the tensor is written into a new entry for its source file (:mod:`hf_fastload.engine.cache_writer`):
  with ``HF_FASTLOAD_CACHE_WRITE=inline`` (the default) while the load converts it, and the load gets a view of the
  entry (the first load is zero-copy too); with ``after``, the load converts it into memory as without the cache and
  a detached low-priority process writes the entry from the source file after the load;
- when the load ends well, the entry gets its header (an ordinary safetensors file: ``safetensors`` reads it) and is
  published: ``fsync``, then ``rename`` into place, so that an entry exists only complete and on disk; then the least
  recently used entries are evicted down to ``HF_FASTLOAD_CACHE_MAX_GB``. A failed load, or any problem writing,
  drops the entry.

One process writes a source's entry at a time (a lock file); the others load as usual without writing. A folder that
is read-only or full, a corrupt entry, a lost lock race end in a normal load, and :meth:`CacheSession.summary` says
what happened (the integration logs the warnings). The one cache error a load raises: an entry cut short while the
load maps it (``CheckpointFileError``; touching its missing pages would be a SIGBUS).
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

import torch

from ..errors import FastLoadError
from ..format.file import SafetensorsFile
from ..format.header import TensorInfo
from ..format.writer import dtype_name
from .cache_store import KEY_MODES, BadEntry, CacheStore, open_entry, source_key
from .cache_writer import WRITE_MODES, EntryWriter, Refused, Slot, spawn_writer, start_publisher, wait_for_writes
from .knobs import settings

__all__ = ["CacheSession", "Slot", "cache_settings", "wait_for_writes"]


def cache_settings() -> dict[str, Any]:
    """``HF_FASTLOAD_CACHE_MAX_GB`` (a positive number, or unset: no limit), ``HF_FASTLOAD_CACHE_KEY``
    (``identity``, the default, or ``content``) and ``HF_FASTLOAD_CACHE_WRITE`` (``inline``, the default, or
    ``after``), from the environment."""
    raw = os.environ.get("HF_FASTLOAD_CACHE_MAX_GB", "").strip()
    max_bytes = None
    if raw:
        try:
            max_bytes = int(float(raw) * 1e9)
        except ValueError:
            max_bytes = -1
        if not max_bytes or max_bytes < 0:
            raise FastLoadError(f"HF_FASTLOAD_CACHE_MAX_GB={raw!r} is not a positive number of gigabytes (e.g. 50)")
    key = os.environ.get("HF_FASTLOAD_CACHE_KEY", "identity").strip().lower() or "identity"
    if key not in KEY_MODES:
        raise FastLoadError(f"HF_FASTLOAD_CACHE_KEY={key!r} is not one of {', '.join(KEY_MODES)}")
    write = os.environ.get("HF_FASTLOAD_CACHE_WRITE", "inline").strip().lower() or "inline"
    if write not in WRITE_MODES:
        raise FastLoadError(f"HF_FASTLOAD_CACHE_WRITE={write!r} is not one of {', '.join(WRITE_MODES)}")
    return {"max_bytes": max_bytes, "key": key, "write": write}


class _Source:
    """What one load knows about one source file: its key, the published entries, its writer."""

    __slots__ = ("entries", "error", "file", "key", "lock", "parts", "ready", "refused", "wanted", "writer")

    def __init__(self, file: SafetensorsFile):
        self.lock = threading.Lock()
        self.file = file
        self.ready = False
        self.key: str | None = None
        self.parts: dict = {}
        self.error: str | None = None
        self.entries: dict[tuple[str, str], tuple[SafetensorsFile, TensorInfo]] = {}
        self.writer: EntryWriter | None = None
        self.refused: str | None = None
        self.wanted: dict[tuple[str, torch.dtype], None] = {}  # missed tensors in order (write="after")


class CacheSession:
    """One load's use of the cache folder ``root`` (see the module docstring).

    Args:
        root (`str`): the cache folder (``HF_FASTLOAD_CACHE``).
        max_bytes (`int`, *optional*): the size limit (``HF_FASTLOAD_CACHE_MAX_GB``); read from the environment
            when not given, as are `key_mode` (``HF_FASTLOAD_CACHE_KEY``) and `write` (``HF_FASTLOAD_CACHE_WRITE``).
    """

    def __init__(
        self, root: str | os.PathLike, max_bytes: int | None = None, key_mode: str | None = None,
        write: str | None = None,
    ):  # fmt: skip
        env = cache_settings() if max_bytes is None or key_mode is None or write is None else {}
        self.write = write or env["write"]
        self.writers: list[int] = []  # pids of the writers started after this load (write="after")
        self.store = CacheStore(root)
        self.max_bytes = max_bytes if max_bytes is not None else env["max_bytes"]
        self.key_mode = key_mode or env["key"]
        self.lock = threading.Lock()
        self.sources: dict[str, _Source] = {}
        self.hits = self.misses = 0
        self.used: set[str] = set()
        self.mapped: list[SafetensorsFile] = []
        self.warnings: list[str] = []
        self.reasons: list[str] = []
        self.published: list[str] = []
        self.written = 0
        self.finished = False

    def _note(self, message: str, warning: bool) -> None:
        with self.lock:
            bucket = self.warnings if warning else self.reasons
            if message not in bucket:
                bucket.append(message)

    def _source(self, file: SafetensorsFile) -> _Source:
        real = os.path.realpath(file.path)
        with self.lock:
            src = self.sources.get(real)
            if src is None:
                src = self.sources[real] = _Source(file)
        with src.lock:
            if not src.ready:
                src.ready = True
                self._scan(src)
        return src

    def _scan(self, src: _Source) -> None:
        """Computes the source's key and opens its published entries (under ``src.lock``)."""
        try:
            src.key, src.parts = source_key(src.file, self.key_mode)
        except OSError as e:
            src.error = f"cannot compute the cache key of {src.file.path}: {e}"
            self._note(src.error, warning=True)
            return
        for path in self.store.entry_paths(src.key):
            try:
                entry = open_entry(path, src.key, src.file.tensors)
            except FileNotFoundError:
                continue  # evicted or cleared meanwhile
            except (BadEntry, OSError) as e:
                removed = False
                if isinstance(e, BadEntry):
                    with contextlib.suppress(OSError):  # a read-only folder keeps it; it is skipped every time
                        removed = self.store.remove(path)
                self._note(f"cache entry {path} is unusable ({e}); {'removed, ' if removed else ''}rebuilding", True)
                continue
            with self.lock:
                self.mapped.append(entry)
            for name, info in entry.tensors.items():
                src.entries.setdefault((name, info.dtype), (entry, info))

    def readahead_targets(self, paths: list[str]) -> list[str]:
        """What to read ahead at the start of a load instead of ``paths`` (checkpoint files): a file that has
        published entries is replaced by them, since a hit maps the entry and never reads the file. In the content
        key mode (which reads every file anyway) the files as given."""
        if self.key_mode != "identity":
            return list(paths)
        out: list[str] = []
        for path in paths:
            try:
                with SafetensorsFile(path, io="pread") as f:
                    key, _ = source_key(f, self.key_mode)
            except (OSError, ValueError):  # the load itself reports a file it cannot read
                out.append(path)
                continue
            out.extend(self.store.entry_paths(key) or [path])
        return out

    def wants(self, info: TensorInfo, dtype: torch.dtype, remote: bool) -> bool:
        """Whether a CPU tensor goes through the cache: it is converted to another dtype, or read with ``pread``
        because its file is on network or FUSE storage (``remote``), and safetensors can store its dtype."""
        if dtype == info.torch_dtype and not remote:
            return False
        try:
            dtype_name(dtype)
        except ValueError:
            return False
        return True

    def lookup(self, file: SafetensorsFile, info: TensorInfo, dtype: torch.dtype) -> torch.Tensor | None:
        """The cached ``stored.to(dtype)`` of ``info`` as a zero-copy view, or None (a miss: convert, see
        :meth:`slot`)."""
        src = self._source(file)
        found = src.entries.get((info.name, dtype_name(dtype))) if src.key else None
        if found is None:
            with self.lock:
                self.misses += 1
            return None
        entry, cached = found
        entry.check_size(cached.start + cached.nbytes, cached.name)  # a page past a truncated end is a SIGBUS
        out = entry.view(cached)
        with self.lock:
            self.hits += 1
            fresh = entry.path not in self.used
            self.used.add(entry.path)
        if fresh:
            self.store.touch(entry.path)
        return out

    def slot(self, file: SafetensorsFile, info: TensorInfo, dtype: torch.dtype) -> Slot | None:
        """Where to convert a missed tensor so that it is written to the cache, or None when this load writes no
        entry for its file (the reason is in :meth:`summary`)."""
        src = self._source(file)
        if src.key is None:
            return None
        if self.write == "after":  # converted as usual now; written by a process started when the load ends
            with src.lock:
                src.wanted.setdefault((info.name, dtype), None)
            return None
        with src.lock:
            if src.writer is None and src.refused is None:
                try:
                    keep = frozenset(self.used)
                    src.writer = EntryWriter(self.store, src.key, src.parts, file, dtype, self.max_bytes, keep)
                except Refused as e:
                    src.refused = str(e)
                    self._note(str(e), e.warning)
            writer = src.writer
        return writer.reserve(info, dtype) if writer is not None else None

    def check_mapped(self) -> None:
        """Raises CheckpointFileError if a mapped entry now ends before its data (see LoadContext.check_mapped)."""
        with self.lock:
            entries = list(self.mapped)
        for entry in entries:
            if entry.path in self.used:
                entry.check_size(entry.data_end)

    def finish(self, ok: bool) -> None:
        """Ends the session after the load (every tensor done): seals and publishes (``ok``) or drops its entries,
        and closes the entries' descriptors (their views stay valid). Never raises."""
        if self.finished:
            return
        self.finished = True
        for src in list(self.sources.values()):
            if ok and src.wanted and src.key is not None:
                try:
                    pid = spawn_writer(
                        self.store, src.key, src.file, list(src.wanted), self.max_bytes, self.key_mode,
                        settings()["threads"],
                    )  # fmt: skip
                    if pid is None:
                        self._note("another process is writing this source's entry; loaded without writing", False)
                    else:
                        self.writers.append(pid)
                except (OSError, ValueError) as e:
                    self._note(f"cannot start the cache writer for {src.file.path}: {e}", True)
            writer, src.writer = src.writer, None
            if writer is None:
                continue
            if not ok:
                writer._close_files(unlink=True)
                continue
            try:
                final = writer.seal(src.file)
            except Refused as e:
                self._note(str(e), e.warning)
                writer._close_files(unlink=True)
                continue
            except (OSError, ValueError) as e:
                self._note(f"cannot complete the cache entry for {src.file.path}: {e}", True)
                writer._close_files(unlink=True)
                continue
            self.written += writer.tensors
            self.published.append(final)
            start_publisher(writer, final, self.max_bytes)
        for entry in self.mapped:
            entry.close()

    def summary(self) -> dict[str, Any]:
        """For the load's report: ``status`` (``hit``: every tensor that would be converted came from the cache;
        ``miss``; ``partial``; ``unused``: none needed converting), counts, entries used and written, and why."""
        if self.hits == 0 and self.misses == 0:
            status = "unused"
        else:
            status = "hit" if self.misses == 0 else ("miss" if self.hits == 0 else "partial")
        out: dict[str, Any] = {
            "dir": self.store.root,
            "status": status,
            "hits": self.hits,
            "misses": self.misses,
            "written": self.written,
            "entries_used": sorted(self.used),
            "entries_written": list(self.published),
            "key": self.key_mode,
            "write": self.write,
            "writer_pids": list(self.writers),
        }
        reasons = self.warnings + self.reasons
        if status == "unused":
            reasons = ["no tensor needed a conversion (same dtype, or not on the CPU): nothing to cache", *reasons]
        elif self.published:
            reasons = ["entry published after fsync by a background thread", *reasons]
        elif self.writers:
            pids = ", ".join(str(p) for p in self.writers)
            why = f"entry written after the load by a background process (pid {pids}); later loads map it"
            reasons = [why, *reasons]
        out["reason"] = "; ".join(reasons)
        out["warnings"] = list(self.warnings)
        return out
