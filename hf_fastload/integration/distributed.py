"""Tensor-parallel loads: which distributed arguments of ``from_pretrained`` the fast path takes, and who this rank is.

Example:
    ```python
    from hf_fastload.integration import distributed

    distributed.tp_fallback_reason({"tp_plan": "auto"})        # None: tensor parallel alone is on the fast path
    distributed.tp_fallback_reason({"device_mesh": mesh})      # "device_mesh without tp_plan: ..."
    rank, world = distributed.rank_and_world()
    ```

Under ``torchrun`` with ``tp_plan="auto"`` (or the installed transformers' other TP arguments), transformers cuts each
checkpoint tensor down to this rank's shard by indexing the lazy slice object that ``safe_open(...).get_slice(name)``
returns, before anything is read:

- 5.x: ``distributed.sharding_utils.DtensorShardOperation.shard_tensor`` computes the DTensor placements' intervals
  and indexes the slice with a tuple of ``slice`` objects (several, concatenated, for ``_StridedShard``), or skips a
  per-expert tensor that this rank does not own; ``core_model_loading._materialize_copy`` is not called for them;
- 4.57: ``integrations.tensor_parallel.get_tensor_shard`` indexes it with a tuple of slices, ``param[:]`` /
  ``param[...]`` for replicated tensors.

With hf_fastload those slice objects are the engine's :class:`~hf_fastload.engine.handle.TensorSlice`, which reads
only the selected bytes (:mod:`hf_fastload.engine.slices`); this module holds what the arguments mean.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from . import compat

__all__ = ["checkpoint_bytes", "rank_and_world", "tp_fallback_reason", "tp_requested"]

TP_KWARGS = ("tp_plan", "tp_size", "device_mesh", "distributed_config")


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
        dist = torch.distributed
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
