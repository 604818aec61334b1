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

Conversions equal the CPU's: stock's blocking ``.to(device, dtype)`` converts on the CPU, whose NaN bits differ from
a GPU's (fp32 -> bf16 NaN is 0xFFFF with AVX2/AVX-512 and 0x7FC0 without, CUDA's ``cvt.rn.bf16.f32`` gives 0x7FFF;
fp16 -> fp32 quiets NaNs on the CPU). :class:`CastRule` holds the CPU's answer, computed once per process with the
CPU's own ``.to()``: the whole table for 16-bit sources (65536 patterns; the device then converts by table lookup),
and for fp32 sources the NaN results (the device converts with round-to-nearest-even as the CPU does, then NaNs
are rewritten from the table). So a device load is bit-identical to stock, NaN payloads included.

The host ring (``HF_FASTLOAD_PINNED_MB``, pinned on CUDA) is made once per process and device and reused by later
loads; it is allocated slot by slot in a background thread, so the first chunk waits for one slot, not the ring. A
failed pinned allocation keeps the slots made so far (at least two), else the ring is pageable; the report says
which. A second load running at the same time on the same device gets a ring of its own (waiting could deadlock a
load nested in another), which is dropped when that load ends.

Everything above runs against a :class:`Backend`: :class:`CudaBackend` holds the few CUDA calls (pinned memory,
streams, events); :class:`HostBackend` runs the same pipeline into CPU memory, synchronously (used for
``HF_FASTLOAD_IO=direct`` on the CPU); :class:`StandInBackend` is a CPU "device" whose copies run asynchronously on
worker threads and which checks the caching allocator's stream rule, models CUDA's NaN conversions, simulates copy
and read bandwidths and injects faults, so the ring, back-pressure, ordering and error paths are tested without a
GPU (:func:`standin` routes CPU loads through it).

Errors: a failed read or copy stops the tensor's other chunks (queued ones are cancelled, running ones finish), the
tensor's copies are waited for before its memory is dropped, later chunks of the same load stop early, and the error
propagates; :meth:`Pipeline.close` (called when the load ends, successful or not) waits for every copy and releases
the staging buffers (and the ring, unless it is kept for the next load).
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, Future
from concurrent.futures import wait as wait_futures
from typing import Any

import torch

from ..errors import CheckpointFileError, FastLoadError
from ..format.file import SafetensorsFile
from ..format.header import TensorInfo
from .cpu import tensor_buffer

__all__ = [
    "Backend", "CastRule", "CudaBackend", "HostBackend", "Pipeline", "StandInBackend", "StreamOrderError",
    "backend_for", "cast_rule", "chunk_bytes", "pinned_budget", "resolve_device", "standin", "warm",
]  # fmt: skip

ALIGN = 4096  # O_DIRECT needs the buffer, the file offset and the length aligned to the logical block size
DEFAULT_CHUNK = 16 << 20
DEFAULT_PINNED_MB = 256
TENSORS_AT_ONCE = 4  # tensors transformers materializes at once (5.x's loader threads; 4.57's prefetch)


class LoadAborted(FastLoadError):
    """A chunk was skipped because another part of the same load had already failed."""


class StreamOrderError(RuntimeError):
    """The stand-in device saw device memory used on a stream that is not ordered after its allocation, or freed
    while another stream may still use it (what the CUDA caching allocator turns into silent corruption)."""


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


def resolve_device(device: torch.device) -> torch.device:
    """``device`` with its index filled in where it has none (``cuda`` -> ``cuda:<current device>``), so that one
    load's ``"cuda"`` and ``"cuda:0"`` share one pipeline."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _aligned(buf: torch.Tensor, nbytes: int) -> torch.Tensor:
    """``nbytes`` of ``buf`` (uint8, ``ALIGN`` bytes longer than needed) starting at an ``ALIGN``-aligned address."""
    skew = (-buf.data_ptr()) % ALIGN
    return buf[skew : skew + nbytes]


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


# -- conversions that give the CPU's bits -----------------------------------------------------------------------------
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
_MANTISSA = {torch.bfloat16: 7, torch.float16: 10}


class CastRule:
    """How a device converts ``src`` to ``dst`` so that the result equals the CPU's ``.to(dst)`` bit for bit.

    Built once per process on the CPU, with the CPU's own conversion (so it follows the CPU kernel that stock uses
    on this machine: AVX-512, AVX2 or scalar). Attributes:

    - ``table``: for 16-bit sources, the bits of ``src.to(dst)`` for all 65536 source patterns; the device converts
      by looking each element up (exact for every value, NaN payloads included);
    - for fp32 sources, the device converts with its own round-to-nearest-even (the same as the CPU's for every
      number), then rewrites NaNs: to ``nan_const`` where the CPU gives one pattern for every NaN (x86: 0xFFFF for
      bf16), else from ``nan_table``, indexed by the sign and the top ``nan_keep`` mantissa bits (x86 fp16: the
      payload is truncated and quieted). Which of these holds is read off the CPU's results for every sign and top
      bits with 16 low-bit patterns each (the rounding boundaries and random ones); where the low bits matter, the
      table holds all 2^24 NaNs.
    """

    def __init__(self, src: torch.dtype, dst: torch.dtype):
        self.src, self.dst = src, dst
        self.table: torch.Tensor | None = None
        self.nan_const: int | None = None
        self.nan_table: torch.Tensor | None = None
        self.nan_keep = 23
        self._on: dict[str, CastRule] = {}
        self._lock = threading.Lock()
        out_bits = _BITS[dst.itemsize]
        if src.itemsize == 2:
            patterns = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
            table = patterns.view(src).to(dst).view(out_bits)
            # index = pattern & 0xFFFF: rotate so that entry i belongs to pattern i
            self.table = torch.cat([table[1 << 15 :], table[: 1 << 15]])
            return
        keep = _MANTISSA[dst]
        drop = 23 - keep
        # every sign and top-`keep` mantissa bits, with low bits at the rounding boundaries and a few random ones
        g = torch.Generator().manual_seed(0)
        lows = torch.tensor([0, 1, 2, (1 << (drop - 1)) - 1, 1 << (drop - 1), (1 << (drop - 1)) + 1, (1 << drop) - 1])
        lows = torch.cat([lows, torch.randint(0, 1 << drop, (9,), generator=g)]).to(torch.int32)
        top = torch.arange(1 << keep, dtype=torch.int32).view(-1, 1) << drop
        mantissa = (top | lows.view(1, -1)).view(1, 1 << keep, -1)
        sign = torch.tensor([0, -(1 << 31)], dtype=torch.int32).view(2, 1, 1)
        bits = (mantissa | sign | 0x7F800000).clone()
        bits[:, 0, 0] |= 1  # mantissa 0 would be an infinity
        sample = bits.view(torch.float32).to(dst).view(out_bits).to(torch.int32) & ((1 << (8 * dst.itemsize)) - 1)
        first = int(sample[0, 0, 0])
        if bool((sample == first).all()):
            self.nan_const = first  # the CPU gives one pattern for every NaN
        elif bool((sample == sample[:, :, :1]).all()):
            self.nan_keep, self.nan_table = keep, sample[:, :, 0].reshape(-1).to(out_bits)  # sign and top bits
        else:  # the CPU's NaN depends on low mantissa bits too: the whole table (2^24 entries, built once)
            mantissa = torch.arange(1 << 23, dtype=torch.int32)
            nans = []
            for sign_bit in (0, -(1 << 31)):
                bits = mantissa | 0x7F800000 | sign_bit
                bits[0] |= 1
                nans.append(bits.view(torch.float32).to(dst).view(out_bits))
            self.nan_table = torch.cat(nans)

    def on(self, device: torch.device) -> CastRule:
        """This rule with its tables on ``device`` (copied once per device, from the calling thread)."""
        key = str(device)
        with self._lock:
            bound = self._on.get(key)
            if bound is None:
                bound = CastRule.__new__(CastRule)
                bound.__dict__.update(self.__dict__)
                for name in ("table", "nan_table"):
                    t = getattr(self, name)
                    if t is not None:
                        setattr(bound, name, t.to(device))
                bound._on = {}
                self._on[key] = bound
        return bound

    def apply(self, dst: torch.Tensor, src: torch.Tensor, device_cast) -> None:
        """``dst`` (1-D, ``self.dst``) = ``src`` (1-D, ``self.src``) as the CPU converts it; runs on the tensors'
        device and current stream. ``device_cast(dst, src)`` is the device's own conversion (fp32 sources)."""
        out_bits = dst.view(_BITS[self.dst.itemsize])
        if self.table is not None:
            index = src.view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF)
            torch.index_select(self.table, 0, index, out=out_bits)
            return
        device_cast(dst, src)
        nan = torch.isnan(src)
        if self.nan_const is not None:
            c = self.nan_const
            out_bits.masked_fill_(nan, c - (1 << 16) if c >= 1 << 15 else c)
            return
        bits = src.view(torch.int32)
        index = (bits >> (23 - self.nan_keep)).bitwise_and_((1 << self.nan_keep) - 1)
        index.bitwise_or_((bits >> 31).bitwise_and_(1).bitwise_left_shift_(self.nan_keep))
        fixed = torch.index_select(self.nan_table, 0, index)
        torch.where(nan, fixed, out_bits, out=out_bits)


@functools.cache
def cast_rule(src: torch.dtype, dst: torch.dtype) -> CastRule:
    """The process's :class:`CastRule` for ``src`` -> ``dst`` (both among float32, bfloat16, float16)."""
    if src not in _FLOATS or dst not in _FLOATS or src == dst:
        raise ValueError(f"no device conversion rule for {src} -> {dst}")
    return CastRule(src, dst)


# -- backends ---------------------------------------------------------------------------------------------------------
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
        return _aligned(torch.empty(nbytes + ALIGN, dtype=torch.uint8), nbytes)

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

    def can_cast(self, src: torch.dtype, dst: torch.dtype) -> bool:
        return src in _FLOATS and dst in _FLOATS

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


# -- the stand-in device ----------------------------------------------------------------------------------------------
class _Stream:
    """A stand-in stream. ``clock`` counts what was queued on it; ``waited[s]`` is the position of stream ``s`` this
    stream is ordered after (by an event it waited for); ``synced`` the position the host has waited for."""

    def __init__(self, backend: StandInBackend, name: str, worker: bool):
        self.backend = backend
        self.name = name
        self.clock = 0
        self.waited: dict[_Stream, int] = {}
        self.synced = 0
        self.jobs: queue.Queue | None = None
        self.error: BaseException | None = None
        self.busy = 0  # jobs queued or running
        if worker:
            self.jobs = queue.Queue()
            self.thread = threading.Thread(target=self._run, name="hf_fastload-standin-stream", daemon=True)
            self.thread.start()

    def __repr__(self) -> str:
        return f"<stand-in stream {self.name}>"

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            kind, payload = job
            try:
                if kind == "event":
                    payload.error = self.error
                    payload.done.set()
                elif self.error is None:
                    try:
                        payload()
                    except BaseException as e:  # noqa: BLE001 - it sticks to the stream, as a CUDA error does
                        self.error = e
            finally:
                with self.backend.lock:
                    self.busy -= 1

    def put(self, kind: str, payload: Any) -> None:
        with self.backend.lock:
            self.busy += 1
        self.jobs.put((kind, payload))


class _Event:
    __slots__ = ("stream", "pos", "done", "error")

    def __init__(self, stream: _Stream, pos: int, done: bool):
        self.stream, self.pos, self.error = stream, pos, None
        self.done = threading.Event()
        if done:
            self.done.set()


class _Block:
    __slots__ = ("stream", "pos", "uses", "recorded", "what")

    def __init__(self, stream: _Stream, pos: int, what: str):
        self.stream, self.pos, self.what = stream, pos, what
        self.uses: dict[_Stream, int] = {}
        self.recorded: set[_Stream] = set()


class _Weak:
    """A device tensor held by a queued stand-in job without keeping its block alive (a CUDA stream holds no
    reference either): a block freed before its queued work ran is a detected error, not a kept block."""

    __slots__ = ("ref", "offset", "shape", "stride", "dtype")

    def __init__(self, t: torch.Tensor):
        self.ref = weakref.ref(t.untyped_storage())
        self.offset, self.shape, self.stride, self.dtype = t.storage_offset(), t.shape, t.stride(), t.dtype

    def get(self) -> torch.Tensor | None:
        storage = self.ref()
        if storage is None:
            return None
        return torch.empty(0, dtype=self.dtype).set_(storage, self.offset, self.shape, self.stride)


class StandInBackend(Backend):
    """A CPU "device" that behaves like a CUDA device for the pipeline's sake.

    Copies and conversions run asynchronously on one worker thread per side stream; events complete when the worker
    reaches them; an error in a copy sticks to its stream and surfaces from :meth:`wait`. It also models

    - the CUDA caching allocator's stream rule: a block allocated on stream A may be handed out while work queued on
      A before it was freed still runs, so a use on stream B must be ordered after the allocation (B waited for an
      event recorded on A at or after it), and a block used on B must not be freed before the host waited for that
      use (or ``record_stream``); breaking either raises or records a :class:`StreamOrderError`
      (:func:`standin` raises the recorded ones when its block ends);
    - CUDA's conversions: NaNs come out as the canonical NaN (0x7FFF, 0x7FFFFFFF), as ``cvt.rn`` gives them
      (``nan="cpu"`` keeps the CPU's);
    - bandwidths: ``copy_gbps`` is shared by all streams (one link), each copy also waits ``copy_latency``; reads
      share ``read_gbps`` (the disk or page cache) and one thread reads at most ``read_thread_gbps`` (a memory
      copy). Real bytes move too, so results stay bit-identical; the real work hides inside the simulated time.

    Args:
        device (`str`): where tensors really live (`"cpu"`).
        delay (`float`): seconds each copy sleeps first (makes the ring fill up).
        oom_after_bytes (`int`, *optional*): :meth:`empty` raises `torch.OutOfMemoryError` once this many bytes
            of tensors have been allocated.
        fail_copy_at (`int`, *optional*): the copy with this number (0-based, over the backend's life) raises.
        fail_record_at (`int`, *optional*): the event record with this number raises (after its copy was queued).
        pinned_fail_after (`int`, *optional*): host (pinned) buffers after this many fail, as a failed
            ``cudaHostAlloc`` does.
        copy_gbps, read_gbps, read_thread_gbps (`float`, *optional*): simulated bandwidths in GB/s;
            copy_latency (`float`): seconds from queuing a copy to its transfer's start.
        nan (`str`): `"cuda"` (default) or `"cpu"`: what the device's own conversion does with NaNs.
    """

    name = "standin"
    asynchronous = True
    shared = True
    keep_ring = True

    def __init__(self, device: str = "cpu", delay: float = 0.0, oom_after_bytes: int | None = None,
                 fail_copy_at: int | None = None, fail_record_at: int | None = None,
                 pinned_fail_after: int | None = None, copy_gbps: float | None = None, copy_latency: float = 0.0,
                 read_gbps: float | None = None, read_thread_gbps: float | None = None,
                 nan: str = "cuda"):  # fmt: skip
        super().__init__(torch.device(device))
        self.delay = delay
        self.oom_after_bytes = oom_after_bytes
        self.fail_copy_at = fail_copy_at
        self.fail_record_at = fail_record_at
        self.pinned_fail_after = pinned_fail_after
        self.copy_gbps, self.copy_latency = copy_gbps, copy_latency
        self.read_gbps, self.read_thread_gbps = read_gbps, read_thread_gbps
        self.nan = nan
        self.lock = threading.Lock()
        self.allocated = 0
        self.copies = 0
        self.records = 0
        self.host_buffers = 0
        self.host_bytes = 0
        self.host_live = 0  # host ring bytes not yet released
        self.streams: list[_Stream] = []
        self.default = _Stream(self, "default", worker=False)
        self.violations: list[str] = []
        self._blocks: dict[int, _Block] = {}
        self._link_free = 0.0  # simulated time at which the copy link / the disk is free again
        self._disk_free = 0.0
        self._local = threading.local()

    # -- memory -----------------------------------------------------------------------------------------------------
    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, stream: Any = None) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * dtype.itemsize
        where = stream if stream is not None else self.current_stream()
        with self.lock:
            if self.oom_after_bytes is not None and self.allocated + nbytes > self.oom_after_bytes:
                raise torch.OutOfMemoryError(
                    f"stand-in device out of memory: {nbytes} bytes asked, {self.allocated} of "
                    f"{self.oom_after_bytes} in use"
                )
            self.allocated += nbytes
            where.clock += 1  # a block handed out here may have been freed just now with work still queued before
            pos = where.clock
        out = torch.empty(shape, dtype=dtype, device=self.device)
        storage = out.untyped_storage()
        if storage.nbytes():
            key = storage.data_ptr()
            with self.lock:
                self._blocks[key] = _Block(where, pos, f"{tuple(shape)} {dtype}")
            weakref.finalize(storage, self._freed, key)
        return out

    def _block(self, t: torch.Tensor) -> _Block | None:
        if t.device != self.device or not t.numel():
            return None
        return self._blocks.get(t.untyped_storage().data_ptr())

    def _freed(self, key: int) -> None:
        with self.lock:
            block = self._blocks.pop(key, None)
            if block is None:
                return
            for s, pos in block.uses.items():
                if s is not block.stream and s.synced < pos and s not in block.recorded:
                    self.violations.append(
                        f"block {block.what} allocated on {block.stream.name} was freed while {s.name} may still "
                        f"use it (its use at {pos} not waited for: host is at {s.synced}; no record_stream)"
                    )

    def record_stream(self, t: torch.Tensor, stream: _Stream) -> None:
        """``Tensor.record_stream``: the block is not reused before the work queued on ``stream`` so far is done."""
        with self.lock:
            block = self._block(t)
            if block is not None:
                block.recorded.add(stream)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        with self.lock:
            if self.pinned_fail_after is not None and self.host_buffers >= self.pinned_fail_after:
                raise RuntimeError("stand-in device: pinned host allocation failed (cudaErrorMemoryAllocation)")
            self.host_buffers += 1
            self.host_bytes += nbytes
            self.host_live += nbytes
        return super().host_buffer(nbytes)

    def pageable_buffer(self, nbytes: int) -> torch.Tensor:
        with self.lock:
            self.host_bytes += nbytes
            self.host_live += nbytes
        return Backend.host_buffer(self, nbytes)

    def free_host(self, nbytes: int) -> None:
        with self.lock:
            self.host_live -= nbytes

    # -- streams ----------------------------------------------------------------------------------------------------
    def current_stream(self) -> _Stream:
        return getattr(self._local, "current", None) or self.default

    @contextlib.contextmanager
    def using(self, stream: _Stream) -> Iterator[_Stream]:
        """``torch.cuda.stream(stream)``: allocations in the block come from ``stream``."""
        outer, self._local.current = getattr(self._local, "current", None), stream
        try:
            yield stream
        finally:
            self._local.current = outer

    def stream(self) -> Any:
        s = getattr(self._local, "stream", None)
        if s is None:
            with self.lock:
                s = _Stream(self, f"side-{len(self.streams)}", worker=True)
                self.streams.append(s)
            self._local.stream = s
        return s

    def mark(self) -> Any:
        s = self.current_stream()
        with self.lock:
            return _Event(s, s.clock, done=s.jobs is None)

    def _check(self, stream: _Stream, tensors: tuple[torch.Tensor, ...], what: str) -> None:
        """The allocator's rule, at the moment work is queued on ``stream``."""
        with self.lock:
            stream.clock += 1
            for t in tensors:
                block = self._block(t)
                if block is None:
                    continue
                if block.stream is not stream and stream.waited.get(block.stream, -1) < block.pos:
                    msg = (
                        f"{what} on {stream.name} uses block {block.what} allocated on {block.stream.name} at "
                        f"{block.pos}, but {stream.name} is ordered only after {block.stream.name}'s "
                        f"{stream.waited.get(block.stream, 'nothing')}: the caching allocator may have handed out a "
                        "block that queued work still uses"
                    )
                    self.violations.append(msg)
                    raise StreamOrderError(msg)
                block.uses[stream] = stream.clock

    def _hold(self, t: torch.Tensor) -> Any:
        return _Weak(t) if self._block(t) is not None else t

    def _resolve(self, held: Any, what: str) -> torch.Tensor | None:
        if not isinstance(held, _Weak):
            return held
        t = held.get()
        if t is None:
            with self.lock:
                self.violations.append(f"{what} ran after its device block was freed (a use after free)")
        return t

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: Any, after: Any = None) -> None:
        if after is not None:
            with self.lock:
                stream.waited[after.stream] = max(stream.waited.get(after.stream, -1), after.pos)
        self._check(stream, (dst, src), "a copy")
        stream.put("copy", functools.partial(self._run_copy, self._hold(dst), self._hold(src)))

    def _run_copy(self, dst: Any, src: Any) -> None:
        with self.lock:
            n = self.copies
            self.copies += 1
        dst, src = self._resolve(dst, f"copy {n}"), self._resolve(src, f"copy {n}")
        if dst is None or src is None:
            return
        if self.delay:
            threading.Event().wait(self.delay)
        if self.fail_copy_at is not None and n == self.fail_copy_at:
            raise RuntimeError(f"stand-in device: injected failure in copy {n}")
        started = time.perf_counter()
        dst.copy_(src)
        if self.copy_gbps or self.copy_latency:
            nbytes = dst.numel() * dst.element_size()
            with self.lock:  # the DMA starts after the copy's latency, once the link is free
                begin = max(started + self.copy_latency, self._link_free)
                end = begin + (nbytes / (self.copy_gbps * 1e9) if self.copy_gbps else 0.0)
                if self.copy_gbps:
                    self._link_free = end
            _sleep_until(end)

    def can_cast(self, src: torch.dtype, dst: torch.dtype) -> bool:
        return src in _FLOATS and dst in _FLOATS

    def cast_rule(self, src: torch.dtype, dst: torch.dtype) -> CastRule:
        return cast_rule(src, dst).on(self.device)

    def cast(self, dst: torch.Tensor, src: torch.Tensor, stream: Any, rule: CastRule | None) -> None:
        self._check(stream, (dst, src), "a conversion")
        stream.put("copy", functools.partial(self._run_cast, self._hold(dst), self._hold(src), rule))

    def _run_cast(self, dst: Any, src: Any, rule: CastRule) -> None:
        dst, src = self._resolve(dst, "a conversion"), self._resolve(src, "a conversion")
        if dst is not None and src is not None:
            rule.apply(dst, src, self._device_cast)

    def _device_cast(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """CUDA's conversion: round to nearest even, NaNs to the canonical NaN (``cvt.rn``; cuda_bf16.hpp's
        ``__internal_float2bfloat16`` returns 0x7fff for every NaN)."""
        dst.copy_(src)
        if self.nan == "cuda":
            bits = dst.view(_BITS[dst.element_size()])
            bits.masked_fill_(torch.isnan(src), 0x7FFF if dst.element_size() == 2 else 0x7FFFFFFF)

    def record(self, stream: Any) -> Any:
        with self.lock:
            n = self.records
            self.records += 1
            if self.fail_record_at is not None and n == self.fail_record_at:
                raise RuntimeError(f"stand-in device: injected failure recording event {n}")
            event = _Event(stream, stream.clock, done=False)
        stream.put("event", event)
        return event

    def wait(self, event: Any) -> None:
        if event is None:
            return
        event.done.wait()
        with self.lock:
            event.stream.synced = max(event.stream.synced, event.pos)
        if event.error is not None:
            raise RuntimeError(
                f"stand-in device: an earlier copy on this stream failed: {event.error}"
            ) from event.error

    def drain(self, stream: Any) -> None:
        event = _Event(stream, stream.clock, done=False)
        stream.put("event", event)
        self.wait(event)

    def pending(self) -> int:
        """Copies and conversions queued or running on the side streams now."""
        with self.lock:
            return sum(s.busy for s in self.streams)

    def read_done(self, nbytes: int, started: float) -> None:
        end = started + (nbytes / (self.read_thread_gbps * 1e9) if self.read_thread_gbps else 0.0)
        if self.read_gbps:
            with self.lock:
                begin = max(started, self._disk_free)
                self._disk_free = begin + nbytes / (self.read_gbps * 1e9)
                end = max(end, self._disk_free)
        _sleep_until(end)

    def close(self) -> None:
        super().close()
        with self.lock:
            workers, self.streams = self.streams, []
        for w in workers:
            w.jobs.put(None)
        for w in workers:
            w.thread.join()
        self._local = threading.local()


def _sleep_until(deadline: float) -> None:
    left = deadline - time.perf_counter()
    if left > 0:
        time.sleep(left)


_standin_lock = threading.Lock()
_standin: list[StandInBackend] = []


@contextlib.contextmanager
def standin(backend: StandInBackend | None = None) -> Iterator[StandInBackend]:
    """Routes CPU-target loads through the device pipeline with a :class:`StandInBackend` while the block runs.

    For tests: the whole pipeline (ring, back-pressure, asynchronous copies, device-side casts, error paths) runs
    and its results can be compared bit for bit with stock loads, without a GPU. On exit the backend is closed and
    any stream-order violation it recorded is raised as :class:`StreamOrderError`.
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
    import gc

    gc.collect()  # frees of blocks still referenced by cycles are checked too
    if backend.violations:
        raise StreamOrderError("; ".join(backend.violations[:3]))


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
        with _standin_lock:
            if _standin:
                return _standin[-1]
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


def ring_shape(threads: int, budget: int, chunk: int | None) -> tuple[int, int]:
    """(slot bytes, slots) of a ring of ``budget`` bytes for ``threads`` reader threads.

    Slots are a power of two (torch's pinned allocator rounds every block up to one): ``chunk`` when given
    (``HF_FASTLOAD_CHUNK_MB``), else ``DEFAULT_CHUNK`` cut down so that every reader thread has two slots.
    """
    if chunk is None:
        chunk = min(DEFAULT_CHUNK, budget // max(2, 2 * threads))
    slot = max(ALIGN, _pow2_floor(max(1, chunk)))
    return slot, max(2, budget // slot)


class _Slot:
    __slots__ = ("host", "event")

    def __init__(self, host: torch.Tensor):
        self.host = host
        self.event: Any = None  # the last copy out of this slot; it must finish before the slot is refilled


class Ring:
    """The host buffers of one device's pipeline: ``nslots`` slots of ``slot_bytes``, allocated one by one in a
    background thread (the first chunk waits for its slot, not for the whole ring)."""

    def __init__(self, backend: Backend, slot_bytes: int, nslots: int):
        self.backend = backend
        self.slot_bytes, self.nslots = slot_bytes, nslots
        self.free: queue.Queue[_Slot] = queue.Queue()
        self.slots: list[_Slot] = []
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
                slot = _Slot(host)
                self.slots.append(slot)
                self.free.put(slot)
        except BaseException as e:  # noqa: BLE001 - handed to the readers waiting for a slot
            self.error = e
        finally:
            self.done.set()

    def acquire(self, stop) -> _Slot:
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

    def settle(self) -> list[_Slot]:
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
        self.ring: Ring | None = backend.take_ring(self.slot_bytes, self.nslots)  # allocated in the background from now
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

    def _acquire(self, ring: Ring) -> _Slot:
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

    def _release(self, ring: Ring, slot: _Slot, event: Any) -> None:
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
                raise CheckpointFileError(
                    f"cannot read {file.path} (tensor {info.name!r}) with O_DIRECT at offset {first + done}: {e}"
                ) from e
            if got == 0:
                raise CheckpointFileError(
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
