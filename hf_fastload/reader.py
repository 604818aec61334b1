"""A validating safetensors reader with the interface of ``safetensors.safe_open``.

Example:
    ```python
    from hf_fastload.reader import SafetensorsFile

    with SafetensorsFile("model.safetensors") as f:
        for name in f.keys():
            tensor = f.get_tensor(name)  # a zero-copy view of the (private) file mapping
    ```

The header is parsed and checked in full before any tensor is touched, by the rules of the safetensors library
(its Rust ``read_metadata`` and ``validate``, 0.8): the length prefix inside the file and at most 100 MB; UTF-8 JSON as
its JSON parser reads it (no ``NaN``, numbers in range, no lone surrogates, at most 127 levels deep); an object whose
``__metadata__`` (given at most once) is null or maps strings to strings; for every tensor a known dtype, a shape of
integers, ``data_offsets`` ``[begin, end]``, ``shape x dtype size == end - begin`` without overflow; and the tensors,
taken in offset order, covering the data region exactly: no hole, no overlap, no byte after the last tensor, so no file
can hide other content between or after its tensors. Header entries may be listed in any order. A tensor that torch
cannot hold (an F6 dtype, an odd F4 last dimension) is refused when it is read, as safetensors does. One rule is
stricter than safetensors: a tensor named twice with different entries is refused (safetensors silently keeps the
last). ``tests/test_reader_fuzz.py`` holds the reader to safetensors' own on valid and damaged files.
A mapped read checks first that the file has not shrunk since it was opened (touching a mapped page past the end of
a file is a SIGBUS, which kills the process).
Every problem raises :class:`~hf_fastload.errors.CheckpointFileError` (an ``OSError``) or
:class:`~hf_fastload.errors.CheckpointContentError` (a ``ValueError``) naming the file and the tensor.

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
import re
import struct
import threading
from dataclasses import dataclass
from typing import Any

import torch

from .errors import CheckpointContentError, CheckpointFileError

__all__ = ["DTYPES", "SafetensorsFile", "TensorInfo", "TensorSlice", "parse_header", "pread_into"]

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
_HEADER_PREFIX = 8
_U64 = 1 << 64  # header integers are Rust usize (u64): larger ones are read as floats, which are not integers
_TORCH_DIM = (1 << 63) - 1  # torch sizes are int64
_MAX_DEPTH = 127  # serde_json, safetensors' JSON parser, refuses 128 nested arrays or objects
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

    @property
    def header_shape(self) -> tuple[int, ...]:
        """The shape as the header gives it (what ``safe_open``'s ``get_shape`` returns)."""
        return (*self.shape[:-1], self.shape[-1] * 2) if self.dtype == "F4" and not self.unreadable else self.shape


def _content_error(path: str, what: str, tensor: str | None = None) -> CheckpointContentError:
    where = f"{path}: tensor {tensor!r}: " if tensor is not None else f"{path}: "
    return CheckpointContentError(f"invalid safetensors file {where}{what}")


def _brief(value: Any, limit: int = 200) -> str:
    """A header value as JSON, cut to ``limit`` characters for a message."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _JSONObject(dict):
    """A JSON object in which some key is given more than once: ``repeated`` lists each repeat as ``(key, earlier
    value, later value)`` (``json.loads`` keeps the last)."""

    __slots__ = ("repeated",)


def _object(pairs: list[tuple[str, Any]]) -> dict:
    """``json.loads``' object hook: a plain dict, or a _JSONObject where a key is given twice."""
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    obj, seen = _JSONObject(obj), {}
    obj.repeated = []
    for key, value in pairs:
        if key in seen:
            obj.repeated.append((key, seen[key], value))
        seen[key] = value
    return obj


def _repeated(obj: dict) -> list[tuple[str, Any, Any]]:
    return obj.repeated if type(obj) is _JSONObject else []


class _JSONError(ValueError):
    """JSON that Python's ``json`` reads but safetensors' parser (serde_json) refuses."""


def _refuse_constant(name: str) -> None:
    raise _JSONError(f"{name} is not a JSON value")


def _int_or_float_zero(token: str) -> int | float:
    return -0.0 if token == "-0" else int(token)  # serde_json reads -0 as a float, which no integer field takes


_NUMBER = re.compile(r"(-?)(\d+)(?:\.(\d+))?(?:[eE]([+-]?)(\d+))?")
_POW10 = [float(f"1e{i}") for i in range(309)]  # serde_json's table: 1e0 ... 1e308


def _overflows(acc: int, digit: int, limit: int) -> bool:
    """serde_json's check before ``acc * 10 + digit``: would it pass ``limit``?"""
    return acc > limit // 10 or (acc == limit // 10 and digit > limit % 10)


def _serde_f64(token: str) -> float:
    """A JSON number as serde_json (safetensors' parser, without its float_roundtrip feature) reads it into an f64;
    raises _JSONError where it says "number out of range". The same digit-by-digit steps, so the same edge cases."""
    sign, whole, fraction, exp_sign, exp_digits = _NUMBER.fullmatch(token).groups()
    u64, i32 = (1 << 64) - 1, (1 << 31) - 1
    significand = exponent = 0
    for i, d in enumerate(map(int, whole)):
        if _overflows(significand, d, u64):
            exponent = len(whole) - i  # the remaining digits only scale
            break
        significand = significand * 10 + d
    for d in map(int, fraction or ""):
        if _overflows(significand, d, u64):
            break  # further fraction digits are ignored
        significand, exponent = significand * 10 + d, exponent - 1
    if exp_digits is not None:
        value = 0
        for d in map(int, exp_digits):
            if _overflows(value, d, i32):
                if significand and exp_sign != "-":
                    raise _JSONError(f"number {token[:40]} out of range")
                return -0.0 if sign else 0.0
            value = value * 10 + d
        exponent = max(-i32 - 1, min(i32, exponent + (-value if exp_sign == "-" else value)))  # saturating
    f = float(significand)
    while True:
        if abs(exponent) <= 308:
            if exponent >= 0:
                f *= _POW10[exponent]
                if math.isinf(f):
                    raise _JSONError(f"number {token[:40]} out of range")
            else:
                f /= _POW10[-exponent]
            break
        if f == 0.0:
            break
        if exponent >= 0:
            raise _JSONError(f"number {token[:40]} out of range")
        f, exponent = f / 1e308, exponent + 308
    return -f if sign else f


def _has_surrogate(value: Any) -> bool:
    """True if a string anywhere in ``value`` holds a lone UTF-16 surrogate (``"\\ud800"``: not a character)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
            stack.extend(first for _, first, _ in _repeated(item))
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _decode(path: str, raw: bytes) -> Any:
    """The header's JSON, read by serde_json's rules: what it refuses raises CheckpointContentError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _content_error(path, f"header is not valid UTF-8 ({e})") from None
    hooks: dict[str, Any] = {"parse_constant": _refuse_constant, "parse_float": _serde_f64}
    if "-0" in text:  # rare: the parse_int hook costs a Python call per integer
        hooks["parse_int"] = _int_or_float_zero
    try:
        header = json.loads(text, object_pairs_hook=_object, **hooks)
    except json.JSONDecodeError as e:
        raise _content_error(path, f"header is not valid JSON ({e})") from None
    except RecursionError:
        raise _content_error(path, f"header is not valid JSON: nested more than {_MAX_DEPTH} levels deep") from None
    except ValueError as e:  # _JSONError, or an integer of more than 4300 digits
        raise _content_error(path, f"header is not valid JSON: {e}") from None
    if "\\u" in text and _has_surrogate(header):
        raise _content_error(path, "header is not valid JSON: a \\u escape is a lone UTF-16 surrogate")
    return header


def _check_ignored(path: str, name: str, values: list[Any]) -> None:
    """Fields of an entry that safetensors ignores must still be JSON it parses: nested at most 127 levels deep (the
    entry itself is level 2), integers within f64 range."""
    stack = [(value, 3) for value in values]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > _MAX_DEPTH:
                raise _content_error(
                    path, f"header is not valid JSON: nested more than {_MAX_DEPTH} levels deep", name
                )
            children = (
                list(value) if isinstance(value, list) else [*value.values(), *(f for _, f, _ in _repeated(value))]
            )
            stack.extend((child, depth + 1) for child in children)
        elif type(value) is int and not -_U64 < value < _U64:
            try:
                _serde_f64(str(value))
            except _JSONError as e:
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
        repeated = _repeated(entry)
        for key, _, _ in repeated:
            if key in _ENTRY_FIELDS:
                raise _content_error(path, f"entry gives {key!r} twice", name)
        missing = [key for key in _ENTRY_FIELDS if key not in entry]
        if missing:
            raise _content_error(path, f"entry has no {missing[0]!r} (it needs {', '.join(_ENTRY_FIELDS)})", name)
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        ignored = [value for key, value in entry.items() if key not in _ENTRY_FIELDS]
        _check_ignored(path, name, ignored + [first for _, first, _ in repeated])
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
        if type(d) is not int or not 0 <= d < _U64:
            raise _content_error(path, f"shape must be a list of non-negative integers, found {_brief(shape)}", name)
    if type(offsets) is not list or len(offsets) != 2:
        raise _content_error(path, f"data_offsets must be [begin, end], found {_brief(offsets)}", name)
    for o in offsets:
        if type(o) is not int or not 0 <= o < _U64:
            raise _content_error(
                path, f"data_offsets must be [begin, end] (non-negative integers), found {_brief(offsets)}", name
            )
    return dtype, bits, shape, offsets


def _tensor_info(path: str, name: str, entry: Any, data_start: int, data_len: int) -> TensorInfo:
    dtype, bits, shape, offsets = _fields(path, name, entry)
    count = 1
    for d in shape:
        count *= d
        if count >= _U64:
            raise _content_error(path, f"shape {shape} overflows a 64-bit element count", name)
    begin, end = offsets
    if end < begin:
        raise _content_error(path, f"data_offsets must be [begin, end] with begin <= end, found {offsets}", name)
    if count * bits >= _U64:
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
        raise CheckpointFileError(
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
    if file_size < _HEADER_PREFIX:
        raise CheckpointFileError(
            f"truncated safetensors file {path}: {file_size} bytes, expected at least 8 (the header length)"
        )
    (header_len,) = struct.unpack("<Q", raw_prefix)
    if header_len > file_size - _HEADER_PREFIX:
        raise CheckpointFileError(
            f"truncated safetensors file {path}: the header claims {header_len} bytes but only "
            f"{file_size - _HEADER_PREFIX} follow the length prefix"
        )
    if header_len > MAX_HEADER_BYTES:
        raise _content_error(path, f"header of {header_len} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    raw = read_header(header_len)
    if len(raw) != header_len:
        raise CheckpointFileError(f"truncated safetensors file {path}: read {len(raw)} of {header_len} header bytes")
    header = _decode(path, raw)
    if not isinstance(header, dict):
        raise _content_error(path, f"header must be a JSON object, found {type(header).__name__}")
    for key, first, last in _repeated(header):
        if key == "__metadata__":
            raise _content_error(path, "__metadata__ is given twice")
        _fields(path, key, first)  # safetensors' parser reads every entry, and keeps the last
        if first != last:
            raise _content_error(
                path,
                f"listed twice in the header with different entries ({_brief(first)} and {_brief(last)}); "
                "the file is ambiguous (safetensors itself would silently take the last)",
                key,
            )

    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict)
        and all(isinstance(v, str) for v in metadata.values())
        and all(isinstance(first, str) for _, first, _ in _repeated(metadata))
    ):
        raise _content_error(path, f"__metadata__ must be null or map strings to strings, found {_brief(metadata)}")

    data_start = _HEADER_PREFIX + header_len
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


def pread_into(fd: int, path: str, buffer: memoryview, offset: int, tensor: str | None = None) -> None:
    """Fills ``buffer`` from ``fd`` at ``offset``; a short read (the file shrank) raises CheckpointFileError."""
    done, total = 0, len(buffer)
    while done < total:
        try:
            n = os.preadv(fd, [buffer[done:]], offset + done)
        except OSError as e:
            raise CheckpointFileError(f"cannot read {path} (tensor {tensor!r}) at offset {offset + done}: {e}") from e
        if n == 0:
            try:
                ends = f"the file ends at {os.fstat(fd).st_size}"
            except OSError:
                ends = f"no bytes could be read at offset {offset + done}"
            raise CheckpointFileError(
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
            raise CheckpointFileError(f"cannot open safetensors file {self.path}: {e.strerror or e}") from e
        try:
            self.size = os.fstat(self.fd).st_size
            prefix = os.pread(self.fd, _HEADER_PREFIX, 0) if self.size >= _HEADER_PREFIX else b""
            self.tensors, self._metadata = parse_header(
                self.path, prefix, self.size, lambda n: os.pread(self.fd, n, _HEADER_PREFIX)
            )
        except BaseException:
            os.close(self.fd)
            raise
        self.data_end = max((info.start + info.nbytes for info in self.tensors.values()), default=0)
        self._ended = False  # closed by its owning load: no tensor may be read any more

    # -- safe_open interface -------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return sorted(self.tensors)

    def metadata(self) -> dict[str, str] | None:
        return dict(self._metadata) if self._metadata is not None else None

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
            raise CheckpointContentError(f"{self.path}: no tensor named {name!r} in this file") from None

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
        """Raises CheckpointFileError if the file now holds fewer than ``end`` bytes.

        Another process may truncate or rewrite the file while it is mapped; touching a mapped page past the file's
        new end kills this process with SIGBUS. Mapped reads call this first (one ``fstat``).
        """
        size = os.fstat(self._fd()).st_size
        if size < end:
            what = f"tensor {tensor!r} needs bytes up to offset {end}" if tensor else f"its data ends at offset {end}"
            raise CheckpointFileError(
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


class TensorSlice:
    """A lazy handle on one tensor, shaped like safetensors' ``PySafeSlice`` (``get_shape``, ``get_dtype``, ``[]``)."""

    __slots__ = ("file", "info")

    def __init__(self, file: SafetensorsFile, info: TensorInfo):
        self.file = file
        self.info = info

    def get_shape(self) -> list[int]:
        return list(self.info.header_shape)

    def get_dtype(self) -> str:
        return self.info.dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.info.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.info.torch_dtype

    def check_readable(self) -> None:
        """Raises CheckpointContentError if torch cannot hold this tensor (safetensors refuses to read it too)."""
        if self.info.unreadable is not None:
            raise _content_error(self.file.path, self.info.unreadable, self.info.name)

    def __getitem__(self, key) -> torch.Tensor:
        from .engine import materialize

        self.check_readable()

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
