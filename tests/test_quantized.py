"""Quantized models on the fast path: the checkpoint's bytes go through hf_fastload, transformers' quantizer makes
the quantized tensors, and the model is stock's, quantization state included.

On the CPU (``device_map="cpu"``): bitsandbytes 4-bit (fp4, nf4, nested) and 8-bit quantized on load, and the
checkpoints ``save_pretrained`` writes of them loaded again (pre-quantized); torchao (int8 and float8 weight-only) on
load, and pre-quantized on 5.x; FP8 checkpoints (block-scaled e4m3) on 5.x, which transformers dequantizes on the CPU.
Methods not checked here fall back to stock, with the reason in the report.
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
from hf_fastload.integration import compat

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


@pytest.mark.skipif(compat.TRANSFORMERS_V5, reason="transformers 4.57's loop: 5.x quantizes in its loader threads")
def test_quantizing_loop_takes_one_tensor_at_a_time(llama, monkeypatch):
    """4.57 quantizes each weight in its loop, on all cores: the engine prefetches nothing there and converts with
    torch's threads, as stock's ``.to()`` does (prefetching alongside made 1 B 8-bit loads 0.78x stock's speed)."""
    from hf_fastload.engine.context import LoadContext

    seen = []
    close = LoadContext.close

    def spy_close(self):
        seen.append(self)
        return close(self)

    monkeypatch.setattr(LoadContext, "close", spy_close)
    kwargs = {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": "cpu"}
    auto = transformers.AutoModelForCausalLM
    fast = hf_fastload.fast_from_pretrained(llama, model_class=auto, strict=True, **kwargs)
    [ctx] = seen
    assert ctx.serial_loop and ctx.prefetched == 0 and ctx.tensors > 0
    assert hf_fastload.last_report().methods.get("convert", 0) > 0  # bf16 -> the quantizer's fp16, by the engine
    _check(auto.from_pretrained(llama, **kwargs), fast, "bitsandbytes 8-bit, quantized on load")


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


# --- torchao (quantized on load: both lines; pre-quantized: 5.x) and FP8 (pre-quantized, dequantized on the CPU) ----


def _same_tensor(a, b, where: str) -> None:
    """Equal class, and equal bits of every inner tensor of a tensor subclass (torchao's quantized tensors)."""
    assert type(a) is type(b), where
    if type(a) not in (torch.Tensor, torch.nn.Parameter) and hasattr(a, "__tensor_flatten__"):
        (names_a, ctx_a), (names_b, ctx_b) = a.__tensor_flatten__(), b.__tensor_flatten__()
        assert names_a == names_b and repr(ctx_a) == repr(ctx_b), where
        for name in names_a:
            _same_tensor(getattr(a, name), getattr(b, name), f"{where}.{name}")
        return
    _same_value(a.detach(), b.detach(), where)


def assert_same_subclass_model(stock, fast) -> None:
    """assert_same_model for models whose parameters are tensor subclasses (no flat view of their bytes)."""
    assert type(stock) is type(fast)
    for kind in ("named_parameters", "named_buffers"):
        ts, tf = dict(getattr(stock, kind)()), dict(getattr(fast, kind)())
        assert list(ts) == list(tf), kind
        for name in ts:
            assert ts[name].requires_grad == tf[name].requires_grad, name
            _same_tensor(ts[name], tf[name], name)
    assert stock.config.to_dict() == fast.config.to_dict()
    with torch.no_grad():
        ids = (torch.arange(1, 9) % (VOCAB - 1) + 1).unsqueeze(0)
        assert torch.equal(_bits(stock(input_ids=ids).logits), _bits(fast(input_ids=ids).logits)), "logits differ"


def _torchao_config(name: str):
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return transformers.TorchAoConfig({"int8": Int8WeightOnlyConfig, "float8": Float8WeightOnlyConfig}[name]())


@pytest.mark.parametrize("name", ["int8", "float8"])
def test_torchao(llama, tmp_path, name):
    pytest.importorskip("torchao", reason="torchao is in the test extras: pip install -e '.[test]'")
    kwargs = {"quantization_config": _torchao_config(name), "device_map": "cpu"}
    stock = transformers.AutoModelForCausalLM.from_pretrained(llama, **kwargs)
    with hf_fastload.enabled():
        fast = transformers.AutoModelForCausalLM.from_pretrained(llama, **kwargs)
    report = hf_fastload.last_report()
    assert report.path == "fast" and report.quantization == "torchao, quantized on load"
    assert_same_subclass_model(stock, fast)
    if not compat.TRANSFORMERS_V5:
        return  # 4.57 cannot reload what it saves: pre-quantized torchao falls back there (README)
    stock.save_pretrained(tmp_path / "saved")
    saved = str(tmp_path / "saved")
    stock = transformers.AutoModelForCausalLM.from_pretrained(saved, device_map="cpu")
    fast = hf_fastload.fast_from_pretrained(saved, device_map="cpu", strict=True)
    report = hf_fastload.last_report()
    assert report.path == "fast" and report.quantization == "torchao, pre-quantized"
    assert_same_subclass_model(stock, fast)


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory) -> str:
    """A pre-quantized FP8 checkpoint as DeepSeek / Qwen ship them (e4m3 weights, a float32 ``weight_scale_inv`` per
    128 x 128 block, ``quant_method: fp8``), written by hand: transformers quantizes to FP8 only on a GPU."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("fp8")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=64)  # fmt: skip
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tensors = {}
    for name, weight in model.state_dict().items():
        if not name.endswith("proj.weight"):
            tensors[name] = weight.contiguous()
            continue
        rows, cols = weight.shape
        blocks = weight.float().reshape(rows // 128, 128, cols // 128, 128)
        scale = blocks.abs().amax(dim=(1, 3)) / 448.0
        tensors[name] = (blocks / scale[:, None, :, None]).reshape(rows, cols).to(torch.float8_e4m3fn)
        tensors[name.removesuffix("weight") + "weight_scale_inv"] = scale
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128],
                                     "activation_scheme": "dynamic", "fmt": "e4m3"}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize("dequantize", [False, True])
def test_fp8_pre_quantized(fp8_checkpoint, dequantize):
    kwargs = {"device_map": "cpu"}
    if dequantize:
        kwargs["quantization_config"] = transformers.FineGrainedFP8Config(dequantize=True)
    if not compat.TRANSFORMERS_V5:
        with pytest.raises(FallbackRequiredError, match="4.57 loads FP8 checkpoints only on a GPU"):
            hf_fastload.fast_from_pretrained(fp8_checkpoint, strict=True, **kwargs)
        return
    stock = transformers.AutoModelForCausalLM.from_pretrained(fp8_checkpoint, **kwargs)
    fast = hf_fastload.fast_from_pretrained(fp8_checkpoint, strict=True, **kwargs)
    report = hf_fastload.last_report()
    assert report.path == "fast" and report.files and report.tensors_loaded > 0
    assert any(str(p.dtype) == "torch.bfloat16" for p in fast.parameters())  # dequantized on the CPU, as stock
    assert_same_model(stock, fast)


@pytest.mark.parametrize(
    "qc, fragment",
    [
        ({"quant_method": "compressed-tensors", "format": "float-quantized"}, "llm-compressor"),
        ({"quant_method": "hqq", "nbits": 4}, "not checked bit for bit"),
    ],
)
def test_other_methods_fall_back_with_their_reason(llama, tmp_path, qc, fragment):
    folder = tmp_path / "m"
    folder.mkdir()
    for name in os.listdir(llama):
        if name != "config.json":
            os.symlink(os.path.join(llama, name), folder / name)
    config = json.loads(open(os.path.join(llama, "config.json")).read())
    config["quantization_config"] = qc
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FallbackRequiredError, match=f"quant_method='{qc['quant_method']}', pre-quantized.*{fragment}"):
        hf_fastload.fast_from_pretrained(str(folder), strict=True)
