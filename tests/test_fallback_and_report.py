"""Fallbacks say why (or raise in strict mode); the report records what a load did; import stays cheap."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch
import transformers
from equivalence import assert_same_model
from models import build_checkpoint

import hf_fastload
from hf_fastload import FallbackRequiredError, VerificationError
from hf_fastload.integration import compat
from hf_fastload.integration.checks import verify


def test_pickle_only_checkpoint_falls_back(tmp_path):
    folder = build_checkpoint("gpt2", str(tmp_path / "m"), torch.float32, safetensors=False)
    stock = transformers.GPT2LMHeadModel.from_pretrained(folder)
    fast = hf_fastload.fast_from_pretrained(folder)
    assert_same_model(stock, fast)
    report = hf_fastload.last_report()
    assert report.path == "fallback" and "safetensors" in report.reason
    with pytest.raises(FallbackRequiredError, match="strict"):
        hf_fastload.fast_from_pretrained(folder, strict=True)


def test_strict_env(tmp_path, monkeypatch):
    folder = build_checkpoint("gpt2", str(tmp_path / "m"), torch.float32, safetensors=False)
    monkeypatch.setenv("HF_FASTLOAD_STRICT", "1")
    with pytest.raises(FallbackRequiredError):
        hf_fastload.fast_from_pretrained(folder)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"use_safetensors": False}, "use_safetensors"),
        ({"gguf_file": "x.gguf"}, "GGUF"),
        ({"device_mesh": object()}, "device_mesh without tp_plan"),
        ({"device_map": {"": "disk"}}, "disk"),
    ],
)
def test_unsupported_arguments_are_named(checkpoints, kwargs, fragment):
    path = checkpoints("llama", torch.float32)
    with pytest.raises(FallbackRequiredError, match=fragment):
        hf_fastload.fast_from_pretrained(path, strict=True, **kwargs)


def test_quantized_config_falls_back(tmp_path):
    folder = build_checkpoint("llama", str(tmp_path / "m"), torch.float32)
    with open(os.path.join(folder, "config.json")) as fh:
        config = json.load(fh)
    config["quantization_config"] = {"quant_method": "hqq", "nbits": 4}  # bitsandbytes: tests/test_quantized.py
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(config, fh)
    with pytest.raises(FallbackRequiredError, match="quantized model .quant_method='hqq'"):
        hf_fastload.fast_from_pretrained(folder, strict=True)
    # a concrete class (what the opt-in routes), alone or with the config object an Auto class passes it
    cls = transformers.LlamaForCausalLM
    loaded = transformers.AutoConfig.from_pretrained(folder)
    for kwargs in ({}, {"config": loaded}, {"config": folder}):
        with pytest.raises(FallbackRequiredError, match="quantiz"):
            hf_fastload.fast_from_pretrained(folder, model_class=cls, strict=True, **kwargs)


# Keyword arguments that transformers itself passes to from_pretrained (the Auto classes to the concrete class, with
# and without peft installed; pipelines; 4.57 and 5.x), and arguments each version drops unread: none of them is a
# reason to fall back. Logged under HF_FASTLOAD=1 with tiny models of each Auto class.
_NOT_FALLBACKS = [
    {"adapter_kwargs": None}, {"adapter_kwargs": {}}, {"adapter_kwargs": {"revision": None}},
    {"adapter_kwargs": {"revision": "main"}}, {"adapter_kwargs": {"token": "t"}},
    {"adapter_kwargs": {"token": "t", "revision": None}}, {"adapter_name": "default"},
    {"trust_remote_code": None}, {"trust_remote_code": False}, {"code_revision": None}, {"_from_auto": True},
    {"_from_pipeline": "text-generation"}, {"_commit_hash": None}, {"revision": None}, {"revision": "main"},
    {"token": None}, {"token": "t"}, {"local_files_only": False}, {"local_files_only": True}, {"cache_dir": None},
    {"force_download": False}, {"proxies": None}, {"subfolder": ""}, {"key_mapping": None},
    {"attn_implementation": "eager"}, {"attn_implementation": "sdpa"}, {"quantization_config": None},
    {"dtype": "auto"}, {"torch_dtype": "auto"}, {"device_map": None}, {"device_map": "cpu"},
    {"device_map": {"": "cpu"}}, {"use_safetensors": None}, {"use_safetensors": True}, {"gguf_file": None},
    {"from_tf": False}, {"state_dict": None},
    {"offload_folder": None}, {"offload_state_dict": False}, {"offload_state_dict": True}, {"offload_buffers": False},
    {"offload_folder": "unused", "device_map": "cpu"}, {"offload_folder": "unused"}, {"tp_plan": None},
    {"tp_size": None}, {"device_mesh": None}, {"distributed_config": None}, {"variant": None},
    {"low_cpu_mem_usage": True}, {"output_loading_info": False}, {"ignore_mismatched_sizes": False},
    {"generation_config": None}, {"max_memory": None},
]  # fmt: skip


@pytest.mark.parametrize("kwargs", _NOT_FALLBACKS, ids=lambda kw: ",".join(f"{k}={v!r}" for k, v in kw.items()))
def test_what_transformers_passes_by_default_is_no_fallback(checkpoints, kwargs):
    from hf_fastload.integration.fallback import fallback_reason

    assert fallback_reason(checkpoints("llama"), kwargs, None) is None


def test_arguments_dropped_unread_load_fast_and_equal(checkpoints, tmp_path):
    """offload_state_dict (both lines), offload_folder without a computed device map, and from_tf on 5.x."""
    path = checkpoints("llama")
    kwargs = {"offload_state_dict": True, "offload_folder": str(tmp_path / "offload")}
    if compat.TRANSFORMERS_V5:
        kwargs["from_tf"] = True
    stock = transformers.LlamaForCausalLM.from_pretrained(path, **kwargs)
    fast = hf_fastload.fast_from_pretrained(path, strict=True, **kwargs)
    assert hf_fastload.last_report().path == "fast"
    assert_same_model(stock, fast)


def test_offload_folder_with_a_computed_device_map_falls_back(checkpoints, tmp_path):
    with pytest.raises(FallbackRequiredError, match="offload"):
        hf_fastload.fast_from_pretrained(checkpoints("llama"), strict=True, device_map="auto",
                                         offload_folder=str(tmp_path / "offload"))  # fmt: skip


def test_report_contents(checkpoints):
    path = checkpoints("llama", torch.bfloat16, True)
    hf_fastload.fast_from_pretrained(path, dtype=torch.float32)
    report = hf_fastload.last_report()
    d = report.to_dict()
    json.dumps(d)
    assert d["path"] == "fast" and d["reason"] is None
    assert d["bytes_read"] > 0 and d["tensors_loaded"] > 0 and len(d["files"]) > 1
    assert set(d["seconds"]) == {"resolve", "build", "read", "finalize", "total"}
    assert d["dtype"] == "torch.float32" and d["io"] in ("mmap", "pread")
    text = str(report)
    assert "path=fast" in text and "LlamaForCausalLM" in text


def test_tied_missing_key_is_reported_as_tied(checkpoints):
    path = checkpoints("gpt2", torch.float32)
    hf_fastload.fast_from_pretrained(path)
    missing = hf_fastload.last_report().missing_keys
    for how in missing.values():
        assert how.startswith("tied to") or how.endswith("_init_weights")


def test_last_report_is_per_thread(checkpoints):
    path = checkpoints("llama", torch.float32)
    hf_fastload.fast_from_pretrained(path)
    mine = hf_fastload.last_report()
    seen = {}
    thread = threading.Thread(target=lambda: seen.setdefault("r", hf_fastload.last_report()))
    thread.start()
    thread.join()
    assert seen["r"] is None and hf_fastload.last_report() is mine


def test_concurrent_loads(checkpoints):
    paths = [checkpoints("llama", torch.bfloat16, True), checkpoints("opt", torch.float16), checkpoints("t5")]
    classes = [transformers.LlamaForCausalLM, transformers.OPTForCausalLM, transformers.T5ForConditionalGeneration]
    results, errors = {}, []

    def work(i):
        try:
            model = hf_fastload.fast_from_pretrained(paths[i], model_class=classes[i], dtype=torch.float32)
            results[i] = (model, hf_fastload.last_report())
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, (model, report) in results.items():
        assert report.path == "fast" and report.source == paths[i]
        assert_same_model(classes[i].from_pretrained(paths[i], dtype=torch.float32), model)


def test_verify_rejects_meta_tensors():
    with torch.device("meta"):
        module = torch.nn.Linear(2, 2)
    with pytest.raises(VerificationError, match="meta"):
        verify(module, {}, None)


def test_public_names_match_the_lazy_table():
    assert set(hf_fastload.__all__) == {"__version__", *hf_fastload._EXPORTS}
    for name in hf_fastload.__all__:
        assert getattr(hf_fastload, name) is not None


def test_import_is_cheap():
    code = "import sys, hf_fastload; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_functions_import_nothing_heavy_until_called():
    """``from hf_fastload import ...`` of the functions a program calls later costs nothing until the call."""
    names = "fast_from_pretrained, enable, disable, enabled, inference_mode, training_mode, skip_init, last_report"
    heavy = "sorted(m for m in ('torch', 'transformers') if m in sys.modules)"
    code = f"import sys; from hf_fastload import {names}; print({heavy})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_checkpoint_whose_tensors_the_model_does_not_take_is_still_fast(checkpoints, tmp_path):
    """Every tensor of the file is an unexpected key (transformers' own test_model_weights_reload_no_missing_tied_
    weights makes such a file): the file was read through our reader, so the load is fast, not a fallback."""
    from safetensors.torch import save_file

    folder = shutil.copytree(checkpoints("llama"), tmp_path / "m")
    save_file({"unrelated.weight": torch.zeros(3)}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _, stock_info = transformers.LlamaForCausalLM.from_pretrained(folder, output_loading_info=True)
    _, fast_info = hf_fastload.fast_from_pretrained(folder, output_loading_info=True, strict=True)
    report = hf_fastload.last_report()
    assert (report.path, report.reason, report.unexpected_keys) == ("fast", None, ["unrelated.weight"])
    assert sorted(fast_info["missing_keys"]) == sorted(stock_info["missing_keys"])
