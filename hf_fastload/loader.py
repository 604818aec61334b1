"""``fast_from_pretrained``: ``from_pretrained`` with hf_fastload's bytes path, checked after every load.

Example:
    ```python
    import hf_fastload
    from transformers import AutoModelForCausalLM

    model = hf_fastload.fast_from_pretrained("path/to/llama", model_class=AutoModelForCausalLM, dtype="float32")
    print(hf_fastload.last_report())
    ```
"""

from __future__ import annotations

import json
import os
import re
import stat
import threading
import time
from typing import Any

from .errors import CheckpointContentError, CheckpointFileError, FallbackRequiredError, VerificationError
from .report import LoadReport, _set_last_report

__all__ = ["fast_from_pretrained"]

_TRUE = {"1", "true", "yes", "on", "y", "t"}
# Keyword arguments of from_pretrained that locate files; the same ones go to AutoConfig when we need the config.
_HUB_KWARGS = (
    "cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies",
    "trust_remote_code", "code_revision",
)  # fmt: skip
SAFE_WEIGHTS_NAME = "model.safetensors"
# transformers' from_pretrained is not thread-safe: it builds models under process-wide patches (accelerate's
# init_empty_weights on 4.57, init-function guards on 5.x), and two concurrent stock loads return models with
# tensors left on the meta device (seen in 10 of 10 trials with three tiny models on both versions). Our loads
# take turns inside from_pretrained; each still reads its bytes with all the engine's threads.
LOAD_LOCK = threading.RLock()
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def _logger():
    from transformers.utils import logging

    return logging.get_logger("transformers.hf_fastload")


def _resolve_class(model_class, source, kwargs):
    """The class whose from_pretrained runs: the one given, else the config's architectures[0], else AutoModel."""
    import transformers

    if model_class is not None:
        return model_class, None
    config = kwargs.get("config")
    if config is None or isinstance(config, (str, os.PathLike)):
        hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        config = transformers.AutoConfig.from_pretrained(config or source, **hub)
    for arch in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and hasattr(cls, "from_pretrained"):
            return cls, config
    return transformers.AutoModel, config


_DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _quantization_config(source: str, kwargs: dict, config) -> Any:
    """The ``quantization_config`` of the model's config, or None.

    From the config object at hand: the one resolved here, else the one the caller passed (the Auto classes pass the
    config they loaded to the concrete class, which is the call the opt-in routes), else ``config.json`` itself.
    """
    import transformers

    for candidate in (config, kwargs.get("config")):
        if candidate is not None and not isinstance(candidate, (str, os.PathLike)):
            return getattr(candidate, "quantization_config", None)
    hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs and k not in ("trust_remote_code", "code_revision")}
    try:
        config_dict, _ = transformers.PretrainedConfig.get_config_dict(kwargs.get("config") or source, **hub)
    except Exception:  # no readable config: stock from_pretrained will raise its own error about it
        return None
    return config_dict.get("quantization_config")


def _fallback_reason(source, kwargs, config) -> str | None:
    """Why the fast path cannot take this load, or None. Checked before loading anything."""
    from . import compat, distributed

    if kwargs.get("state_dict") is not None:
        return "a state_dict was passed: there are no files to read"
    if kwargs.get("gguf_file"):
        return "GGUF checkpoints are dequantized by transformers"
    for flag in ("from_tf", "from_flax"):
        if kwargs.get(flag) and not compat.TRANSFORMERS_V5:  # 5.x drops both arguments unread
            return f"{flag}=True: TensorFlow/Flax weights are converted by transformers"
    if kwargs.get("use_safetensors") is False:
        return "use_safetensors=False: pickle checkpoints are read by torch.load"
    if kwargs.get("quantization_config") is not None or _quantization_config(source, kwargs, config) is not None:
        return "quantized model (quantization_config): weights are handled by the quantizer"
    adapter = _adapter_reason(source, kwargs)
    if adapter is not None:
        return adapter
    tp_reason = distributed.tp_fallback_reason(kwargs)
    if tp_reason is not None:
        return tp_reason
    device_map = kwargs.get("device_map")
    if isinstance(device_map, dict) and "disk" in device_map.values():
        return "device_map offloads to disk"
    # offload_folder matters only where transformers computes the device map (it may put weights on "disk");
    # offload_state_dict is dropped unread by 4.57 and 5.x
    if kwargs.get("offload_folder") and device_map in _DEVICE_MAP_STRATEGIES:
        return f"disk offloading (offload_folder with device_map={device_map!r})"
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return "DeepSpeed ZeRO-3 partitions weights itself"
    if not compat.TRANSFORMERS_V5:
        from transformers.modeling_utils import is_fsdp_enabled

        if is_fsdp_enabled():
            return "FSDP: only local rank 0 reads weights"
        if _env_true("HF_ENABLE_PARALLEL_LOADING"):
            return "HF_ENABLE_PARALLEL_LOADING: transformers 4.57 loads shards from its own threads"
    return None


def _adapter_reason(source: str, kwargs: dict) -> str | None:
    """Why stock ``from_pretrained(source, **kwargs)`` would load a PEFT adapter, or None when it loads none.

    transformers loads an adapter only when peft is installed, and then when ``adapter_kwargs`` names an
    ``_adapter_model_path`` (the Auto classes set it when they found an adapter) or when its own lookup,
    ``find_adapter_config_file``, finds an ``adapter_config.json`` for the model; we ask the same question with the
    same arguments. Everything else is not an adapter load: the ``adapter_kwargs`` the Auto classes pass to every
    load once peft is importable (5.x: ``{"revision": ...}``; 4.57: ``{}``, or ``{"token": ...}`` with a token),
    ``adapter_name`` alone, and an ``adapter_config.json`` without peft (transformers then ignores it).
    """
    from transformers.utils import find_adapter_config_file, is_peft_available

    from . import compat

    if not is_peft_available():
        return None
    adapter_kwargs = dict(kwargs.get("adapter_kwargs") or {})
    given = adapter_kwargs.pop("_adapter_model_path", None)
    if given is not None:
        return f"adapter (PEFT) loading: transformers loads the adapter in {os.fspath(given)} on top of the base model"
    try:
        found = find_adapter_config_file(source, **compat.adapter_lookup_kwargs(kwargs, adapter_kwargs))
    except Exception as e:  # stock makes the same call first: it will raise or decide, not us
        return f"adapter (PEFT) lookup: could not tell whether an adapter is loaded ({type(e).__name__}: {e})"
    if found is not None:
        return f"adapter (PEFT) loading: transformers loads the adapter {found} describes on top of the base model"
    return None


def _broken_entry(path: str) -> str | None:
    """Why ``path``, which exists as a directory entry, cannot be read as a file; None when it is a regular file or
    absent. transformers treats such an entry as absent and says there is no weights file, which misleads."""
    if not os.path.lexists(path):
        return None
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"is a symbolic link to a missing file ({os.readlink(path)!r})"
    except OSError as e:  # ELOOP: a symbolic link loop; EACCES: a directory on the way is not searchable
        return f"cannot be opened: {e.strerror or e}"
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    return None if stat.S_ISREG(mode) else "is not a regular file"


_SHARD_NAME = re.compile(r"-\d+-of-\d+\.safetensors$")


def check_local_checkpoint(folder: str, ctx: Any = None) -> None:
    """Checks a local folder's safetensors files before a fast load; raises CheckpointFileError or
    CheckpointContentError naming the file (and tensor) at fault.

    - ``model.safetensors`` or the index that exists as a broken entry (a symlink loop, a dangling link, a directory);
    - the index parses, and every shard it names exists and is readable;
    - every tensor the index places in a shard is in that shard's header (else transformers 5 would initialize it
      randomly as "missing", and 4.57 would return it on the meta device);
    - a file named like a shard (``*-00003-of-00004.safetensors``) that the index does not name is not loaded: a
      warning names it (a leftover of an earlier save with another shard count, or a shard missing from the index).

    transformers would fail on most of these too, later and with a message that does not name our problem. With the
    load's ``ctx`` (a :class:`~hf_fastload.engine.LoadContext`), shards are opened through it, so the headers read
    here are the ones the load uses (each file is opened and parsed once).
    """
    from .reader import SafetensorsFile

    index_path = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    for path in (os.path.join(folder, SAFE_WEIGHTS_NAME), index_path):
        broken = _broken_entry(path)
        if broken is not None:
            raise CheckpointFileError(f"checkpoint file {path} {broken}")
    if not os.path.isfile(index_path):
        return
    try:
        with open(index_path, encoding="utf-8") as fh:
            index = json.load(fh)
        weight_map = index["weight_map"]
        shards = set(weight_map.values())
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointFileError(f"cannot read safetensors index {index_path}: {e}") from e
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointContentError(
            f"invalid safetensors index {index_path}: expected a JSON object with a 'weight_map' of tensor name to "
            f"shard file, found an error: {e!r}"
        ) from None
    by_shard: dict[Any, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    for shard in sorted(shards, key=str):
        names = sorted(by_shard[shard])
        path = os.path.join(folder, str(shard))
        if not isinstance(shard, str) or not os.path.isfile(path):
            why = (_broken_entry(path) if isinstance(shard, str) else None) or "does not exist"
            raise CheckpointFileError(
                f"{index_path} names shard {shard!r} (holding e.g. {names[:3]}) but {path} {why}"
            )
        handle = ctx.open(path) if ctx is not None else SafetensorsFile(path)  # reads and validates the header
        absent = [name for name in names if name not in handle.tensors]
        if ctx is None:
            handle.close()
        if absent:
            raise CheckpointContentError(
                f"{index_path} places tensor {absent[0]!r} in {path}, but that file has no such tensor"
                f"{f' ({len(absent)} such tensors, e.g. {absent[:3]})' if len(absent) > 1 else ''}; "
                "the index does not belong to these shards (was a shard replaced or the index edited?)"
            )
    try:
        stray = sorted(n for n in os.listdir(folder) if _SHARD_NAME.search(n) and n not in shards)
    except OSError:
        stray = []
    for name in stray:
        _logger().warning(
            f"hf_fastload: {os.path.join(folder, name)} looks like a checkpoint shard but {index_path} does not name "
            "it: its tensors are not loaded (a leftover of an earlier save?)"
        )


def _shape_error(error: Exception, ctx, cls, source: str, kwargs: dict) -> CheckpointContentError | None:
    """Turns transformers' size-mismatch error into ours, naming each tensor, its file, and both shapes."""
    text = str(error)
    if "size mismatch" not in text and "mismatched" not in text.lower():
        return None
    expected: dict[str, tuple] = {}
    prefix = ""
    try:  # the model as built from the config, on the meta device: cheap, and it has the expected shapes
        import torch
        import transformers

        config = kwargs.get("config")
        if config is None or isinstance(config, (str, os.PathLike)):
            hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
            config = transformers.AutoConfig.from_pretrained(config or source, **hub)
        with torch.device("meta"):
            meta = cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)
        expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
        prefix = getattr(meta, "base_model_prefix", "") or ""
    except Exception:  # the explanation is best effort; transformers' own message is kept below
        pass
    found = []
    for handle in list(ctx.files.values()):
        for name, info in handle.tensors.items():
            for key in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}"):
                if key in expected and expected[key] != tuple(info.shape):
                    found.append(
                        f"tensor {name!r} in {handle.path} has shape {list(info.shape)}, "
                        f"the model expects {list(expected[key])}"
                    )
                    break
    where = "; ".join(sorted(set(found))[:5]) if found else "(transformers' report above lists them)"
    return CheckpointContentError(
        f"checkpoint tensor shapes do not match the model built from the config: {where}. "
        "Fix the config or the checkpoint, or pass ignore_mismatched_sizes=True to re-initialize those weights. "
        f"transformers said: {text}"
    )


def _how_initialized(model, missing: list[str]) -> dict[str, str]:
    """For each missing key: tied to a loaded tensor, or initialized by the model's _init_weights."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    # DTensors (tensor-parallel loads) have no storage of their own: compare their local shards
    tensors = {k: t.to_local() if hasattr(t, "to_local") else t for k, t in tensors.items()}
    by_ptr: dict[int, str] = {}
    for name, t in tensors.items():
        if name not in missing and not t.is_meta and t.numel():
            by_ptr.setdefault(t.data_ptr(), name)
    how = {}
    for key in missing:
        t = tensors.get(key)
        partner = by_ptr.get(t.data_ptr()) if t is not None and not t.is_meta and t.numel() else None
        how[key] = f"tied to {partner}" if partner else f"{type(model).__name__}._init_weights"
    return how


def verify(model, info: dict, ctx) -> None:
    """Raises VerificationError unless every parameter and buffer holds real data that was loaded or initialized."""
    left = [
        name
        for name, t in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False))
        if t.is_meta
    ]
    if left:
        raise VerificationError(
            f"{type(model).__name__}: {len(left)} tensor(s) still on the meta device after loading, e.g. {left[:5]}; "
            "they were neither in the checkpoint nor initialized. The model was not returned."
        )
    errors = list(info.get("error_msgs") or []) + list((info.get("conversion_errors") or {}).values())
    if errors:
        raise VerificationError(f"{type(model).__name__}: transformers reported load errors: {errors[:3]}")


def fast_from_pretrained(
    pretrained_model_name_or_path: str | os.PathLike,
    *model_args: Any,
    model_class: Any = None,
    strict: bool | None = None,
    inference: bool = False,
    **kwargs: Any,
):
    """Loads a model like ``model_class.from_pretrained``, reading the safetensors bytes with hf_fastload's engine.

    Args:
        pretrained_model_name_or_path (`str` or `os.PathLike`): a local folder, or a hub id already in the HF cache.
        *model_args: passed to ``from_pretrained``.
        model_class (`type`, *optional*): an Auto class or a concrete model class. Defaults to the class named in the
            config's ``architectures[0]``, else ``AutoModel``.
        strict (`bool`, *optional*): raise `FallbackRequiredError` instead of falling back to stock loading.
            Defaults to the ``HF_FASTLOAD_STRICT`` environment variable.
        inference (`bool`, *optional*, defaults to `False`): return the model wrapped by
            `hf_fastload.inference_mode` (no autograd graph, ``requires_grad=False``; undo with `training_mode`).
        **kwargs: every keyword ``from_pretrained`` takes (``dtype``, ``device_map``, ``revision``, ...), with the
            same meaning and defaults as in the installed transformers.

    Returns:
        The model, or ``(model, loading_info)`` with ``output_loading_info=True``, as ``from_pretrained`` returns.

    Example:
        ```python
        model = fast_from_pretrained("./tiny-llama", dtype="float32")
        ```
    """
    from . import compat, distributed, engine, patch

    entry = patch.take_entry()  # the original from_pretrained when a patched one routed this call here
    t0 = time.perf_counter()
    source = os.fspath(pretrained_model_name_or_path)
    strict = _env_true("HF_FASTLOAD_STRICT") if strict is None else strict
    knobs = engine.settings()
    report = LoadReport(source=source, transformers_version=compat.transformers.__version__, threads=knobs["threads"])
    _set_last_report(report)

    cls, config = _resolve_class(model_class, source, kwargs)
    load = entry or cls.from_pretrained
    report.model_class = cls.__name__
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    report.dtype = str(dtype) if dtype is not None else "default"
    device_map = kwargs.get("device_map")
    report.device = str(device_map) if device_map is not None else "cpu"
    reason = _fallback_reason(source, kwargs, config)
    if reason is not None:
        out = _fallback(load, source, model_args, kwargs, report, reason, strict, t0)
        report.rank, report.world_size = distributed.rank_and_world()
        _finished(report)
        return _inference(out, inference)

    want_info = kwargs.pop("output_loading_info", False)
    prefer_pread = False
    if compat.HAS_DISABLE_MMAP and kwargs.get("disable_mmap"):
        prefer_pread, kwargs["disable_mmap"] = True, False  # we read with pread; stock would read whole files
    ctx = engine.LoadContext(io=knobs["io"], threads=knobs["threads"], prefer_pread=prefer_pread)
    ctx.readahead = not distributed.tp_requested(kwargs)  # a tensor-parallel rank reads only its own shards
    if os.path.isdir(source):
        try:
            check_local_checkpoint(os.path.join(source, kwargs.get("subfolder") or ""), ctx)
        except BaseException:
            ctx.close()
            raise
    t_build = time.perf_counter()
    try:
        with LOAD_LOCK, compat.hooks(ctx), patch.suspended():
            model, info = load(source, *model_args, output_loading_info=True, **kwargs)
        ctx.check_mapped()  # a file truncated during the load: its zero-copy tensors would be a SIGBUS when touched
    except Exception as e:
        if ctx.errors:
            raise ctx.errors[0] from e
        mismatch = _shape_error(e, ctx, cls, source, kwargs)
        if mismatch is not None:
            raise mismatch from e
        raise
    finally:
        ctx.close()
    t_end_load = time.perf_counter()
    if ctx.errors:  # transformers 5 records per-tensor errors instead of raising; never return that model
        raise ctx.errors[0]

    report.files = sorted({h.path for h in ctx.files.values()})
    report.bytes_read, report.tensors_loaded, report.zero_copy = ctx.bytes_read, ctx.tensors, ctx.zero_copy
    report.checkpoint_bytes = distributed.checkpoint_bytes(ctx)
    report.rank, report.world_size = distributed.rank_and_world()
    report.methods = dict(ctx.methods)
    io_used = ctx.io_summary()
    if io_used:
        modes = sorted(set(io_used.values()))
        report.io = "+".join(sorted({m.split(":")[0] for m in modes}))
        report.io_reason = "; ".join(m.split(": ", 1)[1] for m in modes)
    if ctx.tensors == 0:
        why = "the checkpoint has no safetensors weights that hf_fastload could read (transformers loaded it)"
        if strict:
            raise FallbackRequiredError(f"{source}: {why}; strict mode forbids the fallback")
        report.path, report.reason = "fallback", why
        _logger().warning(f"hf_fastload: {source}: fell back to stock from_pretrained: {why}")

    verify(model, info, ctx)
    report.missing_keys = _how_initialized(model, sorted(info.get("missing_keys") or []))
    report.unexpected_keys = sorted(info.get("unexpected_keys") or [])
    mismatched = info.get("mismatched_keys") or []
    report.mismatched_keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in mismatched)
    t_done = time.perf_counter()
    first = ctx.first if ctx.first is not None else t_end_load
    last = ctx.last if ctx.last is not None else t_end_load
    report.seconds = {
        "resolve": t_build - t0,
        "build": max(0.0, first - t_build),
        "read": max(0.0, last - first),
        "finalize": max(0.0, t_done - last),
        "total": t_done - t0,
    }
    _finished(report)
    _inference(model, inference)
    return (model, info) if want_info else model


def _inference(out, inference: bool):
    """Applies `inference_mode` to the model in ``out`` (a model, or ``(model, loading_info)``) if asked."""
    if inference:
        from .inference import inference_mode

        inference_mode(out[0] if isinstance(out, tuple) else out)
    return out


def _fallback(load, source, model_args, kwargs, report, reason, strict, t0):
    if strict:
        raise FallbackRequiredError(f"{source}: the fast path cannot load this model: {reason}")
    _logger().warning(f"hf_fastload: {source}: falling back to stock from_pretrained: {reason}")
    report.path, report.reason, report.io, report.io_reason = "fallback", reason, "stock", reason
    from . import patch

    with LOAD_LOCK, patch.suspended():
        out = load(source, *model_args, **kwargs)
    report.seconds = {"total": time.perf_counter() - t0}
    return out


_report_lock = threading.Lock()


def _finished(report: LoadReport) -> None:
    """Ends a load that returns a model: logs its report (``HF_FASTLOAD_VERBOSE``) and appends it to a file.

    With ``HF_FASTLOAD_REPORT=path.jsonl`` set, ``report.to_dict()`` is appended to that file as one JSON line, in
    one ``write`` in append mode, so that lines from threads and processes sharing the file do not interleave. Never
    raises: a failed write is one logged warning.
    """
    if _env_true("HF_FASTLOAD_VERBOSE"):
        _logger().warning(str(report))
    path = os.environ.get("HF_FASTLOAD_REPORT")
    if path:
        try:
            line = (json.dumps(report.to_dict(), default=str) + "\n").encode("utf-8")
            with _report_lock:  # one write() per line, in append mode: lines from processes do not interleave
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
                try:
                    os.write(fd, line)
                finally:
                    os.close(fd)
        except Exception as e:
            _logger().warning(f"hf_fastload: could not append the load report to HF_FASTLOAD_REPORT={path}: {e}")
