"""The bytes path: turns a :class:`~hf_fastload.reader.TensorSlice` into the final tensor on its device and dtype.

Example:
    ```python
    from hf_fastload.engine import materialize
    from hf_fastload.reader import SafetensorsFile

    f = SafetensorsFile("model.safetensors", io="pread")
    weight = materialize(f.get_slice("lm_head.weight"), device="cpu", dtype=torch.float32)
    ```

Cases, all bit-identical to ``tensor.to(device, dtype)`` of the stored tensor:

- same dtype on the CPU with ``io="mmap"``: a zero-copy view of the file mapping (what stock transformers 5 returns);
- same dtype with ``io="pread"``: ``preadv`` straight into the tensor's own fresh memory;
- a dtype change on the CPU: converted chunk by chunk from the mapping into the final tensor, each chunk's source
  pages dropped from this process once converted (``MADV_DONTNEED``), so they never add up to a second copy of the
  model; with ``io="pread"``, read in chunks into a per-thread staging buffer and converted from there;
- another device: the CPU tensor, then one ``.to(device, dtype)``.

Every tensor that is not a zero-copy view owns its storage (``torch.empty``).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any

import torch

from .errors import CheckpointFileError, FastLoadError
from .reader import SafetensorsFile, TensorInfo, TensorSlice, tensor_buffer

__all__ = ["LoadContext", "alloc_cpu", "materialize", "settings"]

CHUNK_BYTES = 8 << 20
READAHEAD_CHUNK = 32 << 20
READAHEAD_THREADS = 8
IO_MODES = ("auto", "mmap", "pread", "direct")


def settings() -> dict[str, Any]:
    """The knobs, from the environment: ``HF_FASTLOAD_THREADS`` and ``HF_FASTLOAD_IO``."""
    threads = os.environ.get("HF_FASTLOAD_THREADS", "").strip()
    io = os.environ.get("HF_FASTLOAD_IO", "auto").strip().lower() or "auto"
    if io not in IO_MODES:
        from .errors import FastLoadError

        raise FastLoadError(f"HF_FASTLOAD_IO={io!r} is not one of {', '.join(IO_MODES)}")
    return {"threads": int(threads) if threads else min(8, max(2, os.cpu_count() or 2)), "io": io}


class LoadContext:
    """What one load reads, and how; shared by every thread that materializes a tensor of that load.

    Args:
        io (`str`): `"auto"`, `"mmap"` or `"pread"`; `"auto"` picks per file (see :func:`choose_io`).
        threads (`int`): reader threads.
        prefer_pread (`bool`): the caller asked for no mmap (`disable_mmap=True`).
    """

    def __init__(self, io: str = "auto", threads: int = 2, prefer_pread: bool = False):
        self.io = io
        self.threads = threads
        self.prefer_pread = prefer_pread
        self.lock = threading.Lock()
        self.files: dict[tuple[str, str], SafetensorsFile] = {}
        self.io_used: dict[str, str] = {}  # file -> "mode: why"
        self.bytes_read = 0
        self.tensors = 0
        self.zero_copy = 0
        self.methods: dict[str, int] = {}  # how tensors were made: zero-copy, pread, convert, ... -> count
        self.first: float | None = None
        self.last: float | None = None
        self.errors: list[BaseException] = []
        self.readahead_bytes = 0
        self._planned: dict[tuple[str, str], tuple[Any, torch.dtype | None]] = {}
        self.pipelines: dict[str, Any] = {}  # device -> stream.Pipeline, made on its first tensor
        self.closed = False  # set by close(): a task still running for a failed load opens nothing more
        self.active = 0  # tensors being materialized now; close() waits for them
        self._idle = threading.Condition(self.lock)

    def open(self, path: str | os.PathLike, device: Any = "cpu") -> SafetensorsFile:
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
        handle = SafetensorsFile(path, io=io, device=device)
        handle.context = self
        with self.lock:
            late = self.closed  # close() ran while this file was being opened, and did not see it
            fresh = not late and not any(h.path == handle.path for h in self.files.values())
            mine, handle = handle, handle if late else self.files.setdefault(key, handle)
            if not late:
                self.io_used.setdefault(handle.path, f"{io}: {why}")
        if mine is not handle or late:  # another thread opened it first: keep one descriptor
            mine.close()
        if late:
            raise _ended(path)
        if fresh:
            self._readahead(handle)
        return handle

    def _readahead(self, handle: SafetensorsFile) -> None:
        """Asks the kernel to start reading the whole file, from several threads at once.

        A cold file then arrives at the disk's parallel bandwidth instead of one readahead stream's (on this
        project's VM: 2.2 s for 2 GB with ``cat``, 1.3 s with 8 threads of ``POSIX_FADV_WILLNEED``); for a file
        already in the page cache the calls return at once. Skipped when the load would not fit in half of the
        available memory (it would evict its own pages), or with ``HF_FASTLOAD_READAHEAD=0``.
        """
        if not getattr(self, "readahead", True):  # off for tensor-parallel loads: each rank reads only its shards
            return
        if not hasattr(os, "posix_fadvise") or os.environ.get("HF_FASTLOAD_READAHEAD", "1").strip() == "0":
            return
        with self.lock:
            self.readahead_bytes += handle.size
            total = self.readahead_bytes
        if total > _available_memory() // 2:
            return
        fd = os.dup(handle._fd())  # our own descriptor, closed by whichever task finishes last
        offsets = list(range(0, handle.size, READAHEAD_CHUNK)) or [0]
        left = [len(offsets)]
        lock = threading.Lock()

        def advise(offset: int) -> None:
            try:
                os.posix_fadvise(fd, offset, min(READAHEAD_CHUNK, handle.size - offset), os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                with lock:
                    left[0] -= 1
                    done = left[0] == 0
                if done:
                    os.close(fd)

        pool = _get_pool("readahead", READAHEAD_THREADS)
        for offset in offsets:
            pool.submit(advise, offset)

    def materialize(self, ts: TensorSlice, device: Any = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        return materialize(ts, device, dtype)

    def plan(self, ts: TensorSlice, device: Any = None, dtype: torch.dtype | None = None) -> None:
        """Records where ``ts`` goes; the next ``ts[...]`` returns it on that device in that dtype (4.57's hook)."""
        with self.lock:
            self._planned[(ts.file.path, ts.info.name)] = (device, dtype)

    def take(self, ts: TensorSlice) -> torch.Tensor | None:
        """The planned tensor for ``ts`` (materialized now), or None when nothing was planned for it."""
        with self.lock:
            target = self._planned.pop((ts.file.path, ts.info.name), None)
        return None if target is None else materialize(ts, *target)

    def pipeline(self, device: torch.device, file: SafetensorsFile) -> Any:
        """The device pipeline (:mod:`hf_fastload.stream`) for tensors going to ``device``, or None where tensors
        take the CPU paths (a CPU target without ``HF_FASTLOAD_IO=direct``, or a device type without a backend)."""
        key = str(device)
        with self.lock:
            if key in self.pipelines:
                return self.pipelines[key]
        from . import stream

        backend = stream.backend_for(device, file.io)
        pipe = None
        if backend is not None:
            budget = stream.pinned_budget()
            pipe = stream.Pipeline(backend, _chunk_pool(self.threads).submit, self.threads, budget, self.failed)
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

    def record(self, info: TensorInfo, method: str, start: float) -> None:
        now = time.perf_counter()
        with self.lock:
            self.bytes_read += info.nbytes
            self.tensors += 1
            self.zero_copy += method == "zero-copy"
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

    def fail(self, error: BaseException) -> None:
        with self.lock:
            self.errors.append(error)


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


_pool_lock = threading.Lock()
_staging = threading.local()


_pools: dict[tuple[str, int], ThreadPoolExecutor] = {}


def _get_pool(kind: str, threads: int) -> ThreadPoolExecutor:
    with _pool_lock:
        pool = _pools.get((kind, threads))
        if pool is None:
            pool = _pools[(kind, threads)] = ThreadPoolExecutor(threads, thread_name_prefix=f"hf_fastload-{kind}")
        return pool


def _chunk_pool(threads: int) -> ThreadPoolExecutor:
    """Runs chunk reads and conversions; its tasks never wait on other tasks, so callers may block on them."""
    return _get_pool("chunk", threads)


def alloc_cpu(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor that owns its memory.

    Plain ``torch.empty``: on this project's 2-core VM (THP mode ``madvise``), backing outputs with transparent huge
    pages made first-touch faults 4-5x slower (3.7 GB: 5.4 s with ``MADV_HUGEPAGE`` vs 1.0-1.2 s without, measured
    2026-11-29), so the engine does not ask for them.
    """
    if 0 in shape:  # as safetensors makes it: torch.empty's strides overflow for shapes like (0, 2**40, 2**40)
        return torch.empty(0, dtype=dtype).reshape(shape)
    return torch.empty(shape, dtype=dtype)


def _convert_mapped(file: SafetensorsFile, info: TensorInfo, dtype: torch.dtype) -> torch.Tensor:
    """Converts from the file mapping chunk by chunk, dropping each chunk's source pages once it is converted, so the
    mapped file does not add up to a second copy of the model in this process's memory (stock peaks at 1.5x)."""
    out = alloc_cpu(info.shape, dtype)
    if info.numel == 0:
        return out
    src, dst = file.view(info).view(-1), out.view(-1)
    size = info.torch_dtype.itemsize
    step = max(1, CHUNK_BYTES // size)
    for lo in range(0, info.numel, step):
        hi = min(lo + step, info.numel)
        if file.context is not None:
            file.context.check_alive()
        file.check_size(info.start + hi * size, info.name)  # a page past a truncated end would be a SIGBUS
        dst[lo:hi].copy_(src[lo:hi])
        file.release(info, lo * size, hi * size)
    return out


def _staging_buffer() -> torch.Tensor:
    buf = getattr(_staging, "buf", None)
    if buf is None:
        buf = _staging.buf = torch.empty(CHUNK_BYTES, dtype=torch.uint8)
    return buf


def _read_chunk(file: SafetensorsFile, info: TensorInfo, out: memoryview, byte_offset: int) -> None:
    if file.context is not None:
        file.context.check_alive()
    file.read_into(info, out, byte_offset)


def _convert_chunk(file: SafetensorsFile, info: TensorInfo, out_flat: torch.Tensor, lo: int, hi: int) -> None:
    if file.context is not None:
        file.context.check_alive()
    src_dtype = info.torch_dtype
    size = src_dtype.itemsize
    staging = _staging_buffer()[: (hi - lo) * size]
    file.read_into(info, tensor_buffer(staging), lo * size)
    out_flat[lo:hi].copy_(staging.view(src_dtype))


def _wait_all(futures: list[Future]) -> None:
    """Waits for every chunk of one tensor. On the first failure, cancels the chunks not yet started and waits for
    those running (they write into the output tensor and their thread's staging buffer) before raising it, so that no
    task of a failed load is left behind in the persistent pool."""
    try:
        for f in futures:
            f.result()
    except BaseException:
        for f in futures:
            f.cancel()
        wait_futures(futures)
        raise


def _read_converted(file: SafetensorsFile, info: TensorInfo, dtype: torch.dtype, threads: int) -> torch.Tensor:
    out = alloc_cpu(info.shape, dtype)
    numel = info.numel
    if numel == 0:
        return out
    out_flat = out.view(-1)
    step = max(1, CHUNK_BYTES // info.torch_dtype.itemsize)
    bounds = [(lo, min(lo + step, numel)) for lo in range(0, numel, step)]
    if len(bounds) == 1:
        _convert_chunk(file, info, out_flat, *bounds[0])
        return out
    _wait_all([_chunk_pool(threads).submit(_convert_chunk, file, info, out_flat, lo, hi) for lo, hi in bounds])
    return out


def _read_same(file: SafetensorsFile, info: TensorInfo, threads: int) -> torch.Tensor:
    out = alloc_cpu(info.shape, info.torch_dtype)
    if info.nbytes == 0:
        return out
    buf = tensor_buffer(out)
    bounds = [(lo, min(lo + CHUNK_BYTES, info.nbytes)) for lo in range(0, info.nbytes, CHUNK_BYTES)]
    if len(bounds) == 1:
        file.read_into(info, buf, 0)
        return out
    _wait_all([_chunk_pool(threads).submit(_read_chunk, file, info, buf[lo:hi], lo) for lo, hi in bounds])
    return out


def materialize(ts: TensorSlice, device: Any = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The tensor behind ``ts`` on ``device`` (default CPU) in ``dtype`` (default: as stored), owned or zero-copy."""
    file, info = ts.file, ts.info
    ctx: LoadContext | None = getattr(file, "context", None)
    threads = ctx.threads if ctx is not None else settings()["threads"]
    start = time.perf_counter()
    target = torch.device(device) if device is not None else torch.device("cpu")
    if ctx is not None:
        ctx.begin()
    try:
        ts.check_readable()  # a tensor torch cannot hold (an F6 dtype) is refused when read, as safetensors does
        dtype = dtype or info.torch_dtype
        pipe = ctx.pipeline(target, file) if ctx is not None and target.type != "meta" else None
        if target.type == "meta":
            out, method = torch.empty(info.shape, dtype=dtype, device="meta"), "meta"
        elif pipe is not None:
            out = pipe.load(file, info, dtype)
            method = f"stream({pipe.backend.name}){'+cast' if dtype != info.torch_dtype else ''}"
        elif dtype != info.torch_dtype and file.io == "mmap":
            out, method = _convert_mapped(file, info, dtype), "convert"
        elif dtype != info.torch_dtype:
            out, method = _read_converted(file, info, dtype, threads), "pread+convert"
        elif file.io == "mmap":
            file.check_size(info.start + info.nbytes, info.name)  # a view of pages past the end would be a SIGBUS
            out, method = file.view(info), "zero-copy"
        else:
            out, method = _read_same(file, info, threads), "pread"
        if target.type not in ("cpu", "meta"):
            out, method = out.to(device=target), f"{method}+to({target.type})"
    except BaseException as e:
        if ctx is not None:
            ctx.fail(e)
        raise
    finally:
        if ctx is not None:
            ctx.end()
    if ctx is not None:
        ctx.record(info, method, start)
    return out
