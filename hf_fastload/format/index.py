"""A checkpoint folder: ``model.safetensors``, or shards listed by ``model.safetensors.index.json``, checked together.

Example:
    ```python
    from hf_fastload.format.index import check_folder

    strays = check_folder("./llama-8b")   # raises CheckpointFileError / CheckpointContentError naming the culprit
    for path in strays:
        print(f"{path} looks like a shard but the index does not name it")
    ```

transformers would fail on most of what is checked here too, later and with a message that does not name the
problem (or, for a tensor the index places in a shard that lacks it, not at all: 5.x initializes it randomly).
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable
from typing import Any

from ..errors import (
    CheckpointContentError,
    CheckpointFileError,
    CheckpointIndexError,
    CheckpointNotFoundError,
)
from .file import SafetensorsFile

__all__ = [
    "INDEX_NAME", "WEIGHTS_NAME", "broken_entry", "check_folder", "leaves_folder", "read_weight_map",
    "refuse_shards_outside", "weight_files",
]  # fmt: skip

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r"-\d+-of-\d+\.safetensors$")


def broken_entry(path: str) -> str | None:
    """Why ``path``, which exists as a directory entry, cannot be read as a file; None when it is a regular file or
    absent. transformers treats such an entry as absent and says there is no weights file, which misleads."""
    if not os.path.lexists(path):
        return None
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"is a symbolic link to a missing file ({os.readlink(path)!r})"
    except OSError as e:  # ELOOP: a symbolic link loop; EACCES: a directory on the way is not searchable
        return f"cannot be opened: {e.strerror or e}"
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    return None if stat.S_ISREG(mode) else "is not a regular file"


def leaves_folder(shard: str) -> str | None:
    """Why the shard name ``shard`` from an index points outside the checkpoint folder, or None. Only the name is
    judged: a file inside the folder may be a symbolic link to anywhere (the HF cache links into ``../../blobs``)."""
    if os.path.isabs(shard) or shard.startswith(("/", "\\")):
        return "is an absolute path"
    if ".." in re.split(r"[/\\]", shard):
        return "has a '..' component"
    return None


def refuse_shards_outside(index_path: str, weight_map: dict[str, Any]) -> None:
    """Raises CheckpointContentError, naming the index, the shard and why, for a shard name that leaves the index's
    folder: absolute, or with a ``..`` component (stricter than transformers, on purpose: an index could otherwise
    load another model's files, e.g. from elsewhere in the HF cache)."""
    by_shard: dict[Any, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    for shard, names in by_shard.items():
        escape = leaves_folder(shard) if isinstance(shard, str) else None
        if escape is not None:
            raise CheckpointContentError(
                f"{index_path} names shard {shard!r} (holding e.g. {sorted(names)[:3]}), which {escape}: it would be "
                f"read from outside {os.path.dirname(index_path)}. hf_fastload only reads shards inside the "
                "checkpoint folder (an index could otherwise load another model's files, e.g. from elsewhere in the "
                "HF cache); stock transformers would read it. Name the shard by its file name inside the folder."
            )


def read_weight_map(index_path: str) -> dict[str, Any]:
    """The ``weight_map`` (tensor name -> shard file) of a safetensors index.

    Raises:
        `CheckpointFileError`: the index cannot be read (of the ``OSError`` class reading it raised).
        `CheckpointIndexError`: it is not UTF-8 JSON, an object with a ``weight_map`` object whose values can be
            collected (as stock parses it, and of the class that parse raises: ``json.JSONDecodeError``,
            ``KeyError``, ``AttributeError``, ...).
    """
    try:
        with open(index_path, encoding="utf-8") as fh:
            index = json.load(fh)
        weight_map = index["weight_map"]
        set(weight_map.values())  # what stock does with it: not an object, or a shard named by a list, raises here
    except OSError as e:
        raise CheckpointFileError.matching(f"cannot read safetensors index {index_path}: {e}", e) from e
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # UnicodeDecodeError and JSONDecodeError too
        # stock parses the index the same way and raises what the parse raised: so does this error
        raise CheckpointIndexError.matching(
            f"invalid safetensors index {index_path}: expected UTF-8 JSON, an object with a 'weight_map' of tensor "
            f"name to shard file; found an error: {e!r}",
            e,
        ) from None
    return weight_map


def check_folder(folder: str, open_file: Callable[[str], Any] | None = None) -> list[str]:
    """Checks a local checkpoint folder's safetensors files; returns the stray shard files (see below).

    - ``model.safetensors`` or the index that exists as a broken entry (a symlink loop, a dangling link, a directory);
    - the index parses, and every shard it names is inside the folder (no absolute path, no ``..`` component; a shard
      may be a symbolic link to elsewhere, as in the HF cache), exists and is readable;
    - every tensor the index places in a shard is in that shard's header (else transformers 5 would initialize it
      randomly as "missing", and 4.57 would return it on the meta device);
    - a file named like a shard (``*-00003-of-00004.safetensors``) that the index does not name is not loaded: its
      path is returned, for the caller to warn about (a leftover of an earlier save with another shard count, or a
      shard missing from the index).

    Args:
        folder (`str`): the checkpoint folder.
        open_file (`Callable[[str], SafetensorsFile]`, *optional*): opens a shard; a load passes its own opener, so
            that the headers read here are the ones the load uses (each file is opened and parsed once). By default
            each shard is opened, validated and closed.

    Raises:
        `CheckpointFileError`, `CheckpointContentError`: naming the file (and tensor) at fault; where stock fails on
            the same folder, an instance of the class it raises (see :mod:`hf_fastload.errors`).
    """
    index_path = os.path.join(folder, INDEX_NAME)
    for path in (os.path.join(folder, WEIGHTS_NAME), index_path):
        broken = broken_entry(path)
        if broken is not None:
            raise CheckpointFileError(f"checkpoint file {path} {broken}")
    if not os.path.isfile(index_path):
        return []
    weight_map = read_weight_map(index_path)
    refuse_shards_outside(index_path, weight_map)
    by_shard: dict[Any, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    for shard in sorted(by_shard, key=str):
        names = sorted(by_shard[shard])
        path = os.path.join(folder, str(shard))
        if not isinstance(shard, str):  # stock fails joining it to the folder's path: a TypeError
            message = f"invalid safetensors index {index_path}: shard {shard!r} (for e.g. {names[:3]}) is not a string"
            raise CheckpointIndexError.matching(message, TypeError(message))
        if not os.path.isfile(path):  # safetensors raises FileNotFoundError for every file it cannot open
            why = broken_entry(path) or "does not exist"
            raise CheckpointNotFoundError(
                f"{index_path} names shard {shard!r} (holding e.g. {names[:3]}) but {path} {why}"
            )
        if open_file is None:
            with SafetensorsFile(path) as handle:  # reads and validates the header
                absent = [name for name in names if name not in handle.tensors]
        else:
            handle = open_file(path)
            absent = [name for name in names if name not in handle.tensors]
        if absent:
            raise CheckpointContentError(
                f"{index_path} places tensor {absent[0]!r} in {path}, but that file has no such tensor"
                f"{f' ({len(absent)} such tensors, e.g. {absent[:3]})' if len(absent) > 1 else ''}; "
                "the index does not belong to these shards (was a shard replaced or the index edited?)"
            )
    try:
        names = sorted(n for n in os.listdir(folder) if _SHARD_NAME.search(n) and n not in by_shard)
    except OSError:
        names = []
    return [os.path.join(folder, n) for n in names]


def weight_files(folder: str) -> list[str]:
    """The safetensors files a load of ``folder`` will read: the shards its index names, else ``model.safetensors``;
    ``[]`` when there are none. A best-effort list (for prefetching): never raises, checks nothing."""
    index_path = os.path.join(folder, INDEX_NAME)
    try:
        if os.path.isfile(index_path):
            shards = read_weight_map(index_path).values()
            inside = {s for s in shards if isinstance(s, str) and leaves_folder(s) is None}
            return [os.path.join(folder, s) for s in sorted(inside)]
    except (CheckpointFileError, CheckpointContentError):
        return []
    single = os.path.join(folder, WEIGHTS_NAME)
    return [single] if os.path.isfile(single) else []
