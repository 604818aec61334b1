"""The equivalence matrix: fast_from_pretrained against stock from_pretrained with the same arguments.

Every case must be bit-identical (keys, dtypes, devices, values, tying, buffers, training flag, logits, missing and
unexpected keys) and must have taken the fast path.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from equivalence import assert_same_model
from models import KINDS, model_class

import hf_fastload
from hf_fastload.integration import compat

CKPT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REQUESTS = [None, "auto", torch.bfloat16, torch.float32]


def load_both(path, cls, **kwargs):
    torch.manual_seed(1234)  # missing keys are initialized randomly: same seed, same values
    stock, stock_info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    torch.manual_seed(1234)
    fast, fast_info = hf_fastload.fast_from_pretrained(path, model_class=cls, output_loading_info=True, **kwargs)
    return stock, stock_info, fast, fast_info


def _id(v):
    return "none" if v is None else str(v).replace("torch.", "")


@pytest.mark.parametrize("request_dtype", REQUESTS, ids=_id)
@pytest.mark.parametrize("ckpt_dtype", CKPT_DTYPES, ids=_id)
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("kind", KINDS)
def test_matrix(checkpoints, kind, sharded, ckpt_dtype, request_dtype):
    path = checkpoints(kind, ckpt_dtype, sharded)
    kwargs = {} if request_dtype is None else {"dtype": request_dtype}
    stock, stock_info, fast, fast_info = load_both(path, model_class(kind), **kwargs)
    assert_same_model(stock, fast, stock_info, fast_info)
    report = hf_fastload.last_report()
    assert report.path == "fast", report.reason
    assert report.tensors_loaded > 0
    assert len(report.files) == (len(set(report.files)))
    if sharded:
        assert len(report.files) > 1


# The cached axis: converting loads (and, on 5.x, fp16 -> None, which keeps the stored dtype: "unused")
CACHED = [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, None)]


@pytest.mark.parametrize("ckpt_dtype, request_dtype", CACHED, ids=lambda v: _id(v))
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("kind", KINDS)
def test_matrix_cached(checkpoints, tmp_path, kind, sharded, ckpt_dtype, request_dtype):
    """With the converted-tensor cache: the load that writes it and the load mapped from it both equal stock."""
    from hf_fastload.engine.cache import wait_for_writes

    path = checkpoints(kind, ckpt_dtype, sharded)
    cls = model_class(kind)
    kwargs = {} if request_dtype is None else {"dtype": request_dtype}
    torch.manual_seed(1234)
    stock, stock_info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    statuses = []
    for _ in range(2):
        torch.manual_seed(1234)
        fast, fast_info = hf_fastload.fast_from_pretrained(
            path, model_class=cls, output_loading_info=True, fastload_cache=str(tmp_path), **kwargs
        )
        assert wait_for_writes(60)
        assert_same_model(stock, fast, stock_info, fast_info)
        report = hf_fastload.last_report()
        assert report.path == "fast", report.reason
        statuses.append(report.cache["status"])
    assert statuses in (["miss", "hit"], ["unused", "unused"]), report.cache
    if statuses[1] == "hit":
        assert report.zero_copy == report.tensors_loaded


@pytest.mark.parametrize("request_dtype", [None, torch.float32, torch.bfloat16], ids=_id)
def test_head_missing_from_checkpoint(checkpoints, request_dtype):
    """A BERT body checkpoint loaded with a sequence-classification head: the head is initialized as stock does."""
    path = checkpoints("bert", torch.float32)
    kwargs = {"num_labels": 3} | ({} if request_dtype is None else {"dtype": request_dtype})
    cls = transformers.BertForSequenceClassification
    stock, stock_info, fast, fast_info = load_both(path, cls, **kwargs)
    assert_same_model(stock, fast, stock_info, fast_info)
    report = hf_fastload.last_report()
    assert report.path == "fast"
    assert "classifier.weight" in report.missing_keys
    assert "_init_weights" in report.missing_keys["classifier.weight"]


def test_default_class_from_config(checkpoints):
    path = checkpoints("llama", torch.bfloat16)
    model = hf_fastload.fast_from_pretrained(path)
    assert type(model) is transformers.LlamaForCausalLM
    assert hf_fastload.last_report().model_class == "LlamaForCausalLM"


def test_auto_class(checkpoints):
    path = checkpoints("gpt2", torch.float16, True)
    stock, stock_info, fast, fast_info = load_both(path, transformers.AutoModelForCausalLM, dtype="auto")
    assert_same_model(stock, fast, stock_info, fast_info)
    assert hf_fastload.last_report().path == "fast"


@pytest.mark.parametrize("device_map", ["cpu", "auto", {"": "cpu"}], ids=["cpu", "auto", "dict"])
def test_device_map(checkpoints, device_map):
    path = checkpoints("llama", torch.bfloat16, True)
    stock, stock_info, fast, fast_info = load_both(
        path, transformers.LlamaForCausalLM, device_map=device_map, dtype=torch.float32
    )
    assert_same_model(stock, fast, stock_info, fast_info)
    assert hf_fastload.last_report().path == "fast"


@pytest.mark.parametrize("io", ["mmap", "pread"])
@pytest.mark.parametrize("request_dtype", [None, torch.float32], ids=_id)
def test_io_modes(checkpoints, monkeypatch, io, request_dtype):
    path = checkpoints("qwen2", torch.bfloat16, True)
    monkeypatch.setenv("HF_FASTLOAD_IO", io)
    kwargs = {} if request_dtype is None else {"dtype": request_dtype}
    stock, stock_info, fast, fast_info = load_both(path, transformers.Qwen2ForCausalLM, **kwargs)
    assert_same_model(stock, fast, stock_info, fast_info)
    report = hf_fastload.last_report()
    assert report.path == "fast" and report.io == io


@pytest.mark.skipif(not compat.HAS_DISABLE_MMAP, reason="disable_mmap is an argument of transformers >= 5.6")
def test_disable_mmap_reads_with_pread(checkpoints):
    path = checkpoints("llama", torch.bfloat16)
    stock, stock_info, fast, fast_info = load_both(
        path, transformers.LlamaForCausalLM, disable_mmap=True, dtype=torch.bfloat16
    )
    assert_same_model(stock, fast, stock_info, fast_info)
    report = hf_fastload.last_report()
    assert report.path == "fast" and report.io == "pread" and report.zero_copy == 0


def test_large_tensors_use_chunks(tmp_path):
    """Tensors larger than one read chunk are read and converted in parallel chunks, still bit-identical."""
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=40000)  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    from hf_fastload.engine import cpu

    old = cpu.CHUNK_BYTES
    cpu.CHUNK_BYTES = 1 << 16
    try:
        for kwargs in ({"dtype": torch.float32}, {"dtype": torch.float16}):
            stock, si, fast, fi = load_both(tmp_path, transformers.LlamaForCausalLM, **kwargs)
            assert_same_model(stock, fast, si, fi)
    finally:
        cpu.CHUNK_BYTES = old


def test_same_dtype_cpu_load_is_zero_copy(checkpoints):
    path = checkpoints("llama", torch.bfloat16)
    hf_fastload.fast_from_pretrained(path, dtype=torch.bfloat16)
    report = hf_fastload.last_report()
    assert report.zero_copy == report.tensors_loaded > 0


def test_writes_never_reach_the_file(checkpoints):
    path = checkpoints("llama", torch.float32)
    import hashlib
    import pathlib

    digest = hashlib.sha256(pathlib.Path(path, "model.safetensors").read_bytes()).hexdigest()
    model = hf_fastload.fast_from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    del model
    assert hashlib.sha256(pathlib.Path(path, "model.safetensors").read_bytes()).hexdigest() == digest
