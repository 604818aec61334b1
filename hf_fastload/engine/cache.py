"""One load's use of the converted-tensor cache: hits mapped zero-copy, misses written while they are converted.

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
- **miss**: the tensor is converted straight into a new entry for its source file, piece by piece through a small
  per-thread buffer and ``pwrite`` (64 KiB at a time: on this project's VM, Linux 6.18, larger writes made the
  kernel allocate large page-cache folios at 5-9x the cost, measured 2026-12-02), and the caller gets a view of a
  private mapping of that file: the first load is zero-copy too (it allocates no memory of the model's size). The
  pages reach the disk afterwards (the kernel's writeback, then the ``fsync`` before publishing): handing each
  finished tensor to the disk during the load (``sync_file_range``) tied the load to the disk's write speed (a 1 B
  model's first fp32 load: 4.7-5.2 s with it, 3.8-4.3 s without, 2026-12-02). Only tensors whose byte size is a
  multiple of the page size are placed this way (each owns its pages, so a write to one through its private
  mapping never copies a page another tensor is still being written into); the others (odd-sized biases, an odd
  vocabulary) are converted into memory as usual, copied to a side file, and appended when the entry is sealed. A
  write that fails (a full disk) drops the entry, and the tensor is converted as usual;
- when the load ends well, the entry gets its header (an ordinary safetensors file: ``safetensors`` reads it) and is
  published by a background thread: ``fsync``, then ``rename`` into place, so that an entry exists only complete and
  on disk; then the least recently used entries are evicted down to ``HF_FASTLOAD_CACHE_MAX_GB``. A program that
  ends sooner hands the rest to a small detached process (``python -I -S``: ``fsync``, ``rename``), so its exit
  waits neither for the disk nor loses the entry. A failed load, or any problem writing, drops the entry.

One process writes a source's entry at a time (a lock file); the others load as usual without writing. A folder that
is read-only or full, a corrupt entry, a lost lock race end in a normal load, and :meth:`CacheSession.summary` says
what happened (the integration logs the warnings). The one cache error a load raises: an entry cut short while the
load maps it (``CheckpointFileError``; touching its missing pages would be a SIGBUS).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import mmap
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import FastLoadError
from ..format.file import SafetensorsFile
from ..format.header import TensorInfo
from ..format.writer import Placed, dtype_name, encode_header, header_capacity, tail_order
from .cache_store import FORMAT_VERSION, KEY_MODES, BadEntry, CacheStore, open_entry, source_key
from .cpu import convert_to_file, tensor_buffer

__all__ = ["CacheSession", "Slot", "cache_settings", "wait_for_writes"]

PAGE = mmap.PAGESIZE
_log = logging.getLogger("hf_fastload")


def cache_settings() -> dict[str, Any]:
    """``HF_FASTLOAD_CACHE_MAX_GB`` (a positive number, or unset: no limit) and ``HF_FASTLOAD_CACHE_KEY``
    (``identity``, the default, or ``content``), from the environment."""
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
    return {"max_bytes": max_bytes, "key": key}


# -- background publishing ------------------------------------------------------------------------------------------
_publishers: list[_Publisher] = []
_publishers_lock = threading.Lock()

# What a program that ends before its entries are published leaves running: fsync, rename, fsync of the folder.
# Plain os calls in a fresh interpreter (-I -S: no site, no hf_fastload), holding the writer's lock until it ends.
_HELPER = """
import os, sys
fd, temp, final, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
try:
    os.fsync(fd)
    os.rename(temp, final)
    d = os.open(folder, os.O_RDONLY)
    os.fsync(d)
    os.close(d)
except OSError:
    try:
        os.unlink(temp)
    except OSError:
        pass
"""


def wait_for_writes(timeout: float | None = None) -> bool:
    """Waits until the entries written by this process are published (or dropped); False on timeout."""
    with _publishers_lock:
        pending = list(_publishers)
    for p in pending:
        p.thread.join(timeout)
    return not any(p.thread.is_alive() for p in pending)


class _Publisher:
    """Publishes one sealed entry: ``fsync``, then ``rename`` into place (then eviction), in a daemon thread. If the
    program ends first, :func:`_hand_off` gives the rest to a small detached process, so that the program's exit
    waits neither for the disk nor loses the entry."""

    def __init__(self, writer: _EntryWriter, final: str, max_bytes: int | None):
        self.writer, self.final, self.max_bytes = writer, final, max_bytes
        self.lock = threading.Lock()
        self.state = "syncing"  # -> "renaming" -> "done"; or -> "handed" (to the helper process)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, name="hf_fastload-cache-publish", daemon=True)

    def run(self) -> None:
        writer = self.writer
        try:
            error = None
            try:
                os.fsync(writer.fd)
            except OSError as e:
                error = e
            with self.lock:
                if self.state == "handed":
                    return
                self.state = "renaming"
            if error is None:
                writer.publish(self.final, self.max_bytes)
            else:
                _log.warning(f"hf_fastload: the cache entry for {writer.source_path} could not be written: {error}")
                writer._close_files(unlink=True)
        finally:
            with self.lock:
                if self.state != "handed":
                    self.state = "done"
            self.done.set()

    def hand_off(self) -> None:
        with self.lock:
            state = self.state
            if state == "syncing":
                self.state = "handed"
        if state == "renaming":
            self.done.wait(5.0)  # a rename under way: let it finish
        if state != "syncing":
            return
        writer = self.writer
        try:
            subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _HELPER, str(writer.fd), writer.temp, self.final,
                 writer.store.entries_dir],
                pass_fds=(writer.fd, writer.lock_fd), start_new_session=True, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            writer.temp = ""  # the helper's now: not unlinked here
        except OSError:  # no process can be started: the entry is dropped (a later load writes it again)
            pass
        writer._close_files(unlink=True)


def _start_publisher(writer: _EntryWriter, final: str, max_bytes: int | None) -> None:
    publisher = _Publisher(writer, final, max_bytes)
    with _publishers_lock:
        _publishers[:] = [p for p in _publishers if p.thread.is_alive()]
        _publishers.append(publisher)
    publisher.thread.start()


@atexit.register
def _hand_off() -> None:
    with _publishers_lock:
        pending = [p for p in _publishers if p.thread.is_alive()]
    for p in pending:
        p.hand_off()


class _Refused(Exception):
    """No entry is written for this source in this load; ``warning`` says whether the user should be told."""

    def __init__(self, reason: str, warning: bool = True):
        super().__init__(reason)
        self.warning = warning


class _WriteFailed(Exception):
    """Writing a piece of a tensor into the entry failed: the entry is dropped, the tensor is made as usual."""


WRITE_BYTES = 64 << 10


@dataclass
class Slot:
    """Where one missed tensor goes: ``placed`` at data offset ``begin`` of the entry (:meth:`fill` converts it there),
    or not (a tail tensor: converted into memory as usual, then copied into the entry by :meth:`done`)."""

    writer: _EntryWriter
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # -1 for a tail tensor

    @property
    def placed(self) -> bool:
        return self.begin >= 0

    def fill(self, file: SafetensorsFile, info: TensorInfo, threads: int) -> bool:
        """Converts the tensor into its place in the entry; False when writing failed (the entry is then dropped and
        the caller makes the tensor as usual). Other errors (of the source) are raised."""
        return self.writer.fill(self, file, info, threads)

    def done(self, out: torch.Tensor | None) -> torch.Tensor:
        """The tensor the load gets: a view of the entry for a placed tensor, else ``out`` (its bytes copied)."""
        return self.writer.complete(self, out)

    def fail(self) -> None:
        """The conversion failed: the entry is dropped."""
        self.writer.abandon_slot(self)


class _EntryWriter:
    """The entry being written for one source file in this load (see the module docstring)."""

    def __init__(self, store: CacheStore, key: str, parts: dict, source: SafetensorsFile, dtype: torch.dtype,
                 max_bytes: int | None, keep: frozenset[str]):  # fmt: skip
        self.store, self.key, self.source_path = store, key, source.path
        self.lock = threading.Lock()
        self.failed: str | None = None
        self.pending = 0
        self.cursor = 0  # end of the placed tensors in the data region
        self.placed: list[Placed] = []
        self.tail: list[tuple[str, torch.dtype, tuple[int, ...], int, int]] = []  # name, dtype, shape, at, nbytes
        self.tail_cursor = 0
        self.names: set[tuple[str, torch.dtype]] = set()
        self.fd = self.tail_fd = self.lock_fd = -1
        self.temp = ""
        self.private: mmap.mmap | None = None
        try:
            st = os.fstat(source._fd())
            self.identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            store.ensure()
            self.lock_fd = store.try_lock(key)
        except OSError as e:
            raise _Refused(f"cannot write to the cache folder {store.root}: {e.strerror or e}") from None
        if self.lock_fd is None:
            raise _Refused("another process is writing this source's entry; loaded without writing", warning=False)
        try:
            self._open(parts, source, dtype, max_bytes, keep)
        except BaseException:
            self._close_files(unlink=True)
            raise

    def _open(self, parts, source, dtype, max_bytes, keep) -> None:
        store = self.store
        store.remove_leftovers(self.key)
        self.metadata = {
            "format": "pt",
            "hf_fastload_cache": FORMAT_VERSION,
            "source_key": self.key,
            "source": os.path.realpath(source.path),
            "source_name": source.path,
            "key_parts": ",".join(f"{k}={v}" for k, v in sorted(parts.items())),
        }
        shapes = [(name, info.shape) for name, info in source.tensors.items()]
        self.capacity = -(-header_capacity(shapes, self.metadata) // PAGE) * PAGE
        numel = sum(info.numel for info in source.tensors.values())
        estimate = self.capacity + numel * dtype.itemsize
        gb = f"{estimate / 1e9:.2f} GB"
        if max_bytes is not None:
            if estimate > max_bytes:
                raise _Refused(f"an entry of about {gb} would not fit in HF_FASTLOAD_CACHE_MAX_GB={max_bytes / 1e9:g}")
            store.evict(max_bytes, keep, incoming=estimate)
        room = store.room()
        if estimate > room:
            raise _Refused(
                f"not enough free space in {store.root}: an entry of about {gb} does not fit in the "
                f"{room / 1e9:.2f} GB the cache may use (it keeps 5% of the filesystem free)"
            )
        try:
            self.temp = store.temp_path(self.key)
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
            self.fd = os.open(self.temp, flags, 0o644)
            self.tail_fd = os.open(self.temp + ".tail", flags, 0o600)
            os.unlink(self.temp + ".tail")  # a side file that lives only while it is open
            # Sized for the largest dtype every tensor could get (sparse: only written ranges take space), so that
            # the mapping covers whatever is placed; the file is cut to its real size when it is sealed.
            bound = self.capacity + max(numel * 8, PAGE)
            os.ftruncate(self.fd, bound)
            self.private = mmap.mmap(self.fd, bound, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as e:
            why = getattr(e, "strerror", None) or e
            raise _Refused(f"cannot write a cache entry in {store.root}: {why}") from None

    # -- slots, from the load's threads ---------------------------------------------------------------------------
    def reserve(self, info: TensorInfo, dtype: torch.dtype) -> Slot | None:
        nbytes = info.numel * dtype.itemsize
        with self.lock:
            if self.failed is not None or (info.name, dtype) in self.names:
                return None
            self.names.add((info.name, dtype))
            self.pending += 1
            if nbytes == 0 or nbytes % PAGE:
                return Slot(self, info.name, dtype, info.shape, -1)
            begin = self.cursor
            self.cursor += nbytes
        return Slot(self, info.name, dtype, info.shape, begin)

    def _failed_write(self, e: OSError) -> _WriteFailed:
        why = f"cannot write the cache entry: {e.strerror or e}"
        with self.lock:
            if self.failed is None:
                self.failed = why
        return _WriteFailed(why)

    def fill(self, slot: Slot, file: SafetensorsFile, info: TensorInfo, threads: int) -> bool:
        base = self.capacity + slot.begin

        def write(data: memoryview, offset: int) -> None:
            if self.failed is not None:  # another tensor's write failed: stop writing this one
                raise _WriteFailed(self.failed)
            try:
                _pwrite_all(self.fd, data, base + offset)
            except OSError as e:
                raise self._failed_write(e) from None

        try:
            convert_to_file(file, info, slot.dtype, write, threads)
        except _WriteFailed:
            self.abandon_slot(slot, self.failed or "cannot write the cache entry")
            return False
        return True

    def complete(self, slot: Slot, out: torch.Tensor | None) -> torch.Tensor:
        nbytes = torch.Size(slot.shape).numel() * slot.dtype.itemsize
        if not slot.placed:  # a tail tensor: its bytes go to the side file now, into the entry when it is sealed
            try:
                with self.lock:
                    at = self.tail_cursor
                    self.tail_cursor += nbytes
                if nbytes:
                    _pwrite_all(self.tail_fd, tensor_buffer(out.contiguous()), at)
            except OSError as e:
                self.abandon_slot(slot, f"cannot write the cache entry's side file: {e.strerror or e}")
                return out
            with self.lock:
                self.tail.append((slot.name, slot.dtype, slot.shape, at, nbytes))
                self.pending -= 1
            return out
        start = self.capacity + slot.begin
        with self.lock:
            self.placed.append(Placed(slot.name, dtype_name(slot.dtype), slot.shape, slot.begin, slot.begin + nbytes))
            self.pending -= 1
        view = torch.frombuffer(self.private, dtype=slot.dtype, count=torch.Size(slot.shape).numel(), offset=start)
        return view.view(slot.shape)

    def abandon_slot(self, slot: Slot | None, why: str = "a tensor failed while it was being converted") -> None:
        with self.lock:
            self.pending -= 1
            if self.failed is None:
                self.failed = why

    @property
    def tensors(self) -> int:
        return len(self.placed) + len(self.tail)

    # -- the end of the load ----------------------------------------------------------------------------------------
    def seal(self, source: SafetensorsFile | None) -> str:
        """Appends the tail, writes the header, cuts the file; returns where it will be published. Raises _Refused
        (or OSError) when the entry cannot be completed; the caller then drops it."""
        with self.lock:
            if self.failed is not None:
                raise _Refused(self.failed)
            if self.pending:
                raise _Refused("the load ended with tensors still being written")
        if not self.placed and not self.tail:
            raise _Refused("nothing to write", warning=False)
        if source is not None:
            st = os.stat(source.path)  # its descriptor is closed by now; the path must still be the file read
            if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) != self.identity:
                raise _Refused(f"{self.source_path} changed while it was being loaded; its entry is not kept")
        placed = list(self.placed)
        at = self.cursor
        by_name = {(n, d): (shape, src, size) for n, d, shape, src, size in self.tail}
        for name, dtype in tail_order(by_name):
            shape, src, size = by_name[(name, dtype)]
            _copy_range(self.tail_fd, src, self.fd, self.capacity + at, size)
            placed.append(Placed(name, dtype_name(dtype), shape, at, at + size))
            at += size
        header = encode_header(placed, self.metadata, self.capacity)
        _pwrite_all(self.fd, memoryview(header), 0)
        os.ftruncate(self.fd, self.capacity + at)
        return self.store.entry_path(self.key, [(p.name, p.dtype) for p in placed])

    def publish(self, final: str, max_bytes: int | None) -> None:
        """After ``fsync`` (see _Publisher): renames the entry into place, evicts; never raises."""
        try:
            os.rename(self.temp, final)
            self.temp = ""
            with contextlib.suppress(OSError):
                dfd = os.open(self.store.entries_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            if max_bytes is not None:
                self.store.evict(max_bytes, frozenset({final}))
        except Exception as e:  # a cache that cannot be written is a warning, never an error of the program
            _log.warning(f"hf_fastload: the cache entry for {self.source_path} could not be published: {e}")
        finally:
            self._close_files(unlink=True)

    def _close_files(self, unlink: bool) -> None:
        self.private = None  # the mapping goes when the last tensor viewing it goes
        for name in ("tail_fd", "fd", "lock_fd"):
            fd = getattr(self, name)
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
            setattr(self, name, -1)
        if unlink and self.temp:
            with contextlib.suppress(OSError):
                os.unlink(self.temp)
            self.temp = ""


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Writes ``data`` at ``offset`` in pieces of at most 64 KiB (see the module docstring for why)."""
    done, total = 0, len(data)
    while done < total:
        done += os.pwrite(fd, data[done : min(total, done + WRITE_BYTES)], offset + done)


def _copy_range(src_fd: int, src: int, dst_fd: int, dst: int, size: int) -> None:
    """Copies ``size`` bytes between files, in the kernel where it can (``copy_file_range``)."""
    done = 0
    while done < size:
        n = 0
        if hasattr(os, "copy_file_range"):
            with contextlib.suppress(OSError):
                n = os.copy_file_range(src_fd, dst_fd, size - done, src + done, dst + done)
        if n <= 0:
            data = os.pread(src_fd, min(size - done, 8 << 20), src + done)
            if not data:
                raise OSError(f"the cache entry's side file ended early ({src + done} of {src + size})")
            _pwrite_all(dst_fd, memoryview(data), dst + done)
            n = len(data)
        done += n


class _Source:
    """What one load knows about one source file: its key, the published entries, its writer."""

    __slots__ = ("entries", "error", "file", "key", "lock", "parts", "ready", "refused", "writer")

    def __init__(self, file: SafetensorsFile):
        self.lock = threading.Lock()
        self.file = file
        self.ready = False
        self.key: str | None = None
        self.parts: dict = {}
        self.error: str | None = None
        self.entries: dict[tuple[str, str], tuple[SafetensorsFile, TensorInfo]] = {}
        self.writer: _EntryWriter | None = None
        self.refused: str | None = None


class CacheSession:
    """One load's use of the cache folder ``root`` (see the module docstring).

    Args:
        root (`str`): the cache folder (``HF_FASTLOAD_CACHE``).
        max_bytes (`int`, *optional*): the size limit (``HF_FASTLOAD_CACHE_MAX_GB``); read from the environment
            when not given, as is `key_mode` (``HF_FASTLOAD_CACHE_KEY``).
    """

    def __init__(self, root: str | os.PathLike, max_bytes: int | None = None, key_mode: str | None = None):
        env = cache_settings() if max_bytes is None or key_mode is None else {}
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
        with src.lock:
            if src.writer is None and src.refused is None:
                try:
                    keep = frozenset(self.used)
                    src.writer = _EntryWriter(self.store, src.key, src.parts, file, dtype, self.max_bytes, keep)
                except _Refused as e:
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
            writer, src.writer = src.writer, None
            if writer is None:
                continue
            if not ok:
                writer._close_files(unlink=True)
                continue
            try:
                final = writer.seal(src.file)
            except _Refused as e:
                self._note(str(e), e.warning)
                writer._close_files(unlink=True)
                continue
            except (OSError, ValueError) as e:
                self._note(f"cannot complete the cache entry for {src.file.path}: {e}", True)
                writer._close_files(unlink=True)
                continue
            self.written += writer.tensors
            self.published.append(final)
            _start_publisher(writer, final, self.max_bytes)
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
        }
        reasons = self.warnings + self.reasons
        if status == "unused":
            reasons = ["no tensor needed a conversion (same dtype, or not on the CPU): nothing to cache", *reasons]
        elif self.published:
            reasons = ["entry published after fsync by a background thread", *reasons]
        out["reason"] = "; ".join(reasons)
        out["warnings"] = list(self.warnings)
        return out
