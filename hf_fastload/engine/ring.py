"""The host ring of a device pipeline: bounded host buffers (pinned on CUDA), allocated in the background.

Example:
    ```python
    from hf_fastload.engine.ring import Ring, pinned_budget, ring_shape

    slot_bytes, nslots = ring_shape(threads=8, budget=pinned_budget(), chunk=None)   # 16 MiB x 16
    ring = Ring(backend, slot_bytes, nslots)     # slots appear one by one, from a background thread
    slot = ring.acquire(stop=lambda: None)       # waits for a free slot (back-pressure)
    ```

A ring is made once per process and device and kept by its backend for later loads (``HF_FASTLOAD_PINNED_MB``,
``HF_FASTLOAD_CHUNK_MB``). A failed pinned allocation keeps the slots made so far (at least two), else the ring is
pageable; :attr:`Ring.note` says which, for the report.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from typing import Any

import torch

from ..errors import FastLoadError

__all__ = [
    "ALIGN", "DEFAULT_CHUNK", "DEFAULT_PINNED_MB", "Ring", "Slot", "aligned", "chunk_bytes", "pinned_budget",
    "ring_shape",
]  # fmt: skip

ALIGN = 4096  # O_DIRECT needs the buffer, the file offset and the length aligned to the logical block size
DEFAULT_CHUNK = 16 << 20
DEFAULT_PINNED_MB = 256


def _env_mb(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    try:
        mb = int(raw) if raw else default
    except ValueError:
        raise FastLoadError(f"{name}={raw!r} is not a whole number of MiB") from None
    if mb < 1:
        raise FastLoadError(f"{name}={raw!r} must be at least 1")
    return mb


def pinned_budget() -> int:
    """Bytes of host ring memory per device: ``HF_FASTLOAD_PINNED_MB`` (default 256)."""
    return _env_mb("HF_FASTLOAD_PINNED_MB", DEFAULT_PINNED_MB) << 20


def chunk_bytes() -> int | None:
    """``HF_FASTLOAD_CHUNK_MB`` in bytes, or None when unset (then the pipeline picks: see :class:`Pipeline`)."""
    if not os.environ.get("HF_FASTLOAD_CHUNK_MB", "").strip():
        return None
    return _env_mb("HF_FASTLOAD_CHUNK_MB", 1) << 20


def aligned(buf: torch.Tensor, nbytes: int) -> torch.Tensor:
    """``nbytes`` of ``buf`` (uint8, ``ALIGN`` bytes longer than needed) starting at an ``ALIGN``-aligned address."""
    skew = (-buf.data_ptr()) % ALIGN
    return buf[skew : skew + nbytes]


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def ring_shape(threads: int, budget: int, chunk: int | None) -> tuple[int, int]:
    """(slot bytes, slots) of a ring of ``budget`` bytes for ``threads`` reader threads.

    Slots are a power of two (torch's pinned allocator rounds every block up to one): ``chunk`` when given
    (``HF_FASTLOAD_CHUNK_MB``), else ``DEFAULT_CHUNK`` cut down so that every reader thread has two slots.
    """
    if chunk is None:
        chunk = min(DEFAULT_CHUNK, budget // max(2, 2 * threads))
    slot = max(ALIGN, _pow2_floor(max(1, chunk)))
    return slot, max(2, budget // slot)


class Slot:
    __slots__ = ("host", "event")

    def __init__(self, host: torch.Tensor):
        self.host = host
        self.event: Any = None  # the last copy out of this slot; it must finish before the slot is refilled


class Ring:
    """The host buffers of one device's pipeline: ``nslots`` slots of ``slot_bytes``, allocated one by one in a
    background thread (the first chunk waits for its slot, not for the whole ring)."""

    def __init__(self, backend: Any, slot_bytes: int, nslots: int):
        self.backend = backend
        self.slot_bytes, self.nslots = slot_bytes, nslots
        self.free: queue.Queue[Slot] = queue.Queue()
        self.slots: list[Slot] = []
        self.note = "pinned" if backend.name == "cuda" else "host"
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._allocate, name="hf_fastload-ring", daemon=True)
        self._thread.start()

    def _allocate(self) -> None:
        pageable = None
        try:
            for i in range(self.nslots):
                if self._stop:
                    break
                if pageable is None:
                    try:
                        host = self.backend.host_buffer(self.slot_bytes)
                    except (RuntimeError, MemoryError) as e:  # a failed cudaHostAlloc is a RuntimeError
                        if i >= 2:
                            self.note += f", cut to {i} of {self.nslots} slots (pinned allocation failed: {e})"
                            break
                        pageable = f"pageable (pinned allocation failed: {e})"
                        self.note = pageable
                if pageable is not None:
                    host = self.backend.pageable_buffer(self.slot_bytes)
                slot = Slot(host)
                self.slots.append(slot)
                self.free.put(slot)
        except BaseException as e:  # noqa: BLE001 - handed to the readers waiting for a slot
            self.error = e
        finally:
            self.done.set()

    def acquire(self, stop) -> Slot:
        """A free slot; raises ``stop()``'s error while waiting, or the allocation's error if no slot exists."""
        while True:
            error = stop()
            if error is not None:
                raise error
            try:
                return self.free.get(timeout=0.05)
            except queue.Empty:
                if self.done.is_set() and not self.slots and self.error is not None:
                    raise self.error from None

    def settle(self) -> list[Slot]:
        """Waits for the copies out of every free slot (called when the load's readers are done); the allocation
        goes on in the background if it has not finished."""
        slots = []
        while True:
            try:
                slots.append(self.free.get_nowait())
            except queue.Empty:
                break
        for slot in slots:
            with contextlib.suppress(BaseException):
                self.backend.wait(slot.event)
            slot.event = None
            self.free.put(slot)
        return slots

    def release(self) -> None:
        self._stop = True
        self._thread.join()
        for slot in self.slots:
            self.backend.free_host(slot.host.numel())
            slot.host = slot.event = None
        self.slots = []
        self.free = queue.Queue()
