"""A cache entry being written: converted tensors placed in a new file, sealed, then published (fsync, rename).

Example:
    ```python
    from hf_fastload.engine.cache_writer import wait_for_writes

    # after loads with HF_FASTLOAD_CACHE set: returns once every entry this process started is published (or dropped)
    wait_for_writes(60)
    ```

:mod:`hf_fastload.engine.cache` decides what a load caches; this module writes it, in one of two ways
(``HF_FASTLOAD_CACHE_WRITE``):

- ``inline`` (the default): the load converts a missed tensor straight into the entry (:class:`EntryWriter`,
  :class:`Slot`) and gets a view of the entry's private mapping; the entry is sealed when the load ends and published
  by a background thread (or, when the program ends first, by a small detached process);
- ``after``: the load converts into memory as without the cache, and hands the list of its missed tensors to a
  detached, low-priority process (``python -m hf_fastload.engine.cache_writer SPEC``), which converts them again from
  the source file into a new entry and publishes it. The first load then costs what an uncached load costs; the
  conversion is paid once more, on the side, after it. A program that ends at once does not stop the writer.

Both write the same file, under the same lock (one writer per source at a time), with the same checks (room on the
disk, ``HF_FASTLOAD_CACHE_MAX_GB``, the source unchanged since its key was computed) and the same atomic publication.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import mmap
import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

import torch

from ..format.file import SafetensorsFile
from ..format.header import DTYPES, TensorInfo
from ..format.writer import Placed, dtype_name, encode_header, header_capacity, tail_order
from .cache_store import FORMAT_VERSION, CacheStore, source_key
from .cpu import convert_mapped, convert_to_file, read_converted, read_same, tensor_buffer

__all__ = [
    "WRITE_MODES", "EntryWriter", "Refused", "Slot", "main", "spawn_writer", "start_publisher", "wait_for_writes",
    "write_entry",
]  # fmt: skip

PAGE = mmap.PAGESIZE
WRITE_MODES = ("inline", "after")  # HF_FASTLOAD_CACHE_WRITE
_log = logging.getLogger("hf_fastload")


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
    """Waits until the entries this process wrote or started are published (or dropped); False on timeout."""
    with _publishers_lock:
        pending, children = list(_publishers), list(_children)
    for p in pending:
        p.thread.join(timeout)
    for child in children:  # writers started after a load (HF_FASTLOAD_CACHE_WRITE=after)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout)
    return not any(p.thread.is_alive() for p in pending) and all(c.poll() is not None for c in children)


class _Publisher:
    """Publishes one sealed entry: ``fsync``, then ``rename`` into place (then eviction), in a daemon thread. If the
    program ends first, :func:`_hand_off` gives the rest to a small detached process, so that the program's exit
    waits neither for the disk nor loses the entry."""

    def __init__(self, writer: EntryWriter, final: str, max_bytes: int | None):
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


def start_publisher(writer: EntryWriter, final: str, max_bytes: int | None) -> None:
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


class Refused(Exception):
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

    writer: EntryWriter
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


class EntryWriter:
    """The entry being written for one source file in this load (see the module docstring)."""

    def __init__(self, store: CacheStore, key: str, parts: dict, source: SafetensorsFile, dtype: torch.dtype,
                 max_bytes: int | None, keep: frozenset[str], lock_fd: int | None = None):  # fmt: skip
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
            self.lock_fd = store.try_lock(key) if lock_fd is None else lock_fd  # given: taken by the loading process
        except OSError as e:
            raise Refused(f"cannot write to the cache folder {store.root}: {e.strerror or e}") from None
        if self.lock_fd is None:
            raise Refused("another process is writing this source's entry; loaded without writing", warning=False)
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
                raise Refused(f"an entry of about {gb} would not fit in HF_FASTLOAD_CACHE_MAX_GB={max_bytes / 1e9:g}")
            store.evict(max_bytes, keep, incoming=estimate)
        room = store.room()
        if estimate > room:
            raise Refused(
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
            raise Refused(f"cannot write a cache entry in {store.root}: {why}") from None

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
        """Appends the tail, writes the header, cuts the file; returns where it will be published. Raises Refused
        (or OSError) when the entry cannot be completed; the caller then drops it."""
        with self.lock:
            if self.failed is not None:
                raise Refused(self.failed)
            if self.pending:
                raise Refused("the load ended with tensors still being written")
        if not self.placed and not self.tail:
            raise Refused("nothing to write", warning=False)
        if source is not None:
            st = os.stat(source.path)  # its descriptor is closed by now; the path must still be the file read
            if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) != self.identity:
                raise Refused(f"{self.source_path} changed while it was being loaded; its entry is not kept")
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


# -- after the load: a detached writer process (HF_FASTLOAD_CACHE_WRITE=after) --------------------------------------
_children: list[subprocess.Popen] = []


def spawn_writer(
    store: CacheStore, key: str, source: SafetensorsFile, tensors: list[tuple[str, torch.dtype]],
    max_bytes: int | None, key_mode: str, threads: int,
) -> int | None:  # fmt: skip
    """Starts the process that writes ``source``'s entry with ``tensors`` (name, dtype) after the load; its pid, or
    None when another process is writing this source's entry (it holds the entry's lock).

    The lock is taken here and handed to the process, which is detached (its own session: the program may end
    first) and runs at the lowest CPU priority. It computes the source's key again and writes nothing when the key is
    not ``key`` any more (the file changed since the load) or when the entry does not fit (see :func:`write_entry`).
    OSError when the cache folder cannot take the request or no process can be started.
    """
    store.ensure()
    lock_fd = store.try_lock(key)  # taken here and handed over: loads that end together start one writer
    if lock_fd is None:
        return None
    path = ""
    try:
        spec = {
            "root": store.root, "key": key, "key_mode": key_mode, "max_bytes": max_bytes, "source": source.path,
            "io": source.io, "threads": threads, "tensors": [[name, dtype_name(dtype)] for name, dtype in tensors],
            "lock_fd": lock_fd,
        }  # fmt: skip
        fd, path = tempfile.mkstemp(prefix="spec-", suffix=".json", dir=store.tmp_dir)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(spec, fh)
        package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
        child = subprocess.Popen(
            [sys.executable, "-m", "hf_fastload.engine.cache_writer", path], env=env, start_new_session=True,
            pass_fds=(lock_fd,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    except BaseException:
        if path:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    finally:
        os.close(lock_fd)  # the child holds the lock now (or nobody does)
    with _publishers_lock:
        _children[:] = [c for c in _children if c.poll() is None]
        _children.append(child)
    return child.pid


def _made_as_usual(file: SafetensorsFile, info: TensorInfo, dtype: torch.dtype, threads: int) -> torch.Tensor:
    """``stored.to(dtype)`` in memory, as the engine's CPU paths make it (a tail tensor of the entry)."""
    if dtype == info.torch_dtype:
        return read_same(file, info, threads) if file.io != "mmap" else file.view(info).clone()
    if file.io == "mmap":
        return convert_mapped(file, info, dtype)
    return read_converted(file, info, dtype, threads)


def write_entry(spec: dict[str, Any]) -> str:
    """Writes and publishes the entry that ``spec`` (from :func:`spawn_writer`) describes, in this process; returns
    what happened, in one line. Never leaves a partial entry behind."""
    store = CacheStore(spec["root"])
    wanted = [(name, DTYPES[d]) for name, d in spec["tensors"] if d in DTYPES]
    if not wanted:
        return "nothing to write"
    threads, max_bytes = int(spec.get("threads") or 1), spec.get("max_bytes")
    with SafetensorsFile(spec["source"], io=spec.get("io") or "mmap") as file:
        key, parts = source_key(file, spec["key_mode"])
        if key != spec["key"]:
            if spec.get("lock_fd") is not None:
                os.close(spec["lock_fd"])
            return f"{file.path} changed since the load; no entry written"
        widest = max((dtype for _, dtype in wanted), key=lambda d: d.itemsize)
        try:
            writer = EntryWriter(store, key, parts, file, widest, max_bytes, frozenset(), spec.get("lock_fd"))
        except Refused as e:
            return str(e)
        try:
            for name, dtype in wanted:
                info = file.tensors.get(name)
                slot = writer.reserve(info, dtype) if info is not None else None
                if slot is None:
                    continue
                if slot.placed:
                    if not writer.fill(slot, file, info, threads):
                        break  # a write failed (a full disk): seal() refuses the entry
                    writer.complete(slot, None)
                else:
                    writer.complete(slot, _made_as_usual(file, info, dtype, threads))
            final = writer.seal(file)
            os.fsync(writer.fd)
        except (Refused, OSError, ValueError) as e:
            writer._close_files(unlink=True)
            return f"no entry written: {e}"
        except BaseException:
            writer._close_files(unlink=True)
            raise
        writer.publish(final, max_bytes)
    return f"published {final}"


def main(argv: list[str] | None = None) -> int:
    """``python -m hf_fastload.engine.cache_writer SPEC``: :func:`write_entry` at the lowest priority; the spec file
    is removed once read."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m hf_fastload.engine.cache_writer SPEC.json\n")
        return 2
    with contextlib.suppress(OSError, AttributeError):
        os.nice(19)
    try:
        with open(args[0], encoding="utf-8") as fh:
            spec = json.load(fh)
    except (OSError, ValueError) as e:
        sys.stderr.write(f"hf_fastload cache writer: cannot read {args[0]}: {e}\n")
        return 1
    finally:
        with contextlib.suppress(OSError):
            os.unlink(args[0])
    outcome = write_entry(spec)
    sys.stderr.write(f"hf_fastload cache writer: {outcome}\n")
    return 0 if outcome.startswith(("published", "nothing")) else 1


if __name__ == "__main__":
    sys.exit(main())
