"""The device pipeline: checkpoint bytes streamed to an accelerator through a bounded ring of host buffers.

Example:
    ```python
    from hf_fastload.engine.context import LoadContext

    ctx = LoadContext(threads=8)
    f = ctx.open("model.safetensors")
    weight = ctx.materialize(f.get_slice("lm_head.weight"), device="cuda:0", dtype=torch.bfloat16)
    ctx.close()  # frees the staging buffers; the pinned ring stays with the process for the next load
    ```

Per tensor: the final tensor is allocated on the device (it owns its memory; nothing returned is a view into a
buffer that is reused), then each chunk of the stored bytes goes

    reader thread: take a free ring slot (waiting for its previous copy to finish: back-pressure)
                   -> ``pread`` (or ``O_DIRECT`` read) the chunk into the slot's host buffer
                   -> enqueue, on this thread's side stream, the host-to-device copy of the raw bytes, straight into
                      the final tensor, or into this thread's device staging buffer and then a conversion into the
                      final tensor (dtype conversion runs on the device, and gives the CPU's bits: see below)
                   -> record an event and hand the slot back with it

and the caller waits for its tensor's events before returning it. Reads of one chunk overlap the copies of the
chunks before it; several tensors (and several devices, each with its own ring) stream at once.

Stream order (what the CUDA caching allocator needs): the final tensor is allocated on the caller's current stream,
then an event is recorded there, and every side stream waits for that event before writing into the tensor; each
reader thread's staging buffer is allocated on its own side stream, which is the only stream that ever touches it.
A tensor is dropped only after its copies were waited for (also when a chunk fails).

The pieces: the host ring (:mod:`~hf_fastload.engine.ring`: made once per process and device, in the background),
the device operations (:mod:`~hf_fastload.engine.backends`: CUDA, or the CPU for ``HF_FASTLOAD_IO=direct``),
conversions with the CPU's bits, NaN payloads included (:mod:`~hf_fastload.engine.casting`), and, for tests and the
overlap benchmark, a stand-in device that checks the caching allocator's stream rule
(:mod:`~hf_fastload.engine.standin`).

Errors: a failed read or copy stops the tensor's other chunks (queued ones are cancelled, running ones finish), the
tensor's copies are waited for before its memory is dropped, later chunks of the same load stop early, and the error
propagates; :meth:`Pipeline.close` (called when the load ends, successful or not) waits for every copy and releases
the staging buffers (and the ring, unless it is kept for the next load).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future
from concurrent.futures import wait as wait_futures
from typing import Any

import torch

from ..errors import CheckpointFileError, FastLoadError, TruncatedSafetensorsError
from ..format.file import SafetensorsFile
from ..format.header import TensorInfo
from .backends import Backend
from .cpu import tensor_buffer
from .ring import ALIGN, Ring, Slot, ring_shape

__all__ = ["LoadAborted", "Pipeline"]

TENSORS_AT_ONCE = 4  # tensors transformers materializes at once (5.x's loader threads; 4.57's prefetch)


class LoadAborted(FastLoadError):
    """A chunk was skipped because another part of the same load had already failed."""


class Pipeline:
    """The ring, staging buffers and direct-I/O descriptors for one device within one load.

    Args:
        backend (`Backend`): the device's operations.
        submit (`Callable`): runs a chunk task on the engine's reader threads, returning a `Future`.
        threads (`int`): reader threads.
        budget (`int`): bytes of host ring memory (``HF_FASTLOAD_PINNED_MB``).
        aborted (`Callable[[], bool]`): true once the load has failed elsewhere.
        chunk (`int`, *optional*): bytes per chunk (``HF_FASTLOAD_CHUNK_MB``); by default 16 MiB, less where the
            ring would otherwise have fewer than two slots per reader thread.
    """

    def __init__(self, backend: Backend, submit, threads: int, budget: int, aborted=lambda: False,
                 chunk: int | None = None):  # fmt: skip
        self.backend = backend
        self.submit = submit
        self.aborted = aborted
        self.slot_bytes, self.nslots = ring_shape(threads, budget, chunk)
        self.chunk = self.slot_bytes
        self.pieces = max(1, -(-threads // TENSORS_AT_ONCE))
        # allocated in the background from now
        self.ring: Ring | None = backend.take_ring(self.slot_bytes, self.nslots)
        self.ring_note = ""  # how the ring was made (pinned, pageable, cut short), kept after close
        self._lock = threading.Lock()
        self._staging: dict[int, torch.Tensor] = {}  # reader thread -> its device staging buffer
        self._direct_fds: dict[str, int | None] = {}
        self.direct_notes: dict[str, str] = {}
        self.in_use = 0
        self.peak_in_use = 0
        self.tensors = 0  # tensors streaming now, and the most at once
        self.peak_tensors = 0
        self.closed = False

    def describe(self) -> str:
        ring = self.ring
        note = ring.note if ring is not None else self.ring_note
        size = f"{self.chunk >> 20} MiB" if self.chunk >= 1 << 20 else f"{self.chunk >> 10} KiB"
        return f"{self.backend.name} pipeline, ring {self.nslots} x {size}" + (f" {note}" if note else "")

    # -- the ring ---------------------------------------------------------------------------------------------------
    def _ring(self) -> Ring:
        with self._lock:
            if self.closed:
                raise LoadAborted("the load already finished; its device pipeline is closed")
            return self.ring

    def _stop(self) -> BaseException | None:
        if self.closed:
            return LoadAborted("the load has ended")
        if self.aborted():
            return LoadAborted("skipped: the load failed elsewhere")
        return None

    def _acquire(self, ring: Ring) -> Slot:
        slot = ring.acquire(self._stop)
        try:
            self.backend.wait(slot.event)
        except BaseException:
            ring.free.put(slot)  # the error sticks to the stream; the next user of the slot sees it too
            raise
        slot.event = None
        with self._lock:
            self.in_use += 1
            self.peak_in_use = max(self.peak_in_use, self.in_use)
        return slot

    def _release(self, ring: Ring, slot: Slot, event: Any) -> None:
        slot.event = event
        with self._lock:
            self.in_use -= 1
        ring.free.put(slot)

    def _staging_for(self, stream: Any) -> torch.Tensor:
        """This reader thread's device buffer for chunks converted on the device, allocated on its side stream (the
        only stream that uses it, so reuse by the next chunk is ordered by the stream itself)."""
        key = threading.get_ident()
        buf = self._staging.get(key)
        if buf is None:
            buf = self.backend.empty((self.chunk,), torch.uint8, stream=stream)
            with self._lock:
                if self.closed:
                    raise LoadAborted("the load has ended")
                self._staging[key] = buf
        return buf

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

    def _read(self, file: SafetensorsFile, info: TensorInfo, lo: int, n: int, slot: Slot) -> torch.Tensor:
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
        src_dtype = info.torch_dtype
        convert = dtype != src_dtype
        rule = backend.cast_rule(src_dtype, dtype) if convert else None  # tables made before the mark below
        out = backend.empty(info.shape, dtype)
        if info.nbytes == 0:
            return out
        ring = self._ring()
        size = src_dtype.itemsize
        out_flat = out.view(-1)
        out_bytes = out_flat.view(torch.uint8) if not convert else None
        room = self.chunk - (2 * ALIGN if file.io == "direct" else 0)  # a direct read widens to block boundaries
        # a tensor goes in at least `pieces` chunks (down to chunk / 16), so that the few tensors transformers asks
        # for at once keep every reader thread busy
        want = max(self.chunk // 16, -(-info.nbytes // self.pieces))
        step = max(size, min(room, want) // size * size)
        bounds = [(lo, min(lo + step, info.nbytes)) for lo in range(0, info.nbytes, step)]
        events: list[Any] = [None] * len(bounds)
        after = backend.mark()  # side streams write `out` only after its allocation on the caller's stream

        failed = threading.Event()  # set by the first chunk that fails: the tensor's other chunks read nothing more

        def chunk(i: int, lo: int, hi: int) -> None:
            if failed.is_set():
                raise LoadAborted("skipped: another chunk of this tensor failed")
            try:
                slot = self._acquire(ring)
            except BaseException:
                failed.set()
                raise
            stream = event = None
            try:
                started = time.perf_counter()
                host = self._read(file, info, lo, hi - lo, slot)
                backend.read_done(hi - lo, started)
                stream = backend.stream()
                if convert:
                    staged = self._staging_for(stream)[: hi - lo]
                    backend.copy(staged, host, stream, after)
                    backend.cast(out_flat[lo // size : hi // size], staged.view(src_dtype), stream, rule)
                else:
                    backend.copy(out_bytes[lo:hi], host, stream, after)
                event = backend.record(stream)
            except BaseException:
                failed.set()
                if event is None and stream is not None:  # a copy may be queued: `out` and the slot wait for it
                    try:
                        event = backend.record(stream)
                    except BaseException:  # noqa: BLE001 - no event: wait for the whole stream instead
                        with contextlib.suppress(BaseException):
                            backend.drain(stream)
                raise
            finally:
                events[i] = event
                self._release(ring, slot, event)

        with self._lock:
            self.tensors += 1
            self.peak_tensors = max(self.peak_tensors, self.tensors)
        try:
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
        finally:
            with self._lock:
                self.tensors -= 1
        return out

    def close(self) -> None:
        """Waits for every copy still in flight, then releases the staging buffers and direct descriptors, and
        hands the ring back to the backend (kept there for the next load on CUDA, released otherwise)."""
        with self._lock:
            self.closed = True
            ring, self.ring = self.ring, None
            fds, self._direct_fds = self._direct_fds, {}
            staging, self._staging = self._staging, {}
        if ring is not None:
            ring.settle()
            self.ring_note = ring.note
            self.backend.give_ring(ring)
        staging.clear()  # used only on their own side streams, whose copies the ring's events covered
        for fd in fds.values():
            if fd is not None:
                os.close(fd)
        if not self.backend.shared:
            self.backend.close()
