"""``fast_pipeline``: ``transformers.pipeline`` whose model loads through hf_fastload and runs without autograd.

Example:
    ```python
    import hf_fastload

    generator = hf_fastload.fast_pipeline("text-generation", model="path/to/llama", dtype="bfloat16")
    print(generator("Once upon a time", max_new_tokens=20))
    print(hf_fastload.last_report())   # how the model was loaded
    ```

Importing this module imports transformers' pipelines (it copies ``transformers.pipeline``'s signature and
docstring); ``import hf_fastload`` alone does not.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any

import torch
import transformers
import transformers.pipelines

from ..integration import caching, routing
from ..integration.inference import inference_mode

__all__ = ["fast_pipeline"]


def _stock_pipeline(*args, **kwargs):
    """transformers' own ``pipeline``: the original where the opt-in's wrapper (marked ``__hf_fastload_original__``)
    replaced it, also beneath another library's ``functools.wraps`` wrapper on top of ours."""
    current = transformers.pipelines.pipeline
    found = current
    while found is not None and not hasattr(found, "__hf_fastload_original__"):
        found = getattr(found, "__wrapped__", None)
    original = found.__hf_fastload_original__ if found is not None else current
    return original(*args, **kwargs)


def _is_cpu(device: Any) -> bool:
    """Whether a pipeline ``device`` argument means the CPU (``None``, a negative ordinal, ``"cpu"``)."""
    if device is None:
        return True
    if isinstance(device, int):
        return device < 0
    try:
        return torch.device(device).type == "cpu"
    except (RuntimeError, TypeError, ValueError):
        return False  # not ours to judge: transformers will say what is wrong with it


def _direct_placement(arguments: dict[str, Any]) -> None:
    """Turns ``device=<accelerator>`` into ``device_map={"": device}`` for a model loaded by name.

    Stock builds the model on the CPU and then moves it with ``.to(device)``; with a device map, transformers loads
    each tensor straight onto the device, and the pipeline takes its device from the model's ``hf_device_map``.
    Nothing changes for CPU devices, for a ``device_map`` already given, or for an already-built model.
    Untested on a GPU here (the development machine has none); the CPU path is covered by the tests.
    """
    model, device = arguments.get("model"), arguments.get("device")
    model_kwargs = arguments.get("model_kwargs") or {}
    if not isinstance(model, (str, os.PathLike)) or _is_cpu(device):
        return
    if arguments.get("device_map") is not None or "device_map" in model_kwargs:
        return
    arguments["device_map"] = {"": device}
    arguments["device"] = None  # the pipeline refuses a device for a model that has an hf_device_map


def fast_pipeline(
    task: str | None = None, model: Any = None, *args: Any, inference: bool = True, fastload_cache: Any = None,
    **kwargs: Any,
):
    try:
        bound = _SIGNATURE.bind(task, model, *args, **kwargs)
    except TypeError:  # let transformers word the error about its own arguments
        return _stock_pipeline(task, model, *args, **kwargs)
    arguments = bound.arguments
    loads_model = model is None or isinstance(model, (str, os.PathLike))
    if loads_model:
        _direct_placement(arguments)
        extra = arguments.pop("kwargs", {})
        with routing.routed(), caching.using(fastload_cache):
            pipe = _stock_pipeline(**arguments, **extra)
    else:  # an already-built model is used as is
        pipe = _stock_pipeline(task, model, *args, **kwargs)
    if inference:
        # The pipeline's forward (preprocess and postprocess stay outside) runs under inference_mode; pipelines own
        # their outputs, and every task tested postprocesses inference tensors without updating them in place.
        pipe.get_inference_context = _inference_context
        if loads_model:  # a model the caller built is theirs: its requires_grad flags are left alone
            inference_mode(pipe.model)
    return pipe


def _inference_context():
    return torch.inference_mode


_SIGNATURE = inspect.signature(transformers.pipelines.pipeline)  # the wrapper of the opt-in keeps it too
_HEADER = """hf_fastload's `transformers.pipeline`: same arguments, defaults and return value, with these differences:

    - a model given by name or path loads through `hf_fastload.fast_from_pretrained` (the pipeline still picks the
      model class; tokenizers and processors load as stock); `hf_fastload.last_report()` tells how;
    - `device` set to an accelerator (with `model` a name or path and no `device_map`) loads the weights straight
      onto it, as `device_map={"": device}`, instead of loading on the CPU and moving the model;
    - `inference` (`bool`, *optional*, defaults to `True`): the pipeline's forward runs under
      `torch.inference_mode()` instead of `torch.no_grad()`, and a model it loaded is wrapped by
      `hf_fastload.inference_mode` (undo with `hf_fastload.training_mode(pipe.model)`). A model passed in already
      built is not wrapped. `inference=False` keeps stock behaviour;
    - `fastload_cache` (`str`, *optional*): the converted-tensor cache folder for the model's load, as
      `fast_from_pretrained(..., fastload_cache=...)` (default: `HF_FASTLOAD_CACHE`).

    Example:
        ```python
        classifier = hf_fastload.fast_pipeline("text-classification", model="./bert-sst2")
        classifier("hf_fastload loads it fast")
        ```

    transformers' documentation of `pipeline` follows.
"""
functools.update_wrapper(fast_pipeline, transformers.pipelines.pipeline, assigned=("__doc__",), updated=())
fast_pipeline.__doc__ = _HEADER + "\n" + (fast_pipeline.__doc__ or "")
_params = list(_SIGNATURE.parameters.values())
_inference_param = inspect.Parameter("inference", inspect.Parameter.KEYWORD_ONLY, default=True, annotation="bool")
_cache_param = inspect.Parameter("fastload_cache", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="str")
_at = len(_params) - 1 if _params and _params[-1].kind is inspect.Parameter.VAR_KEYWORD else len(_params)
fast_pipeline.__signature__ = _SIGNATURE.replace(
    parameters=[*_params[:_at], _inference_param, _cache_param, *_params[_at:]]
)
