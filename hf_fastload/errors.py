"""Exceptions raised by hf_fastload.

Example:
    ```python
    import hf_fastload
    from safetensors import SafetensorError

    try:
        model = hf_fastload.fast_from_pretrained("./broken-llama")
    except SafetensorError as e:  # what stock from_pretrained raises for a broken file; ours is one too
        print(type(e).__name__, e)  # InvalidSafetensorsError invalid safetensors file ./broken-llama/...: ...
    ```

Every error subclasses :class:`FastLoadError`; one about a checkpoint also subclasses :class:`CheckpointFileError` (an
``OSError``: missing, unreadable, truncated files) or :class:`CheckpointContentError` (a ``ValueError``: bad
content), and it is an instance of the class that stock ``from_pretrained`` raises for the same input, on every
supported transformers line, so that existing ``except`` clauses keep catching it:

- :class:`InvalidSafetensorsError` (a file safetensors refuses: header, dtype, shape, offsets) and
  :class:`TruncatedSafetensorsError` (a file shorter than its header says): ``safetensors.SafetensorError``;
- :class:`DuplicateTensorError` (a tensor listed twice with different entries): ``SafetensorError`` and
  ``RuntimeError``, the two ways stock fails on the entry it keeps;
- :class:`UnreadableTensorError` (a tensor torch cannot hold, refused when read): ``SafetensorError`` and
  ``RuntimeError``;
- :class:`CheckpointNotFoundError` (a file missing or that cannot be opened): ``FileNotFoundError``;
- :class:`ShapeMismatchError` (checkpoint shapes that disagree with the config): ``RuntimeError``;
- :class:`CheckpointIndexError` (an unusable index): the class its parse raised (``json.JSONDecodeError``,
  ``KeyError``, ...), see :meth:`FastLoadError.matching`.

Messages name the file, the tensor where relevant, what was expected and what was found.
"""

from __future__ import annotations

import functools

from safetensors import SafetensorError  # a compiled module without dependencies: importing it costs about 1 ms

__all__ = [
    "CheckpointContentError",
    "CheckpointFileError",
    "CheckpointIndexError",
    "CheckpointNotFoundError",
    "DuplicateTensorError",
    "FallbackRequiredError",
    "FastLoadError",
    "InvalidSafetensorsError",
    "ShapeMismatchError",
    "TruncatedSafetensorsError",
    "UnreadableTensorError",
    "VerificationError",
]


class FastLoadError(Exception):
    """Base class of every error raised by hf_fastload."""

    @classmethod
    def matching(cls, message: str, stock: BaseException) -> FastLoadError:
        """This error with ``message``, made also an instance of ``type(stock)``: for inputs on which stock raises
        whatever one operation raises (parsing an index: ``json.JSONDecodeError``, ``KeyError``, ...) and our check
        runs the same operation. Attributes of ``stock`` that callers read (``lineno``, ``errno``, ...) are copied."""
        error = _with_stock_class(cls, type(stock))(message)
        for name in _STOCK_ATTRIBUTES:
            if hasattr(stock, name):
                try:
                    setattr(error, name, getattr(stock, name))
                except (AttributeError, TypeError):
                    pass
        return error


_STOCK_ATTRIBUTES = ("msg", "doc", "pos", "lineno", "colno", "encoding", "object", "start", "end", "reason", "errno",
                     "strerror", "filename")  # fmt: skip


@functools.cache
def _with_stock_class(cls: type[FastLoadError], stock: type[BaseException]) -> type[FastLoadError]:
    """``cls`` if it is a ``stock`` already, else a subclass of both, named like ``cls`` (made once per pair)."""
    if issubclass(cls, stock):
        return cls

    def __init__(self, message: str):
        # the stock class may take other arguments (JSONDecodeError: msg, doc, pos; OSError: errno, strerror)
        Exception.__init__(self, message)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""  # KeyError would show the message's repr

    def __reduce__(self):  # pickled by (class, stock class, message): the made class cannot be found by name
        return _rebuild, (cls, stock, str(self))

    namespace = {"__init__": __init__, "__str__": __str__, "__reduce__": __reduce__, "__module__": cls.__module__,
                 "__qualname__": cls.__qualname__, "__doc__": cls.__doc__}  # fmt: skip
    return type(cls.__name__, (cls, stock), namespace)


def _rebuild(cls: type[FastLoadError], stock: type[BaseException], message: str) -> FastLoadError:
    return _with_stock_class(cls, stock)(message)


class CheckpointFileError(FastLoadError, OSError):
    """A checkpoint file is missing, unreadable or shorter than its header says."""

    def __init__(self, message: str):
        # OSError's multi-argument form would reinterpret the message as (errno, strerror); keep one argument.
        super().__init__(message)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CheckpointContentError(FastLoadError, ValueError):
    """A checkpoint's content is invalid: header, dtype, offsets, or a shape that does not fit the model."""


class InvalidSafetensorsError(CheckpointContentError, SafetensorError):
    """A safetensors file that the safetensors library refuses too (its header, a dtype, a shape, offsets), or a
    tensor name the file does not hold. A ``safetensors.SafetensorError``, as stock raises."""


class TruncatedSafetensorsError(CheckpointFileError, SafetensorError):
    """A safetensors file shorter than its header says (or than the 8 bytes of the header length). A
    ``safetensors.SafetensorError``, as stock raises, and an ``OSError``."""


class DuplicateTensorError(InvalidSafetensorsError, RuntimeError):
    """A tensor listed twice in a header with different entries. safetensors keeps the last one, so stock either
    loads it or fails on it: a ``SafetensorError`` if that entry is invalid, a ``RuntimeError`` if it does not fit
    the model (another shape; an integer dtype for a float parameter on 4.57). This error is both."""


class UnreadableTensorError(InvalidSafetensorsError, RuntimeError):
    """A valid header entry that torch cannot hold (an ``F6`` dtype, an ``F4`` tensor with an odd last dimension),
    refused when the tensor is read, as safetensors does: a ``SafetensorError`` (what ``safe_open`` raises) and a
    ``RuntimeError`` (what torch raises where transformers 5 reads it through a slice)."""


class CheckpointNotFoundError(CheckpointFileError, FileNotFoundError):
    """A checkpoint file (a shard the index names, a file to open) is missing or cannot be opened. A
    ``FileNotFoundError`` whatever the reason, as safetensors raises for every file it cannot open."""


class ShapeMismatchError(CheckpointContentError, RuntimeError):
    """Checkpoint tensor shapes disagree with the model built from the config. A ``RuntimeError``, as stock
    raises (pass ``ignore_mismatched_sizes=True`` to re-initialize those weights)."""


class CheckpointIndexError(CheckpointContentError):
    """A ``model.safetensors.index.json`` that cannot be used: not UTF-8 JSON, no ``weight_map`` object, a shard name
    that is not a string.

    Stock raises whatever its own parsing of the index hits (``json.JSONDecodeError``, ``UnicodeDecodeError``,
    ``KeyError``, ``TypeError``, ``AttributeError``); our check parses the index the same way and raises
    ``CheckpointIndexError.matching(message, what_the_parse_raised)``, an instance of that class too.
    """


class FallbackRequiredError(FastLoadError, RuntimeError):
    """Strict mode (``strict=True`` or ``HF_FASTLOAD_STRICT=1``) is on and the fast path cannot load this model."""


class VerificationError(FastLoadError, RuntimeError):
    """The post-load check found a parameter or buffer that was neither loaded nor initialized."""
