"""One load's state: its open files, how each is read, its device pipelines, its errors and counters.

Example:
    ```python
    import torch
    from hf_fastload.engine.context import LoadContext

    ctx = LoadContext(io="auto", threads=8)
    f = ctx.open("model.safetensors")          # opened and validated once per load; kernel readahead started
    weight = ctx.materialize(f.get_slice("lm_head.weight"), device="cpu", dtype=torch.float32)
    ctx.close()                                # waits for tensors in flight, closes files and pipelines
    ```

A :class:`LoadContext` is shared by every thread that materializes a tensor of the load (transformers 5 has its own
loader threads). It picks the I/O mode per file (:func:`choose_io`), keeps one handle per file and device, makes
one device pipeline per target device on its first tensor, stops the rest of the load at its first error, and
records what happened for the :class:`~hf_fastload.report.LoadReport`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

import torch

from ..errors import CheckpointFileError, FastLoadError
from ..format.header import TensorInfo
from . import backends, readahead, ring
from .handle import SafetensorsHandle, TensorSlice
from .materialize import materialize
from .pools import chunk_pool, get_pool
from .stream import Pipeline

__all__ = ["LoadContext", "choose_io"]

PREFETCH_BYTES = 512 << 20  # target bytes materialized ahead of what transformers asked for (LoadContext.prefetch)
PREFETCH_THREADS = 8  # tensors materialized at once ahead of it
READAHEAD_THREADS = 8
_PLANNED = object()  # LoadContext.take(): the target the tensor was planned with


class LoadContext:
    """What one load reads, and how; shared by every thread that materializes a tensor of that load.

    Args:
        io (`str`): `"auto"`, `"mmap"` or `"pread"`; `"auto"` picks per file (see :func:`choose_io`).
        threads (`int`): reader threads.
        prefer_pread (`bool`): the caller asked for no mmap (`disable_mmap=True`).
        readahead (`bool`): ask the kernel to read each file ahead, whole (off for tensor-parallel loads, where each
            rank reads only its own shards, and with ``HF_FASTLOAD_READAHEAD=0``).
    """

    def __init__(self, io: str = "auto", threads: int = 2, prefer_pread: bool = False, readahead: bool = True):
        self.io = io
        self.threads = threads
        self.prefer_pread = prefer_pread
        self.readahead = readahead
        self._advised: set[str] = set()  # files whose readahead was started (by realpath)
        self.lock = threading.Lock()
        self.files: dict[tuple[str, str], SafetensorsHandle] = {}
        self.io_used: dict[str, str] = {}  # file -> "mode: why"
        self.bytes_read = 0
        self.tensors = 0
        self.zero_copy = 0
        self.methods: dict[str, int] = {}  # how tensors were made: zero-copy, pread, convert, ... -> count
        self.first: float | None = None
        self.last: float | None = None
        self.errors: list[BaseException] = []
        self.readahead_bytes = 0
        self._planned: dict[tuple[str, str], tuple[TensorSlice, Any, torch.dtype | None]] = {}
        self._order: list[tuple[str, str]] = []  # planned tensors in the order the loop will take them
        self._next = 0  # the first planned tensor not yet prefetched
        self._prefetched: dict[tuple[str, str], tuple[Future, int]] = {}  # key -> (materializing, target bytes)
        self.prefetch_bytes = 0  # target bytes prefetched and not yet taken
        self.prefetch_window = PREFETCH_BYTES
        # The loop that asks for the tensors does heavy work of its own between them, on all of torch's threads
        # (transformers 4.57 quantizing each weight with bitsandbytes): nothing is prefetched, and a conversion uses
        # torch's intra-op threads as stock's `.to()` does, instead of competing with that work for the cores
        self.serial_loop = False
        self._instant: set[tuple[str, str]] = set()  # planned tensors that will be zero-copy views: never prefetched
        self.prefetched = 0  # tensors that were prefetched, and the most target bytes ahead at once
        self.peak_prefetch_bytes = 0
        self.pipelines: dict[str, Any] = {}  # resolved device -> Pipeline, made on its first tensor
        self._streams: dict[tuple, bool] = {}  # (device as asked, io) -> whether it streams (streams())
        self.closed = False  # set by close(): a task still running for a failed load opens nothing more
        self.cache: Any = None  # the load's cache.CacheSession (HF_FASTLOAD_CACHE), set by the integration
        self.remote: set[str] = set()  # files read with pread because of their filesystem (network, FUSE)
        self.active = 0  # tensors being materialized now; close() waits for them
        self._idle = threading.Condition(self.lock)

    def open(self, path: str | os.PathLike, device: Any = "cpu") -> SafetensorsHandle:
        """The handle of ``path`` for this load (opened and validated once per file and device)."""
        path = os.fspath(path)
        key = (os.path.realpath(path), str(device))
        with self.lock:
            handle = self.files.get(key)
        if handle is not None:
            return handle
        if self.closed:
            raise _ended(path)
        io, why = choose_io(path, self.io, self.prefer_pread)
        handle = SafetensorsHandle(path, io=io, device=device)
        handle.owner = self
        with self.lock:
            late = self.closed  # close() ran while this file was being opened, and did not see it
            fresh = not late and not any(h.path == handle.path for h in self.files.values())
            mine, handle = handle, handle if late else self.files.setdefault(key, handle)
            if not late:
                self.io_used.setdefault(handle.path, f"{io}: {why}")
                if io == "pread" and self.io == "auto" and not self.prefer_pread:
                    self.remote.add(handle.path)
        if mine is not handle or late:  # another thread opened it first: keep one descriptor
            mine.close()
        if late:
            raise _ended(path)
        if fresh:  # a descriptor of its own: transformers may close the handle before the readahead runs
            self._readahead(handle.path, lambda: os.dup(handle._fd()))
        return handle

    def read_ahead(self, paths: Iterable[str]) -> None:
        """Starts the kernel readahead of ``paths`` now, before the load opens them.

        Called at the entry of a load, with the files its folder or index names: transformers then imports the
        model's code, reads the config and builds the model (seconds, in a fresh process) while the disk works.
        Best effort: a file that cannot be opened is left to the load, which reports it where it opens it.
        """
        for path in paths:

            def open_own(path: str = path) -> int:
                return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

            self._readahead(path, open_own)

    def _readahead(self, path: str, open_fd: Callable[[], int]) -> None:
        """Asks the kernel to start reading the whole file, from several threads at once; ``open_fd()`` gives a
        descriptor of our own (closed by whichever task finishes last).

        A cold file then arrives at the disk's parallel bandwidth instead of one readahead stream's (on this
        project's VM: 2 GB in 2.9 s with ``dd``, 1.1 s from 8 threads: :func:`~hf_fastload.engine.readahead.spread`);
        for a file already in the page cache the calls return at once. Once per file and load; skipped when the load
        would not fit in half of the available memory (it would evict its own pages), and when readahead is off (the
        default, ``HF_FASTLOAD_READAHEAD``: on that VM it made cold loads slower).

        The caller only opens the file and hands it to the readahead threads (one task): the memory check and the
        calls run there. On a warm load, where every page is cached already, starting them took the caller 5-10 ms
        (a fixed cost of every fast load that stock does not pay).
        """
        if not self.readahead or not hasattr(os, "posix_fadvise"):
            return
        real = os.path.realpath(path)
        with self.lock:
            if real in self._advised:
                return
            self._advised.add(real)
        try:
            fd = open_fd()
        except OSError:
            return
        get_pool("readahead", READAHEAD_THREADS).submit(self._spread, fd)

    def _spread(self, fd: int) -> None:
        """The readahead of one open file (see :meth:`_readahead`), run on a readahead thread: its windows are shared
        with the other readahead threads; ``fd`` is closed by whichever finishes last."""
        try:
            size = os.fstat(fd).st_size
        except OSError:
            os.close(fd)
            return
        with self.lock:
            self.readahead_bytes += size
            total = self.readahead_bytes
        if total > _available_memory() // 2:
            os.close(fd)
            return
        readahead.spread(fd, size, READAHEAD_THREADS)

    def materialize(self, ts: TensorSlice, device: Any = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        return materialize(ts, device, dtype)

    def picked_pread(self, file: SafetensorsHandle) -> bool:
        """Whether ``file`` is read with pread because of where it is (network or FUSE storage), not because the
        caller asked for it."""
        return file.path in self.remote

    def plan(self, ts: TensorSlice, device: Any = None, dtype: torch.dtype | None = None) -> None:
        """Records where ``ts`` goes: the next ``ts[...]`` (4.57) or ``take(ts, device, dtype)`` (5.x) returns it on
        that device in that dtype. Tensors are expected to be taken in the order they were planned (see
        :meth:`prefetch`); a tensor planned twice is not planned (each request then materializes it)."""
        key = (ts.file.path, ts.info.name)
        with self.lock:
            if self.closed:
                return
            if key in self._planned:
                self._planned[key] = None
                self._prefetched.pop(key, None)  # a prefetch already running is dropped (close awaits it)
                return
            self._order.append(key)
            self._planned[key] = (ts, device, dtype)
        streams = self.streams(device, ts.file)  # a device's pipeline, and its ring's allocation, start here
        if not streams and _zero_copy(ts, device, dtype):
            with self.lock:
                self._instant.add(key)

    def prefetch(self) -> None:
        """Starts materializing the next planned tensors in the background, in plan order, while the caller works
        (4.57's loop takes one tensor at a time and does its own work between them).

        At most ``prefetch_window`` target bytes are materialized ahead of the loop (at least one tensor), on
        ``PREFETCH_THREADS`` threads; each tensor streams with all reader threads as usual. A prefetched tensor's
        error is raised when the loop takes it, so errors surface in the loop's order, as stock raises them.
        """
        if self.serial_loop:
            return
        with self.lock:
            while not self.closed and self._next < len(self._order):
                if self._prefetched and self.prefetch_bytes >= self.prefetch_window:
                    break
                key = self._order[self._next]
                self._next += 1
                target = self._planned.get(key)
                # a zero-copy view costs nothing to make when asked for; made ahead, it would outlive the size check
                # that guards its pages (a file truncated in between would be a SIGBUS when the loop copies it)
                if target is None or key in self._prefetched or key in self._instant:
                    continue
                ts, device, dtype = target
                nbytes = ts.info.numel * (dtype or ts.info.torch_dtype).itemsize
                future = get_pool("prefetch", PREFETCH_THREADS).submit(materialize, ts, device, dtype, False)
                self._prefetched[key] = (future, nbytes)
                self.prefetch_bytes += nbytes
                self.prefetched += 1
                self.peak_prefetch_bytes = max(self.peak_prefetch_bytes, self.prefetch_bytes)

    def take(self, ts: TensorSlice, device: Any = _PLANNED, dtype: Any = _PLANNED) -> torch.Tensor | None:
        """The planned tensor for ``ts`` (prefetched, or materialized now), or None when nothing was planned for it
        (or, given ``device`` and ``dtype``, it was planned for another target); then the next planned tensors are
        prefetched."""
        key = (ts.file.path, ts.info.name)
        with self.lock:
            target = self._planned.get(key)
            if target is not None and device is not _PLANNED and not _same_target(target, device, dtype):
                return None
            self._planned.pop(key, None)
            ahead = self._prefetched.pop(key, None)
            if ahead is not None:
                self.prefetch_bytes -= ahead[1]
        if target is None:
            return None
        try:
            if ahead is None:
                return materialize(*target)
            try:
                return ahead[0].result()
            except BaseException as e:
                self.fail(e)  # recorded now, in the loop's order
                raise
        finally:
            self.prefetch()

    def streams(self, device: Any, file: SafetensorsHandle) -> bool:
        """Whether tensors of ``file`` going to ``device`` take a device pipeline (whose ring this starts).

        Asked for every tensor transformers 5 submits (from its main thread): the answer is kept per device and I/O
        mode.
        """
        try:
            memo = (device, file.io)
            hash(memo)
        except TypeError:
            memo = None
        known = self._streams.get(memo) if memo is not None else None
        if known is not None:
            return known
        try:
            target = torch.device(device) if device is not None else torch.device("cpu")
        except (RuntimeError, TypeError):
            return False
        streams = target.type != "meta" and self.pipeline(target, file) is not None
        if memo is not None:
            self._streams[memo] = streams
        return streams

    def pipeline(self, device: torch.device, file: SafetensorsHandle) -> Any:
        """The device pipeline (:mod:`~hf_fastload.engine.stream`) for tensors going to ``device``, or None where
        tensors take the CPU paths (a CPU target without ``HF_FASTLOAD_IO=direct``, or a device type without a
        backend). ``"cuda"`` and ``"cuda:0"`` (the current device) share one pipeline."""
        device = backends.resolve_device(device)
        key = str(device)
        with self.lock:
            if key in self.pipelines:
                return self.pipelines[key]
        backend = backends.backend_for(device, file.io)  # module attributes: tests and benchmarks replace them
        pipe = None
        if backend is not None:
            budget, chunk = ring.pinned_budget(), ring.chunk_bytes()
            pool = chunk_pool(self.threads)
            pipe = Pipeline(backend, pool.submit, self.threads, budget, self._stopping, chunk=chunk)
        with self.lock:
            return self.pipelines.setdefault(key, pipe)

    def io_summary(self) -> dict[str, str]:
        """file -> "mode: why" for the report; files read by a device pipeline say so."""
        with self.lock:
            used = dict(self.io_used)
            pipes = {k: p for k, p in self.pipelines.items() if p is not None}
        for device, pipe in pipes.items():
            for path in used:
                mode = used[path].split(":")[0]
                note = pipe.direct_notes.get(path)
                if note:
                    mode, why = note.split(": ", 1)
                elif mode == "mmap":
                    mode, why = "pread", "device pipeline reads with pread"
                else:
                    why = used[path].split(": ", 1)[1]
                used[path] = f"{mode}: {why}; {pipe.describe()} to {device}"
        return used

    def close(self, timeout: float = 60.0) -> None:
        """Closes every file of this load and its device pipelines (tensors already made stay valid).

        First waits (up to ``timeout`` seconds) for the tensors still being materialized: after a failure or an
        interrupt, transformers 5 leaves its own pool's running tasks behind; they stop at their next chunk (see
        :meth:`check_alive`), and none of them is still reading or allocating for this load once ``close`` returns.
        """
        with self.lock:
            self.closed = True
            self._planned.clear()
            ahead, self._prefetched = list(self._prefetched.values()), {}
            self.prefetch_bytes = 0
        for future, _ in ahead:
            future.cancel()  # not started: never runs; running: awaited below (it counts as active)
        with self.lock:
            self._idle.wait_for(lambda: self.active == 0, timeout)
            handles = list(self.files.values())
            pipes = [p for p in self.pipelines.values() if p is not None and not p.closed]
        for pipe in pipes:
            pipe.close()
        for handle in handles:
            handle.close()

    def check_mapped(self) -> None:
        """Raises CheckpointFileError if a file this load mapped now ends before its last tensor's data.

        The model's zero-copy tensors are views of those mappings: had another process truncated the file during
        the load, the first touch of such a tensor would kill this process with SIGBUS. Called before the model is
        returned (one ``fstat`` per file); a truncation after that is the same hazard as for any mmap user.
        """
        with self.lock:
            handles = list(self.files.values())
        for handle in handles:
            if handle._mmap is not None:
                handle.check_size(handle.data_end)
        if self.cache is not None:
            self.cache.check_mapped()

    def record(self, info: TensorInfo, method: str, start: float) -> None:
        now = time.perf_counter()
        with self.lock:
            self.bytes_read += info.nbytes
            self.tensors += 1
            self.zero_copy += method.startswith("zero-copy")
            self.methods[method] = self.methods.get(method, 0) + 1
            self.first = start if self.first is None else min(self.first, start)
            self.last = now if self.last is None else max(self.last, now)

    def begin(self) -> None:
        """Counts a tensor as being materialized; raises instead once the load has failed or ended, so that the
        rest of a failed load is not read (transformers 5 records per-tensor errors and carries on)."""
        with self.lock:
            if self.errors or self.closed:
                raise self._aborted()
            self.active += 1

    def end(self) -> None:
        with self.lock:
            self.active -= 1
            if self.active == 0:
                self._idle.notify_all()

    def check_alive(self) -> None:
        """Raises once the load has failed or ended: long reads call it between chunks."""
        if self.errors or self.closed:
            raise self._aborted()

    def _aborted(self) -> FastLoadError:
        if not self.errors:
            return FastLoadError("not read: the load has ended (it failed or was interrupted)")
        why = f"{type(self.errors[0]).__name__}: {self.errors[0]}"
        return FastLoadError(f"not read: an earlier tensor of this load failed ({why[:300]})")

    def failed(self) -> bool:
        """True once any tensor of this load failed (chunks still queued for the load then stop early)."""
        return bool(self.errors)

    def _stopping(self) -> bool:
        """True once the load failed or ended: chunks still queued for it (a prefetch nobody will take) stop."""
        return bool(self.errors) or self.closed

    def fail(self, error: BaseException) -> None:
        with self.lock:
            self.errors.append(error)


def _zero_copy(ts: TensorSlice, device: Any, dtype: torch.dtype | None) -> bool:
    """Whether ``ts`` on ``device`` in ``dtype`` is a view of the file mapping (a same-dtype CPU load with mmap)."""
    try:
        on_cpu = device is None or torch.device(device).type == "cpu"
    except (RuntimeError, TypeError):
        return False
    info = ts.info
    return on_cpu and ts.file.io == "mmap" and info.unreadable is None and dtype in (None, info.torch_dtype)


def _same_target(target: tuple, device: Any, dtype: Any) -> bool:
    _, planned_device, planned_dtype = target

    def norm(d):
        return None if d is None else torch.device(d)

    try:
        return norm(planned_device) == norm(device) and planned_dtype == dtype
    except (RuntimeError, TypeError):
        return False


def _ended(path: str) -> CheckpointFileError:
    return CheckpointFileError(f"{path}: the load that asked for this file has ended (it failed or was interrupted)")


def _available_memory() -> int:
    """MemAvailable from /proc/meminfo in bytes (0 where unknown, which turns readahead off)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


_NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "lustre", "gpfs", "beegfs")


def _filesystem(path: str) -> tuple[str, str]:
    """(device, type) of the mount holding ``path``, from /proc/mounts; ("", "") where unknown."""
    try:
        real = os.path.realpath(path)
        with open("/proc/mounts", encoding="utf-8") as fh:
            mounts = [line.split()[:3] for line in fh if len(line.split()) >= 3]
    except OSError:
        return "", ""
    best = ("", "", "")
    for dev, point, fstype in mounts:
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best[1]):
            best = (dev, point, fstype)
    return best[0], best[2]


def choose_io(path: str, io: str, prefer_pread: bool) -> tuple[str, str]:
    """The I/O mode for one file and why: an explicit mode wins; `auto` uses pread where the caller asked for no
    mmap or the file is on FUSE or network storage (where mmap page faults are slow or unsafe), else mmap."""
    if io != "auto":
        return io, "HF_FASTLOAD_IO"
    if prefer_pread:
        return "pread", "disable_mmap=True"
    dev, fstype = _filesystem(path)
    if fstype.startswith("fuse") or fstype in _NETWORK_FS or dev == "hf-mount":
        return "pread", f"{fstype or dev} filesystem"
    return "mmap", "local filesystem"
