"""The device pipeline (hf_fastload.stream) on the CPU: a stand-in device with asynchronous copies, and O_DIRECT.

The CUDA backend is the same pipeline with three thin calls swapped (pinned memory, side streams, events); these tests
run the scheduling — ring, back-pressure, chunk order, device-side casts, error propagation — without a GPU.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading

import pytest
import torch
from equivalence import assert_same_model
from models import model_class
from safetensors.torch import save_file

import hf_fastload
from hf_fastload.engine import stream
from hf_fastload.engine.context import LoadContext
from hf_fastload.errors import CheckpointFileError, FastLoadError


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
    monkeypatch.setenv("HF_FASTLOAD_PINNED_MB", "1")  # 4 threads -> 128 KiB chunks ... and a tight ring
    monkeypatch.setattr(stream, "DEFAULT_CHUNK", 4096)


def _bits(t):
    return t.reshape(-1).view(torch.uint8) if t.numel() else t


@pytest.mark.parametrize("io", ["pread", "mmap", "direct"])
@pytest.mark.parametrize("cast", [False, True], ids=["same", "cast"])
def test_standin_tensors_bit_identical(tmp_path, small_ring, io, cast):
    tensors = _tensors()
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    with stream.standin(stream.StandInBackend(delay=0.0005)) as dev:
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
        ctx.close()
        assert 1 <= pipe.peak_in_use <= pipe.nslots
        assert dev.copies > len(tensors), "big tensors went in several chunks"
        assert dev.host_live == 0, "the ring's host memory is released when the load ends"
    assert dev.streams == []


def test_ring_applies_back_pressure(tmp_path, monkeypatch):
    """With slow copies and a two-slot ring, no more than two chunks are ever in flight, and results stay right."""
    monkeypatch.setattr(stream, "DEFAULT_CHUNK", 4096)
    monkeypatch.setenv("HF_FASTLOAD_PINNED_MB", "1")
    monkeypatch.setattr(stream, "pinned_budget", lambda: 2 * (4096 + 2 * stream.ALIGN))
    t = torch.randn(64, 1024)  # 256 KiB: 64 chunks
    save_file({"t": t}, str(tmp_path / "t.safetensors"))
    with stream.standin(stream.StandInBackend(delay=0.002)):
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
    with stream.standin(stream.StandInBackend()):
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
    with stream.standin(stream.StandInBackend(oom_after_bytes=20_000)) as dev:
        with pytest.raises(torch.OutOfMemoryError, match="stand-in device out of memory"):
            hf_fastload.fast_from_pretrained(path, model_class=cls)
        assert dev.host_live == 0
    assert not _threads()
    with stream.standin(stream.StandInBackend()):
        stock, stock_info, fast, fast_info = load_both(path, cls)
    assert_same_model(stock, fast, stock_info, fast_info)


def test_failed_copy_propagates(checkpoints, small_ring):
    path = checkpoints("gpt2", torch.bfloat16)
    with stream.standin(stream.StandInBackend(fail_copy_at=5)) as dev:
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
    with stream.standin(stream.StandInBackend(delay=0.001)) as dev:
        ctx = LoadContext(io="pread", threads=2)
        with pytest.raises(CheckpointFileError, match="injected"):
            ctx.materialize(ctx.open(tmp_path / "t.safetensors").get_slice("t"), "cpu", None)
        pipe = ctx.pipelines["cpu"]
        assert pipe.in_use == 0
        assert len(calls) < 64, "the remaining chunks stopped"
        ctx.close()
        assert dev.host_live == 0


def test_pinned_budget_knob(monkeypatch):
    monkeypatch.setenv("HF_FASTLOAD_PINNED_MB", "lots")
    with pytest.raises(FastLoadError, match="HF_FASTLOAD_PINNED_MB"):
        stream.pinned_budget()
    monkeypatch.setenv("HF_FASTLOAD_PINNED_MB", "64")
    assert stream.pinned_budget() == 64 << 20
    pipe = stream.Pipeline(stream.HostBackend(torch.device("cpu")), None, threads=8, budget=64 << 20)
    assert pipe.chunk == 4 << 20 and pipe.nslots >= 2 * 8 - 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("request_dtype", [None, torch.float32], ids=["none", "fp32"])
def test_cuda_equals_stock(checkpoints, request_dtype):
    path = checkpoints("llama", torch.bfloat16, True)
    kwargs = {"device_map": "cuda"} | ({} if request_dtype is None else {"dtype": request_dtype})
    stock, stock_info, fast, fast_info = load_both(path, model_class("llama"), **kwargs)
    assert_same_model(stock, fast, stock_info, fast_info)
    assert all(m.startswith("stream(cuda)") for m in hf_fastload.last_report().methods)


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


def test_cuda_backend_call_sequence(tmp_path, small_ring, monkeypatch):
    """CudaBackend's CUDA calls, replaced by CPU fakes: the pipeline makes one side stream per reader thread, makes
    each stream wait for the allocation point before writing new memory, copies inside the stream's context, and
    waits on an event per chunk before a tensor is returned."""
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

    class CpuCuda(stream.CudaBackend):
        def host_buffer(self, nbytes):  # pinned memory needs a CUDA build
            return stream.Backend.host_buffer(self, nbytes)

    backend = CpuCuda(torch.device("cpu", 0))
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "t.safetensors"))
    monkeypatch.setattr(stream, "backend_for", lambda device, io: backend)
    ctx = LoadContext(io="pread", threads=2)
    f = ctx.open(tmp_path / "t.safetensors")
    for name, ref in tensors.items():
        dtype = torch.float32 if ref.is_floating_point() else None
        out = ctx.materialize(f.get_slice(name), "cpu", dtype)
        want = ref.to(dtype) if dtype else ref
        assert torch.equal(_bits(out), _bits(want)), name
    ctx.close()
    streams = {id(s): s for s in entered}
    assert 1 <= len(streams) <= 2, "one side stream per reader thread"
    assert all(isinstance(s, _FakeStream) for s in entered)
    assert all(s.waits for s in streams.values()), "side streams wait for the allocation point"
    kinds = [k for k, _ in _FakeEvent.log]
    assert kinds.count("record") >= len(entered) // 2 and "sync" in kinds


def test_each_device_gets_its_own_pipeline(tmp_path, small_ring, monkeypatch):
    """Tensors for two devices, requested from several threads at once (as transformers' loader threads do), go
    through two pipelines, each with its own ring and backend, concurrently; every tensor comes out right."""
    tensors = {f"t{i}": torch.randn(40, 100 + i) for i in range(8)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    backends = {"cpu:0": stream.StandInBackend(delay=0.0005), "cpu:1": stream.StandInBackend(delay=0.0005)}
    monkeypatch.setattr(stream, "backend_for", lambda device, io: backends[str(device)])
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
    assert not errors
    assert set(pipes) == {"cpu:0", "cpu:1"} and pipes["cpu:0"] is not pipes["cpu:1"]
    assert all(pipes[k].backend is backends[k] for k in pipes)
    assert all(b.copies >= 4 for b in backends.values()), "each device streamed its own tensors"
    for name, ref in tensors.items():
        assert torch.equal(out[name], ref.to(torch.bfloat16)), name
