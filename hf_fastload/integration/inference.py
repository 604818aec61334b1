"""Inference without autograd: :func:`inference_mode` wraps a model for serving, :func:`training_mode` undoes it.

Example:
    ```python
    import torch
    import hf_fastload

    model = hf_fastload.fast_from_pretrained("path/to/llama", dtype="bfloat16", inference=True)
    logits = model(input_ids).logits            # no autograd graph is recorded
    tokens = model.generate(input_ids, max_new_tokens=20)

    hf_fastload.training_mode(model)            # back to the model from_pretrained returned
    model(input_ids, labels=input_ids).loss.backward()
    ```

What the wrapping does, and why each part is what it is:

- ``model.generate`` runs under ``torch.inference_mode()``. Its decoding loop, caches and logits stay inside the
  context; what comes out is token ids, which callers read rather than update.
- ``model.forward`` (so ``model(...)``) runs under ``torch.no_grad()``, not ``inference_mode``. Tensors made under
  ``inference_mode`` are "inference tensors": updating one in place outside the context (``logits[:, -1] /= t``,
  ``logits[:, banned] = -inf``, the habits of hand-written decoding loops) raises ``RuntimeError: Inplace update to
  inference tensor outside InferenceMode``, and using one in an autograd graph (features fed to a trainable head)
  raises ``Inference tensors cannot be saved for backward``. ``tests/test_pipeline.py`` shows both. ``no_grad``
  records no graph either, so the memory saved is the same; the time inference_mode saves on version counters is a
  few percent on tiny models and nothing measurable on large ones. Pipelines, which own their outputs, run their
  forward under ``inference_mode`` (see :func:`hf_fastload.fast_pipeline`).
- every parameter gets ``requires_grad=False``; the previous flags are kept on the model and restored by
  :func:`training_mode`.

Neither function changes ``model.training`` (dropout and similar): ``from_pretrained`` returns models in eval mode,
and ``model.train()`` / ``model.eval()`` stay the way to switch.
"""

from __future__ import annotations

import functools
import types
from typing import Any, TypeVar

__all__ = ["inference_mode", "is_inference_mode", "training_mode"]

M = TypeVar("M")

_STATE = "_hf_fastload_inference"  # the saved state, kept on the model while it is wrapped
_MISSING = object()


def _no_grad():
    import torch  # import cost: `from hf_fastload import inference_mode` does not import torch

    return torch.no_grad()


def _inference():
    import torch  # import cost, as in _no_grad

    return torch.inference_mode()


# method name -> the context it runs under. See the module docstring for why forward gets no_grad.
_CONTEXTS = {"forward": _no_grad, "generate": _inference}


def _wrap(model: Any, name: str, context) -> tuple[object, object]:
    """Puts a wrapped ``name`` on the instance; returns (the instance attribute it replaced or _MISSING, wrapper)."""
    saved = model.__dict__.get(name, _MISSING)
    if saved is _MISSING:
        func = getattr(type(model), name)

        @functools.wraps(func)
        def method(self, *args, **kwargs):
            with context():
                return func(self, *args, **kwargs)

        # A method bound to the model (not a closure over it): copy.deepcopy rebinds it to the copy.
        wrapper = types.MethodType(method, model)
    else:  # already an instance attribute, e.g. accelerate's hooked forward: wrap that one

        @functools.wraps(saved)
        def wrapper(*args, **kwargs):
            with context():
                return saved(*args, **kwargs)

    object.__setattr__(model, name, wrapper)
    return saved, wrapper


def is_inference_mode(model: Any) -> bool:
    """Whether ``model`` is wrapped by :func:`inference_mode`."""
    return _STATE in getattr(model, "__dict__", {})


def inference_mode(model: M) -> M:
    """Wraps ``model`` for inference: no autograd graph, no gradients. Reversible with :func:`training_mode`.

    ``model.generate`` (where the model has one) runs under ``torch.inference_mode()``, ``model.forward`` under
    ``torch.no_grad()`` (its outputs stay ordinary tensors that callers may update in place), and every parameter
    gets ``requires_grad=False``. The wrappers are instance attributes made with ``functools.wraps``, so
    signatures, names and docstrings are the originals'; nothing changes for other instances of the class. Calling
    it on a wrapped model does nothing.

    Args:
        model (`torch.nn.Module`): a model, typically a transformers `PreTrainedModel`.

    Returns:
        The same model object, wrapped.

    Example:
        ```python
        model = hf_fastload.inference_mode(AutoModelForCausalLM.from_pretrained("path"))
        out = model.generate(input_ids, max_new_tokens=8)
        ```
    """
    if is_inference_mode(model):
        return model
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    methods = {}
    for name, context in _CONTEXTS.items():
        if callable(getattr(model, name, None)):
            methods[name] = _wrap(model, name, context)
    for p in model.parameters():
        p.requires_grad_(False)
    cache = model.__dict__.get("_cache", _MISSING)
    object.__setattr__(model, _STATE, {"requires_grad": flags, "methods": methods, "cache": cache})
    return model


def training_mode(model: M) -> M:
    """Undoes :func:`inference_mode`: the original ``forward``/``generate`` and ``requires_grad`` flags come back.

    Afterwards autograd works as before the wrapping (``loss.backward()`` fills ``.grad``). A generation cache that
    transformers 4.57 keeps on the model between ``generate`` calls (``model._cache``, for static caches) is
    dropped if a wrapped ``generate`` made it: it holds inference tensors, and the unwrapped ``generate`` would reset
    it in place outside ``inference_mode``, which raises. Calling it on a model that is not wrapped does nothing.
    ``model.training`` is not changed: call ``model.train()`` for dropout.

    Args:
        model (`torch.nn.Module`): a model wrapped by :func:`inference_mode`.

    Returns:
        The same model object, unwrapped.

    Example:
        ```python
        model = hf_fastload.training_mode(model).train()
        model(input_ids, labels=input_ids).loss.backward()
        ```
    """
    if not is_inference_mode(model):
        return model
    state = model.__dict__[_STATE]
    for name, (saved, wrapper) in state["methods"].items():
        if model.__dict__.get(name) is not wrapper:
            continue  # replaced by someone else since: theirs stays
        if saved is _MISSING:
            object.__delattr__(model, name)
        else:
            object.__setattr__(model, name, saved)
    flags = state["requires_grad"]
    for name, p in model.named_parameters():
        if name in flags:
            p.requires_grad_(flags[name])
    cache = model.__dict__.get("_cache", _MISSING)
    if cache is not _MISSING and cache is not state["cache"]:  # made by a wrapped generate
        object.__delattr__(model, "_cache")
    object.__delattr__(model, _STATE)
    return model
