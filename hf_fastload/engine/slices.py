"""Reading only a block of a tensor: the bytes a tensor-parallel shard needs, as ``safetensors`` slices return them.

Example:
    ```python
    from hf_fastload.engine.slices import parse_index, read_block

    info = file.info("model.layers.0.mlp.up_proj.weight")          # [4096, 4096]
    bounds = parse_index((slice(0, 1024),), info.shape)            # rows 0..1023: one contiguous byte range
    part, method, nbytes = read_block(file, info, bounds)
    ```

transformers cuts each checkpoint tensor down to a rank's shard by indexing the lazy slice object that
``safe_open(...).get_slice(name)`` returns (``TensorSlice`` here, see :mod:`hf_fastload.engine.handle`). Such an
index, made of ``slice`` objects and at most one ``...``, is served by reading only its bytes:

- with ``io="mmap"``: a view of the private file mapping, as ``safetensors`` returns (contiguous for a row block,
  whose bytes are one range; strided for a column block), so only the selected elements' pages are ever touched and
  transformers' own ``.to(dtype)`` / ``.contiguous()`` makes the one copy, as with stock;
- with ``io="pread"``: fresh memory; a row block is one contiguous byte range (one ``pread``); a column block is one
  ``pread`` per run where runs are long (>= 64 KiB), else blocks of rows read from the first selected byte to the
  last and cut in memory.

Values are the stored ones in the stored dtype, exactly what ``safetensors`` returns for the same index. Indexes other
than slices and ``...`` (integers, lists, steps) are not handled here (:func:`parse_index` returns None).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch

from ..format.file import SafetensorsFile
from ..format.header import TensorInfo
from . import cpu

__all__ = ["LONG_RUN_BYTES", "parse_index", "read_block"]

LONG_RUN_BYTES = 64 << 10  # a run this long is read with its own pread; shorter runs are read with their rows
CHUNK_BYTES = 8 << 20


def parse_index(key: Any, shape: tuple[int, ...]) -> list[tuple[int, int]] | None:
    """``[start, stop)`` per dimension for an index made of ``slice`` objects (step 1) and at most one ``...``.

    Bounds follow Python's (and torch's) slicing rules: negative positions count from the end, out-of-range ones are
    clamped, ``stop < start`` selects nothing. Returns None for any other index.
    """
    key = key if isinstance(key, tuple) else (key,)
    if sum(k is Ellipsis for k in key) > 1 or not all(k is Ellipsis or isinstance(k, slice) for k in key):
        return None
    if Ellipsis in key:
        at = key.index(Ellipsis)
        fill = len(shape) - (len(key) - 1)
        if fill < 0:
            return None
        key = key[:at] + (slice(None),) * fill + key[at + 1 :]
    if len(key) > len(shape):
        return None
    key = key + (slice(None),) * (len(shape) - len(key))
    bounds = []
    for k, size in zip(key, shape):
        try:
            start, stop, step = k.indices(size)
        except (TypeError, ValueError):
            return None
        if step != 1:
            return None
        bounds.append((start, max(start, stop)))
    return bounds


def _strides(shape: tuple[int, ...]) -> list[int]:
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= size
    return strides[::-1]


def read_block(
    file: SafetensorsFile, info: TensorInfo, bounds: list[tuple[int, int]]
) -> tuple[torch.Tensor, str, int]:
    """(tensor, method, bytes read) for the block ``bounds`` (from :func:`parse_index`) of ``info``, on the CPU."""
    shape, dtype, itemsize = tuple(info.shape), info.torch_dtype, info.torch_dtype.itemsize
    out_shape = tuple(b - a for a, b in bounds)
    numel = math.prod(out_shape)
    if numel == 0:
        return torch.empty(out_shape, dtype=dtype), "slice:empty", 0
    strides = _strides(shape)
    # The last partially selected dimension: everything after it is whole, so each run of the block is contiguous.
    last = max(d for d, (b, n) in enumerate(zip(bounds, shape)) if b != (0, n))
    runs = math.prod(out_shape[:last])
    first = sum(a * s for (a, _), s in zip(bounds, strides))  # element offset of the block's first element

    if file.io == "mmap":
        # A view of the private mapping, as safetensors returns: contiguous for a row block, strided otherwise (the
        # caller's .to()/.contiguous() then makes the one copy, in the final dtype); only its pages are touched.
        check_size = getattr(file, "check_size", None)
        if check_size is not None:  # mapped pages past the end of a shrunken file would be a SIGBUS
            check_size(info.start + info.nbytes, info.name)
        view = file.view(info)[tuple(slice(a, b) for a, b in bounds)]
        return view, "slice:zero-copy" if runs == 1 else "slice:view", numel * itemsize

    out = cpu.alloc_cpu(out_shape, dtype)
    buf = cpu.tensor_buffer(out)
    run_bytes = numel // runs * itemsize
    if runs == 1:
        for lo in range(0, run_bytes, CHUNK_BYTES):
            hi = min(lo + CHUNK_BYTES, run_bytes)
            file.read_into(info, buf[lo:hi], first * itemsize + lo)
        return out, "slice:pread", run_bytes
    if run_bytes >= LONG_RUN_BYTES:
        outer = [range(a, b) for a, b in bounds[:last]]
        inner = bounds[last][0] * strides[last]
        for i, index in enumerate(itertools.product(*outer)):
            offset = sum(x * s for x, s in zip(index, strides)) + inner
            file.read_into(info, buf[i * run_bytes : (i + 1) * run_bytes], offset * itemsize)
        return out, "slice:pread-runs", numel * itemsize
    return out, "slice:pread-cut", _read_rows_and_cut(file, info, bounds, strides, out)


def _read_rows_and_cut(file, info, bounds, strides, out) -> int:
    """Fills ``out`` with the block ``bounds``: reads blocks of dim-0 rows (from the block's first selected byte in
    them to its last) and copies the selection out of each. Returns the bytes read."""
    dtype, itemsize = info.torch_dtype, info.torch_dtype.itemsize
    (a0, b0), rest = bounds[0], bounds[1:]
    row_offset = sum(a * s for (a, _), s in zip(rest, strides[1:]))  # first selected element inside a row
    row_last = sum((b - 1) * s for (_, b), s in zip(rest, strides[1:]))  # last selected element inside a row
    sub_shape = tuple(b - a for a, b in rest)
    rows_per_chunk = max(1, CHUNK_BYTES // (strides[0] * itemsize))
    staging = None
    total = 0
    for r0 in range(a0, b0, rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, b0)
        lo = r0 * strides[0] + row_offset
        hi = (r1 - 1) * strides[0] + row_last + 1
        span = (hi - lo) * itemsize
        if staging is None or staging.numel() < span:
            staging = torch.empty(span, dtype=torch.uint8)
        file.read_into(info, cpu.tensor_buffer(staging)[:span], lo * itemsize)
        part = staging[:span].view(dtype).as_strided((r1 - r0, *sub_shape), strides)
        out[r0 - a0 : r1 - a0].copy_(part)
        total += span
    return total
