"""The safetensors header: parsing and validation, and where each tensor's bytes are.

Example:
    ```python
    import os
    from hf_fastload.format.header import parse_header

    fd = os.open("model.safetensors", os.O_RDONLY)
    size = os.fstat(fd).st_size
    tensors, metadata = parse_header("model.safetensors", os.pread(fd, 8, 0), size, lambda n: os.pread(fd, n, 8))
    tensors["lm_head.weight"]   # TensorInfo(name=..., dtype='BF16', shape=(...), start=..., nbytes=...)
    ```

The header is checked in full before any tensor is touched: length within the file, valid UTF-8 JSON, no name
listed twice with different entries, known dtype names, integer shapes, ``shape x itemsize == byte length``,
offsets inside the data region, no overlaps. Every problem raises
:class:`~hf_fastload.errors.CheckpointFileError` (an ``OSError``) or
:class:`~hf_fastload.errors.CheckpointContentError` (a ``ValueError``) naming the file and the tensor.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CheckpointContentError, CheckpointFileError

__all__ = ["DTYPES", "HEADER_PREFIX", "MAX_HEADER_BYTES", "TensorInfo", "parse_header"]

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
HEADER_PREFIX = 8


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


def _content_error(path: str, what: str, tensor: str | None = None) -> CheckpointContentError:
    where = f"{path}: tensor {tensor!r}: " if tensor is not None else f"{path}: "
    return CheckpointContentError(f"invalid safetensors file {where}{what}")


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
    if file_size < HEADER_PREFIX:
        raise CheckpointFileError(
            f"truncated safetensors file {path}: {file_size} bytes, expected at least 8 (the header length)"
        )
    (header_len,) = struct.unpack("<Q", raw_prefix)
    if header_len > file_size - HEADER_PREFIX:
        raise CheckpointFileError(
            f"truncated safetensors file {path}: the header claims {header_len} bytes but only "
            f"{file_size - HEADER_PREFIX} follow the length prefix"
        )
    if header_len > MAX_HEADER_BYTES:
        raise _content_error(path, f"header of {header_len} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    raw = read_header(header_len)
    if len(raw) != header_len:
        raise CheckpointFileError(f"truncated safetensors file {path}: read {len(raw)} of {header_len} header bytes")
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
        )

    data_start = HEADER_PREFIX + header_len
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
            raise CheckpointFileError(
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
