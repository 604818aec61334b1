"""Bad checkpoints raise hf_fastload's own errors, naming the file, the tensor, what was expected and found.

File problems are OSErrors, content problems ValueErrors, so existing ``except`` clauses still catch them; no model
is returned and nothing is written to disk.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch
import transformers
from models import build_checkpoint

import hf_fastload
from hf_fastload import CheckpointContentError, CheckpointFileError, FastLoadError
from hf_fastload.reader import SafetensorsFile


@pytest.fixture
def ckpt(tmp_path):
    """A fresh single-file llama checkpoint that the test may damage."""
    return build_checkpoint("llama", str(tmp_path / "m"), torch.float32)


def _weights(folder):
    return os.path.join(folder, "model.safetensors")


def _read(path):
    with open(path, "rb") as fh:
        raw = fh.read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write(path, header, data, pad=True):
    blob = json.dumps(header).encode()
    if pad:
        blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob + data)


def _edit_header(path, edit):
    header, data = _read(path)
    edit(header)
    _write(path, header, data)


def _load(folder, **kwargs):
    return hf_fastload.fast_from_pretrained(folder, **kwargs)


def _snapshot(folder):
    return sorted((p, os.path.getsize(os.path.join(folder, p))) for p in os.listdir(folder))


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
    path = _weights(ckpt)
    os.truncate(path, os.path.getsize(path) - 100)
    msg = expect(ckpt, CheckpointFileError, path, "truncated")
    assert "tensor" in msg
    with pytest.raises(OSError):
        _load(ckpt)


def test_truncated_inside_header(ckpt):
    path = _weights(ckpt)
    os.truncate(path, 20)
    expect(ckpt, CheckpointFileError, path, "truncated", "header")


def test_header_length_past_end(ckpt):
    path = _weights(ckpt)
    with open(path, "r+b") as fh:
        fh.write(struct.pack("<Q", 10**12))
    expect(ckpt, CheckpointFileError, path, str(10**12))


def test_garbage_header(ckpt):
    path = _weights(ckpt)
    header, data = _read(path)
    blob = b"{not json" + b" " * 7
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob + data)
    expect(ckpt, CheckpointContentError, path, "JSON")
    with pytest.raises(ValueError):
        _load(ckpt)


def test_non_utf8_header(ckpt):
    path = _weights(ckpt)
    _, data = _read(path)
    blob = b'{"\xff\xfe": 1}  '
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob + data)
    expect(ckpt, CheckpointContentError, path, "UTF-8")


def test_unknown_dtype(ckpt):
    path = _weights(ckpt)
    _edit_header(path, lambda h: h["model.norm.weight"].update(dtype="F42"))
    expect(ckpt, CheckpointContentError, path, "model.norm.weight", "F42", "BF16")


def test_offsets_out_of_range(ckpt):
    path = _weights(ckpt)

    def edit(h):
        begin, end = h["model.norm.weight"]["data_offsets"]
        h["model.norm.weight"]["data_offsets"] = [begin + 10**9, end + 10**9]

    _edit_header(path, edit)
    expect(ckpt, CheckpointFileError, path, "model.norm.weight")


def test_overlapping_offsets(ckpt):
    path = _weights(ckpt)

    def edit(h):
        h["model.norm.weight"]["data_offsets"] = list(h["lm_head.weight"]["data_offsets"])
        h["model.norm.weight"]["shape"] = h["lm_head.weight"]["shape"]

    _edit_header(path, edit)
    expect(ckpt, CheckpointContentError, path, "overlap")


def test_byte_length_disagrees_with_shape(ckpt):
    path = _weights(ckpt)
    _edit_header(path, lambda h: h["model.norm.weight"].update(shape=[7, 3]))
    expect(ckpt, CheckpointContentError, path, "model.norm.weight", "[7, 3]")


@pytest.mark.parametrize("shape", [[-1, 4], [2.5], "x"])
def test_bad_shapes(ckpt, shape):
    path = _weights(ckpt)
    _edit_header(path, lambda h: h["model.norm.weight"].update(shape=shape))
    expect(ckpt, CheckpointContentError, path, "model.norm.weight", "shape")


def test_empty_file(ckpt):
    path = _weights(ckpt)
    open(path, "wb").close()
    expect(ckpt, CheckpointFileError, path, "truncated")


def test_shard_named_in_index_is_missing(tmp_path):
    folder = build_checkpoint("llama", str(tmp_path / "m"), torch.float32, sharded=True)
    with open(os.path.join(folder, "model.safetensors.index.json")) as fh:
        shard = sorted(set(json.load(fh)["weight_map"].values()))[-1]
    os.remove(os.path.join(folder, shard))
    expect(folder, CheckpointFileError, shard, "does not exist")


def test_shape_disagrees_with_config(tmp_path):
    folder = build_checkpoint("llama", str(tmp_path / "m"), torch.float32)
    config = transformers.AutoConfig.from_pretrained(folder)
    config.intermediate_size = 48  # the checkpoint's MLP weights are 64 wide
    config.save_pretrained(folder)
    msg = expect(folder, CheckpointContentError, _weights(folder), "mlp")
    assert "shape" in msg


def test_not_a_file_error_on_directory_with_no_weights(tmp_path):
    folder = build_checkpoint("llama", str(tmp_path / "m"), torch.float32)
    os.remove(_weights(folder))
    with pytest.raises(OSError):
        _load(folder)


def test_reader_alone(ckpt):
    path = _weights(ckpt)
    with SafetensorsFile(path) as f:
        keys = f.keys()
        assert "lm_head.weight" in keys
        assert f.metadata() == {"format": "pt"}
        t = f.get_tensor("model.norm.weight")
        assert t.dtype == torch.float32 and t.shape == (32,)
        with pytest.raises(CheckpointContentError, match="no tensor named"):
            f.get_slice("nope")
    with pytest.raises(CheckpointFileError, match="cannot open"):
        SafetensorsFile(os.path.join(ckpt, "absent.safetensors"))


def test_next_load_succeeds_after_a_failure(ckpt, tmp_path):
    good = shutil.copytree(ckpt, tmp_path / "good")
    os.truncate(_weights(ckpt), os.path.getsize(_weights(ckpt)) - 64)
    with pytest.raises(CheckpointFileError):
        _load(ckpt)
    model = _load(str(good))
    assert hf_fastload.last_report().path == "fast"
    assert model is not None
