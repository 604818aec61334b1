"""Property tests of the reader: any bytes either load correctly or raise hf_fastload's error; never a crash, a
hang or a huge allocation. ``HF_FASTLOAD_FUZZ_EXAMPLES`` raises the example count for a longer run."""

from __future__ import annotations

import glob
import json
import os
import shutil
import struct
from collections import Counter

import pytest
import torch
from equivalence import assert_same_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import build_checkpoint
from mutations import damaged_files, from_file, valid_files

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


# --- differential: safetensors decides what a valid file is ---------------------------------------------------------

# The one rule on which hf_fastload is stricter than safetensors (README, "Stricter than safetensors"): a tensor named
# twice with different entries, which safetensors resolves silently by taking the last.
STRICTER = ("listed twice in the header with different entries",)
OUTCOMES: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report_outcomes():
    """With ``HF_FASTLOAD_FUZZ_STATS=path``, appends this module's outcome counts to ``path`` as one JSON line."""
    OUTCOMES.clear()
    yield
    path = os.environ.get("HF_FASTLOAD_FUZZ_STATS")
    if path:
        import transformers

        with open(path, "a") as fh:
            fh.write(json.dumps({"transformers": transformers.__version__, **OUTCOMES}) + "\n")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _read_with_safetensors(path: str):
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    except Exception as e:  # SafetensorError; torch's own error for a shape it cannot build
        return e


def _read_with_ours(path: str, io: str):
    try:
        with SafetensorsHandle(path, io=io) as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    except FastLoadError as e:  # anything else is a bug, and fails the test
        return e


def _differential(tmp_path, blob: bytes, io: str = "mmap", applied: tuple = ()) -> str:
    """Reads ``blob`` with safetensors and with our reader: both refuse, or both read the same tensors and metadata
    with the same bytes, or we refuse by a listed stricter rule. Returns which."""
    path = str(tmp_path / f"d{sum(OUTCOMES.values())}.safetensors")
    with open(path, "wb") as fh:
        fh.write(blob)
    try:
        theirs, ours = _read_with_safetensors(path), _read_with_ours(path, io)
    finally:
        os.remove(path)
    where = f"{list(applied)}: {blob[:600]!r}"
    if isinstance(theirs, Exception):
        assert isinstance(ours, Exception), f"safetensors refuses ({theirs}) but hf_fastload reads {where}"
        outcome = "refused by both"
    elif isinstance(ours, Exception):
        assert any(rule in str(ours) for rule in STRICTER), f"safetensors reads, hf_fastload refuses ({ours}) {where}"
        outcome = "refused by hf_fastload only (listed stricter rule)"
    else:
        (ref, ref_meta), (got, got_meta) = theirs, ours
        assert got_meta == ref_meta and sorted(got) == sorted(ref), where
        for name, t in ref.items():
            assert (got[name].dtype, got[name].shape) == (t.dtype, t.shape), (name, where)
            assert torch.equal(_bits(got[name]), _bits(t)), (name, where)
        outcome = "read by both, same bytes"
    OUTCOMES[outcome] += 1
    OUTCOMES[f"{'mutated' if applied else 'valid'}: {outcome}"] += 1
    return outcome


# One file per rule of safetensors' reader (0.8, ``read_metadata`` and ``validate`` in safetensors/src/tensor.rs, and
# serde_json, its JSON parser), as (header, data): the expected outcome is safetensors' own, read at test time.
def _e(name: str, dtype: str = "F32", shape: str = "[1]", offsets: str = "[0,4]", extra: str = "") -> str:
    """One header entry as JSON text, written by hand so that any token can be odd."""
    return f'"{name}":{{"dtype":"{dtype}","shape":{shape},"data_offsets":{offsets}{extra}}}'


T = _e("t")
DEEP = ',"x":' + "[" * 125 + "]" * 125  # with the header object and the entry: 127 levels
RULES = {
    "valid": ("{" + T + "}", 4),
    "no tensors": ("{}", 0),
    "only metadata": ('{"__metadata__":{"a":"b"}}', 0),
    "trailing byte": ("{" + T + "}", 5),
    "trailing byte, no tensors": ("{}", 1),
    "hole at the start": ("{" + _e("t", offsets="[4,8]") + "}", 8),
    "hole between": ("{" + T + "," + _e("u", offsets="[8,12]") + "}", 12),
    "overlap": ("{" + T + "," + _e("u", offsets="[2,6]") + "}", 6),
    "zero-size inside another": ("{" + T + "," + _e("z", shape="[0]", offsets="[2,2]") + "}", 4),
    "zero-size at both ends": (
        "{" + ",".join([_e("a", shape="[0]", offsets="[0,0]"), T, _e("z", shape="[0]", offsets="[4,4]")]) + "}",
        4,
    ),
    "zero-size past the end": ("{" + _e("z", shape="[0]", offsets="[4,4]") + "}", 0),
    "entries not in data order": ("{" + _e("b", offsets="[4,8]") + "," + _e("a") + "}", 8),
    "metadata null": ('{"__metadata__":null,' + T + "}", 4),
    "metadata empty": ('{"__metadata__":{},' + T + "}", 4),
    "metadata a list": ('{"__metadata__":[],' + T + "}", 4),
    "metadata a string": ('{"__metadata__":"x",' + T + "}", 4),
    "metadata nested": ('{"__metadata__":{"a":{"b":"c"}},' + T + "}", 4),
    "metadata value a number": ('{"__metadata__":{"a":1},' + T + "}", 4),
    "metadata value null": ('{"__metadata__":{"a":null},' + T + "}", 4),
    "metadata given twice": ('{"__metadata__":{},"__metadata__":{},' + T + "}", 4),
    "metadata key given twice": ('{"__metadata__":{"a":"1","a":"2"},' + T + "}", 4),
    "metadata key twice, first not a string": ('{"__metadata__":{"a":1,"a":"2"},' + T + "}", 4),
    "tensor listed twice, same entry": ("{" + T + "," + T + "}", 4),
    "tensor listed twice, other entry": ("{" + T + "," + _e("t", dtype="I32") + "}", 4),
    "tensor listed twice, first [1.0]": ("{" + _e("t", shape="[1.0]") + "," + T + "}", 4),
    "tensor listed twice, first invalid": ("{" + _e("t", dtype="F42") + "," + T + "}", 4),
    "field given twice, same value": ("{" + _e("t", extra=',"dtype":"F32"') + "}", 4),
    "ignored field given twice": ("{" + _e("t", extra=',"x":1,"x":2') + "}", 4),
    "missing field": ('{"t":{"dtype":"F32","data_offsets":[0,4]}}', 4),
    "entry null": ('{"t":null}', 0),
    "entry as an array": ('{"t":["F32",[1],[0,4]]}', 4),
    "entry as an array of 4": ('{"t":["F32",[1],[0,4],1]}', 4),
    "dtype as a map": ('{"t":{"dtype":{"F32":null},"shape":[1],"data_offsets":[0,4]}}', 4),
    "dtype as a map to a list": ('{"t":{"dtype":{"F32":[]},"shape":[1],"data_offsets":[0,4]}}', 4),
    "dtype lower case": ("{" + _e("t", dtype="f32") + "}", 4),
    "dtype F6 (no torch dtype)": ("{" + _e("t", dtype="F6_E2M3", shape="[4]", offsets="[0,3]") + "}", 3),
    "F4": ("{" + _e("t", dtype="F4", shape="[2,4]", offsets="[0,4]") + "}", 4),
    "F4, odd last dimension": ("{" + _e("t", dtype="F4", shape="[2,3]", offsets="[0,3]") + "}", 3),
    "F4, half a byte": ("{" + _e("t", dtype="F4", shape="[3]", offsets="[0,2]") + "}", 2),
    "scalar": ("{" + _e("t", shape="[]") + "}", 4),
    "shape overflows, then 0": ("{" + _e("t", shape="[4294967296,4294967296,0]", offsets="[0,0]") + "}", 0),
    "shape 0 first, no overflow": ("{" + _e("t", shape="[0,4294967296,4294967296]", offsets="[0,0]") + "}", 0),
    "bits overflow": ("{" + _e("t", shape="[4611686018427387904]", offsets="[0,0]") + "}", 0),
    "dimension 2^63": ("{" + _e("t", shape="[0,9223372036854775808]", offsets="[0,0]") + "}", 0),
    "dimension 2^64": ("{" + _e("t", shape="[18446744073709551616,0]", offsets="[0,0]") + "}", 0),
    "offsets end before begin": ("{" + _e("t", shape="[0]", offsets="[4,0]") + "}", 4),
    "-0 offset": ("{" + _e("t", offsets="[-0,4]") + "}", 4),
    "1.0 dimension": ("{" + _e("t", shape="[1.0]") + "}", 4),
    "NaN in an ignored field": ("{" + _e("t", extra=',"x":NaN') + "}", 4),
    "1e400 in an ignored field": ("{" + _e("t", extra=',"x":1e400') + "}", 4),
    "2^64 in an ignored field": ("{" + _e("t", extra=',"x":18446744073709551616') + "}", 4),
    "310-digit integer in an ignored field": ("{" + _e("t", extra=',"x":1' + "0" * 309) + "}", 4),
    "lone surrogate in a name": ("{" + _e("\\udc00") + "}", 4),
    "surrogate pair in a name": ("{" + _e("\\ud83d\\ude00") + "}", 4),
    "nested 127 levels": ("{" + _e("t", extra=DEEP) + "}", 4),
    "nested 128 levels": ("{" + _e("t", extra=DEEP.replace("[", "[[", 1).replace("]", "]]", 1)) + "}", 4),
    "nested 5000 levels": ("{" + _e("t", extra=',"x":' + "[" * 5000 + "]" * 5000) + "}", 4),
    "whitespace around": (" \t\n\r{" + T + "}\r\n\t ", 4),
    "NUL padding": ("{" + T + "}\x00", 4),
    "byte order mark": ("\ufeff{" + T + "}", 4),
    "header not an object": ("[]", 0),
}


@pytest.mark.parametrize("rule", RULES)
def test_each_rule_of_safetensors(tmp_path, rule):
    header, size = RULES[rule]
    text = header.encode()
    _differential(tmp_path, struct.pack("<Q", len(text)) + text + bytes(range(size)), applied=(rule,))


PREFIXES = [b"", b"\x00" * 7, struct.pack("<Q", 100_000_001) + b"{}", struct.pack("<Q", 10) + b"{}"]


@pytest.mark.parametrize("prefix", PREFIXES, ids=["empty", "7 bytes", "header over 100 MB", "header past the end"])
def test_length_prefix_rules(tmp_path, prefix):
    """Shorter than the 8-byte prefix, a header over 100 MB, a header longer than the file."""
    _differential(tmp_path, prefix, applied=("prefix",))


@FUZZ
@given(draft=valid_files(), io=st.sampled_from(["mmap", "pread"]))
def test_valid_files_read_as_safetensors_reads_them(tmp_path, draft, io):
    """Files laid out as any safetensors version writes them (padding, data order, header order, every dtype)."""
    assert _differential(tmp_path, draft.bytes(), io) == "read by both, same bytes"


@settings(max_examples=EXAMPLES * 4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(draft=damaged_files(), io=st.sampled_from(["mmap", "pread"]))
def test_damaged_files_refused_exactly_when_safetensors_refuses(tmp_path, draft, io):
    """Trailing bytes, holes, metadata of every JSON type, shifted offsets, header lengths, truncations, dtypes,
    shapes, repeated keys, whitespace, ignored fields, JSON that only Python reads: we read exactly what safetensors
    reads (but for the listed stricter rule), and the same bytes."""
    _differential(tmp_path, draft.bytes(), io, draft.applied)


WRITTEN_BY = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "data", "written_by", "*", "*.safetensors")))


@pytest.mark.parametrize("path", WRITTEN_BY, ids=lambda p: "/".join(p.split(os.sep)[-2:]))
def test_files_written_by_every_safetensors_version(tmp_path, path):
    """Files written by safetensors 0.2.8 to 0.7.0 (``tests/data/written_by/write.py``; 0.2 did not pad the header,
    0.3.0 padded it by ``len % 8`` spaces) read as the installed safetensors reads them."""
    with open(path, "rb") as fh:
        draft = from_file(fh.read())
    assert _differential(tmp_path, draft.bytes()) == "read by both, same bytes"


# --- the same at the model level: stock from_pretrained is the oracle ------------------------------------------------

MODEL_EXAMPLES = int(os.environ.get("HF_FASTLOAD_FUZZ_MODEL_EXAMPLES", max(12, EXAMPLES // 10)))


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    return build_checkpoint("llama", str(tmp_path_factory.mktemp("fuzz") / "llama"), torch.float32)


def _load_or_error(load):
    torch.manual_seed(0)  # a weight missing from the checkpoint is initialized randomly: same seed, same values
    try:
        return load()
    except Exception as e:
        return e


@settings(max_examples=MODEL_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_checkpoints_fail_where_stock_fails(tmp_path_factory, llama_checkpoint, data):
    """A saved Llama whose ``model.safetensors`` is damaged one to three ways: where stock ``from_pretrained`` raises,
    the fast path raises (hf_fastload's own error where safetensors refused the file); where stock loads, the fast
    path loads an equal model (but for the listed stricter rule)."""
    import transformers

    from hf_fastload import fast_from_pretrained

    folder = str(tmp_path_factory.mktemp("damaged") / "llama")
    shutil.copytree(llama_checkpoint, folder)
    weights = os.path.join(folder, "model.safetensors")
    with open(weights, "rb") as fh:
        draft = data.draw(damaged_files(from_file(fh.read())))
    with open(weights, "wb") as fh:
        fh.write(draft.bytes())
    cls = transformers.LlamaForCausalLM
    refused = isinstance(_read_with_safetensors(weights), Exception)
    stock = _load_or_error(lambda: cls.from_pretrained(folder))
    fast = _load_or_error(lambda: fast_from_pretrained(folder, model_class=cls))
    where = f"{draft.applied}: {draft.bytes()[:300]!r}"
    if isinstance(stock, Exception):
        assert isinstance(fast, Exception), f"stock raised {stock!r}, the fast path returned a model: {where}"
        if refused:
            assert isinstance(fast, FastLoadError) and weights in str(fast), (fast, where)
        outcome = "stock raised (safetensors refused the file)" if refused else "stock raised (other reason)"
        OUTCOMES[f"model: {outcome}, fast raised"] += 1
    elif isinstance(fast, Exception):
        assert any(rule in str(fast) for rule in STRICTER), f"stock loaded, the fast path raised {fast!r}: {where}"
        OUTCOMES["model: stock loaded, fast refused (listed stricter rule)"] += 1
    else:
        assert_same_model(stock, fast)
        OUTCOMES["model: both loaded, same model"] += 1
    shutil.rmtree(os.path.dirname(folder))
