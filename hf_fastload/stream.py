"""The device pipeline: checkpoint bytes streamed to an accelerator through a bounded ring of host buffers.

Example:
    ```python
    from hf_fastload.engine import LoadContext

    ctx = LoadContext(threads=8)
    f = ctx.open("model.safetensors")
    weight = ctx.materialize(f.get_slice("lm_head.weight"), device="cuda:0", dtype=torch.bfloat16)
    ctx.close()  # frees the ring's pinned memory and device staging buffers
    ```

Per tensor: the final tensor is allocated on the device (it owns its memory; nothing returned is a view into a
buffer that is reused), then each chunk of the stored bytes goes

    reader thread: take a free ring slot (waiting for its previous copy to finish: back-pressure)
                   -> ``pread`` (or ``O_DIRECT`` read) the chunk into the slot's host buffer
                   -> enqueue, on this thread's side stream, the host-to-device copy of the raw bytes, straight into
                      the final tensor, or into the slot's device staging buffer and then a cast kernel into the
                      final tensor (dtype conversion runs on the device, not the CPU)
                   -> record an event and hand the slot back with it

and the caller waits for its tensor's events before returning it. Reads of one chunk overlap the copies of the
chunks before it; several tensors (and several devices, each with its own ring) stream at once.

Everything above runs against a :class:`Backend`: :class:`CudaBackend` holds the few CUDA calls (pinned memory,
streams, events); :class:`HostBackend` runs the same pipeline into CPU memory, synchronously (used for
``HF_FASTLOAD_IO=direct`` on the CPU); :class:`StandInBackend` is a CPU "device" whose copies run asynchronously on
worker threads, with fault injection, so the ring, back-pressure, ordering and error paths are tested without a GPU
(:func:`standin` routes CPU loads through it).

Errors: a failed read or copy stops the tensor's other chunks (queued ones are cancelled, running ones finish), the
tensor's copies are waited for before its memory is dropped, later chunks of the same load stop early, and the error
propagates; :meth:`Pipeline.close` (called when the load ends, successful or not) releases every buffer.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, Future
from concurrent.futures import wait as wait_futures
from typing import Any

import torch

from .errors import CheckpointFileError, FastLoadError, TruncatedSafetensorsError
from .reader import SafetensorsFile, TensorInfo, tensor_buffer

__all__ = ["Backend", "CudaBackend", "HostBackend", "Pipeline", "StandInBackend", "backend_for", "standin"]

ALIGN = 4096  # O_DIRECT needs the buffer, the file offset and the length aligned to the logical block size
DEFAULT_CHUNK = 16 << 20
DEFAULT_PINNED_MB = 256


class LoadAborted(FastLoadError):
    """A chunk was skipped because another part of the same load had already failed."""


def pinned_budget() -> int:
    """Bytes of host ring memory per device: ``HF_FASTLOAD_PINNED_MB`` (default 256)."""
    raw = os.environ.get("HF_FASTLOAD_PINNED_MB", "").strip()
    try:
        mb = int(raw) if raw else DEFAULT_PINNED_MB
    except ValueError:
        raise FastLoadError(f"HF_FASTLOAD_PINNED_MB={raw!r} is not a whole number of MiB") from None
    if mb < 1:
        raise FastLoadError(f"HF_FASTLOAD_PINNED_MB={raw!r} must be at least 1")
    return mb << 20


def _aligned(buf: torch.Tensor, nbytes: int) -> torch.Tensor:
    """``nbytes`` of ``buf`` (uint8, ``ALIGN`` bytes longer than needed) starting at an ``ALIGN``-aligned address."""
    skew = (-buf.data_ptr()) % ALIGN
    return buf[skew : skew + nbytes]


class Backend:
    """The device operations the pipeline needs. Events are opaque; ``None`` means "already done"."""

    name = "?"
    asynchronous = False
    shared = False  # made by someone else for several loads (a stand-in): they close it, not the pipeline

    def __init__(self, device: torch.device):
        self.device = device

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` of host memory (uint8), ``ALIGN``-aligned, for the ring."""
        return _aligned(torch.empty(nbytes + ALIGN, dtype=torch.uint8), nbytes)

    def stream(self) -> Any:
        return None

    def mark(self) -> Any:
        """An event on the caller's current stream, which side streams wait for before writing new memory."""
        return None

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: Any, after: Any = None) -> None:
        dst.copy_(src)

    def record(self, stream: Any) -> Any:
        return None

    def wait(self, event: Any) -> None:
        pass

    def free_host(self, nbytes: int) -> None:
        """Called when a ring of ``nbytes`` from :meth:`host_buffer` is dropped (for accounting; memory is freed
        when its last tensor goes)."""

    def close(self) -> None:
        pass


class HostBackend(Backend):
    """The CPU as the target: copies run at once in the reader thread."""

    name = "cpu"


class CudaBackend(Backend):
    """One CUDA device: pinned host memory, one side stream per reader thread, events for completion."""

    name = "cuda"
    asynchronous = True

    def __init__(self, device: torch.device):
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        super().__init__(device)
        self._local = threading.local()

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return _aligned(torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=True), nbytes)

    def stream(self) -> Any:
        s = getattr(self._local, "stream", None)
        if s is None:
            s = self._local.stream = torch.cuda.Stream(self.device)
        return s

    def mark(self) -> Any:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: Any, after: Any = None) -> None:
        if after is not None:
            stream.wait_event(after)
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def record(self, stream: Any) -> Any:
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait(self, event: Any) -> None:
        if event is not None:
            event.synchronize()


class _Worker:
    """A stand-in stream: a thread running queued copies in order; an error sticks to every later event."""

    def __init__(self, backend: StandInBackend):
        self.backend = backend
        self.jobs: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="hf_fastload-standin-stream", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            kind, payload = job
            if kind == "event":
                payload[1] = self.error
                payload[0].set()
                continue
            if self.error is None:
                try:
                    self.backend._run_copy(*payload)
                except BaseException as e:  # noqa: BLE001 - it is handed to whoever waits
                    self.error = e


class StandInBackend(Backend):
    """A CPU "device" that behaves like an accelerator for the pipeline's sake.

    Copies run asynchronously on one worker thread per stream; events complete when the worker reaches them; an
    error in a copy surfaces from :meth:`wait`. Faults can be injected:

    Args:
        device (`str`): where tensors really live (`"cpu"`).
        delay (`float`): seconds each copy sleeps first (makes the ring fill up).
        oom_after_bytes (`int`, *optional*): :meth:`empty` raises `torch.OutOfMemoryError` once this many bytes
            of tensors have been allocated.
        fail_copy_at (`int`, *optional*): the copy with this number (0-based, over the backend's life) raises.
    """

    name = "standin"
    asynchronous = True
    shared = True

    def __init__(self, device: str = "cpu", delay: float = 0.0, oom_after_bytes: int | None = None,
                 fail_copy_at: int | None = None):  # fmt: skip
        super().__init__(torch.device(device))
        self.delay = delay
        self.oom_after_bytes = oom_after_bytes
        self.fail_copy_at = fail_copy_at
        self.lock = threading.Lock()
        self.allocated = 0
        self.copies = 0
        self.host_bytes = 0
        self.host_live = 0  # host ring bytes not yet released (buffers are freed when their pipeline closes)
        self.streams: list[_Worker] = []
        self._local = threading.local()

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * dtype.itemsize
        with self.lock:
            if self.oom_after_bytes is not None and self.allocated + nbytes > self.oom_after_bytes:
                raise torch.OutOfMemoryError(
                    f"stand-in device out of memory: {nbytes} bytes asked, {self.allocated} of "
                    f"{self.oom_after_bytes} in use"
                )
            self.allocated += nbytes
        return super().empty(shape, dtype)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        with self.lock:
            self.host_bytes += nbytes
            self.host_live += nbytes
        return super().host_buffer(nbytes)

    def free_host(self, nbytes: int) -> None:
        with self.lock:
            self.host_live -= nbytes

    def stream(self) -> Any:
        w = getattr(self._local, "stream", None)
        if w is None:
            w = self._local.stream = _Worker(self)
            with self.lock:
                self.streams.append(w)
        return w

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: Any, after: Any = None) -> None:
        stream.jobs.put(("copy", (dst, src)))

    def _run_copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        with self.lock:
            n = self.copies
            self.copies += 1
        if self.delay:
            threading.Event().wait(self.delay)
        if self.fail_copy_at is not None and n == self.fail_copy_at:
            raise RuntimeError(f"stand-in device: injected failure in copy {n}")
        dst.copy_(src)

    def record(self, stream: Any) -> Any:
        event = [threading.Event(), None]
        stream.jobs.put(("event", event))
        return event

    def wait(self, event: Any) -> None:
        if event is None:
            return
        event[0].wait()
        if event[1] is not None:
            raise RuntimeError(f"stand-in device: an earlier copy on this stream failed: {event[1]}") from event[1]

    def close(self) -> None:
        with self.lock:
            workers, self.streams = self.streams, []
        for w in workers:
            w.jobs.put(None)
        for w in workers:
            w.thread.join()
        self._local = threading.local()


_standin_lock = threading.Lock()
_standin: list[StandInBackend] = []


@contextlib.contextmanager
def standin(backend: StandInBackend | None = None) -> Iterator[StandInBackend]:
    """Routes CPU-target loads through the device pipeline with a :class:`StandInBackend` while the block runs.

    For tests: the whole pipeline (ring, back-pressure, asynchronous copies, device-side casts, error paths) runs
    and its results can be compared bit for bit with stock loads, without a GPU.
    """
    backend = backend or StandInBackend()
    with _standin_lock:
        _standin.append(backend)
    try:
        yield backend
    finally:
        with _standin_lock:
            _standin.remove(backend)
        backend.close()


def backend_for(device: torch.device, io: str) -> Backend | None:
    """The pipeline backend for tensors going to ``device`` with file I/O ``io``, or None for the plain path."""
    if device.type == "cuda":
        return CudaBackend(device)
    if device.type == "cpu":
        with _standin_lock:
            if _standin:
                return _standin[-1]
        if io == "direct":
            return HostBackend(device)
    return None


class _Slot:
    __slots__ = ("host", "staging", "event")

    def __init__(self, host: torch.Tensor):
        self.host = host
        self.staging: torch.Tensor | None = None  # device buffer for chunks that are cast on the device
        self.event: Any = None  # the last copy out of this slot; it must finish before the slot is refilled


class Pipeline:
    """The ring, staging buffers and direct-I/O descriptors for one device within one load.

    Args:
        backend (`Backend`): the device's operations.
        submit (`Callable`): runs a chunk task on the engine's reader threads, returning a `Future`.
        threads (`int`): reader threads (the ring gets at least two slots per thread).
        budget (`int`): bytes of host ring memory (``HF_FASTLOAD_PINNED_MB``).
        aborted (`Callable[[], bool]`): true once the load has failed elsewhere.
    """

    def __init__(self, backend: Backend, submit, threads: int, budget: int, aborted=lambda: False):
        self.backend = backend
        self.submit = submit
        self.aborted = aborted
        self.chunk = max(ALIGN, min(DEFAULT_CHUNK, budget // max(2, 2 * threads)) // ALIGN * ALIGN)
        self.slot_bytes = self.chunk + 2 * ALIGN  # room to widen a read to block boundaries for O_DIRECT
        self.nslots = max(2, (budget - ALIGN) // self.slot_bytes)  # one allocation that stays inside the budget
        self._host: torch.Tensor | None = None
        self._free: queue.Queue[_Slot] = queue.Queue()
        self._lock = threading.Lock()
        self._direct_fds: dict[str, int | None] = {}
        self.direct_notes: dict[str, str] = {}
        self.in_use = 0
        self.peak_in_use = 0
        self.closed = False

    def describe(self) -> str:
        return f"{self.backend.name} pipeline, ring {self.nslots} x {self.chunk / 2**20:g} MiB"

    # -- the ring ---------------------------------------------------------------------------------------------------
    def _ring(self) -> None:
        with self._lock:
            if self._host is not None:
                return
            if self.closed:
                raise LoadAborted("the load already finished; its device pipeline is closed")
            self._host = self.backend.host_buffer(self.nslots * self.slot_bytes)
            for i in range(self.nslots):
                self._free.put(_Slot(self._host[i * self.slot_bytes : (i + 1) * self.slot_bytes]))

    def _acquire(self) -> _Slot:
        while True:
            if self.aborted() or self.closed:
                raise LoadAborted("skipped: the load failed elsewhere" if not self.closed else "the load has ended")
            try:
                slot = self._free.get(timeout=0.05)
                break
            except queue.Empty:
                continue
        try:
            self.backend.wait(slot.event)
        except BaseException:
            self._free.put(slot)  # the error sticks to the stream; the next user of the slot sees it too
            raise
        slot.event = None
        with self._lock:
            self.in_use += 1
            self.peak_in_use = max(self.peak_in_use, self.in_use)
        return slot

    def _release(self, slot: _Slot, event: Any) -> None:
        slot.event = event
        with self._lock:
            self.in_use -= 1
        self._free.put(slot)

    # -- reads ------------------------------------------------------------------------------------------------------
    def direct_fd(self, file: SafetensorsFile) -> int | None:
        """An ``O_DIRECT`` descriptor for ``file``, or None where the filesystem refuses it (then ``pread``)."""
        with self._lock:
            if file.path in self._direct_fds:
                return self._direct_fds[file.path]
        fd, note = None, "direct: O_DIRECT reads that bypass the page cache"
        if not hasattr(os, "O_DIRECT"):
            note = "pread: this platform has no O_DIRECT"
        else:
            try:
                fd = os.open(file.path, os.O_RDONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
            except OSError as e:
                note = f"pread: O_DIRECT refused by the filesystem ({e.strerror or e})"
        with self._lock:
            if file.path in self._direct_fds:  # another thread won the race
                if fd is not None:
                    os.close(fd)
                return self._direct_fds[file.path]
            self._direct_fds[file.path] = fd
            self.direct_notes[file.path] = note
        return fd

    def _read(self, file: SafetensorsFile, info: TensorInfo, lo: int, n: int, slot: _Slot) -> torch.Tensor:
        """Bytes ``[lo, lo + n)`` of ``info``'s data in the slot's host buffer (a uint8 CPU tensor of length n)."""
        fd = self.direct_fd(file) if file.io == "direct" else None
        if fd is None:
            out = slot.host[:n]
            file.read_into(info, tensor_buffer(out), lo)
            return out
        begin = info.start + lo
        first = begin // ALIGN * ALIGN
        skew = begin - first
        want = -(-(skew + n) // ALIGN) * ALIGN
        buf = tensor_buffer(slot.host[:want])
        done = 0
        while done < skew + n:
            try:
                got = os.preadv(fd, [buf[done:]], first + done)
            except OSError as e:
                raise CheckpointFileError.matching(
                    f"cannot read {file.path} (tensor {info.name!r}) with O_DIRECT at offset {first + done}: {e}", e
                ) from e
            if got == 0:
                raise TruncatedSafetensorsError(
                    f"truncated safetensors file {file.path}: tensor {info.name!r} needs bytes up to offset "
                    f"{begin + n}, the file ended at {first + done}"
                )
            done += got
        return slot.host[skew : skew + n]

    # -- tensors ----------------------------------------------------------------------------------------------------
    def load(self, file: SafetensorsFile, info: TensorInfo, dtype: torch.dtype) -> torch.Tensor:
        """``info``'s tensor on the backend's device in ``dtype``, in memory of its own."""
        backend = self.backend
        out = backend.empty(info.shape, dtype)
        if info.nbytes == 0:
            return out
        self._ring()
        src_dtype = info.torch_dtype
        size = src_dtype.itemsize
        convert = dtype != src_dtype
        out_flat = out.view(-1)
        out_bytes = out_flat.view(torch.uint8) if not convert else None
        step = max(size, self.chunk // size * size)
        bounds = [(lo, min(lo + step, info.nbytes)) for lo in range(0, info.nbytes, step)]
        events: list[Any] = [None] * len(bounds)
        after = backend.mark()

        failed = threading.Event()  # set by the first chunk that fails: the tensor's other chunks read nothing more

        def chunk(i: int, lo: int, hi: int) -> None:
            if failed.is_set():
                raise LoadAborted("skipped: another chunk of this tensor failed")
            try:
                slot = self._acquire()
            except BaseException:
                failed.set()
                raise
            event = stream = None
            try:
                host = self._read(file, info, lo, hi - lo, slot)
                stream = backend.stream()
                if convert:
                    if slot.staging is None:
                        slot.staging = backend.empty((self.chunk,), torch.uint8)
                    staged = slot.staging[: hi - lo]
                    backend.copy(staged, host, stream, after)
                    backend.copy(out_flat[lo // size : hi // size], staged.view(src_dtype), stream)
                else:
                    backend.copy(out_bytes[lo:hi], host, stream, after)
                event = events[i] = backend.record(stream)
            except BaseException:
                failed.set()
                raise
            finally:
                if event is None and stream is not None:  # a copy may be queued: the slot waits for it
                    with contextlib.suppress(BaseException):
                        event = backend.record(stream)
                self._release(slot, event)

        futures: list[Future] = [self.submit(chunk, i, lo, hi) for i, (lo, hi) in enumerate(bounds)]
        try:
            wait_futures(futures, return_when=FIRST_EXCEPTION)  # a failure is seen at once, not in chunk order
            for f in futures:
                f.result()
            for event in events:
                backend.wait(event)
        except BaseException:
            for f in futures:
                f.cancel()
            wait_futures(futures)  # the running chunks finish; nothing writes into `out` after we drop it
            for event in events:
                with contextlib.suppress(BaseException):
                    backend.wait(event)
            first = next((f.exception() for f in futures if not f.cancelled() and f.exception() is not None
                          and not isinstance(f.exception(), LoadAborted)), None)  # fmt: skip
            if first is not None:
                raise first from None  # the chunk's own error, not a sibling's "skipped"
            raise
        return out

    def close(self) -> None:
        """Waits for every copy still in flight, then frees the ring, the staging buffers and direct descriptors."""
        with self._lock:
            self.closed = True
            host, self._host = self._host, None
            fds, self._direct_fds = self._direct_fds, {}
        slots = []
        while True:
            try:
                slots.append(self._free.get_nowait())
            except queue.Empty:
                break
        for slot in slots:
            with contextlib.suppress(BaseException):
                self.backend.wait(slot.event)
            slot.staging = slot.host = slot.event = None
        for fd in fds.values():
            if fd is not None:
                os.close(fd)
        if host is not None:
            self.backend.free_host(host.numel())
        if not self.backend.shared:
            self.backend.close()
