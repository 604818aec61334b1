"""Faults in the middle of a load: an exception in a reader or chunk thread, an allocation failure, a
KeyboardInterrupt. No model comes back, the error keeps its type (or is the ``__cause__``), the engine's persistent
pools are left idle with no thread added, descriptors are closed, nothing of the failed load stays alive, and the
next load in the same process succeeds and equals stock.
"""

from __future__ import annotations

import gc
import os
import shutil
import threading
import time
import weakref

import pytest
import torch
import transformers
from equivalence import assert_same_model

import hf_fastload
from hf_fastload.engine import context, cpu, materialize
from hf_fastload.engine import pools as engine_pools
from hf_fastload.format.file import SafetensorsFile

LLAMA = transformers.LlamaForCausalLM


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _fd_targets() -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return sorted(found)


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _models_alive() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), transformers.PreTrainedModel))


def _foreign_threads() -> set[int]:
    """Threads other than the engine's persistent pools (theirs are named ``hf_fastload-<kind>_<n>``)."""
    return {t.ident for t in threading.enumerate() if not t.name.startswith("hf_fastload-")}


def _pool_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("hf_fastload-"))


def _settled(baseline: dict, timeout: float = 10.0) -> tuple[set[int], int]:
    """(threads outside our pools, descriptors) once both are back to ``baseline`` or ``timeout`` passed: the tasks
    that transformers 5 leaves running in its own pool after an interrupt, and the readahead's descriptor, end on
    their own."""
    deadline = time.monotonic() + timeout
    while True:
        gc.collect()  # a failed load's model and mappings are reference cycles (exception -> traceback -> frames)
        now = (_foreign_threads(), _fds())
        if (now[0] <= baseline["threads"] and now[1] <= baseline["fds"]) or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def _pools_idle() -> None:
    """Every engine pool runs a trivial task at once: nothing of a failed load is queued or stuck in them."""
    for pool in list(engine_pools._pools.values()):
        assert pool.submit(lambda: 42).result(timeout=10) == 42
        assert pool._work_queue.qsize() == 0


@pytest.fixture
def ckpt(checkpoints):
    return checkpoints("llama", torch.float32)


@pytest.fixture
def baseline(ckpt, monkeypatch):
    """Threads, descriptors and memory after good loads (the engine's pools are persistent: they may grow to their
    size, and no pool may be added by a failure)."""
    monkeypatch.setenv("HF_FASTLOAD_THREADS", "2")
    for io in ("mmap", "pread"):
        monkeypatch.setenv("HF_FASTLOAD_IO", io)
        hf_fastload.fast_from_pretrained(ckpt, model_class=LLAMA, dtype=torch.bfloat16)
    monkeypatch.delenv("HF_FASTLOAD_IO")
    time.sleep(0.1)
    return {"threads": _foreign_threads(), "fds": _fds(), "models": _models_alive(), "rss": _rss()}


def _after_failures(ckpt, baseline: dict, pools: set) -> None:
    threads, fds = _settled(baseline)
    assert threads <= baseline["threads"], f"{len(threads - baseline['threads'])} thread(s) left by the failed loads"
    assert set(engine_pools._pools) == pools, "a failed load made a new pool"
    assert _pool_threads() <= sum(p._max_workers for p in engine_pools._pools.values())
    assert fds <= baseline["fds"], f"{fds - baseline['fds']} descriptor(s) left open: {_fd_targets()}"
    _pools_idle()
    assert _models_alive() <= baseline["models"], "a model of a failed load is still alive"
    assert _rss() - baseline["rss"] < 64 << 20, "memory grew by more than 64 MiB over the failed loads"
    stock = LLAMA.from_pretrained(ckpt, dtype=torch.bfloat16)
    fast = hf_fastload.fast_from_pretrained(ckpt, model_class=LLAMA, dtype=torch.bfloat16)
    assert hf_fastload.last_report().path == "fast"
    assert_same_model(stock, fast)


def _failing_alloc(real, at: int, make_error, made: list | None = None):
    """An ``alloc_cpu`` whose ``at``-th call raises ``make_error()`` (a new exception each time: one kept here would
    keep its traceback's frames, and their tensors, alive); the others allocate, recorded in ``made`` as weakrefs."""
    calls = [0]

    def alloc(shape, dtype):
        calls[0] += 1
        if calls[0] == at:
            raise make_error()
        out = real(shape, dtype)
        if made is not None:
            made.append(weakref.ref(out))
        return out

    return alloc


@pytest.mark.parametrize("error", [MemoryError, RuntimeError])
@pytest.mark.parametrize("io", ["mmap", "pread"])
def test_allocation_failure(ckpt, baseline, monkeypatch, error, io):
    """``alloc_cpu`` fails on its 3rd call (a dtype change allocates every tensor), five loads in a row."""
    monkeypatch.setenv("HF_FASTLOAD_IO", io)
    made: list[weakref.ref] = []
    real = cpu.alloc_cpu
    for _ in range(5):
        alloc = _failing_alloc(real, 3, lambda: error("out of memory (simulated) allocating 8.00 GiB"), made)
        monkeypatch.setattr(cpu, "alloc_cpu", alloc)
        with pytest.raises(error) as info:
            hf_fastload.fast_from_pretrained(ckpt, model_class=LLAMA, dtype=torch.bfloat16)
        pools = set(engine_pools._pools)  # the pools this kind of load uses exist from its first failure on
        assert "simulated" in str(info.value) or "simulated" in str(info.value.__cause__)
        del info
    monkeypatch.setattr(cpu, "alloc_cpu", real)
    deadline = time.monotonic() + 10  # tasks that transformers 5 leaves running after the error end on their own
    while True:
        gc.collect()
        alive = [r for r in made if r() is not None]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert made and not alive, f"{len(alive)} tensor(s) of the failed loads still alive after 10 s"
    monkeypatch.delenv("HF_FASTLOAD_IO")
    _after_failures(ckpt, baseline, pools)


def test_exception_in_a_chunk_thread(ckpt, baseline, monkeypatch):
    """With 64-byte chunks every tensor is read by several chunk tasks; the 5th read of each load fails."""
    monkeypatch.setenv("HF_FASTLOAD_IO", "pread")
    chunk_bytes = cpu.CHUNK_BYTES
    monkeypatch.setattr(cpu, "CHUNK_BYTES", 64)
    real = SafetensorsFile.read_into
    for _ in range(5):
        calls = [0]
        lock = threading.Lock()

        def read_into(self, info, out, byte_offset=0, calls=calls, lock=lock):
            with lock:
                calls[0] += 1
                fail = calls[0] == 5
            if fail:
                assert threading.current_thread().name.startswith("hf_fastload-chunk")
                raise OSError(5, "Input/output error (simulated)")
            return real(self, info, out, byte_offset)

        monkeypatch.setattr(SafetensorsFile, "read_into", read_into)
        with pytest.raises(OSError, match="simulated"):
            hf_fastload.fast_from_pretrained(ckpt, model_class=LLAMA, dtype=torch.bfloat16)
        pools = set(engine_pools._pools)  # the pools this kind of load uses exist from its first failure on
    monkeypatch.setattr(SafetensorsFile, "read_into", real)
    monkeypatch.setattr(cpu, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.delenv("HF_FASTLOAD_IO")
    _after_failures(ckpt, baseline, pools)


def test_exception_in_a_reader_thread(ckpt, baseline, monkeypatch):
    """A tensor's read fails where transformers runs it (its own pool on 5.x, the calling thread on 4.57)."""
    real = SafetensorsFile.view
    for _ in range(5):

        def view(self, info):
            if info.name == "model.layers.1.mlp.up_proj.weight":
                raise ValueError("bad bytes (simulated)")
            return real(self, info)

        monkeypatch.setattr(SafetensorsFile, "view", view)
        with pytest.raises(ValueError, match="simulated"):
            hf_fastload.fast_from_pretrained(ckpt, model_class=LLAMA)
        pools = set(engine_pools._pools)  # the pools this kind of load uses exist from its first failure on
    monkeypatch.setattr(SafetensorsFile, "view", real)
    _after_failures(ckpt, baseline, pools)


def test_keyboard_interrupt(ckpt, baseline, monkeypatch):
    """Ctrl-C while tensors are read: KeyboardInterrupt reaches the caller, files are closed, and tasks that
    transformers 5 leaves running in its pool open nothing more."""
    real = cpu.alloc_cpu
    for _ in range(3):
        monkeypatch.setattr(cpu, "alloc_cpu", _failing_alloc(real, 4, KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            hf_fastload.fast_from_pretrained(ckpt, model_class=LLAMA, dtype=torch.bfloat16)
        pools = set(engine_pools._pools)  # the pools this kind of load uses exist from its first failure on
    monkeypatch.setattr(cpu, "alloc_cpu", real)
    _after_failures(ckpt, baseline, pools)


def test_failed_chunk_waits_for_its_siblings(ckpt, monkeypatch):
    """When one chunk of a tensor fails, the tensor's other chunks are cancelled or finished before the error is
    raised: none of them still writes into the (discarded) output or its thread's staging buffer afterwards."""
    monkeypatch.setattr(cpu, "CHUNK_BYTES", 64)
    running, finished = [], []
    lock = threading.Lock()

    class Slow(SafetensorsFile):
        def read_into(self, info, out, byte_offset=0):
            if byte_offset == 0:
                raise OSError(5, "Input/output error (simulated)")
            with lock:
                running.append(byte_offset)
            time.sleep(0.05)
            super().read_into(info, out, byte_offset)
            with lock:
                finished.append(byte_offset)

    f = Slow(os.path.join(ckpt, "model.safetensors"), io="pread")
    try:
        info = f.tensors["model.embed_tokens.weight"]
        same = lambda: cpu.read_same(f, info, 2)  # noqa: E731
        converted = lambda: cpu.read_converted(f, info, torch.bfloat16, 2)  # noqa: E731
        for read in (same, converted):
            with pytest.raises(OSError, match="simulated"):
                read()
            with lock:
                assert sorted(running) == sorted(finished), "a chunk was still running when the error was raised"
            running.clear()
            finished.clear()
    finally:
        f.close()
    _pools_idle()


def test_late_task_of_a_closed_load_opens_nothing(ckpt, tmp_path):
    """After a failed load closed its files, a task still running in transformers' pool reads nothing more and
    cannot reopen a file (the descriptor would never be closed)."""
    ctx = context.LoadContext(io="pread", threads=2)
    path = os.path.join(ckpt, "model.safetensors")
    handle = ctx.open(path)
    info = handle.tensors["model.norm.weight"]
    fds = _fds()
    ctx.close()
    assert _fds() <= fds - 1
    with pytest.raises(hf_fastload.FastLoadError, match="has ended"):
        materialize.materialize(handle.get_slice(info.name))
    with pytest.raises(hf_fastload.CheckpointFileError, match="has ended"):
        handle.read_into(info, memoryview(bytearray(info.nbytes)))
    other = shutil.copy(path, tmp_path / "other.safetensors")
    with pytest.raises(hf_fastload.CheckpointFileError, match="has ended"):
        ctx.open(other)
    assert _fds() <= fds - 1
