"""Every difference between the supported transformers versions (4.57.x and 5.x) lives here.

Example:
    ```python
    from hf_fastload.engine.context import LoadContext
    from hf_fastload.integration import compat

    ctx = LoadContext(threads=8)
    with compat.hooks(ctx):    # this thread's from_pretrained reads its safetensors through ctx
        model = LlamaForCausalLM.from_pretrained("path/to/llama")
    ctx.close()
    compat.TRANSFORMERS_V5     # True on 5.x
    ```

hf_fastload owns only the bytes path of a load; transformers keeps key renames, weight conversions, dtype rules,
tying, missing-key init and device placement. The hooks that hand the bytes path to us differ by version:

- both: ``transformers.modeling_utils.safe_open`` opens files with our validating reader while a fast load runs in
  the calling thread (other threads see the original);
- 5.x: ``core_model_loading._materialize_copy(tensor, device, dtype)`` is where each checkpoint tensor becomes the
  final tensor; for our slices the engine does it, reading and converting in one pass. ``spawn_materialize``, which
  submits every tensor to transformers' 4 loader threads up front, plans the tensors that stream to a device, so
  that they are prefetched (more than 4 at once). ``_is_on_hf_mount`` answers False during a fast load: the engine
  picks its own I/O mode, ``pread`` where stock would have read whole files;
- 4.57: ``_load_state_dict_into_meta_model`` gets a wrapper that computes each tensor's target dtype and device
  with transformers' own ``_infer_parameter_dtype`` and device-map rule; when the original function reads a tensor
  (``slice[...]``) it gets it already in its final dtype and device, and its own ``.to()`` calls are no-ops. The
  loop takes one tensor at a time, so the next planned tensors are prefetched (materialized in the background, a
  bounded window of bytes ahead: :meth:`~hf_fastload.engine.LoadContext.prefetch`) while it works.

Quantized loads (the methods :mod:`~hf_fastload.integration.fallback` lets through: bitsandbytes, torchao, FP8)
keep this path: the quantizer consumes the tensors after it (5.x: its quantize op runs on what ``_materialize_copy``
returned; 4.57: ``create_quantized_param`` gets the tensor the slice returned, in the quantizer's pre-quantization
dtype, on the shard's device), so the bytes are ours and the quantization stock's.

Outside the hooks, :func:`adapter_lookup_kwargs` says how each version looks for a PEFT adapter in a load.

The patches are installed once while any fast load runs (refcounted under a lock) and removed after the last.
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
from collections.abc import Iterator

import torch
import transformers
import transformers.modeling_utils as mu
from packaging import version

from ..engine.context import LoadContext
from ..engine.handle import TensorSlice
from .patching import PatchSet

__all__ = ["TRANSFORMERS_V5", "TRANSFORMERS_VERSION", "active_context", "adapter_lookup_kwargs", "hooks"]

TRANSFORMERS_VERSION = version.parse(transformers.__version__)
TRANSFORMERS_V5 = TRANSFORMERS_VERSION.major >= 5
# Keyword arguments of from_pretrained that only newer versions know: disable_mmap came with 5.6.0 (before it, stock
# hands it to the model's __init__, which refuses it, and so do we).
HAS_DISABLE_MMAP = version.parse(TRANSFORMERS_VERSION.base_version) >= version.parse("5.6")

_local = threading.local()


def active_context() -> LoadContext | None:
    """The LoadContext of the fast load running in this thread, if any."""
    return getattr(_local, "ctx", None)


def adapter_lookup_kwargs(kwargs: dict, adapter_kwargs: dict) -> dict:
    """The keyword arguments with which this version's ``from_pretrained(**kwargs)`` calls
    ``find_adapter_config_file`` when peft is installed and ``adapter_kwargs`` names no ``_adapter_model_path``.

    - 5.x (``integrations.peft.maybe_load_adapters``): ``adapter_kwargs``, plus the load's ``cache_dir``, ``proxies``,
      ``subfolder`` and ``revision`` where ``adapter_kwargs`` has none of its own, and always the load's
      ``force_download``, ``local_files_only`` and token (the load's, else ``adapter_kwargs``' token);
    - 4.57: the load's ``cache_dir``, ``force_download``, ``proxies``, ``local_files_only`` and commit hash, plus
      ``adapter_kwargs`` with the load's token added; no ``subfolder`` unless ``adapter_kwargs`` has one, so 4.57
      looks for ``adapter_config.json`` at the repository's root.

    Args:
        kwargs (`dict`): the keyword arguments of the ``from_pretrained`` call.
        adapter_kwargs (`dict`): its ``adapter_kwargs``, without ``_adapter_model_path``.
    """
    lookup = dict(adapter_kwargs)
    if TRANSFORMERS_V5:
        token = lookup.pop("token", None)
        for name in ("cache_dir", "proxies", "subfolder", "revision"):
            lookup.setdefault(name, kwargs.get(name, "" if name == "subfolder" else None))
        lookup["force_download"] = bool(kwargs.get("force_download", False))
        lookup["local_files_only"] = bool(kwargs.get("local_files_only", False))
        lookup["token"] = kwargs.get("token") or token
        return lookup
    if kwargs.get("token") is not None:
        lookup.setdefault("token", kwargs["token"])
    config = kwargs.get("config")
    commit = kwargs.get("_commit_hash") or getattr(config, "_commit_hash", None)
    lookup.update(
        cache_dir=kwargs.get("cache_dir"),
        force_download=kwargs.get("force_download", False),
        proxies=kwargs.get("proxies"),
        local_files_only=kwargs.get("local_files_only", False),
        _commit_hash=commit if isinstance(commit, str) else None,
    )
    return lookup


def _patch_safe_open(original):
    @functools.wraps(original)
    def safe_open(filename, framework="pt", device="cpu", *args, **kwargs):
        ctx = active_context()
        if ctx is None or framework not in ("pt", "torch", "pytorch"):
            return original(filename, framework, device, *args, **kwargs)
        return ctx.open(filename, device=device)

    return safe_open


def _patch_materialize_copy(original):
    @functools.wraps(original)
    def _materialize_copy(tensor, device=None, dtype=None):
        if isinstance(tensor, TensorSlice):
            ctx = tensor.file.context
            ready = ctx.take(tensor, device, dtype)
            return ready if ready is not None else ctx.materialize(tensor, device, dtype)
        return original(tensor, device, dtype)

    return _materialize_copy


def _patch_spawn_materialize(original):
    @functools.wraps(original)
    def spawn_materialize(thread_pool, tensor, device=None, dtype=None, sharding_op=None, *args, **kwargs):
        # transformers 5 submits every checkpoint tensor to its 4 loader threads up front, in the order they run:
        # tensors that stream to a device are planned and prefetched, so more than 4 stream at once
        if thread_pool is not None and sharding_op is None and isinstance(tensor, TensorSlice):
            ctx = tensor.file.context
            if ctx is not None and ctx.streams(device, tensor.file):
                ctx.plan(tensor, device, dtype)
                ctx.prefetch()
        return original(thread_pool, tensor, device, dtype, sharding_op, *args, **kwargs)

    return spawn_materialize


def _patch_is_on_hf_mount(original):
    @functools.wraps(original)
    def _is_on_hf_mount(path):
        if active_context() is not None:
            return False  # the engine reads such files with pread itself
        return original(path)

    return _is_on_hf_mount


def _v4_target_device(device_map, param_name):
    """4.57's rule in ``_load_state_dict_into_meta_model`` for where a parameter goes."""
    if device_map is None:
        return "cpu"
    regex = "|".join(re.escape(k) for k in sorted(device_map.keys(), reverse=True))
    match = re.search(regex, param_name)
    return device_map[match.group()] if match else None


def _v4_file_device(device_map):
    """The device 4.57's ``_load_state_dict_into_meta_model`` opens the shard on (where ``slice[...]`` puts a
    tensor): the device of a single-device map (``{"": device}``), else the CPU."""
    device = (device_map or {}).get("")
    if device is None or device in ("cpu", torch.device("cpu")):
        return "cpu"
    return device.index if isinstance(device, torch.device) else device


def _patch_load_into_meta_model(original):
    from transformers.modeling_utils import _infer_parameter_dtype  # 4.57 only: 5.x has no such function

    @functools.wraps(original)
    def _load_state_dict_into_meta_model(
        model, state_dict, shard_file, reverse_renaming_mapping, device_map=None, *args, **kwargs
    ):
        ctx = active_context()
        hf_quantizer = kwargs.get("hf_quantizer")
        if ctx is not None and str(shard_file).endswith(".safetensors") and kwargs.get("device_mesh") is None:
            keep_in_fp32_regex = kwargs.get("keep_in_fp32_regex")
            file_device = _v4_file_device(device_map)
            # bitsandbytes quantizes each weight in this loop on all cores: prefetching and converting alongside it
            # made 1 B 8-bit loads 0.78x stock's speed (2026-12-02); as stock, one tensor at a time
            ctx.serial_loop = ctx.serial_loop or hf_quantizer is not None
            handle = ctx.open(shard_file)
            for param_name, empty_param in state_dict.items():
                device = _v4_target_device(device_map, param_name)
                if device is None or device == "disk":
                    continue
                # with a quantizer, the dtype is its pre-quantization dtype; a tensor it quantizes stays where the
                # file's slice put it (create_quantized_param moves it), the others go to their device as usual
                _, casting_dtype = _infer_parameter_dtype(
                    model, param_name, empty_param, keep_in_fp32_regex, hf_quantizer
                )
                if hf_quantizer is not None and hf_quantizer.param_needs_quantization(model, param_name):
                    device = file_device
                name = reverse_renaming_mapping[param_name]
                ctx.plan(handle.get_slice(name), device, casting_dtype)
            ctx.prefetch()  # the first tensors stream while the loop starts; each one taken prefetches more
        return original(model, state_dict, shard_file, reverse_renaming_mapping, device_map, *args, **kwargs)

    return _load_state_dict_into_meta_model


def _targets():
    yield mu, "safe_open", _patch_safe_open
    if TRANSFORMERS_V5:
        import transformers.core_model_loading as cml  # 5.x only: 4.57 has no such module

        yield cml, "_materialize_copy", _patch_materialize_copy
        if hasattr(cml, "spawn_materialize"):
            yield cml, "spawn_materialize", _patch_spawn_materialize
        if hasattr(mu, "_is_on_hf_mount"):
            yield mu, "_is_on_hf_mount", _patch_is_on_hf_mount
    else:
        yield mu, "_load_state_dict_into_meta_model", _patch_load_into_meta_model


PATCHES = PatchSet(_targets)


@contextlib.contextmanager
def hooks(ctx: LoadContext) -> Iterator[LoadContext]:
    """Routes the bytes path of transformers loads in this thread through ``ctx`` while the block runs."""
    PATCHES.acquire()
    outer, _local.ctx = active_context(), ctx  # a load inside a load (remote code, wrappers) gets its own context
    try:
        yield ctx
    finally:
        _local.ctx = outer
        PATCHES.release()
