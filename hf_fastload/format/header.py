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

The header is parsed and checked in full before any tensor is touched, by the rules of the safetensors library
(its Rust ``read_metadata`` and ``validate``, 0.8): the length prefix inside the file and at most 100 MB; UTF-8 JSON
as its JSON parser reads it (no ``NaN``, numbers in range, no lone surrogates, at most 127 levels deep); an object
whose ``__metadata__`` (given at most once) is null or maps strings to strings; for every tensor a known dtype, a
shape of integers, ``data_offsets`` ``[begin, end]``, ``shape x dtype size == end - begin`` without overflow; and the
tensors, taken in offset order, covering the data region exactly: no hole, no overlap, no byte after the last tensor,
so no file can hide other content between or after its tensors. Header entries may be listed in any order. A tensor
that torch cannot hold (an F6 dtype, an odd F4 last dimension) is refused when it is read, as safetensors does. One
rule is stricter than safetensors: a tensor named twice with different entries is refused (safetensors silently
keeps the last). ``tests/test_reader_fuzz.py`` holds the reader to safetensors' own on valid and damaged files.
Every problem raises a :class:`~hf_fastload.errors.CheckpointFileError` or
:class:`~hf_fastload.errors.CheckpointContentError` naming the file and the tensor.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import (
    DuplicateTensorError,
    InvalidSafetensorsError,
    TruncatedSafetensorsError,
    UnreadableTensorError,
)
from .jsonrules import (
    MAX_DEPTH,
    U64,
    JSONError,
    has_surrogate,
    int_or_float_zero,
    object_pairs,
    refuse_constant,
    repeated,
    serde_f64,
)

__all__ = ["DTYPES", "HEADER_PREFIX", "MAX_HEADER_BYTES", "TensorInfo", "parse_header"]

# Every dtype name safetensors knows -> (torch dtype attribute, bits per element). F6_E2M3 and F6_E3M2 have no torch
# dtype: safetensors reads their headers but cannot make torch tensors of them, so neither do we.
_DTYPE_NAMES: dict[str, tuple[str | None, int]] = {
    "F64": ("float64", 64),
    "F32": ("float32", 32),
    "F16": ("float16", 16),
    "BF16": ("bfloat16", 16),
    "I64": ("int64", 64),
    "I32": ("int32", 32),
    "I16": ("int16", 16),
    "I8": ("int8", 8),
    "U8": ("uint8", 8),
    "U16": ("uint16", 16),
    "U32": ("uint32", 32),
    "U64": ("uint64", 64),
    "BOOL": ("bool", 8),
    "C64": ("complex64", 64),
    "F8_E4M3": ("float8_e4m3fn", 8),
    "F8_E4M3FNUZ": ("float8_e4m3fnuz", 8),
    "F8_E5M2": ("float8_e5m2", 8),
    "F8_E5M2FNUZ": ("float8_e5m2fnuz", 8),
    "F8_E8M0": ("float8_e8m0fnu", 8),
    "F4": ("float4_e2m1fn_x2", 4),  # torch packs two F4 values in one element along the last dimension
    "F6_E2M3": (None, 6),
    "F6_E3M2": (None, 6),
}
_BITS = {name: bits for name, (_, bits) in _DTYPE_NAMES.items()}
# safetensors dtype name -> torch dtype. Names that this torch lacks are left out: their tensors are refused when read.
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr) for name, (attr, _) in _DTYPE_NAMES.items() if attr and hasattr(torch, attr)
}

# The reference implementation refuses headers above 100 MB; so do we, before allocating anything.
MAX_HEADER_BYTES = 100_000_000
HEADER_PREFIX = 8
_TORCH_DIM = (1 << 63) - 1  # torch sizes are int64
_ENTRY_FIELDS = ("dtype", "shape", "data_offsets")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    name: str
    dtype: str
    shape: tuple[int, ...]  # the torch tensor's shape (for F4, half the header's last dimension)
    start: int  # absolute byte offset in the file
    nbytes: int
    unreadable: str | None = None  # why torch cannot hold this tensor (it is refused when read), or None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def check_readable(self, path: str) -> None:
        """Raises CheckpointContentError naming ``path`` and this tensor if torch cannot hold it (safetensors refuses
        to read it too); the file itself is valid."""
        if self.unreadable is not None:
            raise _content_error(path, self.unreadable, self.name, UnreadableTensorError)

    @property
    def header_shape(self) -> tuple[int, ...]:
        """The shape as the header gives it (what ``safe_open``'s ``get_shape`` returns)."""
        return (*self.shape[:-1], self.shape[-1] * 2) if self.dtype == "F4" and not self.unreadable else self.shape


def _content_error(
    path: str, what: str, tensor: str | None = None, cls: type[InvalidSafetensorsError] = InvalidSafetensorsError
) -> InvalidSafetensorsError:
    where = f"{path}: tensor {tensor!r}: " if tensor is not None else f"{path}: "
    return cls(f"invalid safetensors file {where}{what}")


def _brief(value: Any, limit: int = 200) -> str:
    """A header value as JSON, cut to ``limit`` characters for a message."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _decode(path: str, raw: bytes) -> Any:
    """The header's JSON, read by serde_json's rules: what it refuses raises CheckpointContentError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _content_error(path, f"header is not valid UTF-8 ({e})") from None
    hooks: dict[str, Any] = {"parse_constant": refuse_constant, "parse_float": serde_f64}
    if "-0" in text:  # rare: the parse_int hook costs a Python call per integer
        hooks["parse_int"] = int_or_float_zero
    try:
        header = json.loads(text, object_pairs_hook=object_pairs, **hooks)
    except json.JSONDecodeError as e:
        raise _content_error(path, f"header is not valid JSON ({e})") from None
    except RecursionError:
        raise _content_error(path, f"header is not valid JSON: nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as e:  # JSONError, or an integer of more than 4300 digits
        raise _content_error(path, f"header is not valid JSON: {e}") from None
    if "\\u" in text and has_surrogate(header):
        raise _content_error(path, "header is not valid JSON: a \\u escape is a lone UTF-16 surrogate")
    return header


def _check_ignored(path: str, name: str, values: list[Any]) -> None:
    """Fields of an entry that safetensors ignores must still be JSON it parses: nested at most 127 levels deep (the
    entry itself is level 2), integers within f64 range."""
    stack = [(value, 3) for value in values]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise _content_error(
                    path, f"header is not valid JSON: nested more than {MAX_DEPTH} levels deep", name
                )
            children = (
                list(value) if isinstance(value, list) else [*value.values(), *(f for _, f, _ in repeated(value))]
            )
            stack.extend((child, depth + 1) for child in children)
        elif type(value) is int and not -U64 < value < U64:
            try:
                serde_f64(str(value))
            except JSONError as e:
                raise _content_error(path, f"header is not valid JSON: {e}", name) from None


def _entry_fields(path: str, name: str, entry: Any) -> tuple[Any, Any, Any]:
    """``(dtype, shape, data_offsets)`` of a header entry, in the forms safetensors' parser accepts: an object with
    these fields (others are ignored), or an array of exactly these three values; a dtype as ``"F32"`` or
    ``{"F32": null}``."""
    if type(entry) is dict and len(entry) == 3 and "dtype" in entry and "shape" in entry and "data_offsets" in entry:
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]  # the usual case
    elif isinstance(entry, list) and len(entry) == 3:
        dtype, shape, offsets = entry
    elif isinstance(entry, dict):
        repeats = repeated(entry)
        for key, _, _ in repeats:
            if key in _ENTRY_FIELDS:
                raise _content_error(path, f"entry gives {key!r} twice", name)
        missing = [key for key in _ENTRY_FIELDS if key not in entry]
        if missing:
            raise _content_error(path, f"entry has no {missing[0]!r} (it needs {', '.join(_ENTRY_FIELDS)})", name)
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        ignored = [value for key, value in entry.items() if key not in _ENTRY_FIELDS]
        _check_ignored(path, name, ignored + [first for _, first, _ in repeats])
    else:
        raise _content_error(
            path, f"entry must be an object with {', '.join(_ENTRY_FIELDS)}, found {_brief(entry, 60)}", name
        )
    if type(dtype) is dict and len(dtype) == 1 and None in dtype.values():
        (dtype,) = dtype
    return dtype, shape, offsets


def _fields(path: str, name: str, entry: Any) -> tuple[str, int, list[int], list[int]]:
    """``(dtype, bits per value, shape, data_offsets)`` of a header entry, checked as safetensors' parser checks every
    entry it reads (each entry of a tensor named twice too): a known dtype, integers in 0..2^64."""
    dtype, shape, offsets = _entry_fields(path, name, entry)
    bits = _BITS.get(dtype) if type(dtype) is str else None
    if bits is None:
        raise _content_error(path, f"unknown dtype {_brief(dtype, 60)}; known: {', '.join(sorted(DTYPES))}", name)
    if type(shape) is not list:
        raise _content_error(path, f"shape must be a list of non-negative integers, found {_brief(shape)}", name)
    for d in shape:
        if type(d) is not int or not 0 <= d < U64:
            raise _content_error(path, f"shape must be a list of non-negative integers, found {_brief(shape)}", name)
    if type(offsets) is not list or len(offsets) != 2:
        raise _content_error(path, f"data_offsets must be [begin, end], found {_brief(offsets)}", name)
    for o in offsets:
        if type(o) is not int or not 0 <= o < U64:
            raise _content_error(
                path, f"data_offsets must be [begin, end] (non-negative integers), found {_brief(offsets)}", name
            )
    return dtype, bits, shape, offsets


def _tensor_info(path: str, name: str, entry: Any, data_start: int, data_len: int) -> TensorInfo:
    dtype, bits, shape, offsets = _fields(path, name, entry)
    count = 1
    for d in shape:
        count *= d
        if count >= U64:
            raise _content_error(path, f"shape {shape} overflows a 64-bit element count", name)
    begin, end = offsets
    if end < begin:
        raise _content_error(path, f"data_offsets must be [begin, end] with begin <= end, found {offsets}", name)
    if count * bits >= U64:
        raise _content_error(path, f"shape {shape} of {dtype} overflows a 64-bit size in bits", name)
    if count * bits % 8:
        raise _content_error(
            path, f"shape {shape} of {dtype} ({bits}-bit values) does not fill whole bytes ({count} values)", name
        )
    expected = count * bits // 8
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
    # A valid header that torch cannot hold: safetensors opens such a file and refuses the tensor when it is read
    # (transformers 5 may never read it: an unexpected key), and so do we.
    unreadable = None
    if dtype not in DTYPES:
        unreadable = (
            f"dtype {dtype} has no torch dtype in torch {torch.__version__} (safetensors cannot read it either)"
        )
    elif count == 0 and any(d > _TORCH_DIM for d in shape):  # with elements, such a shape overflowed above
        unreadable = f"shape {shape} has a dimension beyond torch's limit of 2^63 - 1"
    elif dtype == "F4" and shape[-1] % 2:  # a scalar F4 (4 bits) was refused above
        unreadable = f"F4 shape {shape} needs an even last dimension (torch packs two F4 values per element)"
    elif dtype == "F4":
        shape = [*shape[:-1], shape[-1] // 2]
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, expected, unreadable)


def parse_header(
    path: str, raw_prefix: bytes, file_size: int, read_header
) -> tuple[dict[str, TensorInfo], dict[str, str] | None]:
    """Parses and validates a safetensors header by the safetensors library's rules (see the module docstring).

    Args:
        path (`str`): the file, for messages.
        raw_prefix (`bytes`): the first 8 bytes of the file.
        file_size (`int`): the file's size in bytes.
        read_header (`Callable[[int], bytes]`): reads the header of the given length that follows the prefix.

    Returns:
        `(tensors, metadata)`: `TensorInfo` by name, in header order, and the `__metadata__` mapping (`None` when the
        header has none, or gives null).
    """
    if file_size < HEADER_PREFIX:
        raise TruncatedSafetensorsError(
            f"truncated safetensors file {path}: {file_size} bytes, expected at least 8 (the header length)"
        )
    (header_len,) = struct.unpack("<Q", raw_prefix)
    if header_len > file_size - HEADER_PREFIX:
        raise TruncatedSafetensorsError(
            f"truncated safetensors file {path}: the header claims {header_len} bytes but only "
            f"{file_size - HEADER_PREFIX} follow the length prefix"
        )
    if header_len > MAX_HEADER_BYTES:
        raise _content_error(path, f"header of {header_len} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    raw = read_header(header_len)
    if len(raw) != header_len:
        raise TruncatedSafetensorsError(
            f"truncated safetensors file {path}: read {len(raw)} of {header_len} header bytes"
        )
    header = _decode(path, raw)
    if not isinstance(header, dict):
        raise _content_error(path, f"header must be a JSON object, found {type(header).__name__}")
    for key, first, last in repeated(header):
        if key == "__metadata__":
            raise _content_error(path, "__metadata__ is given twice")
        _fields(path, key, first)  # safetensors' parser reads every entry, and keeps the last
        if first != last:
            raise _content_error(
                path,
                f"listed twice in the header with different entries ({_brief(first)} and {_brief(last)}); "
                "the file is ambiguous (safetensors itself would silently take the last)",
                key,
                DuplicateTensorError,
            )

    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict)
        and all(isinstance(v, str) for v in metadata.values())
        and all(isinstance(first, str) for _, first, _ in repeated(metadata))
    ):
        raise _content_error(path, f"__metadata__ must be null or map strings to strings, found {_brief(metadata)}")

    data_start = HEADER_PREFIX + header_len
    data_len = file_size - data_start
    tensors = {name: _tensor_info(path, name, entry, data_start, data_len) for name, entry in header.items()}

    # safetensors sorts the tensors by data_offsets and requires each to begin where the previous ended, the first at
    # 0 and the last to end at the end of the file: the tensors index every byte, so no other content can hide there.
    reach, holder = 0, None  # where the data covered so far ends, and whose it is
    for begin, end, name in sorted(
        [(t.start - data_start, t.start - data_start + t.nbytes, t.name) for t in tensors.values()]
    ):
        if begin > reach:
            after = f"after {holder!r}'s data" if holder is not None else "at the start of the data"
            raise _content_error(
                path,
                f"data_offsets [{begin}, {end}] leave a hole: bytes [{reach}, {begin}) {after} belong to no tensor "
                "(the format requires the tensors to cover the data exactly; was an entry removed from the header?)",
                name,
            )
        if begin < reach:
            raise _content_error(
                path, f"data_offsets [{begin}, {end}] overlap those of {holder!r}, which end at {reach}", name
            )
        reach, holder = end, name
    if reach < data_len:
        last = f"the last tensor ({holder!r}) ends at data offset {reach}" if holder else "the header lists no tensor"
        raise _content_error(
            path,
            f"{data_len - reach} trailing bytes after the tensors' data: {last} but the data region holds {data_len} "
            "bytes (the format requires the tensors to cover the data exactly; was the file appended to, or an entry "
            "removed from the header?)",
        )
    return tensors, metadata
