"""The engine's thread pools, one per kind and size, kept for the life of the process.

Example:
    ```python
    from hf_fastload.engine.pools import chunk_pool

    future = chunk_pool(8).submit(read_one_chunk)   # tasks that never wait on other tasks of the pool
    ```

Loads reuse the pools (starting threads for every load would cost more than some small loads take); a failed load
leaves none of its tasks behind (its callers cancel or await them).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

__all__ = ["chunk_pool", "get_pool", "one_op_thread"]

_pool_lock = threading.Lock()
_pools: dict[tuple[str, int], ThreadPoolExecutor] = {}


def get_pool(kind: str, threads: int) -> ThreadPoolExecutor:
    """The pool of ``threads`` threads for ``kind`` (``"chunk"``, ``"readahead"``), made on first use."""
    with _pool_lock:
        pool = _pools.get((kind, threads))
        if pool is None:
            pool = _pools[(kind, threads)] = ThreadPoolExecutor(threads, thread_name_prefix=f"hf_fastload-{kind}")
        return pool


def chunk_pool(threads: int) -> ThreadPoolExecutor:
    """Runs chunk reads and conversions; its tasks never wait on other tasks, so callers may block on them."""
    return get_pool("chunk", threads)


_omp: tuple[Callable[[], int], Callable[[int], None]] | None | bool = None  # (get, set), False where unusable


def _openmp() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    """``omp_get_max_threads`` and ``omp_set_num_threads`` of the OpenMP runtime torch's operators run on (the copy
    already loaded in this process), or None: torch not built with OpenMP, or the runtime not found."""
    global _omp
    if _omp is None:
        _omp = False
        try:
            import torch  # import cost: only a converting load gets here

            if "parallel backend: OpenMP" in torch.__config__.parallel_info():
                with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
                    paths = {line.split()[-1] for line in fh if "omp" in line.rsplit("/", 1)[-1]}
                for path in sorted(paths):
                    if os.path.basename(path).startswith(("libgomp", "libiomp", "libomp")):
                        lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
                        get, set_ = lib.omp_get_max_threads, lib.omp_set_num_threads
                        get.restype, set_.argtypes = ctypes.c_int, [ctypes.c_int]
                        _omp = (get, set_)
                        break
        except (OSError, AttributeError, ValueError, ImportError):
            _omp = False
    return _omp or None


@contextmanager
def one_op_thread() -> Iterator[None]:
    """Within the block, torch's operators called from this thread run on this thread alone.

    Conversions run on several threads at once (transformers 5's loader threads, the engine's pools), each a
    tensor's chunks; letting each ``copy_`` also split itself over torch's intra-op threads puts ``cores x callers``
    threads on the cores, spinning in OpenMP's barriers. Only this thread's OpenMP setting changes, and it is restored
    at the end; torch's process-wide ``torch.get_num_threads()`` and every other thread are untouched.
    """
    omp = _openmp()
    if omp is None:
        yield
        return
    get, set_ = omp
    import torch  # import cost: see _openmp

    torch.get_num_threads()  # torch sets a thread's OpenMP count at its first parallel call: before ours, not after
    before = get()
    if before <= 1:
        yield
        return
    set_(1)
    try:
        yield
    finally:
        set_(before)
