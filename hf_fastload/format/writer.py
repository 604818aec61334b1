"""Writing safetensors headers for files whose tensors are placed by the caller (the converted-tensor cache).

Example:
    ```python
    from hf_fastload.format.writer import Placed, encode_header, header_capacity

    capacity = header_capacity([("w", (4, 4))], {"source": "model.safetensors"})   # bytes before the data
    header = encode_header([Placed("w", "F32", (4, 4), 0, 64)], {"source": "model.safetensors"}, capacity)
    assert len(header) == capacity   # 8-byte length, the JSON, spaces up to the data
    ```

A file written this way is an ordinary safetensors file (``safetensors.safe_open`` reads it): the JSON header is
padded with spaces (as safetensors' own writer pads it) so that the data starts at a fixed, page-aligned offset that
is known before any tensor is written, and tensors are placed back to back with no gap (safetensors refuses gaps).
:func:`header_capacity` bounds the header from the tensor names and shapes alone, whatever dtypes and offsets they
end up with. :func:`tail_order` orders tensors so that each starts at a multiple of its element size.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .header import DTYPES, HEADER_PREFIX

__all__ = ["DATA_ALIGN", "Placed", "dtype_name", "encode_header", "header_capacity", "tail_order"]

# The data region starts on a page boundary, so the file's mapping and every tensor in it keep their alignment.
DATA_ALIGN = 4096
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_LONGEST_DTYPE = max(len(name) for name in DTYPES)
_MAX_OFFSET_DIGITS = 20  # 2**64 has 20 digits


@dataclass(frozen=True)
class Placed:
    """One tensor of a file being written: its dtype name, shape, and byte range in the data region."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.float32`` -> ``"F32"``); ValueError for one it cannot store."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(f"safetensors has no name for {dtype}") from None


def _entry_json(name: str, dtype: str, shape: Iterable[int], begin: int, end: int) -> str:
    return json.dumps({name: {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}})[1:-1]


def header_capacity(shapes: Iterable[tuple[str, tuple[int, ...]]], metadata: dict[str, str]) -> int:
    """Bytes to reserve before the data for a file holding at most the named tensors with these shapes.

    The bound assumes the longest dtype name and 20-digit offsets for every tensor, so the header fits whatever
    dtypes and places the tensors get; the result is a multiple of :data:`DATA_ALIGN`.
    """
    size = len(json.dumps({"__metadata__": metadata})) + 1
    wide = 10**_MAX_OFFSET_DIGITS - 1
    for name, shape in shapes:
        size += len(_entry_json(name, "X" * _LONGEST_DTYPE, shape, wide, wide)) + 1
    total = HEADER_PREFIX + size
    return -(-total // DATA_ALIGN) * DATA_ALIGN


def encode_header(tensors: Iterable[Placed], metadata: dict[str, str], capacity: int) -> bytes:
    """The first ``capacity`` bytes of the file: the header length, the JSON header, spaces up to the data.

    Raises:
        `ValueError`: the header does not fit in ``capacity`` bytes, or a tensor's byte range does not match its
            shape and dtype, or the ranges leave a gap or overlap (safetensors would refuse the file).
    """
    placed = sorted(tensors, key=lambda t: (t.begin, t.end))
    reach = 0
    for t in placed:
        expected = torch.Size(t.shape).numel() * DTYPES[t.dtype].itemsize
        if t.end - t.begin != expected:
            raise ValueError(f"tensor {t.name!r}: {t.dtype} {list(t.shape)} needs {expected} bytes, not "
                             f"{t.end - t.begin}")  # fmt: skip
        if t.begin != reach:
            raise ValueError(f"tensor {t.name!r} starts at data offset {t.begin}, expected {reach} (no gaps)")
        reach = t.end
    parts = [json.dumps({"__metadata__": metadata})[1:-1]]
    parts += [_entry_json(t.name, t.dtype, t.shape, t.begin, t.end) for t in placed]
    body = ("{" + ",".join(parts) + "}").encode("utf-8")
    length = capacity - HEADER_PREFIX
    if len(body) > length:
        raise ValueError(f"header of {len(body)} bytes does not fit in the {length} bytes reserved for it")
    return struct.pack("<Q", length) + body + b" " * (length - len(body))


def tail_order(tensors: Iterable[tuple[str, torch.dtype]]) -> list[tuple[str, torch.dtype]]:
    """Tensors in an order that keeps each one aligned to its element size when placed back to back after an
    aligned offset: larger element sizes first (as safetensors' own writer orders them), then by name."""
    return sorted(tensors, key=lambda t: (-t[1].itemsize, t[0]))
