"""from_pretrained's arguments keep their meaning: hub ids from the local cache, key_mapping, torch_dtype, ..."""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from equivalence import assert_same_model
from models import build_checkpoint, hub_cache
from safetensors.torch import load_file, save_file

import hf_fastload


def _both(path, cls, **kwargs):
    stock, si = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    fast, fi = hf_fastload.fast_from_pretrained(path, model_class=cls, output_loading_info=True, **kwargs)
    assert hf_fastload.last_report().path == "fast", hf_fastload.last_report().reason
    assert_same_model(stock, fast, si, fi)
    return fast


def test_hub_id_from_local_cache(tmp_path, monkeypatch):
    """A hub id already in the HF cache loads offline, through the fast path."""
    folder = build_checkpoint("llama", str(tmp_path / "src"), torch.bfloat16)
    cache = tmp_path / "hub"
    hub_cache(cache, "tiny-org/tiny-llama", folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    stock = transformers.LlamaForCausalLM.from_pretrained("tiny-org/tiny-llama", cache_dir=str(cache))
    fast = hf_fastload.fast_from_pretrained("tiny-org/tiny-llama", cache_dir=str(cache))
    assert_same_model(stock, fast)
    report = hf_fastload.last_report()
    assert report.path == "fast" and report.files[0].startswith(str(cache))


def test_torch_dtype_alias(checkpoints):
    path = checkpoints("llama", torch.bfloat16)
    fast = _both(path, transformers.LlamaForCausalLM, torch_dtype=torch.float32)
    assert fast.dtype == torch.float32


def test_key_mapping(tmp_path):
    folder = build_checkpoint("llama", str(tmp_path / "m"), torch.float32)
    weights = os.path.join(folder, "model.safetensors")
    renamed = {k.replace(".mlp.", ".ffn."): v for k, v in load_file(weights).items()}
    save_file(renamed, weights, metadata={"format": "pt"})
    _both(folder, transformers.LlamaForCausalLM, key_mapping={r"\.ffn\.": ".mlp."})


def test_attn_implementation_and_config_overrides(checkpoints):
    path = checkpoints("qwen2", torch.float16, True)
    fast = _both(path, transformers.Qwen2ForCausalLM, attn_implementation="eager", dtype="auto")
    assert fast.config._attn_implementation == "eager"


def test_subfolder(tmp_path):
    build_checkpoint("gpt2", str(tmp_path / "repo" / "weights"), torch.bfloat16)
    stock = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "repo"), subfolder="weights")
    fast = hf_fastload.fast_from_pretrained(str(tmp_path / "repo"), subfolder="weights")
    assert_same_model(stock, fast)
    assert hf_fastload.last_report().path == "fast"


@pytest.mark.parametrize("ckpt_dtype", [torch.bfloat16, torch.float32])
def test_saved_model_roundtrip(checkpoints, tmp_path, ckpt_dtype):
    """A fast-loaded model saves like a stock one (every tensor owns its storage; ties are the real ones)."""
    path = checkpoints("gemma", ckpt_dtype)
    model = hf_fastload.fast_from_pretrained(path, dtype=torch.float32)
    model.save_pretrained(tmp_path / "out")
    again = transformers.GemmaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert_same_model(model, again)
