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

import os
from typing import Any

from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.modeling_utils import is_fsdp_enabled

from ..format.index import INDEX_NAME, WEIGHTS_NAME
from . import compat, distributed

__all__ = ["env_true", "fallback_reason"]

_TRUE = {"1", "true", "yes", "on", "y", "t"}


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
        if kwargs.get(flag):
            return f"{flag}=True: TensorFlow/Flax weights are converted by transformers"
    if kwargs.get("use_safetensors") is False:
        return "use_safetensors=False: pickle checkpoints are read by torch.load"
    if kwargs.get("quantization_config") is not None or getattr(config, "quantization_config", None) is not None:
        return "quantized model (quantization_config): weights are handled by the quantizer"
    if kwargs.get("adapter_kwargs") or kwargs.get("adapter_name") or kwargs.get("_adapter_model_path"):
        return "adapter (PEFT) loading"
    tp_reason = distributed.tp_fallback_reason(kwargs)
    if tp_reason is not None:
        return tp_reason
    device_map = kwargs.get("device_map")
    if isinstance(device_map, dict) and "disk" in device_map.values():
        return "device_map offloads to disk"
    if kwargs.get("offload_folder") or kwargs.get("offload_state_dict"):
        return "disk offloading"
    if is_deepspeed_zero3_enabled():
        return "DeepSpeed ZeRO-3 partitions weights itself"
    if not compat.TRANSFORMERS_V5:
        if is_fsdp_enabled():
            return "FSDP: only local rank 0 reads weights"
        if env_true("HF_ENABLE_PARALLEL_LOADING"):
            return "HF_ENABLE_PARALLEL_LOADING: transformers 4.57 loads shards from its own threads"
    if os.path.isdir(source):
        folder = os.path.join(source, kwargs.get("subfolder") or "")
        if os.path.isfile(os.path.join(folder, "adapter_config.json")) and not any(
            os.path.isfile(os.path.join(folder, n)) for n in (WEIGHTS_NAME, INDEX_NAME)
        ):
            return "adapter (PEFT) checkpoint"
    return None
