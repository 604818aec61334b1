"""With ``HF_FASTLOAD_READAHEAD=entry`` (off by default), the readahead of a checkpoint starts at the entry of a
load, before transformers imports and builds the model.

In a fresh process transformers spends seconds importing the model's code, reading the config and building the
model before it opens a weights file; the files' names are known before all that (from the folder, its index, or
the HF cache's snapshot of a hub id), so their kernel readahead starts first and the disk works meanwhile.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import transformers
from models import build_checkpoint, hub_cache

import hf_fastload
from hf_fastload.engine.context import LoadContext

LLAMA = transformers.LlamaForCausalLM


def _spy(monkeypatch) -> list[tuple]:
    """Records, in order, every prefetch (with its paths), every file the load opens, and every readahead call;
    the readahead is turned on at the entry (``HF_FASTLOAD_READAHEAD=entry``; off by default)."""
    monkeypatch.setenv("HF_FASTLOAD_READAHEAD", "entry")
    events: list[tuple] = []
    read_ahead, open_file, advise = LoadContext.read_ahead, LoadContext.open, os.posix_fadvise

    def spy_read_ahead(self, paths):
        paths = list(paths)
        events.append(("prefetch", sorted(os.path.realpath(p) for p in paths)))
        return read_ahead(self, paths)

    def spy_open(self, path, device="cpu"):
        events.append(("open", os.path.realpath(path)))
        return open_file(self, path, device)

    def spy_advise(fd, offset, length, advice):
        events.append(("advise", os.path.realpath(f"/proc/self/fd/{fd}"), offset))
        return advise(fd, offset, length, advice)

    monkeypatch.setattr(LoadContext, "read_ahead", spy_read_ahead)
    monkeypatch.setattr(LoadContext, "open", spy_open)
    monkeypatch.setattr(os, "posix_fadvise", spy_advise)
    return events


def _weights(folder) -> list[str]:
    return sorted(os.path.realpath(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith(".safetensors"))


def test_single_file_is_prefetched_before_it_is_opened(tmp_path, monkeypatch):
    folder = build_checkpoint("llama", str(tmp_path / "m"), torch.bfloat16)
    events = _spy(monkeypatch)
    hf_fastload.fast_from_pretrained(folder, model_class=LLAMA)
    assert events[0] == ("prefetch", _weights(folder))
    opened = [e for e in events if e[0] == "open"]
    assert opened and all(e[1] in _weights(folder) for e in opened)
    deadline = time.monotonic() + 10  # the readahead runs on its own threads
    while {e[1] for e in events if e[0] == "advise"} != set(_weights(folder)) and time.monotonic() < deadline:
        time.sleep(0.01)
    advised = [e for e in events if e[0] == "advise"]
    assert {e[1] for e in advised} == set(_weights(folder))
    assert len(advised) == len({(e[1], e[2]) for e in advised}), "a file was read ahead twice"


def test_every_shard_is_prefetched(tmp_path, monkeypatch):
    folder = build_checkpoint("llama", str(tmp_path / "m"), torch.float32, sharded=True)
    assert len(_weights(folder)) > 1
    events = _spy(monkeypatch)
    hf_fastload.fast_from_pretrained(folder, model_class=LLAMA)
    assert events[0] == ("prefetch", _weights(folder))


def test_hub_id_is_prefetched_from_the_cache_snapshot(tmp_path, monkeypatch):
    source = build_checkpoint("llama", str(tmp_path / "src"), torch.bfloat16)
    cache = tmp_path / "hub"
    snapshot = hub_cache(cache, "tiny-org/tiny-llama", source)
    events = _spy(monkeypatch)
    hf_fastload.fast_from_pretrained("tiny-org/tiny-llama", cache_dir=str(cache))
    assert events[0] == ("prefetch", _weights(snapshot))


@pytest.mark.parametrize("value", ["0", None])
def test_readahead_off(tmp_path, monkeypatch, value):
    """Off with ``HF_FASTLOAD_READAHEAD=0`` and by default."""
    folder = build_checkpoint("llama", str(tmp_path / "m"), torch.bfloat16)
    events = _spy(monkeypatch)
    if value is None:
        monkeypatch.delenv("HF_FASTLOAD_READAHEAD")
    else:
        monkeypatch.setenv("HF_FASTLOAD_READAHEAD", value)
    hf_fastload.fast_from_pretrained(folder, model_class=LLAMA)
    assert not [e for e in events if e[0] in ("advise", "prefetch")]


def test_readahead_when_opened(tmp_path, monkeypatch):
    """``HF_FASTLOAD_READAHEAD=open``: no prefetch at the entry; each file is read ahead once, when it is opened."""
    folder = build_checkpoint("llama", str(tmp_path / "m"), torch.bfloat16, sharded=True)
    events = _spy(monkeypatch)
    monkeypatch.setenv("HF_FASTLOAD_READAHEAD", "open")
    hf_fastload.fast_from_pretrained(folder, model_class=LLAMA)
    assert not [e for e in events if e[0] == "prefetch"]
    deadline = time.monotonic() + 10
    while {e[1] for e in events if e[0] == "advise"} != set(_weights(folder)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert {e[1] for e in events if e[0] == "advise"} == set(_weights(folder))


def test_readahead_knob_is_checked(tmp_path, monkeypatch):
    folder = build_checkpoint("llama", str(tmp_path / "m"), torch.bfloat16)
    monkeypatch.setenv("HF_FASTLOAD_READAHEAD", "sometimes")
    with pytest.raises(hf_fastload.FastLoadError, match="HF_FASTLOAD_READAHEAD='sometimes' is not one of"):
        hf_fastload.fast_from_pretrained(folder, model_class=LLAMA)
