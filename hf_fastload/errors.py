"""Exceptions raised by hf_fastload.

Every error subclasses :class:`FastLoadError`, and also the built-in class that existing ``except`` clauses expect:
:class:`OSError` for file problems (missing, unreadable, truncated) and :class:`ValueError` for bad content (header,
dtype, offsets, shapes). Messages name the file, the tensor where relevant, what was expected and what was found.
"""

from __future__ import annotations

__all__ = [
    "CheckpointContentError",
    "CheckpointFileError",
    "FallbackRequiredError",
    "FastLoadError",
    "VerificationError",
]


class FastLoadError(Exception):
    """Base class of every error raised by hf_fastload."""


class CheckpointFileError(FastLoadError, OSError):
    """A checkpoint file is missing, unreadable or shorter than its header says."""

    def __init__(self, message: str):
        # OSError's multi-argument form would reinterpret the message as (errno, strerror); keep one argument.
        super().__init__(message)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CheckpointContentError(FastLoadError, ValueError):
    """A checkpoint's content is invalid: header, dtype, offsets, or a shape that does not fit the model."""


class FallbackRequiredError(FastLoadError, RuntimeError):
    """Strict mode (``strict=True`` or ``HF_FASTLOAD_STRICT=1``) is on and the fast path cannot load this model."""


class VerificationError(FastLoadError, RuntimeError):
    """The post-load check found a parameter or buffer that was neither loaded nor initialized."""
