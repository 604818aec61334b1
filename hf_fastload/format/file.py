"""An open safetensors file: its validated header and its bytes, by ``mmap`` views or ``pread``.

Example:
    ```python
    from hf_fastload.format.file import SafetensorsFile

    with SafetensorsFile("model.safetensors") as f:
        info = f.tensors["lm_head.weight"]   # TensorInfo: dtype, shape, byte range
        weight = f.view(info)                 # a zero-copy view of the private (copy-on-write) mapping
    ```

The header is parsed and validated when the file is opened (:func:`~hf_fastload.format.header.parse_header`).
Bytes come back in one of two ways, picked by ``io``:

- ``"mmap"``: views into a private (copy-on-write) mapping of the file, as stock transformers returns them for a
  same-dtype CPU load. Writing into such a tensor never writes to the file. A mapped read checks first that the file
  has not shrunk since it was opened (touching a mapped page past the end of a file is a SIGBUS, which kills the
  process).
- ``"pread"``: :meth:`SafetensorsFile.read_into` fills caller-owned memory with ``os.preadv``, for storage where mmap
  is slow or unsafe (network and FUSE mounts), or when the caller asked for ``disable_mmap=True``.

This layer knows the file format only; the ``safe_open``-compatible handle that transformers indexes is the
engine's (:mod:`hf_fastload.engine.handle`).
"""

from __future__ import annotations

import mmap
import os
import threading
from typing import Any

import torch

from ..errors import (
    CheckpointFileError,
    CheckpointNotFoundError,
    InvalidSafetensorsError,
    TruncatedSafetensorsError,
)
from .header import HEADER_PREFIX, TensorInfo, parse_header

__all__ = ["SafetensorsFile", "pread_into"]


def pread_into(fd: int, path: str, buffer: memoryview, offset: int, tensor: str | None = None) -> None:
    """Fills ``buffer`` from ``fd`` at ``offset``; a short read (the file shrank) raises TruncatedSafetensorsError."""
    done, total = 0, len(buffer)
    while done < total:
        try:
            n = os.preadv(fd, [buffer[done:]], offset + done)
        except OSError as e:
            message = f"cannot read {path} (tensor {tensor!r}) at offset {offset + done}: {e}"
            raise CheckpointFileError.matching(message, e) from e  # keeps the class: IsADirectoryError, ...
        if n == 0:
            try:
                ends = f"the file ends at {os.fstat(fd).st_size}"
            except OSError:
                ends = f"no bytes could be read at offset {offset + done}"
            raise TruncatedSafetensorsError(
                f"truncated safetensors file {path}: tensor {tensor!r} needs bytes up to offset {offset + total}, "
                f"{ends} (truncated while it was being loaded?)"
            )
        done += n


class SafetensorsFile:
    """An open safetensors file: the validated header (``tensors``, ``metadata()``) and access to the bytes.

    Args:
        path (`str`): the file.
        io (`str`, *optional*, defaults to `"mmap"`): how callers read it: `"mmap"` (zero-copy :meth:`view`) or
            `"pread"` (:meth:`read_into`); recorded here for the reader that decides.

    Raises:
        `CheckpointFileError`: the file cannot be opened, or is shorter than its header says.
        `CheckpointContentError`: the header is invalid (see :mod:`hf_fastload.format.header`).
    """

    def __init__(self, path: str | os.PathLike, io: str = "mmap"):
        self.path = os.fspath(path)
        self.io = io
        self._mmap: mmap.mmap | None = None
        self._lock = threading.RLock()
        self.owner: Any = None  # a load that owns this file closes it, not __exit__ (see there)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            # safe_open raises FileNotFoundError for every file it cannot open (missing, permission denied, ...)
            raise CheckpointNotFoundError(f"cannot open safetensors file {self.path}: {e.strerror or e}") from e
        try:
            self.size = os.fstat(self.fd).st_size
            prefix = os.pread(self.fd, HEADER_PREFIX, 0) if self.size >= HEADER_PREFIX else b""
            self.tensors, self._metadata = parse_header(
                self.path, prefix, self.size, lambda n: os.pread(self.fd, n, HEADER_PREFIX)
            )
        except BaseException as e:
            os.close(self.fd)
            if isinstance(e, OSError) and not isinstance(e, CheckpointFileError):  # a directory, an I/O error
                message = f"cannot read safetensors file {self.path}: {e.strerror or e}"
                raise CheckpointFileError.matching(message, e) from e
            raise
        self.data_end = max((info.start + info.nbytes for info in self.tensors.values()), default=0)
        self._ended = False  # closed by its owner: no tensor may be read any more

    # -- the header ----------------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return sorted(self.tensors)

    def metadata(self) -> dict[str, str] | None:
        return dict(self._metadata) if self._metadata is not None else None

    def info(self, name: str) -> TensorInfo:
        """Where tensor ``name`` is; raises CheckpointContentError naming the file when it has no such tensor."""
        try:
            return self.tensors[name]
        except KeyError:
            raise InvalidSafetensorsError(f"{self.path}: no tensor named {name!r} in this file") from None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        # transformers closes its handles while tensors of the same file may still be read by other threads; a
        # descriptor closed then could be reused by an unrelated open and read silently. The owner closes it.
        if self.owner is None:
            self.close()

    def close(self) -> None:
        """Closes the descriptor. Tensors already returned stay valid (a mapping lives as long as its views)."""
        with self._lock:
            fd, self.fd = self.fd, -1
            self._ended = self.owner is not None
        if fd >= 0:
            os.close(fd)

    # -- bytes -------------------------------------------------------------------------------------------------
    def _fd(self) -> int:
        if self.fd < 0:  # reopened on demand: transformers closes handles before every tensor is materialized
            with self._lock:
                if self._ended:  # a task still running after its load failed: reopening would leak the descriptor
                    raise CheckpointFileError(
                        f"{self.path}: the load that opened this file has ended (it failed or was interrupted)"
                    )
                if self.fd < 0:
                    self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        return self.fd

    def mapping(self) -> mmap.mmap:
        """The private (copy-on-write) mapping of the whole file, made on first use."""
        if self._mmap is None:
            with self._lock:
                if self._mmap is None:
                    self._mmap = mmap.mmap(self._fd(), self.size, access=mmap.ACCESS_COPY)
        return self._mmap

    def check_size(self, end: int, tensor: str | None = None) -> None:
        """Raises TruncatedSafetensorsError if the file now holds fewer than ``end`` bytes.

        Another process may truncate or rewrite the file while it is mapped; touching a mapped page past the file's
        new end kills this process with SIGBUS. Mapped reads call this first (one ``fstat``).
        """
        size = os.fstat(self._fd()).st_size
        if size < end:
            what = f"tensor {tensor!r} needs bytes up to offset {end}" if tensor else f"its data ends at offset {end}"
            raise TruncatedSafetensorsError(
                f"safetensors file {self.path} shrank while it was being loaded: {what}, the file now ends at {size} "
                f"(it had {self.size} bytes when opened); was it truncated or rewritten in place by another process?"
            )

    def view(self, info: TensorInfo) -> torch.Tensor:
        """A zero-copy CPU view of one tensor (shares the file's pages until written)."""
        if info.nbytes == 0:  # as safetensors makes it (torch.empty's strides overflow for absurd zero-size shapes)
            return torch.empty(0, dtype=info.torch_dtype).reshape(info.shape)
        flat = torch.frombuffer(self.mapping(), dtype=torch.uint8, count=info.nbytes, offset=info.start)
        return flat.view(info.torch_dtype).view(info.shape)

    def release(self, info: TensorInfo, begin: int, end: int) -> None:
        """Drops this process's mapping of the whole pages inside bytes ``[begin, end)`` of ``info``'s data.

        The file's page cache keeps them; a later access faults them back in unchanged. Pages shared with a
        neighbouring tensor are kept, so a zero-copy view of another tensor never loses a private write.
        """
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        lo = -(-(info.start + begin) // page) * page
        hi = (info.start + end) // page * page
        if hi > lo:
            self._mmap.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def read_into(self, info: TensorInfo, out: memoryview, byte_offset: int = 0) -> None:
        """Copies ``len(out)`` bytes of ``info``'s data, starting ``byte_offset`` into it, with pread."""
        pread_into(self._fd(), self.path, out, info.start + byte_offset, info.name)
