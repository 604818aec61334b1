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

import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["chunk_pool", "get_pool"]

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
