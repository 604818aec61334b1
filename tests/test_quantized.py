"""Quantized models on the fast path: the checkpoint's bytes go through hf_fastload, transformers' quantizer makes
the quantized tensors, and the model is stock's, quantization state included.

bitsandbytes on the CPU (``device_map="cpu"``): 4-bit (fp4, nf4, nested) and 8-bit quantized on load, and the
checkpoints ``save_pretrained`` writes of them loaded again (pre-quantized). Methods not checked here fall back to
stock, with the reason in the report.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from equivalence import assert_same_model
from models import VOCAB

import hf_fastload
from hf_fastload import FallbackRequiredError

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the test extras: pip install -e '.[test]'")
from transformers import BitsAndBytesConfig  # noqa: E402

CONFIGS = {
    "4bit": dict(load_in_4bit=True),
    "4bit-nf4-nested": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16),
    "8bit": dict(load_in_8bit=True),
}  # fmt: skip


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    """A tiny bf16 Llama whose linear layers bitsandbytes' CPU kernels take (dimensions multiples of 128)."""
    folder = str(tmp_path_factory.mktemp("bnb") / "llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=64)  # fmt: skip
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8) if t.numel() else t


def _same_value(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), where
        assert torch.equal(_bits(a), _bits(b)), f"{where}: values differ"
    elif isinstance(a, dict):
        assert sorted(a) == sorted(b), where
        for k in a:
            _same_value(a[k], b[k], f"{where}.{k}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device, tuple, list)


def assert_same_quantization(stock, fast, before_forward: bool = True) -> None:
    """Every parameter's class and bnb attributes, ``quant_state`` of each ``Params4bit`` (absmax, shape, dtype,
    blocksize, quant_type, code, nested state), ``CB``/``SCB`` of each ``Int8Params``, the config. Call it before any
    forward pass: bitsandbytes repacks 4-bit weights for its CPU kernel on the first one."""
    params_s, params_f = dict(stock.named_parameters()), dict(fast.named_parameters())
    assert list(params_s) == list(params_f)
    quantized = 0
    for name, p in params_s.items():
        q = params_f[name]
        assert type(p) is type(q), name
        attrs = {k: v for k, v in vars(p).items() if isinstance(v, _PLAIN)}
        assert attrs == {k: v for k, v in vars(q).items() if isinstance(v, _PLAIN)}, name
        if getattr(p, "quant_state", None) is not None:
            quantized += 1
            _same_value(p.quant_state.as_dict(packed=False), q.quant_state.as_dict(packed=False), name)
            _same_value(p.quant_state.as_dict(packed=True), q.quant_state.as_dict(packed=True), name)
        for attr in ("CB", "SCB"):
            if getattr(p, attr, None) is not None:
                quantized += attr == "SCB"
                _same_value(getattr(p, attr), getattr(q, attr), f"{name}.{attr}")
    # (after a forward pass, bitsandbytes' CPU path keeps 8-bit statistics in the module's state instead)
    assert quantized > 0 or not before_forward, "no quantized parameter: the test would prove nothing"
    assert stock.config.to_dict() == fast.config.to_dict()
    for flag in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        assert getattr(stock, flag, None) == getattr(fast, flag, None), flag


def _check(stock, fast, quantization: str) -> None:
    report = hf_fastload.last_report()
    assert report.path == "fast" and report.reason is None
    assert report.quantization == quantization and report.tensors_loaded > 0
    assert_same_quantization(stock, fast)
    assert_same_model(stock, fast)  # includes the logits (a forward pass of each)
    assert_same_quantization(stock, fast, before_forward=False)  # and after it


@pytest.fixture(scope="module")
def saved(llama, tmp_path_factory) -> dict[str, str]:
    """The pre-quantized checkpoints: each quantized-on-load model, saved with save_pretrained."""
    out = {}
    for name, options in CONFIGS.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            llama, quantization_config=BitsAndBytesConfig(**options), device_map="cpu"
        )
        out[name] = str(tmp_path_factory.mktemp("bnb-saved") / name)
        model.save_pretrained(out[name])
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_quantized_on_load(llama, name, dtype):
    kwargs = {"quantization_config": BitsAndBytesConfig(**CONFIGS[name]), "device_map": "cpu"}
    if dtype is not None:
        kwargs["dtype"] = dtype
    stock = transformers.AutoModelForCausalLM.from_pretrained(llama, **kwargs)
    auto = transformers.AutoModelForCausalLM
    fast = hf_fastload.fast_from_pretrained(llama, model_class=auto, strict=True, **kwargs)
    bits = "4-bit" if "4bit" in name else "8-bit"
    _check(stock, fast, f"bitsandbytes {bits}, quantized on load")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_pre_quantized(saved, name):
    stock = transformers.AutoModelForCausalLM.from_pretrained(saved[name], device_map="cpu")
    with hf_fastload.enabled():
        fast = transformers.AutoModelForCausalLM.from_pretrained(saved[name], device_map="cpu")
    bits = "4-bit" if "4bit" in name else "8-bit"
    _check(stock, fast, f"bitsandbytes {bits}, pre-quantized")


def test_pre_quantized_without_class(saved):
    """fast_from_pretrained picks the class from the config, and the quantizer from its quantization_config."""
    stock = transformers.LlamaForCausalLM.from_pretrained(saved["4bit-nf4-nested"], device_map="cpu")
    fast = hf_fastload.fast_from_pretrained(saved["4bit-nf4-nested"], device_map="cpu", strict=True)
    _check(stock, fast, "bitsandbytes 4-bit, pre-quantized")


def test_qlora_adapter_on_a_pre_quantized_base(saved, tmp_path):
    """A LoRA adapter on a 4-bit base (QLoRA): the base's bytes on the fast path, adapter and quantization stock's."""
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(saved["4bit"], device_map="cpu")
    torch.manual_seed(1)
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(base, lora).save_pretrained(tmp_path / "lora")
    path = tmp_path / "lora" / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = saved["4bit"]
    path.write_text(json.dumps(config))

    def load():
        return peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "lora"), device_map="cpu")

    stock = load()
    with hf_fastload.enabled():
        fast = load()
    report = hf_fastload.last_report()
    assert report.path == "fast" and report.quantization == "bitsandbytes 4-bit, pre-quantized"
    assert_same_quantization(stock, fast)
    assert_same_model(stock, fast)


def test_unchecked_method_falls_back_with_its_reason(llama, tmp_path):
    """A quant_method not checked on the fast path stays on stock; strict mode says which and why."""
    folder = tmp_path / "m"
    folder.mkdir()
    for name in os.listdir(llama):
        os.symlink(os.path.join(llama, name), folder / name)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").unlink()
    config["quantization_config"] = {"quant_method": "hqq", "nbits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FallbackRequiredError, match="quant_method='hqq'"):
        hf_fastload.fast_from_pretrained(str(folder), strict=True)
