"""The readahead of a whole file really brings the whole file into the page cache.

Linux reads at most the device's readahead window per ``POSIX_FADV_WILLNEED`` call and drops the rest of the range
without a word; advising 32 MiB pieces on a disk with an 8 MiB window read a quarter of each file (a cold start was
no faster with the readahead than without it).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import time

import pytest

from hf_fastload.engine import readahead
from hf_fastload.engine.context import LoadContext

PAGE = os.sysconf("SC_PAGE_SIZE")


def _resident(path: str) -> float:
    """The share of ``path``'s pages in the page cache (mincore of a fresh mapping of it)."""
    size = os.path.getsize(path)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    pages = (size + PAGE - 1) // PAGE
    vec = ctypes.create_string_buffer(pages)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            pytest.skip(f"mmap failed: {os.strerror(ctypes.get_errno())}")
        try:
            if libc.mincore(addr, size, vec) != 0:
                pytest.skip(f"mincore failed: {os.strerror(ctypes.get_errno())}")
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(b & 1 for b in vec.raw) / pages


def _evicted_file(path: str, size: int) -> str:
    block = os.urandom(1 << 20)
    with open(path, "wb") as fh:
        for _ in range(size >> 20):
            fh.write(block)
        fh.flush()
        os.fsync(fh.fileno())  # dirty pages are not dropped
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if _resident(path) > 0.05:
        pytest.skip("this filesystem keeps the file's pages (tmpfs?): the readahead cannot be observed")
    return path


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise")
def test_the_whole_file_reaches_the_page_cache(tmp_path):
    path = _evicted_file(str(tmp_path / "weights.bin"), 64 << 20)
    ctx = LoadContext(io="mmap", threads=2, readahead=True)
    try:
        ctx.read_ahead([path])
        deadline = time.monotonic() + 30
        while _resident(path) < 0.999 and time.monotonic() < deadline:
            time.sleep(0.05)
        share = _resident(path)
    finally:
        ctx.close()
    window = readahead._device_window(os.stat(path).st_dev)
    assert share >= 0.999, f"only {share:.0%} of the file was read ahead (its device's window: {window} bytes)"


def test_spread_advises_every_window_once_and_closes_the_descriptor(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    path.write_bytes(b"\0" * (10 * 4096 + 123))
    calls: list[tuple[int, int]] = []
    lock = threading.Lock()

    def spy(fd, offset, length, advice):
        assert advice == os.POSIX_FADV_WILLNEED
        with lock:
            calls.append((offset, length))

    monkeypatch.setattr(readahead, "window_bytes", lambda fd: 4096)
    monkeypatch.setattr(os, "posix_fadvise", spy)
    fd = os.open(path, os.O_RDONLY)
    closed = threading.Event()
    real_close = os.close

    def close(n):
        if n == fd:
            assert not closed.is_set(), "closed twice"
            closed.set()
        real_close(n)

    monkeypatch.setattr(os, "close", close)
    readahead.spread(fd, os.path.getsize(path), threads=3)
    assert closed.wait(10)
    assert sorted(calls) == [(i * 4096, 4096) for i in range(10)] + [(10 * 4096, 123)]


def test_window_comes_from_the_device_and_has_a_floor(monkeypatch):
    readahead._device_window.cache_clear()
    monkeypatch.setattr(readahead, "_read_kb", lambda p: {"read_ahead_kb": 8192 << 10, "max_sectors_kb": 4096 << 10}
                        .get(os.path.basename(p), 0) if "/queue/" in p else 0)  # fmt: skip
    fd = os.open(__file__, os.O_RDONLY)
    try:
        assert readahead.window_bytes(fd) == 8 << 20
        readahead._device_window.cache_clear()
        monkeypatch.setattr(readahead, "_read_kb", lambda p: 0)  # nothing in sysfs
        assert readahead.window_bytes(fd) == readahead.DEFAULT_WINDOW
    finally:
        os.close(fd)
        readahead._device_window.cache_clear()
