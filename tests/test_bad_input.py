"""Bad checkpoints raise hf_fastload's own errors, naming the file, the tensor, what was expected and found.

File problems are OSErrors, content problems ValueErrors, and each error is also an instance of the class stock
``from_pretrained`` raises (``tests/test_stock_exceptions.py`` compares them on the same inputs), so existing
``except`` clauses still catch them; no model is returned and nothing is written to disk. The damages themselves
live in ``tests/bad_inputs.py``, shared with that comparison.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import bad_inputs as damage
import pytest
import torch
import transformers
from bad_inputs import read as _read
from bad_inputs import weights as _weights
from bad_inputs import write as _write
from equivalence import assert_same_model
from models import build_checkpoint

import hf_fastload
from hf_fastload import (
    CheckpointContentError,
    CheckpointFileError,
    CheckpointIndexError,
    CheckpointNotFoundError,
    DuplicateTensorError,
    FastLoadError,
    InvalidSafetensorsError,
    ShapeMismatchError,
    TruncatedSafetensorsError,
)
from hf_fastload.engine.handle import SafetensorsHandle


@pytest.fixture
def ckpt(tmp_path):
    """A fresh single-file llama checkpoint that the test may damage."""
    return build_checkpoint("llama", str(tmp_path / "m"), torch.float32)


def _load(folder, **kwargs):
    return hf_fastload.fast_from_pretrained(folder, **kwargs)


def _snapshot(folder):
    return sorted((p, os.lstat(os.path.join(folder, p)).st_size) for p in os.listdir(folder))


def _capture_warnings(monkeypatch) -> list[str]:
    """The messages hf_fastload logs as warnings from now on (transformers' logging is at "error" in tests)."""
    from hf_fastload.integration import loader

    seen: list[str] = []

    class Logger:
        def warning(self, message):
            seen.append(message)

    monkeypatch.setattr(loader, "_logger", Logger)
    return seen


def expect(folder, error, *fragments, **kwargs):
    before = _snapshot(folder)
    with pytest.raises(error) as info:
        _load(folder, **kwargs)
    message = str(info.value)
    assert isinstance(info.value, FastLoadError)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert _snapshot(folder) == before, "the load wrote to the checkpoint folder"
    return message


def test_truncated_in_data(ckpt):
    path = damage.truncated_in_data(ckpt)
    msg = expect(ckpt, TruncatedSafetensorsError, path, "truncated")
    assert "tensor" in msg
    with pytest.raises(OSError):
        _load(ckpt)


def test_truncated_inside_header(ckpt):
    path = damage.truncated_inside_header(ckpt)
    expect(ckpt, TruncatedSafetensorsError, path, "truncated", "header")


def test_header_length_past_end(ckpt):
    path = damage.header_length_past_end(ckpt)
    expect(ckpt, TruncatedSafetensorsError, path, str(10**12))


def test_garbage_header(ckpt):
    path = damage.garbage_header(ckpt)
    expect(ckpt, InvalidSafetensorsError, path, "JSON")
    with pytest.raises(ValueError):
        _load(ckpt)


def test_non_utf8_header(ckpt):
    path = damage.non_utf8_header(ckpt)
    expect(ckpt, InvalidSafetensorsError, path, "UTF-8")


def test_unknown_dtype(ckpt):
    path = damage.unknown_dtype(ckpt)
    expect(ckpt, InvalidSafetensorsError, path, "model.norm.weight", "F42", "BF16")


def test_offsets_out_of_range(ckpt):
    path = damage.offsets_out_of_range(ckpt)
    expect(ckpt, TruncatedSafetensorsError, path, "model.norm.weight")


def test_overlapping_offsets(ckpt):
    path = damage.overlapping_offsets(ckpt)
    expect(ckpt, InvalidSafetensorsError, path, "overlap")


def test_byte_length_disagrees_with_shape(ckpt):
    path = damage.byte_length_disagrees_with_shape(ckpt)
    expect(ckpt, InvalidSafetensorsError, path, "model.norm.weight", "[7, 3]")


@pytest.mark.parametrize("bad", [damage.negative_shape, damage.fractional_shape, damage.shape_not_a_list])
def test_bad_shapes(ckpt, bad):
    path = bad(ckpt)
    expect(ckpt, InvalidSafetensorsError, path, "model.norm.weight", "shape")


def test_empty_file(ckpt):
    path = damage.empty_file(ckpt)
    expect(ckpt, TruncatedSafetensorsError, path, "truncated")


def test_shard_named_in_index_is_missing(tmp_path):
    folder = build_checkpoint("llama", str(tmp_path / "m"), torch.float32, sharded=True)
    shard = os.path.basename(damage.shard_named_in_index_is_missing(folder))
    expect(folder, CheckpointNotFoundError, shard, "does not exist")


def test_shape_disagrees_with_config(tmp_path):
    folder = build_checkpoint("llama", str(tmp_path / "m"), torch.float32)
    damage.shape_disagrees_with_config(folder)
    msg = expect(folder, ShapeMismatchError, _weights(folder), "mlp", "[32, 64]", "[32, 48]")
    assert "shape" in msg


def test_reader_alone(ckpt):
    path = _weights(ckpt)
    with SafetensorsHandle(path) as f:
        keys = f.keys()
        assert "lm_head.weight" in keys
        assert f.metadata() == {"format": "pt"}
        t = f.get_tensor("model.norm.weight")
        assert t.dtype == torch.float32 and t.shape == (32,)
        with pytest.raises(InvalidSafetensorsError, match="no tensor named"):
            f.get_slice("nope")
    with pytest.raises(CheckpointNotFoundError, match="cannot open"):
        SafetensorsHandle(os.path.join(ckpt, "absent.safetensors"))


def test_next_load_succeeds_after_a_failure(ckpt, tmp_path):
    good = shutil.copytree(ckpt, tmp_path / "good")
    os.truncate(_weights(ckpt), os.path.getsize(_weights(ckpt)) - 64)
    with pytest.raises(CheckpointFileError):
        _load(ckpt)
    model = _load(str(good))
    assert hf_fastload.last_report().path == "fast"
    assert model is not None


# --- header oddities that safetensors itself accepts or refuses --------------------------------------------------


@pytest.mark.parametrize("bad", [damage.duplicate_name_different_entries, damage.duplicate_name_first_entry_differs])
def test_duplicate_tensor_name_with_different_entries(ckpt, bad):
    """json.loads keeps the last of two equal keys (so does safetensors): an ambiguous file is refused instead."""
    path = bad(ckpt)
    expect(ckpt, DuplicateTensorError, path, "model.norm.weight", "listed twice")


def test_duplicate_tensor_name_with_identical_entries_loads(ckpt):
    """Not ambiguous: loads, as with safetensors."""
    path = _weights(ckpt)
    header, _ = _read(path)
    damage.write_with_extra_entry(path, "model.norm.weight", header["model.norm.weight"])
    assert_same_model(transformers.LlamaForCausalLM.from_pretrained(ckpt), _load(ckpt))


def test_header_order_differs_from_data_order(ckpt):
    """safetensors sorts entries by offset, so a header listed in another order is valid; it loads equal to stock."""
    path = _weights(ckpt)
    header, data = _read(path)
    shuffled = dict(reversed(list(header.items())))
    assert list(shuffled) != list(header)
    _write(path, shuffled, data)
    assert_same_model(transformers.LlamaForCausalLM.from_pretrained(ckpt), _load(ckpt))
    assert hf_fastload.last_report().path == "fast"


def test_offsets_end_before_begin(ckpt):
    path = damage.offsets_end_before_begin(ckpt)
    expect(ckpt, InvalidSafetensorsError, path, "model.norm.weight", "data_offsets")


def test_header_is_not_an_object(ckpt):
    path = damage.header_is_not_an_object(ckpt)
    expect(ckpt, InvalidSafetensorsError, path, "JSON object", "list")


@pytest.mark.parametrize(
    "bad",
    [damage.metadata_not_strings, damage.metadata_value_is_a_number, damage.metadata_is_a_list,
     damage.metadata_is_a_string],
)  # fmt: skip
def test_metadata_not_strings(ckpt, bad):
    path = bad(ckpt)
    expect(ckpt, InvalidSafetensorsError, path, "__metadata__")


def test_metadata_null_loads(ckpt):
    """safetensors reads ``"__metadata__": null`` as no metadata; so do we."""
    damage.edit_header(_weights(ckpt), lambda h: h.update(__metadata__=None))
    assert_same_model(transformers.LlamaForCausalLM.from_pretrained(ckpt), _load(ckpt))


@pytest.mark.parametrize("bad", [damage.weight_of_a_dtype_torch_lacks, damage.weight_f4_with_an_odd_last_dimension])
def test_weight_torch_cannot_hold(ckpt, bad):
    """A valid header entry that torch cannot hold is refused when it is read, as safetensors does: a model weight
    fails the load (4.57 refuses an F6 dtype name itself before reading, as stock)."""
    path = bad(ckpt)
    with pytest.raises(Exception) as stock:
        transformers.LlamaForCausalLM.from_pretrained(ckpt)
    with pytest.raises(type(stock.value)) as info:
        _load(ckpt)
    if isinstance(info.value, FastLoadError):  # refused when read: our error names the file and the tensor
        assert path in str(info.value) and "model.norm.weight" in str(info.value), info.value
    with SafetensorsHandle(path) as f:
        header_shape = damage.read(path)[0]["model.norm.weight"]["shape"]
        assert f.get_slice("model.norm.weight").get_shape() == header_shape
        with pytest.raises(InvalidSafetensorsError, match="model.norm.weight"):
            f.get_tensor("model.norm.weight")


@pytest.mark.parametrize("dtype, shape", [("F6_E2M3", [32]), ("F4", [2, 31])], ids=["F6, no torch dtype", "F4, odd"])
def test_unexpected_key_torch_cannot_hold(ckpt, dtype, shape):
    """Such a tensor as an unexpected key: 5.x never reads it (stock loads the model), 4.57 refuses its dtype name
    before reading. We do what stock does."""
    path = _weights(ckpt)
    header, data = _read(path)
    nbytes = {"F6_E2M3": 6, "F4": 4}[dtype] * int(torch.tensor(shape).prod()) // 8
    header["extra.weight"] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + nbytes]}
    _write(path, header, data + bytes(nbytes))
    cls = transformers.LlamaForCausalLM
    try:
        stock = cls.from_pretrained(ckpt)
    except Exception as e:
        with pytest.raises(Exception) as info:
            _load(ckpt)
        assert isinstance(info.value, type(e)), info.value
    else:
        assert_same_model(stock, _load(ckpt))


def test_trailing_bytes_after_the_data(ckpt):
    path = damage.trailing_bytes_after_the_data(ckpt)
    expect(ckpt, InvalidSafetensorsError, path, "24 trailing bytes")


def test_entry_removed_from_the_header_leaves_a_hole(ckpt):
    """Loading it anyway would give a model stock never returns (transformers would see a missing key and
    initialize that weight randomly)."""
    path = damage.entry_removed_leaves_a_hole(ckpt)
    expect(ckpt, InvalidSafetensorsError, path, "hole", "belong to no tensor")


# --- folders: index, shards, links, permissions ------------------------------------------------------------------


def _sharded(tmp_path):
    folder = build_checkpoint("llama", str(tmp_path / "m"), torch.float32, sharded=True)
    return folder, damage.weight_map(folder)


def test_tensor_in_index_absent_from_its_shard(tmp_path):
    """Stock 5.x initializes such a tensor randomly (a "MISSING" line), 4.57 returns it on the meta device."""
    folder, _ = _sharded(tmp_path)
    shard = damage.tensor_in_index_absent_from_its_shard(folder)
    expect(folder, CheckpointContentError, "model.norm.weight", shard, "no such tensor")


def test_shard_name_leaves_the_folder(tmp_path):
    """Stock reads a shard from a sibling folder; we refuse the index (``tests/test_security.py`` has the variants)."""
    folder, _ = _sharded(tmp_path)
    index = damage.shard_name_leaves_the_folder(folder)
    expect(folder, CheckpointContentError, index, "../other/", "outside")


def test_index_is_not_json(tmp_path):
    folder, _ = _sharded(tmp_path)
    index = damage.index_is_not_json(folder)
    message = expect(folder, CheckpointIndexError, index, "weight_map")
    with pytest.raises(json.JSONDecodeError):  # what stock raises
        _load(folder)
    assert "line 1 column 2" in message


@pytest.mark.parametrize(
    "bad, stock_class",
    [
        (damage.index_without_weight_map, KeyError),
        (damage.index_not_utf8, UnicodeDecodeError),
        (damage.index_shard_name_not_a_string, TypeError),
    ],
)
def test_index_unusable(tmp_path, bad, stock_class):
    """The error is also what stock's own parse of the index raises, with our message naming the index."""
    folder, _ = _sharded(tmp_path)
    index = bad(folder)
    expect(folder, CheckpointIndexError, index, "invalid safetensors index")
    with pytest.raises(stock_class):
        _load(folder)


def test_shard_the_index_does_not_name_warns_and_loads(tmp_path, monkeypatch):
    folder, weight_map = _sharded(tmp_path)
    stray = os.path.join(folder, "model-00007-of-00009.safetensors")
    shutil.copy(os.path.join(folder, sorted(set(weight_map.values()))[0]), stray)
    warnings = _capture_warnings(monkeypatch)
    model = _load(folder)
    assert hf_fastload.last_report().path == "fast"
    assert_same_model(transformers.LlamaForCausalLM.from_pretrained(folder), model)
    assert [w for w in warnings if stray in w and "does not name" in w], warnings


def test_no_weights_at_all(tmp_path):
    folder = build_checkpoint("llama", str(tmp_path / "m"), torch.float32)
    damage.no_weights_at_all(folder)
    with pytest.raises(OSError) as info:  # transformers' own error, as stock: it names the folder
        _load(folder)
    assert folder in str(info.value)


def test_symlink_loop(ckpt):
    path = damage.symlink_loop(ckpt)
    expect(ckpt, CheckpointFileError, path, "symbolic links")  # stock says there is no weights file


def test_dangling_symlink(ckpt):
    path = damage.dangling_symlink(ckpt)
    expect(ckpt, CheckpointFileError, path, "missing file")


def test_weights_name_is_a_directory(ckpt):
    path = damage.weights_name_is_a_directory(ckpt)
    expect(ckpt, CheckpointFileError, path, "directory")


def test_permission_denied(ckpt, monkeypatch):
    path = _weights(ckpt)
    if os.geteuid() != 0:
        os.chmod(path, 0)
    else:  # root reads a mode-000 file anyway: deny the open instead
        real_open = os.open

        def deny(p, *args, **kwargs):
            if os.fspath(p) == path:
                raise PermissionError(13, "Permission denied", p)
            return real_open(p, *args, **kwargs)

        monkeypatch.setattr(os, "open", deny)
    try:
        expect(ckpt, CheckpointNotFoundError, path, "Permission denied")  # safetensors: FileNotFoundError
    finally:
        os.chmod(path, 0o644)


# --- a file truncated by another process while it loads ----------------------------------------------------------

_TRUNCATE_DURING_LOAD = r"""
import os, shutil, sys
import torch
import hf_fastload
from hf_fastload.engine.context import LoadContext

source, work = sys.argv[1], sys.argv[2]
os.environ["HF_FASTLOAD_READAHEAD"] = "0"
record, check = LoadContext.record, LoadContext.check_mapped
for case in sys.argv[3:]:
    io, when, dtype = case.split("-")
    folder = shutil.copytree(source, os.path.join(work, case))
    path = os.path.join(folder, "model.safetensors")
    cut = []

    def truncate():
        if not cut:
            cut.append(True)
            os.truncate(path, 4096)  # past the header, before nearly every tensor's data

    def after_first(self, *args):  # right after the first tensor is materialized; the others are still to come
        record(self, *args)
        truncate()

    def before_check(self):  # after every tensor, right before the final check: only zero-copy views to guard
        truncate()
        check(self)

    LoadContext.record, LoadContext.check_mapped = record, check
    if when == "first":
        LoadContext.record = after_first
    else:
        LoadContext.check_mapped = before_check
    os.environ["HF_FASTLOAD_IO"] = io
    want = {"same": torch.float32, "convert": torch.bfloat16}[dtype]
    try:
        model = hf_fastload.fast_from_pretrained(folder, dtype=want)
    except hf_fastload.CheckpointFileError as e:
        print(f"{case}: CheckpointFileError: {e}", flush=True)
    else:  # acceptable only when every byte had been read before the cut (pread reads are copies)
        stock = type(model).from_pretrained(source, dtype=want).state_dict()
        equal = all(torch.equal(stock[k], v) for k, v in model.state_dict().items())
        print(f"{case}: returned a model (truncated: {bool(cut)}, equal to the original: {equal})", flush=True)
"""

TRUNCATION_CASES = [  # io-when-dtype
    "mmap-first-same", "mmap-first-convert", "pread-first-same", "pread-first-convert", "mmap-end-same",
]  # fmt: skip


def test_truncated_by_another_process_during_the_load(ckpt, tmp_path):
    """Touching a mapped page past a file's new end is a SIGBUS, which would kill the interpreter: mapped reads check
    the size first, and the model is not returned if a mapped file shrank. Runs in a child, so that a crash is seen;
    one child for every case (I/O mode, truncated after the first tensor or at the end, same dtype or converting)."""
    script = tmp_path / "truncate.py"
    script.write_text(_TRUNCATE_DURING_LOAD)
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, str(script), ckpt, str(work), *TRUNCATION_CASES], capture_output=True, text=True, timeout=300
    )
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, f"exit code {proc.returncode} (-7 is SIGBUS) after {lines}: {proc.stderr[-2000:]}"
    assert len(lines) == len(TRUNCATION_CASES), lines
    for case, line in zip(TRUNCATION_CASES, lines):
        path = str(work / case / "model.safetensors")
        if case.startswith("pread") and "returned a model" in line:
            # transformers 5 reads tensors from 4 threads: all of a tiny model may be read before the cut. A model
            # of copies made before it is right; a wrong one never is.
            assert line.endswith("equal to the original: True)"), line
            continue
        assert line.startswith(f"{case}: CheckpointFileError: ") and path in line, line
        assert "shrank" in line or "truncated" in line, line
