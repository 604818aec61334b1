"""hf_fastload: load Hugging Face Transformers models fast, bit-identical to ``from_pretrained``.

Example:
    ```python
    import hf_fastload

    model = hf_fastload.fast_from_pretrained("path/to/model", dtype="float32")
    print(hf_fastload.last_report())

    hf_fastload.enable()   # or HF_FASTLOAD=1 / `hf-fastload run`: every from_pretrained and pipeline() loads fast
    ```

Importing this package is cheap: torch and transformers are imported on first use of a name that needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "fast_from_pretrained": "loader",
    "fast_pipeline": "pipeline",
    "inference_mode": "inference",
    "training_mode": "inference",
    "last_report": "report",
    "LoadReport": "report",
    "skip_init": "noinit",
    "disable_torch_init": "noinit",
    "restore_torch_init": "noinit",
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
    "enable": "optin",
    "disable": "optin",
    "enabled": "optin",
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
        VerificationError,
    )
    from .inference import inference_mode, training_mode
    from .loader import fast_from_pretrained
    from .noinit import disable_torch_init, restore_torch_init, skip_init
    from .optin import disable, enable, enabled
    from .pipeline import fast_pipeline
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
