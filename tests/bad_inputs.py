"""The bad-input catalogue: each case is a function that damages a fresh tiny llama checkpoint in place.

Example:
    ```python
    from bad_inputs import CASES, fresh

    case = CASES["unknown_dtype"]
    folder = case.damage(fresh(tmp_path, case))  # then load it with stock and with hf_fastload
    ```

``tests/test_bad_input.py`` checks our messages case by case; ``tests/test_stock_exceptions.py`` runs stock
``from_pretrained`` and ``fast_from_pretrained`` on every case and compares the exception classes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from models import build_checkpoint

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def weights(folder: str) -> str:
    return os.path.join(folder, WEIGHTS)


def read(path: str) -> tuple[dict, bytes]:
    """(header, data region) of a safetensors file."""
    with open(path, "rb") as fh:
        raw = fh.read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write(path: str, header, data: bytes, pad: bool = True) -> None:
    blob = json.dumps(header).encode()
    if pad:
        blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob + data)


def write_raw_header(path: str, blob: bytes) -> None:
    """Replaces the header of ``path`` by the bytes ``blob`` (padded to 8 with spaces), keeping the data region."""
    _, data = read(path)
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob + data)


def edit_header(path: str, edit: Callable[[dict], None]) -> None:
    header, data = read(path)
    edit(header)
    write(path, header, data)


def write_with_extra_entry(path: str, name: str, entry: dict) -> dict:
    """Rewrites ``path`` with a second header entry for ``name`` (the JSON text lists the key twice)."""
    header, data = read(path)
    blob = (json.dumps(header)[:-1] + ", " + json.dumps({name: entry})[1:-1] + "}").encode()
    assert blob.count(json.dumps(name).encode()) == 2
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob + data)
    return header


def weight_map(folder: str) -> dict[str, str]:
    with open(os.path.join(folder, INDEX)) as fh:
        return json.load(fh)["weight_map"]


def shard_of(folder: str, tensor: str) -> str:
    return os.path.join(folder, weight_map(folder)[tensor])


def _edit_tensor(folder: str, **changes) -> str:
    path = weights(folder)
    edit_header(path, lambda h: h["model.norm.weight"].update(changes))
    return path


# --- the damages: each takes a fresh checkpoint folder and returns the path at fault ------------------------------


def truncated_in_data(folder):
    path = weights(folder)
    os.truncate(path, os.path.getsize(path) - 100)
    return path


def truncated_inside_header(folder):
    path = weights(folder)
    os.truncate(path, 20)
    return path


def header_length_past_end(folder):
    path = weights(folder)
    with open(path, "r+b") as fh:
        fh.write(struct.pack("<Q", 10**12))
    return path


def empty_file(folder):
    path = weights(folder)
    open(path, "wb").close()
    return path


def garbage_header(folder):
    path = weights(folder)
    write_raw_header(path, b"{not json")
    return path


def non_utf8_header(folder):
    path = weights(folder)
    write_raw_header(path, b'{"\xff\xfe": 1}')
    return path


def header_is_not_an_object(folder):
    path = weights(folder)
    write(path, [1, 2, 3], read(path)[1])
    return path


def metadata_not_strings(folder):
    path = weights(folder)
    edit_header(path, lambda h: h.update(__metadata__={"format": {"nested": 1}}))
    return path


def metadata_value_is_a_number(folder):
    path = weights(folder)
    edit_header(path, lambda h: h.update(__metadata__={"format": 1}))
    return path


def metadata_is_a_list(folder):
    path = weights(folder)
    edit_header(path, lambda h: h.update(__metadata__=["pt"]))
    return path


def metadata_is_a_string(folder):
    path = weights(folder)
    edit_header(path, lambda h: h.update(__metadata__="pt"))
    return path


def without(header: dict, data: bytes, name: str) -> tuple[dict, bytes]:
    """``header`` and ``data`` with tensor ``name`` and its bytes taken out, the other offsets moved: a valid file."""
    begin, end = header.pop(name)["data_offsets"]
    for entry in (v for k, v in header.items() if k != "__metadata__"):
        entry["data_offsets"] = [o - (end - begin) if o >= end else o for o in entry["data_offsets"]]
    return header, data[:begin] + data[end:]


def trailing_bytes_after_the_data(folder):
    """Bytes after the last tensor belong to no tensor: safetensors refuses the file (it could hide other content)."""
    path = weights(folder)
    with open(path, "ab") as fh:
        fh.write(b"\x00" * 24)
    return path


def entry_removed_leaves_a_hole(folder):
    """The first tensor's entry is removed and its bytes stay, indexed by nothing: safetensors refuses the file."""
    path = weights(folder)
    header, data = read(path)
    name = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")[0][1]
    del header[name]
    write(path, header, data)
    return path


def _weight_torch_cannot_hold(folder, dtype: str, shape: list[int]) -> str:
    path = weights(folder)
    header, data = without(*read(path), "model.norm.weight")
    nbytes = {"F6_E2M3": 6, "F4": 4}[dtype] * int(torch.tensor(shape).prod()) // 8
    header["model.norm.weight"] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + nbytes]}
    write(path, header, data + bytes(nbytes))
    return path


def weight_of_a_dtype_torch_lacks(folder):
    """A valid header entry of F6_E2M3, which torch has no dtype for: refused when read, as safetensors does."""
    return _weight_torch_cannot_hold(folder, "F6_E2M3", [32])


def weight_f4_with_an_odd_last_dimension(folder):
    """F4 with an odd last dimension: torch packs two F4 values per element, so it cannot hold it."""
    return _weight_torch_cannot_hold(folder, "F4", [2, 31])


def shard_name_leaves_the_folder(folder):
    """The index names a shard in a sibling folder (``../other/...``): stock reads it; we refuse the index."""
    other = os.path.join(os.path.dirname(folder), "other")
    os.makedirs(other, exist_ok=True)
    index_path = os.path.join(folder, INDEX)
    with open(index_path, encoding="utf-8") as fh:
        index = json.load(fh)
    shard = index["weight_map"]["model.norm.weight"]
    os.replace(os.path.join(folder, shard), os.path.join(other, shard))
    index["weight_map"] = {k: (f"../other/{v}" if v == shard else v) for k, v in index["weight_map"].items()}
    with open(index_path, "w", encoding="utf-8") as fh:
        json.dump(index, fh)
    return index_path


def unknown_dtype(folder):
    return _edit_tensor(folder, dtype="F42")


def byte_length_disagrees_with_shape(folder):
    return _edit_tensor(folder, shape=[7, 3])


def negative_shape(folder):
    return _edit_tensor(folder, shape=[-1, 4])


def fractional_shape(folder):
    return _edit_tensor(folder, shape=[2.5])


def shape_not_a_list(folder):
    return _edit_tensor(folder, shape="x")


def offsets_out_of_range(folder):
    path = weights(folder)

    def edit(h):
        begin, end = h["model.norm.weight"]["data_offsets"]
        h["model.norm.weight"]["data_offsets"] = [begin + 10**9, end + 10**9]

    edit_header(path, edit)
    return path


def offsets_end_before_begin(folder):
    path = weights(folder)

    def edit(h):
        begin, end = h["model.norm.weight"]["data_offsets"]
        h["model.norm.weight"]["data_offsets"] = [end, begin]

    edit_header(path, edit)
    return path


def overlapping_offsets(folder):
    path = weights(folder)

    def edit(h):
        h["model.norm.weight"]["data_offsets"] = list(h["lm_head.weight"]["data_offsets"])
        h["model.norm.weight"]["shape"] = h["lm_head.weight"]["shape"]

    edit_header(path, edit)
    return path


def duplicate_name_different_entries(folder):
    """json.loads and safetensors keep the last of two equal keys, here a wrong one (I32 for an F32 tensor): stock 5.x
    loads the integers as floats, 4.57 fails on them (RuntimeError). We refuse the ambiguous file."""
    path = weights(folder)
    header, _ = read(path)
    write_with_extra_entry(path, "model.norm.weight", dict(header["model.norm.weight"], dtype="I32"))
    return path


def duplicate_name_first_entry_differs(folder):
    """Two entries for one tensor, the last one right: stock loads it. We refuse the ambiguous file all the same."""
    path = weights(folder)
    header, data = read(path)
    entry = header.pop("model.norm.weight")
    blob = json.dumps(header)[:-1] + ", " + json.dumps({"model.norm.weight": dict(entry, dtype="I32")})[1:-1]
    write_raw_header(path, (blob + ", " + json.dumps({"model.norm.weight": entry})[1:-1] + "}").encode())
    return path


def shape_disagrees_with_config(folder):
    config = transformers.AutoConfig.from_pretrained(folder)
    config.intermediate_size = 48  # the checkpoint's MLP weights are 64 wide
    config.save_pretrained(folder)
    return weights(folder)


def no_weights_at_all(folder):
    os.remove(weights(folder))
    return folder


def symlink_loop(folder):
    path = weights(folder)
    os.remove(path)
    os.symlink(WEIGHTS, path)
    return path


def dangling_symlink(folder):
    path = weights(folder)
    os.remove(path)
    os.symlink(os.path.join(os.path.dirname(folder), "gone.safetensors"), path)
    return path


def weights_name_is_a_directory(folder):
    path = weights(folder)
    os.remove(path)
    os.mkdir(path)
    return path


def shard_named_in_index_is_missing(folder):
    shard = os.path.join(folder, sorted(set(weight_map(folder).values()))[-1])
    os.remove(shard)
    return shard


def index_is_not_json(folder):
    index = os.path.join(folder, INDEX)
    with open(index, "w") as fh:
        fh.write("{'weight_map': ")
    return index


def _edit_index(folder, edit) -> str:
    index = os.path.join(folder, INDEX)
    with open(index) as fh:
        content = json.load(fh)
    with open(index, "wb") as fh:
        fh.write(edit(content))
    return index


def index_without_weight_map(folder):
    return _edit_index(folder, lambda index: json.dumps({"metadata": index["metadata"]}).encode())


def index_not_utf8(folder):
    return _edit_index(folder, lambda index: b"\xff\xfe" + json.dumps(index).encode())


def index_shard_name_not_a_string(folder):
    def edit(index):
        index["weight_map"]["model.norm.weight"] = 3
        return json.dumps(index).encode()

    return _edit_index(folder, edit)


def tensor_in_index_absent_from_its_shard(folder):
    """The shard is rewritten (a valid safetensors file) without one tensor that the index still places in it."""
    from safetensors.torch import load_file, save_file

    shard = shard_of(folder, "model.norm.weight")
    tensors = load_file(shard)
    del tensors["model.norm.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    return shard


@dataclass(frozen=True)
class Case:
    """One bad input: ``damage(folder)`` breaks a fresh checkpoint (sharded or not) and returns the path at fault.

    ``stock_loads`` names the transformers lines (``"4.57"``, ``"5"``) on which stock ``from_pretrained`` returns a
    model where hf_fastload raises by design; ``why`` says why.
    """

    damage: Callable[[str], str]
    sharded: bool = False
    stock_loads: tuple[str, ...] = ()
    why: str = ""

    @property
    def name(self) -> str:
        return self.damage.__name__


_TABLE = [
    Case(truncated_in_data),
    Case(truncated_inside_header),
    Case(header_length_past_end),
    Case(empty_file),
    Case(garbage_header),
    Case(non_utf8_header),
    Case(header_is_not_an_object),
    Case(metadata_not_strings),
    Case(metadata_value_is_a_number),
    Case(metadata_is_a_list),
    Case(metadata_is_a_string),
    Case(trailing_bytes_after_the_data),
    Case(entry_removed_leaves_a_hole),
    Case(weight_of_a_dtype_torch_lacks),
    Case(weight_f4_with_an_odd_last_dimension),
    Case(unknown_dtype),
    Case(byte_length_disagrees_with_shape),
    Case(negative_shape),
    Case(fractional_shape),
    Case(shape_not_a_list),
    Case(offsets_out_of_range),
    Case(offsets_end_before_begin),
    Case(overlapping_offsets),
    Case(shape_disagrees_with_config),
    Case(no_weights_at_all),
    Case(symlink_loop),
    Case(dangling_symlink),
    Case(weights_name_is_a_directory),
    Case(shard_named_in_index_is_missing, sharded=True),
    Case(index_is_not_json, sharded=True),
    Case(index_without_weight_map, sharded=True),
    Case(index_not_utf8, sharded=True),
    Case(index_shard_name_not_a_string, sharded=True),
    Case(
        duplicate_name_different_entries,
        stock_loads=("5",),
        why="an ambiguous file: safetensors silently keeps the last entry, here integers that 5.x casts to floats",
    ),
    Case(
        duplicate_name_first_entry_differs,
        stock_loads=("4.57", "5"),
        why="an ambiguous file: safetensors silently keeps the last entry, whichever its writer meant",
    ),
    Case(
        shard_name_leaves_the_folder,
        sharded=True,
        stock_loads=("4.57", "5"),
        why="stock reads a shard from outside the checkpoint folder: an index could load another model's files",
    ),
    Case(
        tensor_in_index_absent_from_its_shard,
        sharded=True,
        stock_loads=("4.57", "5"),
        why="stock 5.x initializes the tensor randomly (a MISSING key), 4.57 leaves it on the meta device: "
        "a model nobody saved",
    ),
]
CASES: dict[str, Case] = {case.name: case for case in _TABLE}


def fresh(tmp_path, case: Case, dtype: torch.dtype = torch.float32) -> str:
    """A fresh llama checkpoint for ``case`` under ``tmp_path`` (sharded if the case needs an index)."""
    return build_checkpoint("llama", str(tmp_path / case.name), dtype, sharded=case.sharded)
