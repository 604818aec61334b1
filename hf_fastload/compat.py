"""Every difference between the supported transformers versions (4.57.x and 5.x) lives here.

hf_fastload owns only the bytes path of a load; transformers keeps key renames, weight conversions, dtype rules,
tying, missing-key init and device placement. The hooks that hand the bytes path to us differ by version:

- both: ``transformers.modeling_utils.safe_open`` opens files with our validating reader while a fast load runs in
  the calling thread (other threads see the original);
- 5.x: ``core_model_loading._materialize_copy(tensor, device, dtype)`` is where each checkpoint tensor becomes the
  final tensor; for our slices the engine does it, reading and converting in one pass. ``_is_on_hf_mount`` answers
  False during a fast load: the engine picks its own I/O mode, ``pread`` where stock would have read whole files;
- 4.57: ``_load_state_dict_into_meta_model`` gets a wrapper that computes each tensor's target dtype and device
  with transformers' own ``_infer_parameter_dtype`` and device-map rule; when the original function reads a tensor
  (``slice[...]``) it gets it already in its final dtype and device, and its own ``.to()`` calls are no-ops.

Outside the hooks, :func:`adapter_lookup_kwargs` says how each version looks for a PEFT adapter in a load.

The patches are installed once while any fast load runs (refcounted under a lock) and removed after the last.
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
from collections.abc import Iterator

import transformers
from packaging import version

from .engine import LoadContext
from .patching import PatchSet
from .reader import TensorSlice

__all__ = ["TRANSFORMERS_V5", "TRANSFORMERS_VERSION", "active_context", "adapter_lookup_kwargs", "hooks"]

TRANSFORMERS_VERSION = version.parse(transformers.__version__)
TRANSFORMERS_V5 = TRANSFORMERS_VERSION.major >= 5
# Keyword arguments of from_pretrained that only 5.x knows.
HAS_DISABLE_MMAP = TRANSFORMERS_V5

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
            return tensor.file.context.materialize(tensor, device, dtype)
        return original(tensor, device, dtype)

    return _materialize_copy


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


def _patch_load_into_meta_model(original):
    from transformers.modeling_utils import _infer_parameter_dtype

    @functools.wraps(original)
    def _load_state_dict_into_meta_model(
        model, state_dict, shard_file, reverse_renaming_mapping, device_map=None, *args, **kwargs
    ):
        ctx = active_context()
        hf_quantizer = kwargs.get("hf_quantizer")
        if (
            ctx is not None
            and str(shard_file).endswith(".safetensors")
            and hf_quantizer is None
            and kwargs.get("device_mesh") is None
        ):
            keep_in_fp32_regex = kwargs.get("keep_in_fp32_regex")
            handle = ctx.open(shard_file)
            for param_name, empty_param in state_dict.items():
                device = _v4_target_device(device_map, param_name)
                if device is None or device == "disk":
                    continue
                _, casting_dtype = _infer_parameter_dtype(model, param_name, empty_param, keep_in_fp32_regex, None)
                name = reverse_renaming_mapping[param_name]
                ctx.plan(handle.get_slice(name), device, casting_dtype)
        return original(model, state_dict, shard_file, reverse_renaming_mapping, device_map, *args, **kwargs)

    return _load_state_dict_into_meta_model


def _targets():
    import transformers.modeling_utils as mu

    yield mu, "safe_open", _patch_safe_open
    if TRANSFORMERS_V5:
        import transformers.core_model_loading as cml

        yield cml, "_materialize_copy", _patch_materialize_copy
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
