"""A stand-in device: a CPU "device" that behaves like a CUDA device for the pipeline's sake, for tests and
benchmarks without a GPU.

Example:
    ```python
    import hf_fastload
    from hf_fastload.engine.standin import StandInBackend, standin

    with standin(StandInBackend(delay=0.001)) as device:   # CPU loads go through the device pipeline
        model = hf_fastload.fast_from_pretrained("path/to/llama", dtype="float32")
    # on exit: every stream-order violation the device saw is raised (StreamOrderError)
    ```
"""

from __future__ import annotations

import contextlib
import functools
import gc
import queue
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from .backends import Backend, cpu_override
from .casting import BITS, FLOATS, CastRule, cast_rule

__all__ = ["StandInBackend", "StreamOrderError", "standin"]


class StreamOrderError(RuntimeError):
    """The stand-in device saw device memory used on a stream that is not ordered after its allocation, or freed
    while another stream may still use it (what the CUDA caching allocator turns into silent corruption)."""


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
                elif kind == "keep":
                    pass  # record_stream's tensor: kept alive until the work queued before it was done
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
        """``Tensor.record_stream``: the block is not reused before the work queued on ``stream`` so far is done.

        The stand-in keeps the tensor itself alive until then (a job on ``stream`` holds it): a copy queued before
        that runs after the caller dropped the tensor is then no use after free, as on CUDA."""
        with self.lock:
            block = self._block(t)
            if block is not None:
                block.recorded.add(stream)
        if block is not None:
            stream.put("keep", t)

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
        return src in FLOATS and dst in FLOATS

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
            bits = dst.view(BITS[dst.element_size()])
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


@contextlib.contextmanager
def standin(backend: StandInBackend | None = None) -> Iterator[StandInBackend]:
    """Routes CPU-target loads through the device pipeline with a :class:`StandInBackend` while the block runs.

    For tests: the whole pipeline (ring, back-pressure, asynchronous copies, device-side casts, error paths) runs
    and its results can be compared bit for bit with stock loads, without a GPU. On exit the backend is closed and
    any stream-order violation it recorded is raised as :class:`StreamOrderError`.
    """
    backend = backend or StandInBackend()
    try:
        with cpu_override(backend):
            yield backend
    finally:
        backend.close()
    gc.collect()  # frees of blocks still referenced by cycles are checked too
    if backend.violations:
        raise StreamOrderError("; ".join(backend.violations[:3]))
