"""The device operations a pipeline needs, per kind of device: :class:`CudaBackend`, :class:`HostBackend`.

Example:
    ```python
    import torch
    from hf_fastload.engine.backends import backend_for

    backend = backend_for(torch.device("cuda:0"), io="pread")   # one per device and process: streams, ring, tables
    out = backend.empty((4096, 4096), torch.bfloat16)
    ```

:class:`CudaBackend` holds the few CUDA calls (pinned memory, side streams, events, casts with the CPU's bits);
:class:`HostBackend` runs the same pipeline into CPU memory, synchronously (``HF_FASTLOAD_IO=direct`` on the CPU).
Tests route CPU loads through a stand-in device instead (:mod:`hf_fastload.engine.standin`, via
:func:`cpu_override`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch

from .casting import FLOATS, CastRule, cast_rule
from .ring import ALIGN, Ring, aligned, chunk_bytes, pinned_budget, ring_shape

__all__ = ["Backend", "CudaBackend", "HostBackend", "backend_for", "cpu_override", "resolve_device", "warm"]


def resolve_device(device: torch.device) -> torch.device:
    """``device`` with its index filled in where it has none (``cuda`` -> ``cuda:<current device>``), so that one
    load's ``"cuda"`` and ``"cuda:0"`` share one pipeline."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class Backend:
    """The device operations the pipeline needs. Events are opaque; ``None`` means "already done"."""

    name = "?"
    asynchronous = False
    shared = False  # made by someone else for several loads (a stand-in): they close it, not the pipeline
    keep_ring = False  # keep the host ring after a load, for the next one

    def __init__(self, device: torch.device):
        self.device = device
        self._ring_lock = threading.Lock()
        self._ring: Ring | None = None  # the ring kept for the next load

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, stream: Any = None) -> torch.Tensor:
        """A new tensor on the device, allocated on ``stream`` (default: the caller's current stream)."""
        return torch.empty(shape, dtype=dtype, device=self.device)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` of host memory (uint8), ``ALIGN``-aligned, for the ring (pinned where the device has it)."""
        return aligned(torch.empty(nbytes + ALIGN, dtype=torch.uint8), nbytes)

    def pageable_buffer(self, nbytes: int) -> torch.Tensor:
        """Plain host memory for the ring, when pinned memory cannot be had."""
        return Backend.host_buffer(self, nbytes)

    def stream(self) -> Any:
        return None

    def mark(self) -> Any:
        """An event on the caller's current stream, which side streams wait for before writing new memory."""
        return None

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: Any, after: Any = None) -> None:
        dst.copy_(src)

    def can_cast(self, src: torch.dtype, dst: torch.dtype) -> bool:
        """Whether chunks of ``src`` can be converted to ``dst`` on the device with the CPU's bits."""
        return True

    def cast_rule(self, src: torch.dtype, dst: torch.dtype) -> CastRule | None:
        """The conversion rule, ready on the device (None where the device's conversion is the CPU's)."""
        return None

    def cast(self, dst: torch.Tensor, src: torch.Tensor, stream: Any, rule: CastRule | None) -> None:
        dst.copy_(src)

    def record(self, stream: Any) -> Any:
        return None

    def wait(self, event: Any) -> None:
        pass

    def drain(self, stream: Any) -> None:
        """Blocks until everything queued on ``stream`` has run (where no event could be recorded)."""

    def read_done(self, nbytes: int, started: float) -> None:
        """Called by reader threads after each read (a stand-in simulates a read bandwidth here)."""

    def free_host(self, nbytes: int) -> None:
        """Called when a ring buffer of ``nbytes`` is dropped (for accounting; memory is freed when its last tensor
        goes)."""

    # -- the ring kept between loads --------------------------------------------------------------------------------
    def take_ring(self, slot_bytes: int, nslots: int) -> Ring:
        """The kept ring if it has this shape and is free, else a new one (allocated in the background)."""
        with self._ring_lock:
            ring, self._ring = self._ring, None
        if ring is not None and (ring.slot_bytes, ring.nslots) == (slot_bytes, nslots):
            return ring
        if ring is not None:
            ring.release()
        return Ring(self, slot_bytes, nslots)

    def give_ring(self, ring: Ring) -> None:
        """Takes a ring back after a load (its copies all finished): kept for the next load, or released."""
        if self.keep_ring:
            with self._ring_lock:
                if self._ring is None:
                    self._ring = ring
                    return
        ring.release()

    def drop_ring(self) -> None:
        with self._ring_lock:
            ring, self._ring = self._ring, None
        if ring is not None:
            ring.release()

    def close(self) -> None:
        self.drop_ring()


class HostBackend(Backend):
    """The CPU as the target: copies run at once in the reader thread."""

    name = "cpu"


class CudaBackend(Backend):
    """One CUDA device: pinned host memory, one side stream per reader thread, events for completion.

    One per device and process (:func:`backend_for`): its side streams, conversion tables and pinned ring serve
    every load.
    """

    name = "cuda"
    asynchronous = True
    shared = True
    keep_ring = True

    def __init__(self, device: torch.device):
        super().__init__(resolve_device(device))
        self._local = threading.local()

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, stream: Any = None) -> torch.Tensor:
        if stream is None:
            return torch.empty(shape, dtype=dtype, device=self.device)
        with torch.cuda.stream(stream):  # the block comes from (and returns to) this stream's pool
            return torch.empty(shape, dtype=dtype, device=self.device)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        # torch's pinned allocator rounds each block up to a power of two and returns page-aligned memory: ask for
        # exactly nbytes (a power of two) and only pad where the block is not aligned
        buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        if buf.data_ptr() % ALIGN == 0:
            return buf
        return aligned(torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=True), nbytes)

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

    def can_cast(self, src: torch.dtype, dst: torch.dtype) -> bool:
        return src in FLOATS and dst in FLOATS

    def cast_rule(self, src: torch.dtype, dst: torch.dtype) -> CastRule:
        return cast_rule(src, dst).on(self.device)

    def cast(self, dst: torch.Tensor, src: torch.Tensor, stream: Any, rule: CastRule | None) -> None:
        with torch.cuda.stream(stream):
            rule.apply(dst, src, _plain_cast)

    def record(self, stream: Any) -> Any:
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait(self, event: Any) -> None:
        if event is not None:
            event.synchronize()

    def drain(self, stream: Any) -> None:
        stream.synchronize()


def _plain_cast(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src)


_override_lock = threading.Lock()
_cpu_overrides: list[Backend] = []


@contextlib.contextmanager
def cpu_override(backend: Backend) -> Iterator[Backend]:
    """Routes CPU-target loads through the device pipeline with ``backend`` while the block runs (tests: the
    stand-in device of :mod:`hf_fastload.engine.standin`)."""
    with _override_lock:
        _cpu_overrides.append(backend)
    try:
        yield backend
    finally:
        with _override_lock:
            _cpu_overrides.remove(backend)


_cuda_lock = threading.Lock()
_cuda: dict[str, CudaBackend] = {}


def backend_for(device: torch.device, io: str) -> Backend | None:
    """The pipeline backend for tensors going to ``device`` with file I/O ``io``, or None for the plain path."""
    if device.type == "cuda":
        device = resolve_device(device)
        with _cuda_lock:
            backend = _cuda.get(str(device))
            if backend is None:
                backend = _cuda[str(device)] = CudaBackend(device)
        return backend
    if device.type == "cpu":
        with _override_lock:
            if _cpu_overrides:
                return _cpu_overrides[-1]
        if io == "direct":
            return HostBackend(device)
    return None


def warm(device: Any, threads: int) -> Backend | None:
    """Starts allocating ``device``'s host ring in the background (for a load that will stream to it), so that the
    pipeline of that load finds it ready. Returns the backend, or None where ``device`` takes no pipeline."""
    backend = backend_for(torch.device(device), "pread")
    if backend is not None and backend.keep_ring:
        slot_bytes, nslots = ring_shape(threads, pinned_budget(), chunk_bytes())
        backend.give_ring(backend.take_ring(slot_bytes, nslots))
    return backend
