"""When the fast path steps aside: the loads that stay on stock ``from_pretrained``, each with its reason.

Example:
    ```python
    from hf_fastload.integration.fallback import fallback_reason

    fallback_reason("./llama", {"gguf_file": "model.gguf"}, None)   # "GGUF checkpoints are dequantized by ..."
    fallback_reason("./llama", {"dtype": "float32"}, None)          # None: the fast path takes it
    ```

The reason goes into the :class:`~hf_fastload.report.LoadReport` and one log line; ``strict=True`` (or
``HF_FASTLOAD_STRICT=1``) turns it into a :class:`~hf_fastload.errors.FallbackRequiredError`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.modeling_utils import is_fsdp_enabled

from . import compat, distributed
from .checks import HUB_KWARGS, adapter_base

__all__ = ["FAST_ON_LOAD", "FAST_PRE_QUANTIZED", "env_true", "fallback_reason", "quantization_reason"]

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # device maps transformers computes


def env_true(name: str) -> bool:
    """Whether the environment variable ``name`` is set to a true value (``1``, ``true``, ``yes``, ``on``, ...)."""
    return os.environ.get(name, "").strip().lower() in _TRUE


def fallback_reason(source: str, kwargs: dict[str, Any], config: Any) -> str | None:
    """Why the fast path cannot take this load, or None. Checked before loading anything.

    Args:
        source (`str`): the name or path given to ``from_pretrained``.
        kwargs (`dict`): its keyword arguments.
        config (`PretrainedConfig`, *optional*): the config, when it was loaded to resolve the class.
    """
    if kwargs.get("state_dict") is not None:
        return "a state_dict was passed: there are no files to read"
    if kwargs.get("gguf_file"):
        return "GGUF checkpoints are dequantized by transformers"
    for flag in ("from_tf", "from_flax"):
        if kwargs.get(flag) and not compat.TRANSFORMERS_V5:  # 5.x drops both arguments unread
            return f"{flag}=True: TensorFlow/Flax weights are converted by transformers"
    if kwargs.get("use_safetensors") is False:
        return "use_safetensors=False: pickle checkpoints are read by torch.load"
    quantized = quantization_reason(source, kwargs, config)
    if quantized is not None:
        return quantized
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
    if is_deepspeed_zero3_enabled():
        return "DeepSpeed ZeRO-3 partitions weights itself"
    if not compat.TRANSFORMERS_V5:
        if is_fsdp_enabled():
            return "FSDP: only local rank 0 reads weights"
        if env_true("HF_ENABLE_PARALLEL_LOADING"):
            return "HF_ENABLE_PARALLEL_LOADING: transformers 4.57 loads shards from its own threads"
    return None


# --- quantized models -------------------------------------------------------------------------------------------
# transformers' quantizer runs after the step we own (5.x: a conversion op fed by ``_materialize_copy``; 4.57:
# ``create_quantized_param``, fed by the slice our handle returns), so the checkpoint's bytes go through our reader
# and the quantizer gets the tensors stock would hand it. Fast only for the methods whose loads were checked bit for
# bit against stock, tensors and quantization state (tests/test_quantized.py), on the lines where they were; the
# others keep falling back, each with its reason (README, "What falls back").

# quant_method -> the transformers lines on which it is fast: quantized on load (a quantization_config in the call,
# none in the config), and pre-quantized (the config has one; transformers merges the call's into it)
FAST_ON_LOAD = {"bitsandbytes": ("4.57", "5"), "torchao": ("4.57", "5")}
FAST_PRE_QUANTIZED = {"bitsandbytes": ("4.57", "5"), "torchao": ("5",), "fp8": ("5",)}
# why a method stays on stock, where we know more than "not checked"
_NOT_FAST = {
    ("fp8", "on load"): "FP8 quantization on load needs a GPU (transformers refuses it on the CPU); not checked",
    ("fp8", "4.57"): "transformers 4.57 loads FP8 checkpoints only on a GPU; not checked",
    ("torchao", "4.57"): "transformers 4.57 cannot reload the torchao checkpoints it saves (safetensors); not checked",
    ("compressed-tensors", ""): "its checkpoints are made by llm-compressor, which the test environment lacks; not "
    "checked bit for bit in the test suite",
}


def _quant_method(qc: Any) -> str:
    """The ``quant_method`` of a quantization config (an object or its dict), as transformers reads it."""
    get = qc.get if isinstance(qc, dict) else lambda k, d=None: getattr(qc, k, d)
    method = get("quant_method", None)
    if method is None and (get("load_in_4bit", False) or get("load_in_8bit", False)):
        method = "bitsandbytes"  # configs saved before quant_method existed
    method = getattr(method, "value", method)  # QuantizationMethod is a str enum
    return str(method or "unknown")


def _config_quantization(source: str, kwargs: dict[str, Any], config: Any) -> Any:
    """The ``quantization_config`` of the model's config, or None: of the config object at hand (resolved here, or
    passed by the caller, as the Auto classes pass theirs to the concrete class), else of ``config.json`` (of the
    base model, when ``source`` is a PEFT adapter)."""
    for candidate in (config, kwargs.get("config")):
        if candidate is not None and not isinstance(candidate, (str, os.PathLike)):
            return getattr(candidate, "quantization_config", None)
    from transformers import PretrainedConfig

    hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs and k not in ("trust_remote_code", "code_revision")}
    where = kwargs.get("config") or adapter_base(source, kwargs) or source
    local = os.path.join(os.fspath(where), kwargs.get("subfolder") or "", "config.json")
    if os.path.isfile(local):  # a local folder: its config.json, read directly (get_config_dict costs ms)
        try:
            with open(local, encoding="utf-8") as fh:
                saved = json.load(fh)
        except (OSError, ValueError):  # unreadable: stock from_pretrained raises its own error about it
            return None
        return saved.get("quantization_config") if isinstance(saved, dict) else None
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(where, **hub)
    except Exception:  # no readable config: stock from_pretrained raises its own error about it
        return None
    return config_dict.get("quantization_config")


def quantization_reason(source: str, kwargs: dict[str, Any], config: Any) -> str | None:
    """Why a quantized load stays on stock, or None: not quantized, or quantized with a method that is fast on this
    transformers line (:data:`FAST_PRE_QUANTIZED` when the config has a ``quantization_config``, whose method
    transformers then uses; else :data:`FAST_ON_LOAD` for the call's)."""
    saved = _config_quantization(source, kwargs, config)
    qc = saved if saved is not None else kwargs.get("quantization_config")
    if qc is None:
        return None
    method, line = _quant_method(qc), "5" if compat.TRANSFORMERS_V5 else "4.57"
    when, table = ("pre-quantized", FAST_PRE_QUANTIZED) if saved is not None else ("on load", FAST_ON_LOAD)
    if line in table.get(method, ()):
        return None
    why = _NOT_FAST.get((method, when if when == "on load" else line)) or _NOT_FAST.get((method, ""))
    return f"quantized model (quant_method={method!r}, {when}): {why or 'not checked bit for bit against stock'}"
