"""The engine's entry: the tensor behind a checkpoint slice, on its device, in its dtype, by the cheapest way.

Example:
    ```python
    import torch
    from hf_fastload.engine.handle import SafetensorsHandle
    from hf_fastload.engine.materialize import materialize

    f = SafetensorsHandle("model.safetensors", io="pread")
    weight = materialize(f.get_slice("lm_head.weight"), device="cpu", dtype=torch.float32)
    ```

How each tensor is made (the report's ``methods`` counts them):

- ``meta``: an empty meta tensor (transformers asks for some);
- ``stream(<backend>)[+cast]``: a device target (CUDA, or ``HF_FASTLOAD_IO=direct``): the device pipeline of the
  load (:mod:`hf_fastload.engine.stream`);
- ``zero-copy``, ``pread``, ``convert``, ``pread+convert``: the CPU paths (:mod:`hf_fastload.engine.cpu`);
- ``zero-copy(cache)``, ``...+cache-write``: with the converted-tensor cache on (``HF_FASTLOAD_CACHE``), a CPU
  tensor that would be converted (or read with ``pread`` from network storage) is a view of a cache entry, or is
  converted into a new one (:mod:`hf_fastload.engine.cache`);
- ``...+to(<device>)``: a device without a pipeline backend: the CPU tensor, then one ``.to(device)``;
- ``slice:...``: a block of a tensor (a tensor-parallel shard), :func:`read_part`.

Every tensor of a load is counted in and out of its :class:`~hf_fastload.engine.context.LoadContext` (a failed or
closed load reads nothing more; its first error is kept) and recorded for the report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from ..format.header import TensorInfo
from . import cpu, slices
from .knobs import settings

__all__ = ["materialize", "read_part"]


def _tracked(
    ts: Any, make: Callable[[], tuple[torch.Tensor, str, TensorInfo]], record_failure: bool = True
) -> torch.Tensor:
    """Runs ``make`` as one tensor of ``ts``'s load: counted in flight, its failure recorded (unless
    ``record_failure`` is False), its result reported."""
    ctx = ts.file.context
    start = time.perf_counter()
    if ctx is not None:
        ctx.begin()  # raises instead once the load has failed or ended
    try:
        out, method, recorded = make()
    except BaseException as e:
        if ctx is not None and record_failure:
            ctx.fail(e)
        raise
    finally:
        if ctx is not None:
            ctx.end()
    if ctx is not None:
        ctx.record(recorded, method, start)
    return out


def materialize(
    ts: Any, device: Any = None, dtype: torch.dtype | None = None, record_failure: bool = True
) -> torch.Tensor:
    """The tensor behind ``ts`` (a :class:`~hf_fastload.engine.handle.TensorSlice`) on ``device`` (default CPU) in
    ``dtype`` (default: as stored), owned or zero-copy; bit-identical to ``stored.to(device, dtype)``.

    A failure is recorded in the load's context (which stops the rest of the load), unless ``record_failure`` is
    False (a prefetch: the failure is recorded when the tensor is taken).
    """
    file, info = ts.file, ts.info
    ctx = file.context
    target = torch.device(device) if device is not None else torch.device("cpu")

    def make() -> tuple[torch.Tensor, str, TensorInfo]:
        info.check_readable(file.path)  # a tensor torch cannot hold (F6) is refused when read, as safetensors does
        to_dtype = dtype or info.torch_dtype
        threads = ctx.threads if ctx is not None else settings()["threads"]
        pipe = ctx.pipeline(target, file) if ctx is not None and target.type != "meta" else None
        if pipe is not None and to_dtype != info.torch_dtype and not pipe.backend.can_cast(info.torch_dtype, to_dtype):
            pipe = None  # no device conversion with the CPU's bits: convert on the CPU, as stock does, then copy
        if target.type == "meta":
            out, method = torch.empty(info.shape, dtype=to_dtype, device="meta"), "meta"
        elif pipe is not None:  # the pipeline's tensor is on the (resolved) device already
            out = pipe.load(file, info, to_dtype)
            method = f"stream({pipe.backend.name}){'+cast' if to_dtype != info.torch_dtype else ''}"
        elif (
            target.type == "cpu"
            and getattr(ctx, "cache", None) is not None
            and ctx.cache.wants(info, to_dtype, ctx.picked_pread(file))
        ):
            out, method = _through_cache(ctx.cache, file, info, to_dtype, threads)
        else:
            out, method = _cpu(file, info, to_dtype, threads)
        if target.type not in ("cpu", "meta") and pipe is None:
            out, method = out.to(device=target), f"{method}+to({target.type})"
        return out, method, info

    return _tracked(ts, make, record_failure)


def _cpu(file: Any, info: TensorInfo, dtype: torch.dtype, threads: int) -> tuple[torch.Tensor, str]:
    """The CPU paths: ``(tensor, method)``."""
    if dtype != info.torch_dtype and file.io == "mmap":
        return cpu.convert_mapped(file, info, dtype), "convert"
    if dtype != info.torch_dtype:
        return cpu.read_converted(file, info, dtype, threads), "pread+convert"
    if file.io == "mmap":
        file.check_size(info.start + info.nbytes, info.name)  # a view of pages past the end would be a SIGBUS
        return file.view(info), "zero-copy"
    return cpu.read_same(file, info, threads), "pread"


def _through_cache(cache: Any, file: Any, info: TensorInfo, dtype: torch.dtype, threads: int):
    """A CPU tensor through the load's :class:`~hf_fastload.engine.cache.CacheSession`: a view of a cache entry (a
    hit), or converted into the entry being written and viewed there (a miss), or, when no entry is written, as
    usual. A tensor the entry could not take (a full disk) is made as usual."""
    hit = cache.lookup(file, info, dtype)
    if hit is not None:
        return hit, "zero-copy(cache)"
    slot = cache.slot(file, info, dtype)
    if slot is None:
        return _cpu(file, info, dtype, threads)
    if slot.placed:
        try:
            written = slot.fill(file, info, threads)
        except BaseException:
            slot.fail()
            raise
        if not written:
            return _cpu(file, info, dtype, threads)
        base = ("convert" if file.io == "mmap" else "pread+convert") if dtype != info.torch_dtype else "pread"
        return slot.done(None), f"{base}+cache-write"
    try:
        out, method = _cpu(file, info, dtype, threads)
    except BaseException:
        slot.fail()
        raise
    return slot.done(out), f"{method}+cache-write"


def read_part(ts: Any, key: Any) -> torch.Tensor | None:
    """``ts[key]`` reading only the bytes the index selects, or None when ``key`` is not a partial block of slices.

    Args:
        ts (`TensorSlice`): the lazy tensor.
        key: the index transformers used (a tuple of ``slice`` objects, for a tensor-parallel shard).

    Returns:
        A tensor in the stored dtype, on the file's device (read on the CPU, then moved), or None.
    """
    info = ts.info
    shape = tuple(info.shape)
    bounds = slices.parse_index(key, shape) if shape else None
    if bounds is None or all(b == (0, n) for b, n in zip(bounds, shape)):
        return None
    file = ts.file

    def make() -> tuple[torch.Tensor, str, TensorInfo]:
        out, method, nbytes = slices.read_block(file, info, bounds)
        device = torch.device(file.device) if file.device is not None else None
        if device is not None and device.type != "cpu":
            out, method = out.to(device), f"{method}+to({device.type})"
        return out, method, replace(info, shape=tuple(out.shape), nbytes=nbytes)

    return _tracked(ts, make)
