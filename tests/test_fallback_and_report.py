"""Fallbacks say why (or raise in strict mode); the report records what a load did; import stays cheap."""

from __future__ import annotations

import json
import os
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
