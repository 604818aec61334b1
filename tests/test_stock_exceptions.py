"""Where stock ``from_pretrained`` raises, hf_fastload raises an instance of the class stock raises, on the same input.

Stock is the oracle: every case of the bad-input catalogue (``tests/bad_inputs.py``, the damages of
``tests/test_bad_input.py``) is loaded by stock and by the fast path, and ``isinstance(fast_error, type(stock_error))``
must hold on the installed transformers line. The cases where stock returns a model and we raise by design are listed
in the catalogue with the lines and the reason, and checked as such. ``tests/test_faults.py`` injects its faults into
hf_fastload's own functions, which stock does not run: there stock does not fail, and the contract is that the
original exception reaches the caller with its type.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import bad_inputs
import pytest
import torch
import transformers
from bad_inputs import CASES, fresh, weights
from safetensors import SafetensorError, safe_open

import hf_fastload
from hf_fastload import errors
from hf_fastload.engine.handle import SafetensorsHandle
from hf_fastload.integration.compat import TRANSFORMERS_V5

LINE = "5" if TRANSFORMERS_V5 else "4.57"
LLAMA = transformers.LlamaForCausalLM


def _raised(load) -> BaseException | None:
    try:
        load()
    except Exception as e:
        return e
    return None


def _classes(error: BaseException) -> str:
    return " < ".join(c.__qualname__ for c in type(error).__mro__[:-2])


def assert_same_class(stock: BaseException | None, fast: BaseException | None, what: str = "") -> None:
    assert stock is not None, f"stock loaded {what}: this is not a case where stock raises"
    assert fast is not None, f"the fast path loaded {what}, stock raised {stock!r}"
    assert isinstance(fast, type(stock)), (
        f"{what}: stock raised {type(stock).__module__}.{type(stock).__qualname__}: {str(stock)[:300]}\n"
        f"ours is not one: {_classes(fast)}: {str(fast)[:300]}"
    )


@pytest.mark.parametrize("case", CASES.values(), ids=CASES)
def test_catalogue_raises_what_stock_raises(tmp_path, case):
    folder = fresh(tmp_path, case)
    case.damage(folder)
    stock = _raised(lambda: LLAMA.from_pretrained(folder))
    fast = _raised(lambda: hf_fastload.fast_from_pretrained(folder, model_class=LLAMA))
    if LINE in case.stock_loads:  # stricter than stock by design; the README lists these with the reason
        assert stock is None, f"stock raises {stock!r} now: compare the classes instead ({case.why})"
        assert isinstance(fast, hf_fastload.FastLoadError), fast
    else:
        assert_same_class(stock, fast, case.name)


_PERMISSION_DENIED = r"""
import ctypes, json, os, sys

if os.geteuid() == 0:  # root reads a mode-000 file anyway: drop the capabilities that let it (for every thread)
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(header), data) == 0:
        for d in data:  # CAP_DAC_OVERRIDE (1) and CAP_DAC_READ_SEARCH (2)
            d.effective &= ~0b110
            d.permitted &= ~0b110
        libc.capset(ctypes.byref(header), data)
folder = sys.argv[1]
try:
    open(os.path.join(folder, "model.safetensors"), "rb")
    print(json.dumps({"skip": "the file stays readable (no way to drop the privilege here)"}))
    sys.exit(0)
except PermissionError:
    pass
import transformers
import hf_fastload

def raised(load):
    try:
        load()
    except Exception as e:
        return e

stock = raised(lambda: transformers.LlamaForCausalLM.from_pretrained(folder))
fast = raised(lambda: hf_fastload.fast_from_pretrained(folder, model_class=transformers.LlamaForCausalLM))
print(json.dumps({"stock": repr(stock), "fast": repr(fast), "same": isinstance(fast, type(stock)) if stock else None,
                  "fast_classes": [c.__name__ for c in type(fast).__mro__]}))
"""


def test_permission_denied_raises_what_stock_raises(tmp_path):
    """A weights file this process may not read: stock's safetensors says FileNotFoundError; so do we (in a child
    process that gives up root's right to read any file)."""
    folder = fresh(tmp_path, bad_inputs.Case(bad_inputs.unknown_dtype))
    os.chmod(weights(folder), 0)
    try:
        proc = subprocess.run([sys.executable, "-c", _PERMISSION_DENIED, folder], capture_output=True, text=True,
                              timeout=300)  # fmt: skip
    finally:
        os.chmod(weights(folder), 0o644)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    assert result["same"], result
    assert "CheckpointNotFoundError" in result["fast_classes"] and "Permission denied" in result["fast"], result


# --- the reader on its own: what safe_open raises -----------------------------------------------------------------

_FILE_CASES = [case for case in CASES.values() if not case.sharded and case.damage is not bad_inputs.no_weights_at_all]


@pytest.mark.parametrize("case", _FILE_CASES, ids=[case.name for case in _FILE_CASES])
def test_reader_raises_what_safe_open_raises(tmp_path, case):
    """``SafetensorsHandle`` stands in for ``safe_open``: where safe_open refuses a file, it raises the same class."""
    folder = fresh(tmp_path, case)
    case.damage(folder)
    path = weights(folder)
    stock = _raised(lambda: safe_open(path, framework="pt").__enter__().keys())
    fast = _raised(lambda: SafetensorsHandle(path).close())
    if stock is None:  # ours reads it too, unless a stricter rule of the README's list refuses it
        assert fast is None or isinstance(fast, hf_fastload.DuplicateTensorError), fast
    else:
        assert_same_class(stock, fast, case.name)


def test_reader_lookups_raise_what_safe_open_raises(tmp_path, checkpoints):
    path = weights(checkpoints("llama"))
    with safe_open(path, framework="pt") as f:
        stock = _raised(lambda: f.get_slice("nope"))
    with SafetensorsHandle(path) as f:
        assert_same_class(stock, _raised(lambda: f.get_slice("nope")), "a tensor name the file lacks")
        assert_same_class(stock, _raised(lambda: f.get_tensor("nope")), "a tensor name the file lacks")
    absent = str(tmp_path / "absent.safetensors")
    assert_same_class(_raised(lambda: safe_open(absent, framework="pt")), _raised(lambda: SafetensorsHandle(absent)))


# --- checkpoint shapes that disagree with the config: transformers' own mismatched-shape tests, in small ---------


def _arch_configs() -> dict:
    t = transformers
    small = dict(vocab_size=96, max_position_embeddings=64)
    decoder = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, **small)  # fmt: skip
    return {
        "llama": t.LlamaConfig(**decoder),
        "qwen2": t.Qwen2Config(**decoder),
        "mixtral": t.MixtralConfig(**decoder, num_local_experts=2, num_experts_per_tok=1),
        "gpt2": t.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64),
        "bert": t.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             **small),
        "t5": t.T5Config(d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=8, vocab_size=96,
                         decoder_start_token_id=0),
    }  # fmt: skip


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


def _same_weights(stock, stock_again, fast) -> None:
    """Same class, keys, dtypes and shapes, and the same bits wherever stock determines them: 4.57 leaves T5's
    re-initialized shared embedding uninitialized (two stock loads with one seed differ there), so those are not
    compared."""
    assert type(stock) is type(fast)
    a, again, b = stock.state_dict(), stock_again.state_dict(), fast.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        if torch.equal(_bits(a[key]), _bits(again[key])):
            assert torch.equal(_bits(a[key]), _bits(b[key])), key


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "mixtral", "qwen2", "t5"])
def test_mismatched_shapes_raise_and_load_as_stock(tmp_path, arch):
    """transformers' ``test_load_with_mismatched_shapes`` and ``test_can_load_ignoring_mismatched_shapes`` for a
    sequence-classification model, each load run by stock and under the opt-in: where stock raises (a RuntimeError),
    ours is an instance of stock's class and names the tensor; with ``ignore_mismatched_sizes=True`` both load the
    same model, on the fast path."""
    config = _arch_configs()[arch]
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(config)
    cls = type(model)
    model.save_pretrained(tmp_path)
    base = transformers.AutoConfig.from_pretrained(tmp_path)
    base.get_text_config().vocab_size = 10
    head, body = transformers.AutoModelForSequenceClassification, transformers.AutoModel
    loads = {
        "auto class, num_labels=42": lambda: head.from_pretrained(tmp_path, num_labels=42),
        "AutoModel, vocab_size=10": lambda: body.from_pretrained(tmp_path, config=base),
        "concrete class, num_labels=42": lambda: cls.from_pretrained(tmp_path, num_labels=42),
    }
    for what, load in loads.items():
        stock = _raised(load)
        with hf_fastload.enabled():
            fast = _raised(load)
        assert isinstance(stock, RuntimeError), f"{what}: {stock!r}"
        assert_same_class(stock, fast, what)
        assert isinstance(fast, hf_fastload.ShapeMismatchError), f"{what}: {fast!r}"
        assert "ignore_mismatched_sizes=True" in str(fast) and "the model expects" in str(fast), str(fast)

    ignoring = {
        "auto class": lambda: head.from_pretrained(tmp_path, num_labels=42, ignore_mismatched_sizes=True),
        "AutoModel": lambda: body.from_pretrained(tmp_path, config=base, ignore_mismatched_sizes=True),
    }
    for what, load in ignoring.items():
        stock = []
        for _ in range(2):
            torch.manual_seed(1234)  # the mismatched weights are initialized randomly: same seed, same values
            stock.append(load())
        torch.manual_seed(1234)
        with hf_fastload.enabled():
            fast = load()
        report = hf_fastload.last_report()
        assert report.path == "fast", (what, report.reason)
        assert report.mismatched_keys, what
        _same_weights(*stock, fast)
        if what == "auto class":
            assert fast.config.num_labels == 42


# --- the classes themselves ---------------------------------------------------------------------------------------


def test_error_classes_are_what_stock_raises_and_ours():
    e = errors
    stock_class = {
        e.InvalidSafetensorsError: (SafetensorError, ValueError, e.CheckpointContentError),
        e.TruncatedSafetensorsError: (SafetensorError, OSError, e.CheckpointFileError),
        e.DuplicateTensorError: (SafetensorError, RuntimeError, e.InvalidSafetensorsError),
        e.UnreadableTensorError: (SafetensorError, RuntimeError, e.InvalidSafetensorsError),
        e.CheckpointNotFoundError: (FileNotFoundError, e.CheckpointFileError),
        e.ShapeMismatchError: (RuntimeError, e.CheckpointContentError),
        e.CheckpointIndexError: (ValueError, e.CheckpointContentError),
        e.FallbackRequiredError: (RuntimeError,),
        e.VerificationError: (RuntimeError,),
    }
    assert set(stock_class) | {e.FastLoadError, e.CheckpointFileError, e.CheckpointContentError} == {
        getattr(e, name) for name in e.__all__
    }
    for cls, bases in stock_class.items():
        error = cls("what went wrong, and the fix")
        assert isinstance(error, (e.FastLoadError, *bases)) and all(isinstance(error, b) for b in bases), cls
        assert str(error) == "what went wrong, and the fix"
        again = pickle.loads(pickle.dumps(error))  # crosses process boundaries (multiprocessing, torchrun)
        assert type(again) is cls and str(again) == str(error)
        assert getattr(hf_fastload, cls.__name__) is cls
    try:
        json.loads("{'weight_map': ")
    except json.JSONDecodeError as parse:
        error = e.CheckpointIndexError.matching("invalid safetensors index I: ...", parse)
    assert isinstance(error, json.JSONDecodeError) and isinstance(error, e.CheckpointIndexError)
    assert (error.lineno, error.colno, str(error)) == (1, 2, "invalid safetensors index I: ...")
    assert type(error).__name__ == "CheckpointIndexError"
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error) and str(again) == str(error)
    key = e.CheckpointIndexError.matching("no weight_map", KeyError("weight_map"))
    assert isinstance(key, KeyError) and str(key) == "no weight_map"  # not KeyError's repr of the message


# --- the catalogue covers every bad input of test_bad_input.py ----------------------------------------------------

# every test of tests/test_bad_input.py: the catalogue cases it covers, or why none
BAD_INPUT_TESTS = {
    "test_truncated_in_data": ["truncated_in_data"],
    "test_truncated_inside_header": ["truncated_inside_header"],
    "test_header_length_past_end": ["header_length_past_end"],
    "test_garbage_header": ["garbage_header"],
    "test_non_utf8_header": ["non_utf8_header"],
    "test_unknown_dtype": ["unknown_dtype"],
    "test_offsets_out_of_range": ["offsets_out_of_range"],
    "test_overlapping_offsets": ["overlapping_offsets"],
    "test_byte_length_disagrees_with_shape": ["byte_length_disagrees_with_shape"],
    "test_bad_shapes": ["negative_shape", "fractional_shape", "shape_not_a_list"],
    "test_empty_file": ["empty_file"],
    "test_shard_named_in_index_is_missing": ["shard_named_in_index_is_missing"],
    "test_shape_disagrees_with_config": ["shape_disagrees_with_config"],
    "test_reader_alone": "the reader on its own: test_reader_lookups_raise_what_safe_open_raises",
    "test_next_load_succeeds_after_a_failure": "not a bad input",
    "test_duplicate_tensor_name_with_different_entries": [
        "duplicate_name_different_entries",
        "duplicate_name_first_entry_differs",
    ],
    "test_duplicate_tensor_name_with_identical_entries_loads": "loads, as with stock",
    "test_header_order_differs_from_data_order": "loads, as with stock",
    "test_offsets_end_before_begin": ["offsets_end_before_begin"],
    "test_header_is_not_an_object": ["header_is_not_an_object"],
    "test_metadata_not_strings": [
        "metadata_not_strings", "metadata_value_is_a_number", "metadata_is_a_list", "metadata_is_a_string",
    ],
    "test_metadata_null_loads": "loads, as with stock",
    "test_weight_torch_cannot_hold": ["weight_of_a_dtype_torch_lacks", "weight_f4_with_an_odd_last_dimension"],
    "test_unexpected_key_torch_cannot_hold": "stock loads on 5.x (never reads it), raises on 4.57: the test compares",
    "test_trailing_bytes_after_the_data": ["trailing_bytes_after_the_data"],
    "test_entry_removed_from_the_header_leaves_a_hole": ["entry_removed_leaves_a_hole"],
    "test_tensor_in_index_absent_from_its_shard": ["tensor_in_index_absent_from_its_shard"],
    "test_shard_name_leaves_the_folder": ["shard_name_leaves_the_folder"],
    "test_index_is_not_json": ["index_is_not_json"],
    "test_index_unusable": ["index_without_weight_map", "index_not_utf8", "index_shard_name_not_a_string"],
    "test_shard_the_index_does_not_name_warns_and_loads": "loads, as with stock",
    "test_no_weights_at_all": ["no_weights_at_all"],
    "test_symlink_loop": ["symlink_loop"],
    "test_dangling_symlink": ["dangling_symlink"],
    "test_weights_name_is_a_directory": ["weights_name_is_a_directory"],
    "test_permission_denied": "test_permission_denied_raises_what_stock_raises",
    "test_truncated_by_another_process_during_the_load": "stock's mapped read of a file cut under it is a SIGBUS that "
    "kills the process: no exception class to compare",
}


def test_catalogue_covers_every_bad_input():
    """A new test in test_bad_input.py gets its damage in bad_inputs.py and a line here."""
    import test_bad_input

    tests = {name for name in dir(test_bad_input) if name.startswith("test_")}
    assert tests == set(BAD_INPUT_TESTS), (
        f"unlisted: {sorted(tests - set(BAD_INPUT_TESTS))}, gone: {sorted(set(BAD_INPUT_TESTS) - tests)}"
    )
    covered = {name for cases in BAD_INPUT_TESTS.values() if isinstance(cases, list) for name in cases}
    assert covered == set(CASES), f"cases without a test: {sorted(set(CASES) - covered)}"
