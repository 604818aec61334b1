"""What is checked around a fast load: the model that comes back, and the errors transformers words vaguely.

Example:
    ```python
    from hf_fastload.integration.checks import verify

    model, info = Model.from_pretrained(path, output_loading_info=True)
    verify(model, info, ctx)   # VerificationError: a tensor left on the meta device, or a recorded load error
    ```
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import transformers
from transformers.utils import find_adapter_config_file, is_peft_available

from ..errors import ShapeMismatchError, VerificationError

__all__ = ["HUB_KWARGS", "adapter_base", "how_initialized", "load_config", "shape_error", "verify"]

# Keyword arguments of from_pretrained that locate files; the same ones go to AutoConfig when we need the config.
HUB_KWARGS = (
    "cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies",
    "trust_remote_code", "code_revision",
)  # fmt: skip


def load_config(source: str, kwargs: dict) -> Any:
    """The config a ``from_pretrained(source, **kwargs)`` call uses: ``kwargs["config"]`` when it is an object, else
    loaded with the same hub arguments (from the base model, when ``source`` is a PEFT adapter)."""
    config = kwargs.get("config")
    if config is None or isinstance(config, (str, os.PathLike)):
        hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
        config = transformers.AutoConfig.from_pretrained(config or adapter_base(source, kwargs) or source, **hub)
    return config


def adapter_base(source: str, kwargs: dict) -> str | None:
    """The base model a ``from_pretrained(source, **kwargs)`` call loads when ``source`` is a PEFT adapter, else None.

    transformers' rule: with peft installed, when ``find_adapter_config_file`` finds an ``adapter_config.json`` for
    ``source``, the model loaded is that config's ``base_model_name_or_path`` (a local path or a hub id), and the
    adapter is loaded on top of it; 5.x keeps ``source`` when it is a local folder with a ``config.json`` of its own
    (a model with an embedded adapter), and so does this hint on both lines. Used before the load to find the config
    (the class, the quantization) and the base folder to check; the load itself is stock's.
    """
    if not is_peft_available() or os.path.isfile(os.path.join(source, transformers.utils.CONFIG_NAME)):
        return None
    hub = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
    try:
        found = find_adapter_config_file(source, **hub)
        if found is None:
            return None
        with open(found, encoding="utf-8") as fh:
            base = json.load(fh).get("base_model_name_or_path")
    except Exception:  # stock makes the same lookup and raises or decides; this is only a hint
        return None
    return base if isinstance(base, str) and base else None


def shape_error(error: Exception, ctx: Any, cls: type, source: str, kwargs: dict) -> ShapeMismatchError | None:
    """Turns transformers' size-mismatch error (a RuntimeError) into ours, naming each tensor, its file, and both
    shapes; ours is a RuntimeError too, so ``except RuntimeError`` still catches it."""
    text = str(error)
    if not isinstance(error, RuntimeError) or ("size mismatch" not in text and "mismatched" not in text.lower()):
        return None
    expected: dict[str, tuple] = {}
    prefix = ""
    try:  # the model as built from the config, on the meta device: cheap, and it has the expected shapes
        config = load_config(source, kwargs)
        if config is not kwargs.get("config"):  # loaded here: keywords set its attributes, as from_pretrained does
            for key, value in kwargs.items():  # (num_labels=42 makes the head the model expects)
                if key not in HUB_KWARGS and key not in ("config", "dtype", "torch_dtype") and hasattr(config, key):
                    setattr(config, key, value)
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
    return ShapeMismatchError(
        f"checkpoint tensor shapes do not match the model built from the config: {where}. "
        "Fix the config or the checkpoint, or pass ignore_mismatched_sizes=True to re-initialize those weights. "
        f"transformers said: {text}"
    )


def how_initialized(model, missing: list[str]) -> dict[str, str]:
    """For each missing key: tied to a loaded tensor, or initialized by the model's _init_weights."""
    if not missing:
        return {}
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    # DTensors (tensor-parallel loads) have no storage of their own: compare their local shards
    tensors = {k: t.to_local() if hasattr(t, "to_local") else t for k, t in tensors.items()}
    by_ptr: dict[int, str] = {}
    missing_set = set(missing)
    for name, t in tensors.items():
        if name not in missing_set and not t.is_meta and t.numel():
            by_ptr.setdefault(t.data_ptr(), name)
    how = {}
    for key in missing:
        t = tensors.get(key)
        partner = by_ptr.get(t.data_ptr()) if t is not None and not t.is_meta and t.numel() else None
        how[key] = f"tied to {partner}" if partner else f"{type(model).__name__}._init_weights"
    return how


def verify(model, info: dict, ctx) -> None:
    """Raises VerificationError unless every parameter and buffer holds real data that was loaded or initialized."""
    # one pass over the modules' own dictionaries first (named_parameters builds every name: ms on a large model)
    if any(
        t is not None and t.is_meta
        for module in model.modules()
        for tensors in (module._parameters, module._buffers)
        for t in tensors.values()
    ):
        tensors = (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False))
        left = [name for name, t in tensors if t.is_meta]
        raise VerificationError(
            f"{type(model).__name__}: {len(left)} tensor(s) still on the meta device after loading, e.g. {left[:5]}; "
            "they were neither in the checkpoint nor initialized. The model was not returned."
        )
    errors = list(info.get("error_msgs") or []) + list((info.get("conversion_errors") or {}).values())
    if errors:
        raise VerificationError(f"{type(model).__name__}: transformers reported load errors: {errors[:3]}")
