"""Hostile checkpoints: nothing in them runs, and nothing of their contents leaks into messages.

- no unpickling unless stock would: a pickle checkpoint goes to stock ``from_pretrained``, which uses
  ``torch.load(weights_only=True)``, and a pickle whose ``__reduce__`` would run code is refused by both;
- a safetensors header is data: metadata and names are never evaluated, dtype names are looked up in a table;
- the ``HF_FASTLOAD`` startup hook imports nothing when the variable is unset;
- an index cannot send the load outside the checkpoint folder (an absolute shard name, a ``..`` component), while
  shards that are symbolic links (the HF cache's snapshot folders) load;
- error messages name files, tensors, shapes and dtypes, never tensor values.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch
import transformers
from equivalence import assert_same_model
from models import build_checkpoint

import hf_fastload
from hf_fastload import CheckpointContentError, FastLoadError
from hf_fastload.engine.handle import SafetensorsHandle


class _Payload:
    """Unpickling this creates a directory: the marker that code from the checkpoint ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_malicious_pickle_runs_neither_stock_nor_fast(tmp_path):
    folder = build_checkpoint("llama", str(tmp_path / "m"), torch.float32, safetensors=False)
    marker = tmp_path / "pwned"
    state = torch.load(os.path.join(folder, "pytorch_model.bin"), weights_only=True)
    state["model.norm.weight"] = _Payload(str(marker))
    torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    cls = transformers.LlamaForCausalLM
    with pytest.raises(Exception) as stock:
        cls.from_pretrained(folder)
    assert not marker.exists(), "stock from_pretrained ran the pickle's code"
    with pytest.raises(Exception) as fast:
        hf_fastload.fast_from_pretrained(folder, model_class=cls)
    assert not marker.exists(), "the fast path ran the pickle's code"
    assert type(fast.value) is type(stock.value)  # transformers read the pickle, with its own safety, both times
    for error in (stock.value, fast.value):
        chain = []
        while error is not None and len(chain) < 10:  # 4.57 wraps torch's error in an OSError (as __context__)
            chain.append(str(error))
            error = error.__cause__ or error.__context__
        assert any("weights_only" in text for text in chain), chain


def test_fast_path_never_unpickles(checkpoints, monkeypatch):
    """A safetensors load does not call torch.load or pickle at all."""
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling during a safetensors load")

    path = checkpoints("llama", torch.bfloat16, True)
    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(module, name, refuse)
    hf_fastload.fast_from_pretrained(path, model_class=transformers.LlamaForCausalLM, dtype=torch.float32)
    assert hf_fastload.last_report().path == "fast"


def _rewrite(path: str, edit) -> None:
    with open(path, "rb") as fh:
        raw = fh.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


def test_header_strings_are_never_evaluated(tmp_path):
    folder = build_checkpoint("llama", str(tmp_path / "m"), torch.float32)
    weights = os.path.join(folder, "model.safetensors")
    marker = tmp_path / "pwned"
    code = f"__import__('os').makedirs({str(marker)!r})"
    hostile = {"format": "pt", "eval": code, "{{7*7}}": "${jndi:ldap://x}", "__class__": "__reduce__", code: code}
    _rewrite(weights, lambda h: h["__metadata__"].update(hostile))
    model = hf_fastload.fast_from_pretrained(folder, model_class=transformers.LlamaForCausalLM)
    assert model is not None and hf_fastload.last_report().path == "fast"
    with SafetensorsHandle(weights) as f:
        assert f.metadata() == hostile  # kept verbatim, as strings
    assert not marker.exists()


@pytest.mark.parametrize("dtype", ["float32", "load", "save", "__class__", f"F32; {'__import__'}('os')"])
def test_dtype_names_are_looked_up_not_evaluated(tmp_path, dtype):
    """Only safetensors' own names (F32, BF16, ...) are dtypes; torch attribute names are not resolved."""
    folder = build_checkpoint("llama", str(tmp_path / "m"), torch.float32)
    weights = os.path.join(folder, "model.safetensors")
    _rewrite(weights, lambda h: h["model.norm.weight"].update(dtype=dtype))
    with pytest.raises(CheckpointContentError, match="unknown dtype"):
        hf_fastload.fast_from_pretrained(folder, model_class=transformers.LlamaForCausalLM)


def _sharded_with_a_sibling(tmp_path):
    """A sharded llama in ``tmp_path/m`` and a copy of its first shard in ``tmp_path/other``."""
    folder = build_checkpoint("llama", str(tmp_path / "m"), torch.float32, sharded=True)
    index_path = os.path.join(folder, "model.safetensors.index.json")
    with open(index_path) as fh:
        index = json.load(fh)
    first = sorted(set(index["weight_map"].values()))[0]
    os.makedirs(tmp_path / "other")
    shutil.copy(os.path.join(folder, first), tmp_path / "other" / first)
    return folder, index_path, index, first


@pytest.mark.parametrize("where", ["parent", "absolute", "inner parent"])
def test_index_cannot_name_shards_outside_the_folder(tmp_path, where):
    """Stock reads ``../other/<shard>`` (another model's file, in a cache); the fast path refuses the index."""
    folder, index_path, index, first = _sharded_with_a_sibling(tmp_path)
    shard = {
        "parent": f"../other/{first}",
        "absolute": str(tmp_path / "other" / first),
        "inner parent": f"sub/../../other/{first}",
    }[where]
    os.remove(os.path.join(folder, first))  # the only copy is outside the folder
    index["weight_map"] = {k: shard if v == first else v for k, v in index["weight_map"].items()}
    with open(index_path, "w") as fh:
        json.dump(index, fh)
    cls = transformers.LlamaForCausalLM
    if where != "inner parent":  # stock does read it (a path through a missing "sub" fails in the OS)
        cls.from_pretrained(folder)
    with pytest.raises(CheckpointContentError) as info:
        hf_fastload.fast_from_pretrained(folder, model_class=cls)
    message = str(info.value)
    assert index_path in message and repr(shard) in message and "outside" in message, message


def _hf_cache(tmp_path, folder, repo="org--tiny-llama", commit="0123456789abcdef0123456789abcdef01234567"):
    """``folder`` laid out as the HF hub cache lays out a download: every file of ``snapshots/<commit>/`` is a
    relative symbolic link into ``blobs/``."""
    import hashlib

    root = tmp_path / "hub" / f"models--{repo}"
    snapshot = root / "snapshots" / commit
    os.makedirs(root / "blobs")
    os.makedirs(snapshot)
    os.makedirs(root / "refs")
    (root / "refs" / "main").write_text(commit)
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as fh:
            blob = hashlib.sha256(fh.read()).hexdigest()
        shutil.copy(os.path.join(folder, name), root / "blobs" / blob)
        os.symlink(os.path.join("..", "..", "blobs", blob), snapshot / name)
    return str(snapshot)


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_hf_cache_layout_with_symlinked_shards_loads(tmp_path, sharded):
    """The HF cache's snapshot folder links each file into ``../../blobs/<hash>``: by path and by hub id, it loads."""
    folder = build_checkpoint("llama", str(tmp_path / "m"), torch.float32, sharded=sharded)
    snapshot = _hf_cache(tmp_path, folder)
    assert all(os.path.islink(os.path.join(snapshot, n)) for n in os.listdir(snapshot))
    cls = transformers.LlamaForCausalLM
    stock = cls.from_pretrained(folder)
    for source, kwargs in ((snapshot, {}), ("org/tiny-llama", {"cache_dir": str(tmp_path / "hub")})):
        fast = hf_fastload.fast_from_pretrained(source, model_class=cls, **kwargs)
        report = hf_fastload.last_report()
        assert report.path == "fast" and report.tensors_loaded > 0, report
        assert_same_model(stock, fast)


def test_cached_hub_index_cannot_name_another_models_shards(tmp_path):
    """In the HF cache, an index naming ``../../../models--org--other/snapshots/<sha>/<shard>`` makes stock load
    another model's weights by hub id (huggingface_hub before 1.x; newer versions refuse the name with a ValueError);
    the fast path refuses the index before loading anything."""
    folder = build_checkpoint("llama", str(tmp_path / "m"), torch.float32, sharded=True)
    other = _hf_cache(tmp_path, folder, repo="org--other")
    snapshot = _hf_cache(tmp_path, folder)
    index_path = os.path.join(snapshot, "model.safetensors.index.json")
    with open(index_path) as fh:
        index = json.load(fh)
    first = sorted(set(index["weight_map"].values()))[0]
    shard = os.path.relpath(os.path.join(other, first), snapshot)
    assert shard.startswith("../../../models--org--other/")
    index["weight_map"] = {k: shard if v == first else v for k, v in index["weight_map"].items()}
    os.remove(index_path)  # the link into blobs: the new index is a file of its own
    with open(index_path, "w") as fh:
        json.dump(index, fh)
    os.remove(os.path.join(snapshot, first))
    cls, hub = transformers.LlamaForCausalLM, {"cache_dir": str(tmp_path / "hub")}
    try:
        cls.from_pretrained("org/tiny-llama", **hub)  # stock read the other model's shard
    except ValueError as e:  # or its huggingface_hub refused the name
        assert "'..'" in str(e), e
    with pytest.raises(CheckpointContentError) as info:
        hf_fastload.fast_from_pretrained("org/tiny-llama", model_class=cls, **hub)
    assert repr(shard) in str(info.value) and "'..' component" in str(info.value), info.value


_SYS_MODULES = "import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in ({})))".format(
    "'hf_fastload', 'hf_fastload_startup', 'torch', 'transformers'"
)


def test_startup_hook_imports_nothing_when_unset():
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_FASTLOAD")}
    unset = subprocess.run([sys.executable, "-c", _SYS_MODULES], env=env, capture_output=True, text=True, check=True)
    assert unset.stdout.strip() == "[]", unset.stdout
    # and the hook is installed, so the line above did test it: set, it imports its own small module
    on = subprocess.run([sys.executable, "-c", _SYS_MODULES], env=dict(env, HF_FASTLOAD="1"), capture_output=True,
                        text=True, check=True)  # fmt: skip
    assert "hf_fastload_startup" in on.stdout and "torch" not in on.stdout, on.stdout


VALUE = 24681.375  # exact in float32 and bfloat16; its digits must never appear in a message


@pytest.fixture
def marked(tmp_path):
    """A llama checkpoint whose every weight holds VALUE."""
    folder = build_checkpoint("llama", str(tmp_path / "m"), torch.float32)
    cls = transformers.LlamaForCausalLM
    model = cls.from_pretrained(folder)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(VALUE)
    model.save_pretrained(folder)
    return folder


def _no_values(message: str) -> None:
    for text in ("24681", "2.4681", "2.468", "tensor(["):
        assert text not in message, f"a tensor's contents in the message: {message[:2000]}"


def _config_edit(folder, **changes):
    config = transformers.AutoConfig.from_pretrained(folder)
    for k, v in changes.items():
        setattr(config, k, v)
    config.save_pretrained(folder)


@pytest.mark.parametrize(
    "damage",
    ["shape_vs_config", "unknown_dtype", "byte_length", "duplicate", "truncated", "offsets"],
)
def test_error_messages_never_show_tensor_values(marked, damage):
    weights = os.path.join(marked, "model.safetensors")
    if damage == "shape_vs_config":
        _config_edit(marked, intermediate_size=48)
    elif damage == "unknown_dtype":
        _rewrite(weights, lambda h: h["model.norm.weight"].update(dtype="F42"))
    elif damage == "byte_length":
        _rewrite(weights, lambda h: h["model.norm.weight"].update(shape=[7, 3]))
    elif damage == "duplicate":
        with open(weights, "rb") as fh:
            raw = fh.read()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        extra = json.dumps({"model.norm.weight": dict(header["model.norm.weight"], dtype="I32")})[1:-1]
        blob = (json.dumps(header)[:-1] + ", " + extra + "}").encode()
        blob += b" " * (-len(blob) % 8)
        with open(weights, "wb") as fh:
            fh.write(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])
    elif damage == "truncated":
        os.truncate(weights, os.path.getsize(weights) - 100)
    elif damage == "offsets":
        _rewrite(weights, lambda h: h["model.norm.weight"].update(data_offsets=[0, 10**12]))
    with pytest.raises((FastLoadError, OSError, ValueError, RuntimeError)) as info:
        hf_fastload.fast_from_pretrained(marked, model_class=transformers.LlamaForCausalLM)
    message = str(info.value)
    _no_values(message)
    _no_values(repr(info.value))
    if info.value.__cause__ is not None:
        _no_values(str(info.value.__cause__))
