"""A validating safetensors reader with the interface of ``safetensors.safe_open``.

Example:
    ```python
    from hf_fastload.reader import SafetensorsFile

    with SafetensorsFile("model.safetensors") as f:
        for name in f.keys():
            tensor = f.get_tensor(name)  # a zero-copy view of the (private) file mapping
    ```

The header is parsed and checked in full before any tensor is touched: length within the file, valid UTF-8 JSON,
no name listed twice with different entries, known dtype names, integer shapes, ``shape x itemsize == byte length``,
offsets inside the data region, no overlaps. Tensors may be listed in any order, and gaps between them are allowed.
A mapped read checks first that the file has not shrunk since it was opened (touching a mapped page past the end of
a file is a SIGBUS, which kills the process).
Every problem raises an error naming the file and the tensor that is an instance of what ``safe_open`` raises:
:class:`~hf_fastload.errors.InvalidSafetensorsError` (a ``ValueError``) for an invalid header and
:class:`~hf_fastload.errors.TruncatedSafetensorsError` (an ``OSError``) for a file shorter than its header says, both
``safetensors.SafetensorError``; :class:`~hf_fastload.errors.CheckpointNotFoundError` (a ``FileNotFoundError``) for a
file that cannot be opened.

Tensors come back in one of two ways, picked by ``io``:

- ``"mmap"``: views into a private (copy-on-write) mapping of the file, as stock transformers returns them for a
  same-dtype CPU load. Writing into such a tensor never writes to the file.
- ``"pread"``: fresh memory filled with ``os.preadv``, for storage where mmap is slow or unsafe (network and FUSE
  mounts), or when the caller asked for ``disable_mmap=True``.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from typing import Any

import torch

from .errors import (
    CheckpointFileError,
    CheckpointNotFoundError,
    DuplicateTensorError,
    InvalidSafetensorsError,
    TruncatedSafetensorsError,
)

__all__ = ["DTYPES", "SafetensorsFile", "TensorInfo", "TensorSlice", "parse_header", "pread_into"]

# safetensors dtype name -> torch dtype. Names that this torch lacks are left out, so they read as unknown.
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in {
        "F64": "float64",
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "I64": "int64",
        "I32": "int32",
        "I16": "int16",
        "I8": "int8",
        "U8": "uint8",
        "U16": "uint16",
        "U32": "uint32",
        "U64": "uint64",
        "BOOL": "bool",
        "C64": "complex64",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E4M3FNUZ": "float8_e4m3fnuz",
        "F8_E5M2": "float8_e5m2",
        "F8_E5M2FNUZ": "float8_e5m2fnuz",
        "F8_E8M0": "float8_e8m0fnu",
    }.items()
    if hasattr(torch, attr)
}

# The reference implementation refuses headers above 100 MB; so do we, before allocating anything.
MAX_HEADER_BYTES = 100_000_000
_HEADER_PREFIX = 8


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _content_error(
    path: str, what: str, tensor: str | None = None, cls: type[InvalidSafetensorsError] = InvalidSafetensorsError
) -> InvalidSafetensorsError:
    where = f"{path}: tensor {tensor!r}: " if tensor is not None else f"{path}: "
    return cls(f"invalid safetensors file {where}{what}")


def _brief(value: Any, limit: int = 200) -> str:
    """A header value as JSON, cut to ``limit`` characters for a message."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _JSONObject(dict):
    """A JSON object that remembers keys given twice with different values (``json.loads`` keeps the last)."""

    __slots__ = ("duplicates",)

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, Any]]) -> _JSONObject:
        obj = cls()
        obj.duplicates = []
        for key, value in pairs:
            if key in obj and obj[key] != value:
                obj.duplicates.append((key, obj[key], value))
            obj[key] = value
        return obj


def parse_header(path: str, raw_prefix: bytes, file_size: int, read_header) -> tuple[dict[str, TensorInfo], dict]:
    """Parses and validates a safetensors header.

    Args:
        path (`str`): the file, for messages.
        raw_prefix (`bytes`): the first 8 bytes of the file.
        file_size (`int`): the file's size in bytes.
        read_header (`Callable[[int], bytes]`): reads the header of the given length that follows the prefix.

    Returns:
        `(tensors, metadata)`: `TensorInfo` by name, in file order, and the `__metadata__` mapping (or `{}`).
    """
    if file_size < _HEADER_PREFIX:
        raise TruncatedSafetensorsError(
            f"truncated safetensors file {path}: {file_size} bytes, expected at least 8 (the header length)"
        )
    (header_len,) = struct.unpack("<Q", raw_prefix)
    if header_len > file_size - _HEADER_PREFIX:
        raise TruncatedSafetensorsError(
            f"truncated safetensors file {path}: the header claims {header_len} bytes but only "
            f"{file_size - _HEADER_PREFIX} follow the length prefix"
        )
    if header_len > MAX_HEADER_BYTES:
        raise _content_error(path, f"header of {header_len} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    raw = read_header(header_len)
    if len(raw) != header_len:
        raise TruncatedSafetensorsError(
            f"truncated safetensors file {path}: read {len(raw)} of {header_len} header bytes"
        )
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_JSONObject.from_pairs)
    except UnicodeDecodeError as e:
        raise _content_error(path, f"header is not valid UTF-8 ({e})") from None
    except json.JSONDecodeError as e:
        raise _content_error(path, f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _content_error(path, f"header must be a JSON object, found {type(header).__name__}")
    if header.duplicates:
        key, first, last = header.duplicates[0]
        raise _content_error(
            path,
            f"listed twice in the header with different entries ({_brief(first)} and {_brief(last)}); "
            "the file is ambiguous (safetensors itself would silently take the last)",
            key,
            DuplicateTensorError,
        )

    data_start = _HEADER_PREFIX + header_len
    data_len = file_size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if getattr(metadata, "duplicates", None):
        raise _content_error(path, f"__metadata__ lists key {metadata.duplicates[0][0]!r} twice with different values")
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _content_error(path, "__metadata__ must map strings to strings")

    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise _content_error(path, f"entry must be an object, found {type(entry).__name__}", name)
        if entry.duplicates:
            raise _content_error(path, f"entry lists {entry.duplicates[0][0]!r} twice with different values", name)
        dtype = entry.get("dtype")
        if dtype not in DTYPES:
            raise _content_error(path, f"unknown dtype {dtype!r}; known: {', '.join(sorted(DTYPES))}", name)
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _content_error(path, f"shape must be a list of non-negative integers, found {shape!r}", name)
        offsets = entry.get("data_offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise _content_error(
                path, f"data_offsets must be [begin, end] with 0 <= begin <= end, found {offsets!r}", name
            )
        begin, end = offsets
        itemsize = DTYPES[dtype].itemsize
        expected = math.prod(shape) * itemsize
        if end - begin != expected:
            raise _content_error(
                path,
                f"shape {shape} of {dtype} needs {expected} bytes but data_offsets {offsets} span {end - begin}",
                name,
            )
        if end > data_len:
            raise TruncatedSafetensorsError(
                f"truncated safetensors file {path}: tensor {name!r} ends at data offset {end} but the data region "
                f"holds {data_len} bytes"
            )
        tensors[name] = TensorInfo(name, dtype, tuple(shape), data_start + begin, end - begin)
        spans.append((begin, end, name))

    spans.sort()
    reach, holder = 0, None  # the furthest end seen so far, and whose it is
    for begin, end, name in spans:
        if begin < reach and end > begin:
            raise _content_error(
                path, f"data_offsets [{begin}, {end}] overlap those of {holder!r}, which end at {reach}", name
            )
        if end > reach:
            reach, holder = end, name
    return tensors, metadata


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


def tensor_buffer(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (works for every dtype, numpy not needed)."""
    import ctypes

    nbytes = tensor.numel() * tensor.element_size()
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


class SafetensorsFile:
    """An open safetensors file, usable where ``safetensors.safe_open(path, framework="pt")`` is.

    Args:
        path (`str`): the file.
        io (`str`, *optional*, defaults to `"mmap"`): `"mmap"` returns zero-copy views of a private mapping;
            `"pread"` reads into fresh memory.
        device (`str | torch.device | int`, *optional*, defaults to `"cpu"`): where `get_tensor` puts tensors.
    """

    def __init__(self, path: str | os.PathLike, io: str = "mmap", device: Any = "cpu"):
        self.path = os.fspath(path)
        self.io = io
        self.device = device
        self._mmap: mmap.mmap | None = None
        self._lock = threading.RLock()
        self.context = None  # the LoadContext that owns this handle; it, not __exit__, closes the descriptor
        try:
            self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            # safe_open raises FileNotFoundError for every file it cannot open (missing, permission denied, ...)
            raise CheckpointNotFoundError(f"cannot open safetensors file {self.path}: {e.strerror or e}") from e
        try:
            self.size = os.fstat(self.fd).st_size
            prefix = os.pread(self.fd, _HEADER_PREFIX, 0) if self.size >= _HEADER_PREFIX else b""
            self.tensors, self._metadata = parse_header(
                self.path, prefix, self.size, lambda n: os.pread(self.fd, n, _HEADER_PREFIX)
            )
        except BaseException as e:
            os.close(self.fd)
            if isinstance(e, OSError) and not isinstance(e, CheckpointFileError):  # a directory, an I/O error
                message = f"cannot read safetensors file {self.path}: {e.strerror or e}"
                raise CheckpointFileError.matching(message, e) from e
            raise
        self.data_end = max((info.start + info.nbytes for info in self.tensors.values()), default=0)
        self._ended = False  # closed by its owning load: no tensor may be read any more

    # -- safe_open interface -------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return sorted(self.tensors)

    def metadata(self) -> dict[str, str] | None:
        return dict(self._metadata) if self._metadata else None

    def get_slice(self, name: str) -> TensorSlice:
        return TensorSlice(self, self._info(name))

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.get_slice(name)[...]

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        # transformers closes its handles while tensors of the same file may still be read by other threads; a
        # descriptor closed then could be reused by an unrelated open and read silently. The owner closes it.
        if self.context is None:
            self.close()

    def close(self) -> None:
        """Closes the descriptor. Tensors already returned stay valid (a mapping lives as long as its views)."""
        with self._lock:
            fd, self.fd = self.fd, -1
            self._ended = self.context is not None
        if fd >= 0:
            os.close(fd)

    # -- bytes -------------------------------------------------------------------------------------------------
    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise InvalidSafetensorsError(f"{self.path}: no tensor named {name!r} in this file") from None

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
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.torch_dtype)
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


class TensorSlice:
    """A lazy handle on one tensor, shaped like safetensors' ``PySafeSlice`` (``get_shape``, ``get_dtype``, ``[]``)."""

    __slots__ = ("file", "info")

    def __init__(self, file: SafetensorsFile, info: TensorInfo):
        self.file = file
        self.info = info

    def get_shape(self) -> list[int]:
        return list(self.info.shape)

    def get_dtype(self) -> str:
        return self.info.dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.info.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.info.torch_dtype

    def __getitem__(self, key) -> torch.Tensor:
        from .engine import materialize

        ctx = getattr(self.file, "context", None)
        whole = key is Ellipsis or (isinstance(key, tuple) and key == (Ellipsis,))
        if ctx is not None and whole:
            ready = ctx.take(self)
            if ready is not None:
                return ready
        if not whole:  # a block of slices (a tensor-parallel shard): read only its bytes
            from .distributed import read_index

            part = read_index(self, key)
            if part is not None:
                return part
        full = materialize(self, device=self.file.device)
        if whole:
            return full
        return full[key].contiguous()

    def __repr__(self) -> str:
        return f"TensorSlice({self.info.name!r}, {self.info.dtype}, {list(self.info.shape)}, file={self.file.path!r})"
