"""hf_fastload: load Hugging Face Transformers models fast, bit-identical to ``from_pretrained``.

Example:
    ```python
    import hf_fastload

    model = hf_fastload.fast_from_pretrained("path/to/model", dtype="float32")
    print(hf_fastload.last_report())

    hf_fastload.enable()   # or HF_FASTLOAD=1 / `hf-fastload run`: every from_pretrained and pipeline() loads fast
    ```

Importing this package is cheap: torch and transformers are imported on first use of a name that needs them.

The package is built in layers, each importing only from the layers below it (checked in CI by import-linter,
``.importlinter``): ``tools`` (the CLI, benchmarks) > ``features`` (``fast_pipeline``, the opt-in) >
``integration`` (transformers: ``fast_from_pretrained``, hooks, routing) > ``engine`` (bytes to tensors on a
device) > ``format`` (safetensors files and folders) and ``report``, over ``errors``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first use)
_EXPORTS = {
    "fast_from_pretrained": "integration.api",
    "fast_pipeline": "features.pipeline",
    "inference_mode": "integration.inference",
    "training_mode": "integration.inference",
    "last_report": "report",
    "LoadReport": "report",
    "skip_init": "integration.noinit",
    "disable_torch_init": "integration.noinit",
    "restore_torch_init": "integration.noinit",
    "FastLoadError": "errors",
    "CheckpointFileError": "errors",
    "CheckpointContentError": "errors",
    "FallbackRequiredError": "errors",
    "VerificationError": "errors",
    "CheckpointIndexError": "errors",
    "CheckpointNotFoundError": "errors",
    "DuplicateTensorError": "errors",
    "InvalidSafetensorsError": "errors",
    "ShapeMismatchError": "errors",
    "TruncatedSafetensorsError": "errors",
    "UnreadableTensorError": "errors",
    "enable": "features.optin",
    "disable": "features.optin",
    "enabled": "features.optin",
}

__all__ = [
    "CheckpointContentError",
    "CheckpointFileError",
    "CheckpointIndexError",
    "CheckpointNotFoundError",
    "DuplicateTensorError",
    "FallbackRequiredError",
    "FastLoadError",
    "InvalidSafetensorsError",
    "LoadReport",
    "ShapeMismatchError",
    "TruncatedSafetensorsError",
    "UnreadableTensorError",
    "VerificationError",
    "__version__",
    "disable",
    "disable_torch_init",
    "enable",
    "enabled",
    "fast_from_pretrained",
    "fast_pipeline",
    "inference_mode",
    "last_report",
    "restore_torch_init",
    "skip_init",
    "training_mode",
]

if TYPE_CHECKING:
    from .errors import (
        CheckpointContentError,
        CheckpointFileError,
        CheckpointIndexError,
        CheckpointNotFoundError,
        DuplicateTensorError,
        FallbackRequiredError,
        FastLoadError,
        InvalidSafetensorsError,
        ShapeMismatchError,
        TruncatedSafetensorsError,
        UnreadableTensorError,
        VerificationError,
    )
    from .features.optin import disable, enable, enabled
    from .features.pipeline import fast_pipeline
    from .integration.api import fast_from_pretrained
    from .integration.inference import inference_mode, training_mode
    from .integration.noinit import disable_torch_init, restore_torch_init, skip_init
    from .report import LoadReport, last_report


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_fastload' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
