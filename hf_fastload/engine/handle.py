"""The handle transformers reads a checkpoint file through: ``safe_open``'s interface over hf_fastload's engine.

Example:
    ```python
    from hf_fastload.engine.handle import SafetensorsHandle

    with SafetensorsHandle("model.safetensors") as f:     # what safetensors.safe_open(path, framework="pt") is
        for name in f.keys():
            tensor = f.get_tensor(name)    # a zero-copy view of the (private) file mapping
        part = f.get_slice("lm_head.weight")[:1024]       # reads only those rows
    ```

:class:`SafetensorsHandle` is a :class:`~hf_fastload.format.file.SafetensorsFile` (validated header, bytes) that
also hands out :class:`TensorSlice` objects, shaped like safetensors' ``PySafeSlice``. Indexing a slice
materializes through the engine (:mod:`hf_fastload.engine.materialize`): the whole tensor, or only a block's bytes
for a tensor-parallel shard. Inside a load, the handle belongs to the load's
:class:`~hf_fastload.engine.context.LoadContext`, which decides the target of planned tensors (transformers 4.57)
and closes the file when the load ends.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..format.file import SafetensorsFile
from ..format.header import TensorInfo
from .materialize import materialize, read_part

__all__ = ["SafetensorsHandle", "TensorSlice"]


class SafetensorsHandle(SafetensorsFile):
    """An open safetensors file, usable where ``safetensors.safe_open(path, framework="pt")`` is.

    Args:
        path (`str`): the file.
        io (`str`, *optional*, defaults to `"mmap"`): `"mmap"` returns zero-copy views of a private mapping;
            `"pread"` reads into fresh memory.
        device (`str | torch.device | int`, *optional*, defaults to `"cpu"`): where `get_tensor` puts tensors.
    """

    def __init__(self, path: str | os.PathLike, io: str = "mmap", device: Any = "cpu"):
        super().__init__(path, io=io)
        self.device = device

    @property
    def context(self) -> Any:
        """The :class:`~hf_fastload.engine.context.LoadContext` that owns this handle, or None."""
        return self.owner

    def get_slice(self, name: str) -> TensorSlice:
        return TensorSlice(self, self.info(name))

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.get_slice(name)[...]

    def __enter__(self) -> SafetensorsHandle:
        return self


class TensorSlice:
    """A lazy handle on one tensor, shaped like safetensors' ``PySafeSlice`` (``get_shape``, ``get_dtype``, ``[]``)."""

    __slots__ = ("file", "info")

    def __init__(self, file: SafetensorsHandle, info: TensorInfo):
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
        self.info.check_readable(self.file.path)

    def __getitem__(self, key) -> torch.Tensor:
        self.check_readable()
        ctx = self.file.context
        whole = key is Ellipsis or (isinstance(key, tuple) and key == (Ellipsis,))
        if ctx is not None and whole:
            ready = ctx.take(self)  # a tensor whose target was planned (transformers 4.57's loop)
            if ready is not None:
                return ready
        if not whole:  # a block of slices (a tensor-parallel shard): read only its bytes
            part = read_part(self, key)
            if part is not None:
                return part
        full = materialize(self, device=self.file.device)
        if whole:
            return full
        return full[key].contiguous()

    def __repr__(self) -> str:
        return f"TensorSlice({self.info.name!r}, {self.info.dtype}, {list(self.info.shape)}, file={self.file.path!r})"
