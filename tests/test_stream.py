"""The device pipeline (engine/stream.py) on the CPU: a stand-in device with asynchronous copies, and O_DIRECT.

The CUDA backend is the same pipeline with a few thin calls swapped (pinned memory, side streams, events); these
tests run the scheduling — ring, back-pressure, chunk order, device-side casts, error propagation — without a GPU.
The stand-in also checks the CUDA caching allocator's stream rule (every ``standin()`` block raises what it saw) and
converts NaNs as CUDA does, so the CPU-exact conversions are tested too. Tests marked ``cuda`` run on a GPU.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time

import pytest
import torch
from equivalence import assert_same_model
from models import example_inputs, model_class
from safetensors.torch import save_file
from specials import load_specials, special_values

import hf_fastload
from hf_fastload.engine import context
from hf_fastload.engine.backends import Backend, CudaBackend
from hf_fastload.engine.context import LoadContext
from hf_fastload.engine.ring import chunk_bytes, pinned_budget, ring_shape
from hf_fastload.engine.standin import StandInBackend, StreamOrderError, standin
from hf_fastload.errors import CheckpointFileError, FastLoadError
from hf_fastload.integration import compat

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def load_both(path, cls, **kwargs):
    torch.manual_seed(1234)
    stock, stock_info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    torch.manual_seed(1234)
    fast, fast_info = hf_fastload.fast_from_pretrained(path, model_class=cls, output_loading_info=True, **kwargs)
    return stock, stock_info, fast, fast_info


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "big": torch.randn(300, 77, generator=g).to(torch.bfloat16),  # 46 KB: many 4 KiB chunks
        "half": torch.randn(513, generator=g).to(torch.float16),
        "ints": torch.arange(5000, dtype=torch.int64),
        "flags": torch.rand(33, generator=g) > 0.5,
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(2.5),
    }


@pytest.fixture
def small_ring(monkeypatch):
    monkeypatch.setenv("HF_FASTLOAD_PINNED_MB", "1")  # 4 KiB chunks: every tensor of a tiny model goes in several
    monkeypatch.setattr("hf_fastload.engine.ring.DEFAULT_CHUNK", 4096)


def _bits(t):
    return t.reshape(-1).view(torch.uint8) if t.numel() else t


@pytest.mark.parametrize("io", ["pread", "mmap", "direct"])
@pytest.mark.parametrize("cast", [False, True], ids=["same", "cast"])
def test_standin_tensors_bit_identical(tmp_path, small_ring, io, cast):
    tensors = _tensors()
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    with standin(StandInBackend(delay=0.0005)) as dev:
        ctx = LoadContext(io=io, threads=4)
        f = ctx.open(path)
        for name, ref in tensors.items():
            dtype = torch.float32 if cast and ref.is_floating_point() else None
            out = ctx.materialize(f.get_slice(name), "cpu", dtype)
            want = ref.to(dtype) if dtype else ref
            assert out.dtype == want.dtype and out.shape == want.shape, name
            assert torch.equal(_bits(out), _bits(want)), name
            assert out.untyped_storage().nbytes() == want.numel() * want.element_size(), f"{name} owns its memory"
        pipe = ctx.pipelines["cpu"]
        staging = dict(pipe._staging)
        ctx.close()
        assert 1 <= pipe.peak_in_use <= pipe.nslots
        assert dev.copies > len(tensors), "big tensors went in several chunks"
        assert len(staging) <= 4 if cast else not staging, "one staging buffer per reader thread, only to convert"
        assert dev.host_live == pipe.slot_bytes * pipe.nslots, "the ring is kept for the next load"
    assert dev.host_live == 0, "and released with its device"
    assert dev.streams == []


def test_ring_applies_back_pressure(tmp_path, monkeypatch):
    """With slow copies and a two-slot ring, no more than two chunks are ever in flight, and results stay right."""
    monkeypatch.setattr("hf_fastload.engine.ring.DEFAULT_CHUNK", 4096)
    monkeypatch.setattr("hf_fastload.engine.ring.pinned_budget", lambda: 2 * 4096)
    t = torch.randn(64, 1024)  # 256 KiB: 64 chunks
    save_file({"t": t}, str(tmp_path / "t.safetensors"))
    with standin(StandInBackend(delay=0.002)):
        ctx = LoadContext(io="pread", threads=4)
        out = ctx.materialize(ctx.open(tmp_path / "t.safetensors").get_slice("t"), "cpu", None)
        pipe = ctx.pipelines["cpu"]
        ctx.close()
    assert pipe.nslots == 2 and pipe.peak_in_use <= 2
    assert torch.equal(out, t)


@pytest.mark.parametrize("kind", ["llama", "t5", "gpt2"])
@pytest.mark.parametrize("request_dtype", [None, torch.float32], ids=["none", "fp32"])
def test_models_through_standin_equal_stock(checkpoints, small_ring, kind, request_dtype):
    path = checkpoints(kind, torch.bfloat16, kind == "llama")
    kwargs = {} if request_dtype is None else {"dtype": request_dtype}
    with standin(StandInBackend()):
        stock, stock_info, fast, fast_info = load_both(path, model_class(kind), **kwargs)
    assert_same_model(stock, fast, stock_info, fast_info)
    report = hf_fastload.last_report()
    assert report.path == "fast"
    assert set(report.methods) <= {"stream(standin)", "stream(standin)+cast"}, report.methods
    assert "standin pipeline" in report.io_reason


@pytest.mark.parametrize("request_dtype", [None, torch.float32], ids=["none", "fp32"])
def test_direct_io_on_cpu_equals_stock(checkpoints, monkeypatch, request_dtype):
    monkeypatch.setenv("HF_FASTLOAD_IO", "direct")
    path = checkpoints("qwen2", torch.bfloat16, True)
    kwargs = {} if request_dtype is None else {"dtype": request_dtype}
    stock, stock_info, fast, fast_info = load_both(path, model_class("qwen2"), **kwargs)
    assert_same_model(stock, fast, stock_info, fast_info)
    report = hf_fastload.last_report()
    assert report.path == "fast"
    assert all(m.startswith("stream(cpu)") for m in report.methods), report.methods
    assert report.io in ("direct", "pread"), report.io  # pread where the filesystem refuses O_DIRECT (tmpfs)


def test_direct_refused_falls_back_to_pread_and_says_so(checkpoints, monkeypatch):
    monkeypatch.setenv("HF_FASTLOAD_IO", "direct")
    real_open = os.open

    def no_direct(path, flags, *args, **kwargs):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_direct)
    path = checkpoints("llama", torch.bfloat16)
    stock, stock_info, fast, fast_info = load_both(path, model_class("llama"))
    assert_same_model(stock, fast, stock_info, fast_info)
    report = hf_fastload.last_report()
    assert report.io == "pread" and "O_DIRECT refused" in report.io_reason


def _threads():
    return {t.name for t in threading.enumerate() if "standin" in t.name}


def test_device_out_of_memory_midway(checkpoints, small_ring):
    """OOM on the device after a few tensors: the error propagates, no model, buffers and streams released, and
    the next load succeeds."""
    path = checkpoints("llama", torch.bfloat16, True)
    cls = model_class("llama")
    with standin(StandInBackend(oom_after_bytes=20_000)) as dev:
        with pytest.raises(torch.OutOfMemoryError, match="stand-in device out of memory"):
            hf_fastload.fast_from_pretrained(path, model_class=cls)
    assert dev.host_live == 0
    assert not _threads()
    with standin(StandInBackend()):
        stock, stock_info, fast, fast_info = load_both(path, cls)
    assert_same_model(stock, fast, stock_info, fast_info)


def test_failed_copy_propagates(checkpoints, small_ring):
    path = checkpoints("gpt2", torch.bfloat16)
    with standin(StandInBackend(fail_copy_at=5)) as dev:
        with pytest.raises(RuntimeError, match="injected failure in copy 5"):
            hf_fastload.fast_from_pretrained(path, model_class=model_class("gpt2"), dtype=torch.float32)
    assert dev.host_live == 0
    assert not _threads()


def test_failed_read_stops_the_tensor(tmp_path, small_ring, monkeypatch):
    """A read error in one chunk: the caller gets the file error, the other chunks stop, the slot comes back."""
    t = torch.randn(64, 1024)
    save_file({"t": t}, str(tmp_path / "t.safetensors"))
    from hf_fastload.format.file import SafetensorsFile

    real = SafetensorsFile.read_into
    calls = []

    def flaky(self, info, out, byte_offset=0):
        calls.append(byte_offset)
        if len(calls) == 3:
            raise CheckpointFileError(f"cannot read {self.path} (tensor {info.name!r}): injected")
        return real(self, info, out, byte_offset)

    monkeypatch.setattr(SafetensorsFile, "read_into", flaky)
    with standin(StandInBackend(delay=0.001)) as dev:
        ctx = LoadContext(io="pread", threads=2)
        with pytest.raises(CheckpointFileError, match="injected"):
            ctx.materialize(ctx.open(tmp_path / "t.safetensors").get_slice("t"), "cpu", None)
        pipe = ctx.pipelines["cpu"]
        assert pipe.in_use == 0
        assert len(calls) < 64, "the remaining chunks stopped"
        ctx.close()
    assert dev.host_live == 0


def test_failed_event_record_still_waits_before_the_tensor_is_dropped(tmp_path, small_ring):
    """A chunk whose event cannot be recorded after its copy was queued: the event recorded in the error path is the
    one the tensor waits for, so no copy into the dropped tensor is still pending when the error reaches the caller."""
    t = torch.randn(1000)
    save_file({"t": t}, str(tmp_path / "t.safetensors"))
    with standin(StandInBackend(delay=0.3, fail_record_at=0)) as dev:
        ctx = LoadContext(io="pread", threads=2)
        with pytest.raises(RuntimeError, match="injected failure recording event 0"):
            ctx.materialize(ctx.open(tmp_path / "t.safetensors").get_slice("t"), "cpu", None)
        assert dev.pending() == 0, "a copy into the failed tensor was still running when its error was raised"
        ctx.close()


def test_pinned_budget_and_chunk_knobs(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_FASTLOAD_PINNED_MB", "lots")
    with pytest.raises(FastLoadError, match="HF_FASTLOAD_PINNED_MB"):
        pinned_budget()
    monkeypatch.setenv("HF_FASTLOAD_PINNED_MB", "64")
    assert pinned_budget() == 64 << 20
    assert ring_shape(8, 64 << 20, None) == (4 << 20, 16), "two slots per reader thread by default"
    monkeypatch.setenv("HF_FASTLOAD_CHUNK_MB", "0")
    with pytest.raises(FastLoadError, match="HF_FASTLOAD_CHUNK_MB"):
        chunk_bytes()
    monkeypatch.setenv("HF_FASTLOAD_CHUNK_MB", "32")
    assert ring_shape(8, 64 << 20, chunk_bytes()) == (32 << 20, 2), "an explicit chunk size is kept"
    assert ring_shape(8, 256 << 20, 24 << 20)[0] == 16 << 20, "slots are powers of two (as pinned blocks)"
    monkeypatch.setenv("HF_FASTLOAD_PINNED_MB", "4")
    monkeypatch.setenv("HF_FASTLOAD_CHUNK_MB", "1")
    save_file({"t": torch.randn(1000)}, str(tmp_path / "t.safetensors"))
    with standin(StandInBackend()):
        ctx = LoadContext(io="pread", threads=8)
        ctx.materialize(ctx.open(tmp_path / "t.safetensors").get_slice("t"), "cpu", None)
        pipe = ctx.pipelines["cpu"]
        ctx.close()
    assert (pipe.chunk, pipe.nslots) == (1 << 20, 4), "the knobs reach the load's pipeline"


# -- the caching allocator's stream rule ------------------------------------------------------------------------------
def test_standin_checks_the_allocators_stream_rule():
    """The model itself: a block used on a side stream must be allocated before the event that stream waited for
    (or on that stream); a block used on a side stream must not be freed before that use was waited for."""
    dev = StandInBackend(delay=0.05)  # copies run well after they are queued
    side = dev.stream()
    src = torch.ones(16, dtype=torch.uint8)
    a = dev.empty((16,), torch.uint8)
    mark = dev.mark()
    late = dev.empty((16,), torch.uint8)  # allocated after the mark: the side stream is not ordered after it
    dev.copy(a, src, side, mark)
    with pytest.raises(StreamOrderError, match="allocated on default"):
        dev.copy(late, src, side, mark)
    dev.violations.clear()
    own = dev.empty((16,), torch.uint8, stream=side)  # the side stream's own block: ordered by the stream
    dev.copy(own, src, side)
    event = dev.record(side)

    used = dev.empty((16,), torch.uint8)
    dev.copy(used, src, side, dev.mark())
    del used  # freed while its copy was never waited for (and here before it ran: a use after free)
    dev.drain(side)
    assert "freed while side-0 may still use it" in dev.violations[0], dev.violations
    assert "ran after its device block was freed" in dev.violations[1], dev.violations
    dev.violations.clear()
    waited = dev.empty((16,), torch.uint8)
    dev.copy(waited, src, side, dev.mark())
    dev.wait(dev.record(side))
    del waited
    recorded = dev.empty((16,), torch.uint8)
    dev.copy(recorded, src, side, dev.mark())
    dev.record_stream(recorded, side)
    del recorded  # its copy may run later: record_stream keeps the block until then
    dev.wait(event)
    dev.drain(side)
    assert dev.violations == [] and torch.equal(a, src) and torch.equal(own, src)
    dev.close()


@pytest.mark.parametrize("threads", [1, 4])
def test_staging_is_allocated_on_the_side_stream_once_per_thread(tmp_path, small_ring, threads):
    """Converting chunks go through one staging buffer per reader thread, allocated on its side stream: the stand-in
    raises StreamOrderError for a staging buffer allocated on the caller's stream after the mark."""
    t = torch.randn(40, 1000).to(torch.bfloat16)  # 80 KB: 20 chunks of 4 KiB
    save_file({"t": t}, str(tmp_path / "t.safetensors"))
    with standin(StandInBackend(delay=0.0005)) as dev:
        ctx = LoadContext(io="pread", threads=threads)
        out = ctx.materialize(ctx.open(tmp_path / "t.safetensors").get_slice("t"), "cpu", torch.float32)
        pipe = ctx.pipelines["cpu"]
        assert 1 <= len(pipe._staging) <= threads < pipe.nslots
        ctx.close()
    assert torch.equal(out, t.float()) and dev.violations == []


# -- conversions with the CPU's bits ----------------------------------------------------------------------------------
def test_device_conversions_equal_the_cpus_bit_for_bit(tmp_path, small_ring):
    """NaNs (many payloads, both signs), infinities, subnormals, zeros and extremes in every direction between
    fp32, bf16 and fp16, converted on a device that canonicalizes NaNs as CUDA does: the CPU's bits come out."""
    with standin(StandInBackend(delay=0.0002)):
        load_specials(str(tmp_path), "cpu")


def test_the_standin_converts_nans_as_cuda_does():
    """Without the CPU's rule the stand-in's own conversion gives CUDA's canonical NaN, not the CPU's: the test
    above would see a device that ignored the rule."""
    dev = StandInBackend()
    src = special_values()["fp32"]
    out = torch.empty(src.shape, dtype=torch.bfloat16)
    dev._device_cast(out, src)
    nan = torch.isnan(src)
    assert (out.view(torch.int16)[nan] == 0x7FFF).all()
    assert not torch.equal(_bits(out), _bits(src.to(torch.bfloat16)))
    assert torch.equal(_bits(out[~nan]), _bits(src[~nan].to(torch.bfloat16)))


@pytest.mark.cuda
@CUDA
def test_cuda_conversions_equal_the_cpus_bit_for_bit(tmp_path, small_ring):
    load_specials(str(tmp_path), "cuda")


# -- the ring ---------------------------------------------------------------------------------------------------------
def test_ring_is_made_once_and_reused_by_later_loads(checkpoints, small_ring):
    path = checkpoints("llama", torch.bfloat16, True)
    cls = model_class("llama")
    with standin(StandInBackend()) as dev:
        hf_fastload.fast_from_pretrained(path, model_class=cls)
        dev._ring.done.wait()  # the allocation goes on in the background after a short load
        first = (dev.host_buffers, dev.host_live, dev._ring)
        for _ in range(2):
            stock, stock_info, fast, fast_info = load_both(path, cls, dtype=torch.float32)
            assert_same_model(stock, fast, stock_info, fast_info)
        assert (dev.host_buffers, dev.host_live, dev._ring) == first, "no new host buffers for later loads"
    assert dev.host_live == 0


def test_ring_is_allocated_in_the_background_slot_by_slot(tmp_path, monkeypatch):
    """A slow pinned allocation: the first tensor streams through the first slots while the rest are still being
    allocated."""
    monkeypatch.setattr("hf_fastload.engine.ring.DEFAULT_CHUNK", 4096)
    t = torch.randn(2048)  # two chunks
    save_file({"t": t}, str(tmp_path / "t.safetensors"))

    class SlowPinned(StandInBackend):
        def host_buffer(self, nbytes):
            if self.host_buffers >= 2:
                time.sleep(0.1)
            return super().host_buffer(nbytes)

    with standin(SlowPinned()):
        ctx = LoadContext(io="pread", threads=2)
        out = ctx.materialize(ctx.open(tmp_path / "t.safetensors").get_slice("t"), "cpu", None)
        ring = ctx.pipelines["cpu"].ring
        assert not ring.done.is_set() and ring.nslots > 8, "the tensor did not wait for the whole ring"
        ctx.close()
    assert torch.equal(out, t)


@pytest.mark.parametrize("fail_after", [3, 1], ids=["cut", "pageable"])
def test_failed_pinned_allocation_keeps_a_smaller_ring_or_goes_pageable(checkpoints, small_ring, fail_after):
    path = checkpoints("gpt2", torch.bfloat16)
    with standin(StandInBackend(pinned_fail_after=fail_after)):
        stock, stock_info, fast, fast_info = load_both(path, model_class("gpt2"), dtype=torch.float32)
    assert_same_model(stock, fast, stock_info, fast_info)
    reason = hf_fastload.last_report().io_reason
    if fail_after == 3:
        assert "cut to 3 of 256 slots (pinned allocation failed: stand-in device: pinned" in reason, reason
    else:
        assert "pageable (pinned allocation failed: stand-in device: pinned" in reason, reason


def test_concurrent_loads_to_one_device_get_their_own_rings(tmp_path, small_ring):
    tensors = {f"t{i}": torch.randn(30, 100 + i) for i in range(6)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    with standin(StandInBackend(delay=0.0005)) as dev:
        ctxs = [LoadContext(io="pread", threads=2) for _ in range(2)]
        out, errors = {}, []

        def load(ctx, k):
            try:
                f = ctx.open(tmp_path / "t.safetensors")
                for name in tensors:
                    out[(k, name)] = ctx.materialize(f.get_slice(name), "cpu", torch.bfloat16)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=load, args=(ctx, k)) for k, ctx in enumerate(ctxs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rings = [ctx.pipelines["cpu"].ring for ctx in ctxs]
        for ctx in ctxs:
            ctx.close()
        assert not errors and rings[0] is not rings[1]
        assert dev.host_live == rings[0].slot_bytes * rings[0].nslots, "one ring is kept, the other released"
    for (_, name), t in out.items():
        assert torch.equal(t, tensors[name].to(torch.bfloat16)), name


# -- several devices, CUDA's calls ------------------------------------------------------------------------------------
class _FakeEvent:
    log: list = []

    def record(self, stream):
        self.log.append(("record", stream))

    def synchronize(self):
        self.log.append(("sync", self))


class _FakeStream:
    def __init__(self, device):
        self.device = device
        self.waits = []

    def wait_event(self, event):
        self.waits.append(event)

    def synchronize(self):
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's stream and event calls replaced by CPU fakes; returns the streams entered, in order."""
    entered = []

    @contextlib.contextmanager
    def fake_stream_ctx(s):
        entered.append(s)
        yield

    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", fake_stream_ctx)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "default-stream")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    _FakeEvent.log = []
    return entered


class CpuCuda(CudaBackend):
    """CudaBackend's calls on CPU memory (with the fake_cuda fixture)."""

    def __init__(self, device=torch.device("cpu", 0)):
        super().__init__(device)
        self.device = torch.device("cpu")  # where its tensors really go

    def host_buffer(self, nbytes):  # pinned memory needs a CUDA build
        return Backend.host_buffer(self, nbytes)


def test_cuda_backend_call_sequence(tmp_path, small_ring, monkeypatch, fake_cuda):
    """CudaBackend's CUDA calls, replaced by CPU fakes: the pipeline makes one side stream per reader thread, makes
    each stream wait for the allocation point before writing new memory, copies and allocates staging inside the
    stream's context, and waits on an event per chunk before a tensor is returned."""
    backend = CpuCuda()
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "t.safetensors"))
    monkeypatch.setattr("hf_fastload.engine.backends.backend_for", lambda device, io: backend)
    ctx = LoadContext(io="pread", threads=2)
    f = ctx.open(tmp_path / "t.safetensors")
    for name, ref in tensors.items():
        dtype = torch.float32 if ref.is_floating_point() else None
        out = ctx.materialize(f.get_slice(name), "cpu", dtype)
        want = ref.to(dtype) if dtype else ref
        assert torch.equal(_bits(out), _bits(want)), name
    ctx.close()
    streams = {id(s): s for s in fake_cuda}
    assert 1 <= len(streams) <= 2, "one side stream per reader thread"
    assert all(isinstance(s, _FakeStream) for s in fake_cuda)
    assert all(s.waits for s in streams.values()), "side streams wait for the allocation point"
    kinds = [k for k, _ in _FakeEvent.log]
    assert kinds.count("record") >= len(fake_cuda) // 3 and "sync" in kinds


def test_cuda_and_cuda0_share_one_pipeline_and_no_extra_copy(tmp_path, small_ring, monkeypatch, fake_cuda):
    """ "cuda" and "cuda:0" in one load are one device: one pipeline; the tensor it makes is final (no ``.to()``
    after it, which on this CPU-only torch would fail), and the report says ``stream(cuda)``."""
    backend = CpuCuda(torch.device("cuda", 0))
    tensors = {"a": torch.randn(100), "b": torch.randn(100)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    monkeypatch.setattr("hf_fastload.engine.backends.backend_for", lambda device, io: backend)
    ctx = LoadContext(io="pread", threads=2)
    f = ctx.open(tmp_path / "t.safetensors")
    a = ctx.materialize(f.get_slice("a"), "cuda", None)
    b = ctx.materialize(f.get_slice("b"), torch.device("cuda", 0), torch.bfloat16)
    ctx.close()
    assert list(ctx.pipelines) == ["cuda:0"]
    assert ctx.methods == {"stream(cuda)": 1, "stream(cuda)+cast": 1}
    assert a.numel() == b.numel() == 100


def test_each_device_gets_its_own_pipeline(tmp_path, small_ring, monkeypatch):
    """Tensors for two devices, requested from several threads at once (as transformers' loader threads do), go
    through two pipelines, each with its own ring and backend, concurrently; every tensor comes out right."""
    tensors = {f"t{i}": torch.randn(40, 100 + i) for i in range(8)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    backends = {"cpu:0": StandInBackend(delay=0.0005), "cpu:1": StandInBackend(delay=0.0005)}
    monkeypatch.setattr("hf_fastload.engine.backends.backend_for", lambda device, io: backends[str(device)])
    ctx = LoadContext(io="pread", threads=4)
    f = ctx.open(tmp_path / "t.safetensors")
    out, errors = {}, []

    def load(name, device):
        try:
            out[name] = ctx.materialize(f.get_slice(name), device, torch.bfloat16)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=load, args=(n, f"cpu:{i % 2}")) for i, n in enumerate(tensors)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pipes = dict(ctx.pipelines)
    ctx.close()
    for backend in backends.values():
        backend.close()
        assert backend.violations == []
    assert not errors
    assert set(pipes) == {"cpu:0", "cpu:1"} and pipes["cpu:0"] is not pipes["cpu:1"]
    assert all(pipes[k].backend is backends[k] for k in pipes)
    assert all(b.copies >= 4 for b in backends.values()), "each device streamed its own tensors"
    for name, ref in tensors.items():
        assert torch.equal(out[name], ref.to(torch.bfloat16)), name


# -- prefetch: 4.57's loop takes one tensor at a time, 5.x's loader four --------------------------------------------
@pytest.fixture
def contexts(monkeypatch):
    """Every LoadContext made while the test runs."""
    made = []
    real = LoadContext.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(LoadContext, "__init__", init)
    return made


@pytest.mark.parametrize("device", ["standin", "cpu"])
@pytest.mark.parametrize("request_dtype", [None, torch.bfloat16], ids=["default", "bf16"])
def test_next_tensors_are_prefetched(checkpoints, small_ring, contexts, device, request_dtype):
    """4.57: every planned tensor (CPU or device); 5.x: the tensors that stream to a device (transformers' own 4
    loader threads already overlap CPU tensors). Equal to stock either way."""
    path = checkpoints("llama", torch.bfloat16, True)
    kwargs = {} if request_dtype is None else {"dtype": request_dtype}
    with standin(StandInBackend(delay=0.001)) if device == "standin" else contextlib.nullcontext():
        stock, stock_info, fast, fast_info = load_both(path, model_class("llama"), **kwargs)
    assert_same_model(stock, fast, stock_info, fast_info)
    ctx = contexts[-1]
    # 5.x: CPU tensors are not prefetched; 4.57: nor are zero-copy views (same dtype, mmap), which cost nothing and,
    # made ahead, would outlive the size check that guards their pages
    if device == "cpu" and (compat.TRANSFORMERS_V5 or request_dtype == torch.bfloat16):
        assert ctx.prefetched == 0
        return
    assert ctx.prefetched >= ctx.tensors - 4, "the loader found its tensors prefetched"
    if device == "standin":
        assert ctx.pipelines["cpu"].peak_tensors > 1, "tensors streamed side by side"


def test_prefetch_window_bounds_bytes_ahead(checkpoints, small_ring, contexts, monkeypatch):
    monkeypatch.setattr(context, "PREFETCH_BYTES", 10_000)
    path = checkpoints("llama", torch.float32, True)
    with standin(StandInBackend(delay=0.001)):
        stock, stock_info, fast, fast_info = load_both(path, model_class("llama"))
    assert_same_model(stock, fast, stock_info, fast_info)
    ctx = contexts[-1]
    biggest = max(info.nbytes for h in ctx.files.values() for info in h.tensors.values())
    assert 0 < ctx.peak_prefetch_bytes <= 10_000 + biggest


def test_a_prefetched_tensors_error_is_raised_in_the_loaders_order(tmp_path, small_ring):
    """A tensor that fails while prefetched fails the load only when it is taken, and the load then raises it."""
    tensors = {"a": torch.randn(100), "b": torch.randn(100)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    with standin(StandInBackend(oom_after_bytes=500)):
        ctx = LoadContext(io="pread", threads=2)
        f = ctx.open(tmp_path / "t.safetensors")
        a, b = f.get_slice("a"), f.get_slice("b")
        ctx.plan(a, "cpu", torch.float32)  # 400 bytes: fits
        ctx.plan(b, "cpu", torch.float32)  # 400 more: out of memory, while prefetched
        ctx.prefetch()
        time.sleep(0.2)
        assert not ctx.errors, "not recorded before it is taken"
        assert torch.equal(ctx.take(a, "cpu", torch.float32), tensors["a"])
        with pytest.raises(torch.OutOfMemoryError):
            ctx.take(b, "cpu", torch.float32)
        assert isinstance(ctx.errors[0], torch.OutOfMemoryError)
        assert ctx.take(a, "cuda", None) is None, "a tensor not planned (any more) is materialized by the caller"
        ctx.close()


# -- a GPU ------------------------------------------------------------------------------------------------------------
def test_example_inputs_follow_the_model():
    """With a one-device device_map accelerate moves no inputs: the equivalence check builds them where the model's
    embeddings are (a CUDA model would otherwise get CPU inputs and fail)."""
    cls = model_class("llama")
    from models import _configs

    with torch.device("meta"):
        model = cls(_configs()["llama"][1])
    assert example_inputs(model)["input_ids"].device.type == "meta"


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("request_dtype", [None, torch.float32], ids=["none", "fp32"])
def test_cuda_equals_stock(checkpoints, small_ring, request_dtype):
    path = checkpoints("llama", torch.bfloat16, True)
    kwargs = {"device_map": "cuda"} | ({} if request_dtype is None else {"dtype": request_dtype})
    stock, stock_info, fast, fast_info = load_both(path, model_class("llama"), **kwargs)
    assert_same_model(stock, fast, stock_info, fast_info)
    assert set(hf_fastload.last_report().methods) <= {"stream(cuda)", "stream(cuda)+cast"}
