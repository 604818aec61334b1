"""The converted-tensor cache's folder: entry keys, entries, writer locks, eviction, verification.

Example:
    ```python
    from hf_fastload.engine.cache_store import CacheStore, source_key
    from hf_fastload.format.file import SafetensorsFile

    store = CacheStore("~/.cache/hf_fastload/converted")
    with SafetensorsFile("llama/model.safetensors") as f:
        key, parts = source_key(f)          # identity and content of the source file, as one hex digest
    for entry in store.entries():
        print(entry.path, entry.size, entry.last_used)
    store.evict(max_bytes=20 * 10**9)       # least recently used entries first
    ```

Layout of the folder (created on the first write):

- ``entries/<key>-<tensors>.safetensors``: published entries, ordinary safetensors files holding the tensors of one
  source file as a load converted them (``stored.to(dtype)`` under the checkpoint's tensor names); ``<key>`` is the
  source's key (:func:`source_key`), ``<tensors>`` a digest of the names and dtypes it holds. An entry is never
  written in place: it appears by ``rename`` once complete and on disk (``fsync``), and goes by ``unlink`` (processes
  that map it keep their pages);
- ``locks/<key>.lock``: one writer per source file at a time (``flock``, released by the kernel if the writer dies);
- ``tmp/``: entries being written; a writer that holds a key's lock removes that key's leftovers.

The file modification time of an entry is its last use (a hit sets it), which eviction goes by. Knows nothing of
transformers: the cache's unit is one checkpoint tensor converted to one dtype.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..format.file import SafetensorsFile
from ..format.header import HEADER_PREFIX, TensorInfo
from .cpu import tensor_buffer
from .pools import get_pool

__all__ = [
    "FORMAT_VERSION", "KEY_MODES", "BadEntry", "CacheStore", "EntryInfo", "EntryStatus", "check_entry",
    "compare_with_source", "open_entry", "source_key",
]  # fmt: skip

# Bump when the entry layout or what the key covers changes: old entries then simply never match.
FORMAT_VERSION = "1"
KEY_MODES = ("identity", "content")
_SAMPLES = 16
_SAMPLE_BYTES = 4096
_HASH_CHUNK = 64 << 20
_SUFFIX = ".safetensors"


class BadEntry(Exception):
    """A cache entry that cannot be used: truncated, corrupt, or not the one its name claims to be."""


def _conversion_rules() -> str:
    """What decides the bytes of ``stored.to(dtype)``: torch's conversion code, by release."""
    return "torch " + torch.__version__.split("+")[0]


def _content_digest(fd: int, size: int, threads: int = 4) -> str:
    """sha256 over the sha256 of each 64 MiB piece of the file, the pieces hashed in parallel (hashlib releases the
    GIL); reads the whole file."""

    def piece(offset: int) -> bytes:
        h = hashlib.sha256()
        end = min(offset + _HASH_CHUNK, size)
        buf = memoryview(bytearray(min(1 << 20, end - offset) or 1))  # reused: fresh memory is slow to touch
        while offset < end:
            n = os.preadv(fd, [buf[: min(len(buf), end - offset)]], offset)
            if n <= 0:
                raise OSError(f"the file ended at {offset} while it was being hashed (it shrank?)")
            h.update(buf[:n])
            offset += n
        return h.digest()

    pool = get_pool("hash", threads)
    digests = list(pool.map(piece, range(0, size, _HASH_CHUNK)))
    return hashlib.sha256(b"".join(digests)).hexdigest()


def source_key(file: SafetensorsFile, mode: str = "identity") -> tuple[str, dict[str, Any]]:
    """The key of the entries that hold ``file``'s tensors converted: ``(hex digest, the parts it covers)``.

    Args:
        file (`SafetensorsFile`): the open source file (its descriptor is what is checked, not the path).
        mode (`str`, *optional*, defaults to `"identity"`): `"identity"`: the file's device, inode, size,
            modification and change times (``st_ctime`` changes on every write and cannot be set back by tools that
            preserve ``mtime``), the header bytes (names, dtypes, shapes, offsets, metadata) and 16 sampled 4 KiB
            blocks of the data; costs one ``fstat`` and a few small reads. `"content"`: a sha256 of the whole file
            instead of its identity (reads every byte at every load; for storage whose inode numbers or times cannot
            be trusted, and to share entries between copies of a checkpoint).

    Both modes also cover the cache format version and torch's release (its conversion code makes the bytes).
    """
    if mode not in KEY_MODES:
        raise ValueError(f"key mode must be one of {', '.join(KEY_MODES)}; got {mode!r}")
    fd = file._fd()
    st = os.fstat(fd)
    (header_len,) = struct.unpack("<Q", os.pread(fd, HEADER_PREFIX, 0))
    header = os.pread(fd, HEADER_PREFIX + header_len, 0)
    parts: dict[str, Any] = {"format": FORMAT_VERSION, "rules": _conversion_rules(), "mode": mode}
    parts["header_sha256"] = hashlib.sha256(header).hexdigest()
    if mode == "content":
        parts["content_sha256"] = _content_digest(fd, st.st_size)
    else:
        parts.update(dev=st.st_dev, ino=st.st_ino, size=st.st_size, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns)
        start, span = len(header), max(0, st.st_size - len(header))
        sampled = hashlib.sha256()
        for i in range(_SAMPLES):
            offset = start + (max(0, span - _SAMPLE_BYTES) * i) // (_SAMPLES - 1)
            sampled.update(os.pread(fd, _SAMPLE_BYTES, offset))
        parts["samples_sha256"] = sampled.hexdigest()
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()
    return digest, parts


def open_entry(path: str, key: str, source: dict[str, TensorInfo]) -> SafetensorsFile:
    """Opens and checks one entry (mapped, private) for the source file whose key is ``key`` and tensors ``source``.

    Raises:
        `BadEntry`: the file is not a complete entry for that source: unreadable or truncated header or data, bytes
            after the data, another format version or key, or a tensor the source lacks or with another shape.
        `FileNotFoundError`: it was removed meanwhile (evicted or cleared).
    """
    try:
        entry = SafetensorsFile(path, io="mmap")
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:  # CheckpointFileError / CheckpointContentError: truncated or garbage
        raise BadEntry(str(e)) from None
    try:
        meta = entry.metadata() or {}
        if meta.get("hf_fastload_cache") != FORMAT_VERSION or meta.get("source_key") != key:
            raise BadEntry(f"{path}: its metadata does not name this source and cache format version")
        if entry.size != entry.data_end or not entry.tensors:
            raise BadEntry(f"{path}: {entry.size} bytes where its header's data ends at {entry.data_end}")
        for name, info in entry.tensors.items():
            src = source.get(name)
            if src is None or src.shape != info.shape:
                raise BadEntry(f"{path}: tensor {name!r} {list(info.shape)} does not match the source")
    except BaseException:
        entry.close()
        raise
    return entry


@dataclass
class EntryInfo:
    """One published entry, as listed by :meth:`CacheStore.entries`."""

    path: str
    key: str
    size: int
    last_used: float


class CacheStore:
    """The cache folder ``root``; creates nothing until :meth:`ensure` (a read-only folder still serves hits).

    Args:
        root (`str`): the folder (``HF_FASTLOAD_CACHE``); ``~`` is expanded.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = os.path.abspath(os.path.expanduser(os.fspath(root)))
        self.entries_dir = os.path.join(self.root, "entries")
        self.locks_dir = os.path.join(self.root, "locks")
        self.tmp_dir = os.path.join(self.root, "tmp")

    def ensure(self) -> None:
        """Creates the folder's subfolders (OSError when it cannot: read-only, not a folder, no permission)."""
        for d in (self.entries_dir, self.locks_dir, self.tmp_dir):
            os.makedirs(d, exist_ok=True)

    # -- entries ---------------------------------------------------------------------------------------------------
    def entry_paths(self, key: str) -> list[str]:
        """Published entries of the source whose key is ``key`` (none when the folder does not exist)."""
        prefix = key + "-"
        try:
            names = os.listdir(self.entries_dir)
        except OSError:
            return []
        return sorted(os.path.join(self.entries_dir, n) for n in names if n.startswith(prefix) and n.endswith(_SUFFIX))

    def entry_path(self, key: str, tensors: list[tuple[str, str]]) -> str:
        """Where the entry of ``key`` holding ``tensors`` (name, dtype name) is published."""
        digest = hashlib.sha256("\n".join(f"{n}\t{d}" for n, d in sorted(tensors)).encode("utf-8")).hexdigest()
        return os.path.join(self.entries_dir, f"{key}-{digest[:16]}{_SUFFIX}")

    def entries(self) -> list[EntryInfo]:
        """Every published entry, least recently used first."""
        found = []
        try:
            names = os.listdir(self.entries_dir)
        except OSError:
            return []
        for name in names:
            if not name.endswith(_SUFFIX):
                continue
            path = os.path.join(self.entries_dir, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            found.append(EntryInfo(path, name.split("-", 1)[0], st.st_size, st.st_mtime))
        return sorted(found, key=lambda e: (e.last_used, e.path))

    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries())

    @staticmethod
    def touch(path: str) -> None:
        """Marks an entry as used now (for eviction); silently nothing on a read-only folder."""
        with contextlib.suppress(OSError):
            os.utime(path, None)

    def remove(self, path: str) -> bool:
        """Unlinks an entry; processes that map it keep their pages. False when it was already gone."""
        try:
            os.unlink(path)
            return True
        except FileNotFoundError:
            return False

    # -- writers ---------------------------------------------------------------------------------------------------
    def try_lock(self, key: str) -> int | None:
        """Takes the writer lock of ``key`` without waiting: its descriptor (close it to release), or None when
        another writer holds it. OSError when the lock file cannot be created (read-only folder)."""
        fd = os.open(os.path.join(self.locks_dir, key + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def remove_leftovers(self, key: str) -> None:
        """Removes ``key``'s temporary files (call with its lock held: no live writer owns them)."""
        try:
            names = os.listdir(self.tmp_dir)
        except OSError:
            return
        for name in names:
            if name.startswith(key + "."):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.tmp_dir, name))

    def temp_path(self, key: str) -> str:
        return os.path.join(self.tmp_dir, f"{key}.{os.getpid()}.{os.urandom(4).hex()}.tmp")

    def room(self) -> int:
        """Bytes a new entry may take on the folder's filesystem: the free space less 5% of the filesystem, so
        that the cache never fills a disk (0 when unknown)."""
        try:
            st = os.statvfs(self.tmp_dir if os.path.isdir(self.tmp_dir) else self.root)
        except OSError:
            return 0
        return max(0, st.f_bavail * st.f_frsize - st.f_blocks * st.f_frsize // 20)

    @contextlib.contextmanager
    def _evict_lock(self) -> Iterator[bool]:
        try:
            fd = os.open(os.path.join(self.locks_dir, "evict.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            yield False
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield True
        finally:
            os.close(fd)

    def evict(self, max_bytes: int, keep: frozenset[str] = frozenset(), incoming: int = 0) -> list[str]:
        """Removes least recently used entries until they take at most ``max_bytes`` with ``incoming`` more bytes
        to come; never the paths in ``keep``. Returns the removed paths."""
        removed: list[str] = []
        with self._evict_lock():
            found = self.entries()
            total = sum(e.size for e in found) + incoming
            for entry in found:
                if total <= max_bytes:
                    break
                if entry.path in keep:
                    continue
                with contextlib.suppress(OSError):
                    if self.remove(entry.path):
                        removed.append(entry.path)
                total -= entry.size
        return removed

    def clear(self) -> list[str]:
        """Removes every entry and the leftovers of writers that are not running. Returns the removed entries."""
        removed = [e.path for e in self.entries() if self.remove(e.path)]
        try:
            names = os.listdir(self.tmp_dir)
        except OSError:
            names = []
        for name in names:
            key = name.split(".", 1)[0]
            with contextlib.suppress(OSError):
                fd = self.try_lock(key)
                if fd is not None:  # no writer of this key is running: its temporary files are leftovers
                    try:
                        os.unlink(os.path.join(self.tmp_dir, name))
                    finally:
                        os.close(fd)
        return removed


@dataclass
class EntryStatus:
    """What :func:`check_entry` found: ``state`` is ``current`` (its source is unchanged: loads use it), ``stale``
    (the source changed: no load will use it again), ``orphan`` (the source is gone) or ``corrupt``."""

    path: str
    size: int
    last_used: float
    state: str
    detail: str = ""
    source: str = ""
    tensors: int = 0
    dtypes: tuple[str, ...] = ()


def check_entry(entry: EntryInfo, verify: bool = False) -> EntryStatus:
    """Checks one entry against its source (``hf-fastload cache ls``); with ``verify``, also converts the source
    again and compares every byte (``hf-fastload cache verify``), which reads both files whole."""
    status = EntryStatus(entry.path, entry.size, entry.last_used, "corrupt")
    try:
        handle = SafetensorsFile(entry.path, io="pread")
    except (OSError, ValueError) as e:
        status.detail = str(e)
        return status
    with handle:
        meta = handle.metadata() or {}
        status.source = meta.get("source", "")
        status.tensors = len(handle.tensors)
        status.dtypes = tuple(sorted({info.dtype for info in handle.tensors.values()}))
        if meta.get("hf_fastload_cache") != FORMAT_VERSION or meta.get("source_key") != entry.key:
            status.detail = "not an entry of this cache format, or its name does not match its key"
            return status
        if handle.size != handle.data_end:
            status.detail = f"{handle.size} bytes, its header's data ends at {handle.data_end}"
            return status
        mode = dict(p.split("=", 1) for p in meta.get("key_parts", "").split(",") if "=" in p).get("mode", "identity")
        try:
            source = SafetensorsFile(status.source, io="pread")
        except FileNotFoundError:
            status.state, status.detail = "orphan", "the source file no longer exists"
            return status
        except (OSError, ValueError) as e:
            status.state, status.detail = "orphan", f"the source cannot be read: {e}"
            return status
        with source:
            try:
                key, _ = source_key(source, mode)
            except (OSError, ValueError) as e:
                status.state, status.detail = "orphan", f"the source cannot be read: {e}"
                return status
            if key != entry.key:
                status.state, status.detail = "stale", "the source changed since the entry was written"
                return status
            status.state = "current"
            if verify:
                mismatch = compare_with_source(handle, source)
                if mismatch is not None:
                    status.state, status.detail = "corrupt", mismatch
    return status


def compare_with_source(entry: SafetensorsFile, source: SafetensorsFile, chunk_elements: int = 1 << 22) -> str | None:
    """Converts every tensor of ``source`` that ``entry`` holds again and compares the bytes; None when all match,
    else which tensor differs (``hf-fastload cache verify``). Reads both files with ``pread``, chunk by chunk."""
    for name, info in entry.tensors.items():
        src = source.tensors.get(name)
        if src is None or src.shape != info.shape:
            return f"tensor {name!r} is not in the source with this shape"
        for lo in range(0, info.numel, chunk_elements):
            hi = min(lo + chunk_elements, info.numel)
            stored = torch.empty(hi - lo, dtype=src.torch_dtype)
            source.read_into(src, tensor_buffer(stored), lo * src.torch_dtype.itemsize)
            cached = torch.empty(hi - lo, dtype=info.torch_dtype)
            entry.read_into(info, tensor_buffer(cached), lo * info.torch_dtype.itemsize)
            expected = stored.to(info.torch_dtype)
            if not torch.equal(expected.view(torch.uint8), cached.view(torch.uint8)):
                return f"tensor {name!r} differs from the source converted to {info.dtype} (elements {lo}..{hi})"
    return None
