"""Property tests of the reader: any bytes either load correctly or raise hf_fastload's error; never a crash, a
hang or a huge allocation. ``HF_FASTLOAD_FUZZ_EXAMPLES`` raises the example count for a longer run."""

from __future__ import annotations

import json
import os
import struct

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_fastload import FastLoadError
from hf_fastload.engine.handle import SafetensorsHandle
from hf_fastload.format.header import DTYPES

EXAMPLES = int(os.environ.get("HF_FASTLOAD_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _load_all(path: str) -> None:
    with SafetensorsHandle(path) as f:
        for name in f.keys():
            t = f.get_tensor(name)
            assert t.numel() == f.tensors[name].numel
            assert t.untyped_storage().nbytes() <= os.path.getsize(path) or t.numel() == 0


def _check(tmp_path, blob: bytes) -> None:
    path = str(tmp_path / "fuzz.safetensors")
    with open(path, "wb") as fh:
        fh.write(blob)
    try:
        _load_all(path)
    except FastLoadError:
        pass


@FUZZ
@given(st.binary(max_size=256))
def test_any_bytes(tmp_path, blob):
    _check(tmp_path, blob)


@FUZZ
@given(
    header_len=st.integers(min_value=0, max_value=2**64 - 1),
    body=st.binary(max_size=64),
)
def test_any_header_length(tmp_path, header_len, body):
    """A claimed header of up to 2^64 bytes is refused before anything is allocated."""
    _check(tmp_path, struct.pack("<Q", header_len) + body)


_entry = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from([*DTYPES, "F42", "", "bf16"]),
        "shape": st.one_of(
            st.lists(st.integers(min_value=-2, max_value=10**12), max_size=4),
            st.just("x"),
            st.lists(st.floats(allow_nan=False), max_size=2),
        ),
        "data_offsets": st.one_of(
            st.lists(st.integers(min_value=-5, max_value=2**62), min_size=2, max_size=2),
            st.lists(st.integers(min_value=0, max_value=64), min_size=0, max_size=3),
        ),
    }
)


@FUZZ
@given(entries=st.dictionaries(st.text(max_size=8), _entry, max_size=4), data=st.binary(max_size=128))
def test_structured_headers(tmp_path, entries, data):
    """Plausible headers: wrong dtypes, absurd shapes (10^12 elements), bad offsets; no allocation beyond the file."""
    blob = json.dumps(entries).encode()
    _check(tmp_path, struct.pack("<Q", len(blob)) + blob + data)


@FUZZ
@given(tensors=st.dictionaries(st.text(min_size=1, max_size=8), st.integers(0, 16), min_size=1, max_size=5))
def test_valid_files_roundtrip(tmp_path, tensors):
    """Files written by safetensors itself read back equal."""
    from safetensors.torch import save_file

    values = {k: torch.arange(n, dtype=torch.float32) * 0.5 for k, n in tensors.items()}
    path = str(tmp_path / "ok.safetensors")
    save_file(values, path)
    with SafetensorsHandle(path) as f:
        assert sorted(f.keys()) == sorted(values)
        for k, v in values.items():
            assert torch.equal(f.get_tensor(k), v)
