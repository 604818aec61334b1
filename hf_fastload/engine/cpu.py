"""CPU tensors from a checkpoint file: zero-copy views, ``pread`` into owned memory, chunked dtype conversion.

Example:
    ```python
    import torch
    from hf_fastload.engine import cpu
    from hf_fastload.format.file import SafetensorsFile

    f = SafetensorsFile("model.safetensors")
    info = f.info("lm_head.weight")
    weight = cpu.convert_mapped(f, info, torch.float32)     # bf16 file -> fp32 tensor, chunk by chunk
    ```

Cases, all bit-identical to ``tensor.to(dtype)`` of the stored tensor:

- same dtype with ``io="mmap"``: a zero-copy view of the file mapping (what stock transformers 5 returns; the file's
  :meth:`~hf_fastload.format.file.SafetensorsFile.view`);
- same dtype with ``io="pread"``: ``preadv`` straight into the tensor's own fresh memory (:func:`read_same`);
- a dtype change with ``io="mmap"``: converted chunk by chunk from the mapping into the final tensor, each chunk's
  source pages dropped from this process once converted (``MADV_DONTNEED``), so they never add up to a second copy
  of the model (:func:`convert_mapped`);
- a dtype change with ``io="pread"``: read in chunks into a per-thread staging buffer and converted from there
  (:func:`read_converted`);
- into a file instead of memory (:func:`convert_to_file`, the converted-tensor cache's entry): each converted piece
  of at most 1 MiB is made in a per-thread buffer and handed to a writer.

Every tensor that is not a zero-copy view owns its storage (``torch.empty``). Chunks of one tensor run on the
engine's chunk pool; a failure cancels or awaits the others before it is raised.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures

import torch

from ..format.file import SafetensorsFile
from ..format.header import TensorInfo
from .pools import chunk_pool, one_op_thread

__all__ = [
    "CHUNK_BYTES", "PIECE_BYTES", "alloc_cpu", "convert_mapped", "convert_to_file", "read_converted", "read_same",
    "tensor_buffer",
]  # fmt: skip

CHUNK_BYTES = 8 << 20
PIECE_BYTES = 1 << 20  # convert_to_file: converted bytes handed to the writer at a time (stays in the CPU's cache)
_staging = threading.local()


def tensor_buffer(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (works for every dtype, numpy not needed)."""
    nbytes = tensor.numel() * tensor.element_size()
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


def _check_alive(file: SafetensorsFile) -> None:
    """Raises once the load that owns ``file`` has failed or ended (long reads call it between chunks)."""
    if file.owner is not None:
        file.owner.check_alive()


def alloc_cpu(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor that owns its memory.

    Plain ``torch.empty``: on this project's 2-core VM (THP mode ``madvise``), backing outputs with transparent huge
    pages made first-touch faults 4-5x slower (3.7 GB: 5.4 s with ``MADV_HUGEPAGE`` vs 1.0-1.2 s without, measured
    2026-11-29), so the engine does not ask for them.
    """
    if 0 in shape:  # as safetensors makes it: torch.empty's strides overflow for shapes like (0, 2**40, 2**40)
        return torch.empty(0, dtype=dtype).reshape(shape)
    return torch.empty(shape, dtype=dtype)


def convert_mapped(file: SafetensorsFile, info: TensorInfo, dtype: torch.dtype) -> torch.Tensor:
    """Converts from the file mapping chunk by chunk, dropping each chunk's source pages once it is converted, so the
    mapped file does not add up to a second copy of the model in this process's memory (stock peaks at 1.5x)."""
    out = alloc_cpu(info.shape, dtype)
    if info.numel == 0:
        return out
    src, dst = file.view(info).view(-1), out.view(-1)
    size = info.torch_dtype.itemsize
    step = max(1, CHUNK_BYTES // size)
    alone = file.owner is not None and getattr(file.owner, "serial_loop", False)  # see LoadContext.serial_loop
    with contextlib.nullcontext() if alone else one_op_thread():
        for lo in range(0, info.numel, step):
            hi = min(lo + step, info.numel)
            _check_alive(file)
            file.check_size(info.start + hi * size, info.name)  # a page past a truncated end would be a SIGBUS
            dst[lo:hi].copy_(src[lo:hi])
            file.release(info, lo * size, hi * size)
    return out


def _thread_buffer(name: str, nbytes: int) -> torch.Tensor:
    """This thread's reusable byte buffer ``name`` (made on first use; it stays warm in the CPU's cache)."""
    buf = getattr(_staging, name, None)
    if buf is None:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        setattr(_staging, name, buf)
    return buf


def _staging_buffer() -> torch.Tensor:
    return _thread_buffer("buf", CHUNK_BYTES)


def _read_chunk(file: SafetensorsFile, info: TensorInfo, out: memoryview, byte_offset: int) -> None:
    _check_alive(file)
    file.read_into(info, out, byte_offset)


def _convert_chunk(file: SafetensorsFile, info: TensorInfo, out_flat: torch.Tensor, lo: int, hi: int) -> None:
    _check_alive(file)
    src_dtype = info.torch_dtype
    size = src_dtype.itemsize
    staging = _staging_buffer()[: (hi - lo) * size]
    file.read_into(info, tensor_buffer(staging), lo * size)
    with one_op_thread():
        out_flat[lo:hi].copy_(staging.view(src_dtype))


def _wait_all(futures: list[Future]) -> None:
    """Waits for every chunk of one tensor. On the first failure, cancels the chunks not yet started and waits for
    those running (they write into the output tensor and their thread's staging buffer) before raising it, so that no
    task of a failed load is left behind in the persistent pool."""
    try:
        for f in futures:
            f.result()
    except BaseException:
        for f in futures:
            f.cancel()
        wait_futures(futures)
        raise


def read_converted(file: SafetensorsFile, info: TensorInfo, dtype: torch.dtype, threads: int) -> torch.Tensor:
    out = alloc_cpu(info.shape, dtype)
    numel = info.numel
    if numel == 0:
        return out
    out_flat = out.view(-1)
    step = max(1, CHUNK_BYTES // info.torch_dtype.itemsize)
    bounds = [(lo, min(lo + step, numel)) for lo in range(0, numel, step)]
    if len(bounds) == 1:
        _convert_chunk(file, info, out_flat, *bounds[0])
        return out
    _wait_all([chunk_pool(threads).submit(_convert_chunk, file, info, out_flat, lo, hi) for lo, hi in bounds])
    return out


def read_same(file: SafetensorsFile, info: TensorInfo, threads: int) -> torch.Tensor:
    out = alloc_cpu(info.shape, info.torch_dtype)
    if info.nbytes == 0:
        return out
    buf = tensor_buffer(out)
    bounds = [(lo, min(lo + CHUNK_BYTES, info.nbytes)) for lo in range(0, info.nbytes, CHUNK_BYTES)]
    if len(bounds) == 1:
        file.read_into(info, buf, 0)
        return out
    _wait_all([chunk_pool(threads).submit(_read_chunk, file, info, buf[lo:hi], lo) for lo, hi in bounds])
    return out


def _piece_buffer() -> torch.Tensor:
    return _thread_buffer("piece", PIECE_BYTES)


def _file_chunk(file: SafetensorsFile, info: TensorInfo, dtype: torch.dtype, write: Callable, lo: int, hi: int):
    _check_alive(file)
    src_dtype = info.torch_dtype
    size = src_dtype.itemsize
    if file.io == "mmap":
        file.check_size(info.start + hi * size, info.name)  # a page past a truncated end would be a SIGBUS
        src = file.view(info).view(-1)[lo:hi]
    else:
        staging = _staging_buffer()[: (hi - lo) * size]
        file.read_into(info, tensor_buffer(staging), lo * size)
        src = staging.view(src_dtype)
    step = max(1, PIECE_BYTES // dtype.itemsize)
    for p in range(0, hi - lo, step):
        q = min(hi - lo, p + step)
        if dtype == src_dtype and file.io != "mmap":
            piece = src[p:q]  # already in the staging buffer
        else:
            piece = _piece_buffer()[: (q - p) * dtype.itemsize].view(dtype)
            with one_op_thread():
                piece.copy_(src[p:q])
        write(tensor_buffer(piece), (lo + p) * dtype.itemsize)
    if file.io == "mmap":
        file.release(info, lo * size, hi * size)


def convert_to_file(file: SafetensorsFile, info: TensorInfo, dtype: torch.dtype, write: Callable, threads: int):
    """Converts ``info`` to ``dtype`` (or copies it, for the same dtype) into a file instead of memory: each piece of
    the result, at most :data:`PIECE_BYTES`, is made in a per-thread buffer and handed to ``write(bytes,
    byte_offset_in_the_tensor)``. Nothing of the tensor's size is allocated; the source is read as by
    :func:`convert_mapped` (its pages dropped once converted) or :func:`read_converted`. Bit-identical to
    ``stored.to(dtype)``; an exception from ``write`` stops the tensor's other chunks and is raised."""
    numel = info.numel
    if numel == 0:
        return
    step = max(1, CHUNK_BYTES // max(info.torch_dtype.itemsize, dtype.itemsize))
    bounds = [(lo, min(lo + step, numel)) for lo in range(0, numel, step)]
    if len(bounds) == 1:
        _file_chunk(file, info, dtype, write, *bounds[0])
        return
    _wait_all([chunk_pool(threads).submit(_file_chunk, file, info, dtype, write, lo, hi) for lo, hi in bounds])
