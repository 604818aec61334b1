"""The layer's public function, importable without importing torch or transformers: ``fast_from_pretrained``.

Example:
    ```python
    import hf_fastload
    from transformers import AutoModelForCausalLM

    model = hf_fastload.fast_from_pretrained("path/to/llama", model_class=AutoModelForCausalLM, dtype="float32")
    print(hf_fastload.last_report())
    ```

``from hf_fastload import fast_from_pretrained`` costs nothing until the first call, which imports the loader
(:mod:`hf_fastload.integration.loader`) and with it transformers' modeling code, as the load needs it anyway.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["fast_from_pretrained"]


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
    from .loader import fast_load  # import cost: torch and transformers' modeling code, at the first load only

    return fast_load(pretrained_model_name_or_path, model_args, kwargs, model_class=model_class, strict=strict,
                     inference=inference)
