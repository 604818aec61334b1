"""Tensor-parallel loads: which distributed arguments the fast path takes, and reading only this rank's slices.

Under ``torchrun`` with ``tp_plan="auto"`` (or the installed transformers' other TP arguments), transformers cuts each
checkpoint tensor down to this rank's shard by indexing the lazy slice object that ``safe_open(...).get_slice(name)``
returns, before anything is read:

- 5.x: ``distributed.sharding_utils.DtensorShardOperation.shard_tensor`` computes the DTensor placements' intervals
  and indexes the slice with a tuple of ``slice`` objects (several, concatenated, for ``_StridedShard``), or skips a
  per-expert tensor that this rank does not own; ``core_model_loading._materialize_copy`` is not called for them;
- 4.57: ``integrations.tensor_parallel.get_tensor_shard`` indexes it with a tuple of slices, ``param[:]`` /
  ``param[...]`` for replicated tensors.

With hf_fastload those slice objects are our :class:`~hf_fastload.reader.TensorSlice`, and :func:`read_index` serves
such an index by reading only its bytes:

- with ``io="mmap"``: a view of the private file mapping, as ``safetensors`` returns (contiguous for a row block,
  whose bytes are one range; strided for a column block), so only the selected elements' pages are ever touched and
  transformers' own ``.to(dtype)`` / ``.contiguous()`` makes the one copy, as with stock;
- with ``io="pread"``: fresh memory; a row block is one contiguous byte range (one ``pread``); a column block is one
  ``pread`` per run where runs are long (>= 64 KiB), else blocks of rows read from the first selected byte to the
  last and cut in memory.

Values are the stored ones in the stored dtype, exactly what ``safetensors`` returns for the same index; transformers
then converts and wraps them as stock does. Indexes other than slices and ``...`` (integers, lists, steps) take the
old way: the whole tensor, indexed with torch.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import replace
from typing import Any

__all__ = ["checkpoint_bytes", "parse_index", "rank_and_world", "read_index", "tp_fallback_reason", "tp_requested"]

TP_KWARGS = ("tp_plan", "tp_size", "device_mesh", "distributed_config")
LONG_RUN_BYTES = 64 << 10  # a run this long is read with its own pread; shorter runs are read with their rows
CHUNK_BYTES = 8 << 20


def tp_requested(kwargs: dict) -> bool:
    """Whether ``from_pretrained`` was asked for a distributed (tensor-parallel) load."""
    return any(kwargs.get(k) is not None for k in TP_KWARGS)


def _config_value(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def tp_fallback_reason(kwargs: dict) -> str | None:
    """Why a distributed load cannot take the fast path, or None (also None when the load is not distributed).

    The fast path takes what was checked bit for bit against stock under ``torchrun`` (tests/test_distributed.py):
    tensor parallelism alone. Other layouts (FSDP, pipeline or expert parallel through ``distributed_config``, a
    ``device_mesh`` without a TP plan, or any ``device_mesh`` on 4.57) stay on stock ``from_pretrained``.
    """
    from . import compat

    if not tp_requested(kwargs):
        return None
    tp_plan, tp_size = kwargs.get("tp_plan"), kwargs.get("tp_size")
    config = kwargs.get("distributed_config")
    if config is None and tp_plan is None and tp_size is None:
        return "device_mesh without tp_plan: not on the fast path (only tensor-parallel loads are)"
    if kwargs.get("device_mesh") is not None and not compat.TRANSFORMERS_V5:
        # 4.57 then places tensors on <device type>:<LOCAL_RANK>, which fails on CPU: not checked against stock
        return "device_mesh on transformers 4.57: not checked against stock; tp_plan alone takes the fast path"
    if config is not None:
        if compat.TRANSFORMERS_V5:
            for name in ("fsdp_size", "dp_replicate_size", "pp_size", "ep_size"):
                value = _config_value(config, name)
                if value not in (None, 1):
                    return f"distributed_config {name}={value}: only tensor-parallel loads are on the fast path"
        if _config_value(config, "enable_expert_parallel", False):
            return "distributed_config enable_expert_parallel: only tensor-parallel loads are on the fast path"
        if _config_value(config, "enable_sequence_parallel", False):
            return "distributed_config enable_sequence_parallel: only tensor-parallel loads are on the fast path"
    return None


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process: torch.distributed's once initialized, else torchrun's environment."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # a broken distributed build must not fail a finished load; the environment is the fallback
        pass
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


def checkpoint_bytes(ctx) -> int:
    """Tensor bytes in the checkpoint files this load opened (each file once)."""
    seen: dict[str, int] = {}
    for handle in list(ctx.files.values()):
        if handle.path not in seen:
            seen[handle.path] = sum(info.nbytes for info in handle.tensors.values())
    return sum(seen.values())


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


def read_index(ts, key: Any):
    """``ts[key]`` reading only the bytes the index selects, or None when ``key`` is not a partial block of slices.

    Args:
        ts (`TensorSlice`): the lazy tensor.
        key: the index transformers used.

    Returns:
        A CPU tensor (moved to the file's device when that is not the CPU) in the stored dtype, or None.
    """
    import torch

    info = ts.info
    shape = tuple(info.shape)
    if not shape:
        return None
    bounds = parse_index(key, shape)
    if bounds is None or all(b == (0, n) for b, n in zip(bounds, shape)):
        return None
    file = ts.file
    ctx = getattr(file, "context", None)
    start_time = time.perf_counter()
    # The engine's bookkeeping of tensors in flight (a failed or closed load reads nothing more), where it has it.
    begin, end = getattr(ctx, "begin", None), getattr(ctx, "end", None)
    if begin is not None:
        begin()
    try:
        out, method, nbytes = _read_block(file, info, bounds)
        device = file.device
        if device is not None and torch.device(device).type != "cpu":
            out, method = out.to(device), f"{method}+to({torch.device(device).type})"
    except BaseException as e:
        if ctx is not None:
            ctx.fail(e)
        raise
    finally:
        if begin is not None and end is not None:
            end()
    if ctx is not None:
        ctx.record(replace(info, shape=tuple(out.shape), nbytes=nbytes), method, start_time)
    return out


def _read_block(file, info, bounds: list[tuple[int, int]]):
    """(tensor, method, bytes read) for the block ``bounds`` of ``info``."""
    import torch

    from .engine import alloc_cpu
    from .reader import tensor_buffer

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

    out = alloc_cpu(out_shape, dtype)
    buf = tensor_buffer(out)
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
    import torch

    from .reader import tensor_buffer

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
        file.read_into(info, tensor_buffer(staging)[:span], lo * itemsize)
        part = staging[:span].view(dtype).as_strided((r1 - r0, *sub_shape), strides)
        out[r0 - a0 : r1 - a0].copy_(part)
        total += span
    return total
