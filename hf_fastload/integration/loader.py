"""The load behind ``fast_from_pretrained``: ``from_pretrained`` with hf_fastload's bytes path, checked after.

Example:
    ```python
    from transformers import AutoModelForCausalLM
    from hf_fastload.integration.loader import fast_load

    model = fast_load("path/to/llama", (), {"dtype": "float32"}, model_class=AutoModelForCausalLM)
    ```

A load: resolve the class (and the config, when the class comes from it); fall back to stock where the fast path
cannot guarantee stock's outcome (:mod:`~hf_fastload.integration.fallback`); check a local folder's files
(:func:`~hf_fastload.format.index.check_folder`); run the original ``from_pretrained`` with the bytes path routed
through the engine (:mod:`~hf_fastload.integration.compat`); verify the model
(:mod:`~hf_fastload.integration.checks`); fill in the :class:`~hf_fastload.report.LoadReport`.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import transformers
from huggingface_hub import try_to_load_from_cache
from transformers.utils import logging
from transformers.utils.hub import cached_file

from ..engine.context import LoadContext
from ..engine.knobs import settings
from ..errors import FallbackRequiredError, FastLoadError
from ..format.index import INDEX_NAME, check_folder, read_weight_map, refuse_shards_outside, weight_files
from ..report import LoadReport, _set_last_report
from . import caching, compat, distributed
from .checks import adapter_base, how_initialized, load_config, shape_error, verify
from .fallback import env_true, fallback_reason
from .inference import inference_mode

__all__ = ["LOAD_LOCK", "fast_load", "in_fast_load"]

# transformers' from_pretrained is not thread-safe: it builds models under process-wide patches (accelerate's
# init_empty_weights on 4.57, init-function guards on 5.x), and two concurrent stock loads return models with
# tensors left on the meta device (seen in 10 of 10 trials with three tiny models on both versions). Our loads
# take turns inside from_pretrained; each still reads its bytes with all the engine's threads.
LOAD_LOCK = threading.RLock()
_local = threading.local()


def in_fast_load() -> bool:
    """Whether this thread is inside a fast load's call of the original ``from_pretrained`` (routing is off there)."""
    return getattr(_local, "depth", 0) > 0


@contextlib.contextmanager
def _inside() -> Iterator[None]:
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


def _logger():
    return logging.get_logger("transformers.hf_fastload")


def _resolve_class(model_class, source, kwargs):
    """The class whose from_pretrained runs: the one given, else the config's architectures[0], else AutoModel."""
    if model_class is not None:
        return model_class, None
    config = load_config(source, kwargs)
    for arch in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and hasattr(cls, "from_pretrained"):
            return cls, config
    return transformers.AutoModel, config


def _checkpoint_folder(source: str, kwargs: dict) -> str | None:
    """The local folder holding the checkpoint: ``source`` itself, or the HF cache's snapshot of a hub id (found
    without network); None when it is not known yet (transformers downloads or resolves it later)."""
    subfolder = kwargs.get("subfolder") or ""
    if os.path.isdir(source):
        return os.path.join(source, subfolder)
    try:
        hub = {"cache_dir": kwargs.get("cache_dir"), "revision": kwargs.get("revision")}
        found = try_to_load_from_cache(source, os.path.join(subfolder, "config.json"), **hub)
    except Exception:  # not a valid repo id, an unreadable cache: transformers will say what is wrong
        return None
    return os.path.dirname(found) if isinstance(found, str) else None


def _check_cached_index(repo_id: str, kwargs: dict) -> None:
    """For a hub id: if its index is already in the HF cache, refuses shard names that leave its snapshot folder (an
    index there could name another model's files in the same cache). Reads nothing from the network; what is not
    cached yet, or cannot be looked up, is left to transformers."""
    try:
        hub = {k: kwargs[k] for k in ("cache_dir", "revision", "subfolder", "token") if kwargs.get(k) is not None}
        index_path = cached_file(
            repo_id, INDEX_NAME, local_files_only=True, _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False, **hub,
        )  # fmt: skip
    except Exception:  # not a repo id, a gated repo, ...: transformers says so in the load itself
        return
    if isinstance(index_path, str) and os.path.isfile(index_path):
        try:
            weight_map = read_weight_map(index_path)
        except FastLoadError:  # a broken index: transformers reports it, as stock
            return
        refuse_shards_outside(index_path, weight_map)


def _check_folder(folder: str, ctx: LoadContext) -> None:
    """:func:`~hf_fastload.format.index.check_folder` with the load's opener; warns about each stray shard."""
    for path in check_folder(folder, ctx.open):
        _logger().warning(
            f"hf_fastload: {path} looks like a checkpoint shard but {os.path.join(folder, INDEX_NAME)} does not name "
            "it: its tensors are not loaded (a leftover of an earlier save?)"
        )


def _inference(out, inference: bool):
    """Applies `inference_mode` to the model in ``out`` (a model, or ``(model, loading_info)``) if asked."""
    if inference:
        inference_mode(out[0] if isinstance(out, tuple) else out)
    return out


def fast_load(
    pretrained_model_name_or_path: str | os.PathLike,
    model_args: tuple,
    kwargs: dict[str, Any],
    *,
    model_class: Any = None,
    strict: bool | None = None,
    inference: bool = False,
    entry: Any = None,
):
    """:func:`~hf_fastload.fast_from_pretrained` (same arguments, ``model_args`` and ``kwargs`` as a tuple and a
    dict), with ``entry``: the original ``from_pretrained`` (bound to its class) of a routed
    call (:mod:`hf_fastload.integration.routing`), which is called instead of ``model_class.from_pretrained`` (a
    subclass's own ``from_pretrained`` that called ``super()`` and was routed here must not run a second time)."""
    t0 = time.perf_counter()
    source = os.fspath(pretrained_model_name_or_path)
    strict = env_true("HF_FASTLOAD_STRICT") if strict is None else strict
    knobs = settings()
    report = LoadReport(source=source, transformers_version=transformers.__version__, threads=knobs["threads"])
    _set_last_report(report)
    cache_dir = caching.cache_dir(kwargs)  # fastload_cache= / HF_FASTLOAD_CACHE; stock never sees the keyword
    prefer_pread = bool(compat.HAS_DISABLE_MMAP and kwargs.get("disable_mmap"))
    # a tensor-parallel rank reads only its own shards: no whole-file readahead
    readahead = knobs["readahead"] != "off" and not distributed.tp_requested(kwargs)
    ctx = LoadContext(knobs["io"], knobs["threads"], prefer_pread, readahead=readahead)
    adapter_path = (kwargs.get("adapter_kwargs") or {}).get("_adapter_model_path")  # transformers pops it
    try:
        session = caching.start(cache_dir, kwargs, ctx, report) if cache_dir else None
        base = adapter_base(source, kwargs)  # a PEFT adapter: its base model is read (and checked) too
        sources = [name for name in (source, base) if name is not None]
        if readahead and knobs["readahead"] == "entry":  # the disk works while transformers imports and builds
            for name in sources:
                folder = _checkpoint_folder(name, kwargs)
                if folder is not None:  # a cached checkpoint file: its entries instead
                    files = weight_files(folder)
                    ctx.read_ahead(session.readahead_targets(files) if session else files)
        cls, config = _resolve_class(model_class, source, kwargs)
        load = entry or cls.from_pretrained
        report.model_class = cls.__name__
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        report.dtype = str(dtype) if dtype is not None else "default"
        device_map = kwargs.get("device_map")
        report.device = str(device_map) if device_map is not None else "cpu"
        reason = fallback_reason(source, kwargs, config)
        for name in sources if reason is None else ():
            if os.path.isdir(name):
                _check_folder(os.path.join(name, kwargs.get("subfolder") or ""), ctx)
            else:
                _check_cached_index(name, kwargs)
    except BaseException:
        ctx.close()
        raise
    if reason is not None:
        ctx.close()
        caching.fell_back(cache_dir, report)
        out = _fallback(load, source, model_args, kwargs, report, reason, strict, t0)
        report.rank, report.world_size = distributed.rank_and_world()
        _finished(report)
        return _inference(out, inference)

    want_info = kwargs.pop("output_loading_info", False)
    if prefer_pread:
        kwargs["disable_mmap"] = False  # we read with pread; stock would read whole files
    loaded = False
    t_build = time.perf_counter()
    try:
        with LOAD_LOCK, compat.hooks(ctx), _inside():
            model, info = load(source, *model_args, output_loading_info=True, **kwargs)
        ctx.check_mapped()  # a file truncated during the load: its zero-copy tensors would be a SIGBUS when touched
        loaded = not ctx.errors
    except Exception as e:
        if ctx.errors:
            raise ctx.errors[0] from e
        mismatch = shape_error(e, ctx, cls, source, kwargs)
        if mismatch is not None:
            raise mismatch from e
        raise
    finally:
        ctx.close()
        caching.finish(session, loaded, report, _logger())  # publishes what the load wrote, or drops it
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
    # a file read through our reader counts even when the model takes none of its tensors (all unexpected keys)
    if ctx.tensors == 0 and not ctx.files:
        why = "the checkpoint has no safetensors weights that hf_fastload could read (transformers loaded it)"
        if strict:
            raise FallbackRequiredError(f"{source}: {why}; strict mode forbids the fallback")
        report.path, report.reason = "fallback", why
        if report.cache:
            report.cache.update(status="bypassed", reason=why)
        _logger().warning(f"hf_fastload: {source}: fell back to stock from_pretrained: {why}")

    verify(model, info, ctx)
    report.quantization = _quantization(model)
    if getattr(model, "_hf_peft_config_loaded", False):  # transformers loaded a PEFT adapter on top of the base
        report.adapter = os.fspath(adapter_path or source)
    report.missing_keys = how_initialized(model, sorted(info.get("missing_keys") or []))
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


def _quantization(model) -> str | None:
    """How the model is quantized, from the quantizer transformers attached: method, bits, and whether the checkpoint
    was pre-quantized or quantized on load; None for a model without one."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return None
    qc = quantizer.quantization_config
    method = str(getattr(qc.quant_method, "value", qc.quant_method))
    if getattr(qc, "load_in_4bit", False) or getattr(qc, "load_in_8bit", False):
        method += " 4-bit" if qc.load_in_4bit else " 8-bit"
    return f"{method}, {'pre-quantized' if quantizer.pre_quantized else 'quantized on load'}"


def _fallback(load, source, model_args, kwargs, report, reason, strict, t0):
    if strict:
        raise FallbackRequiredError(f"{source}: the fast path cannot load this model: {reason}")
    _logger().warning(f"hf_fastload: {source}: falling back to stock from_pretrained: {reason}")
    report.path, report.reason, report.io, report.io_reason = "fallback", reason, "stock", reason
    with LOAD_LOCK, _inside():
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
    if env_true("HF_FASTLOAD_VERBOSE"):
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
