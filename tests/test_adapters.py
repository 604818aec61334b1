"""PEFT adapters: the base model's weights load through the fast path in every adapter entry point, and the model is
stock's (PEFT wrappers, every tensor's bits, logits, ``peft_config``, active adapter, trainable flags).

The base is named in ``adapter_config.json`` by a local path or by a hub id found in the HF cache (a cache laid out
in ``tmp_path``, offline). ``HF_FASTLOAD=1`` runs an unmodified PEFT script (``examples/peft_script.py``) in fresh
interpreters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from equivalence import assert_same_model
from models import VOCAB

import hf_fastload
from hf_fastload.integration import loader

peft = pytest.importorskip("peft", reason="peft is in the test extras: pip install -e '.[test]'")
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "examples", "peft_script.py")
COMMIT = "0123456789abcdef0123456789abcdef01234567"
BASE_ID, ADAPTER_ID = "tiny-org/llama-base", "tiny-org/llama-lora"


def _cache_repo(cache: str, repo_id: str, folder: str) -> None:
    """Lays ``folder`` out as the snapshot of hub repository ``repo_id`` in the HF cache ``cache`` (offline use)."""
    repo = os.path.join(cache, f"models--{repo_id.replace('/', '--')}")
    snapshot = os.path.join(repo, "snapshots", COMMIT)
    os.makedirs(snapshot)
    for name in os.listdir(folder):
        os.symlink(os.path.join(folder, name), os.path.join(snapshot, name))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as fh:
        fh.write(COMMIT)


def _save_adapter(base_model, folder: str, base_ref: str, seed: int, targets: list[str]) -> str:
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    get_peft_model(base_model, config).save_pretrained(folder)
    path = os.path.join(folder, "adapter_config.json")
    with open(path) as fh:
        adapter_config = json.load(fh)
    adapter_config["base_model_name_or_path"] = base_ref
    with open(path, "w") as fh:
        json.dump(adapter_config, fh)
    return folder


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> dict[str, str]:
    """A tiny Llama (bf16) and two LoRA adapters naming it by path, one naming it by hub id; and an HF cache holding
    the base and that adapter."""
    root = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)  # fmt: skip
    base = str(root / "base")
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(base)

    def fresh():
        return transformers.LlamaForCausalLM.from_pretrained(base)

    out = {"base": base, "cache": str(root / "hub")}
    out["path"] = _save_adapter(fresh(), str(root / "lora"), base, 1, ["q_proj", "v_proj"])
    out["second"] = _save_adapter(fresh(), str(root / "lora2"), base, 2, ["k_proj", "o_proj", "down_proj"])
    hub_adapter = _save_adapter(fresh(), str(root / "lora-hub"), BASE_ID, 1, ["q_proj", "v_proj"])
    _cache_repo(out["cache"], BASE_ID, base)
    _cache_repo(out["cache"], ADAPTER_ID, hub_adapter)
    return out


def _adapter_and_kwargs(layout, ref: str, monkeypatch) -> tuple[str, dict]:
    """The adapter to load (a folder naming its base by path, or a hub id naming its base by hub id), and the keyword
    arguments that find it. For hub ids, the HF cache built in tmp_path is made this process's default cache, as
    ``HF_HUB_CACHE`` does at startup (transformers 5.24 re-resolves the base's revision without the ``cache_dir`` of
    the call, so ``cache_dir=`` alone does not find a cached base: stock fails too)."""
    if ref == "path":
        return layout["path"], {}
    import huggingface_hub.constants
    import transformers.utils.hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", layout["cache"])
    monkeypatch.setattr(transformers.utils.hub, "TRANSFORMERS_CACHE", layout["cache"], raising=False)
    return ADAPTER_ID, {}


def _active(model):
    """The active adapter(s): PeftModel's, else those of the model's adapter layers (transformers 5.24's
    ``active_adapters()`` and ``set_adapter()`` require peft >= 0.22, not released when this was written)."""
    if isinstance(model, PeftModel):
        return model.active_adapter
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sorted({tuple(m.active_adapters) for m in model.modules() if isinstance(m, BaseTunerLayer)})


def assert_same_peft(stock, fast) -> None:
    """assert_same_model, plus what PEFT adds: module tree, adapter configs, active adapter(s), trainable flags."""
    assert [(n, type(m)) for n, m in stock.named_modules()] == [(n, type(m)) for n, m in fast.named_modules()]
    configs_s = {k: c.to_dict() for k, c in getattr(stock, "peft_config", {}).items()}
    configs_f = {k: c.to_dict() for k, c in getattr(fast, "peft_config", {}).items()}
    assert configs_s == configs_f and configs_s, "peft_config differs"
    assert _active(stock) == _active(fast)
    trainable_s = [n for n, p in stock.named_parameters() if p.requires_grad]
    assert trainable_s == [n for n, p in fast.named_parameters() if p.requires_grad]
    assert_same_model(stock, fast)


def _fast_reports(load) -> tuple[object, list]:
    """``load()`` under ``hf_fastload.enabled()``; the model and the report of each model load in it."""
    reports = []
    original = loader._finished

    def keep(report):
        reports.append(report)
        original(report)

    loader._finished = keep
    try:
        with hf_fastload.enabled():
            model = load()
    finally:
        loader._finished = original
    return model, reports


def _assert_base_fast(reports) -> None:
    assert reports, "no load went through hf_fastload"
    for report in reports:
        assert report.path == "fast", report.reason
        assert any(f.endswith("model.safetensors") and "lora" not in f for f in report.files), report.files


@pytest.mark.parametrize("ref", ["path", "hub"])
def test_auto_model_with_adapter_folder(layout, ref, monkeypatch):
    adapter, kwargs = _adapter_and_kwargs(layout, ref, monkeypatch)
    stock = transformers.AutoModelForCausalLM.from_pretrained(adapter, **kwargs)
    fast, reports = _fast_reports(lambda: transformers.AutoModelForCausalLM.from_pretrained(adapter, **kwargs))
    assert_same_peft(stock, fast)
    _assert_base_fast(reports)
    assert len(reports) == 1 and reports[0].adapter == adapter


@pytest.mark.parametrize("ref", ["path", "hub"])
def test_auto_peft_model(layout, ref, monkeypatch):
    adapter, kwargs = _adapter_and_kwargs(layout, ref, monkeypatch)
    stock = AutoPeftModelForCausalLM.from_pretrained(adapter, **kwargs)
    fast, reports = _fast_reports(lambda: AutoPeftModelForCausalLM.from_pretrained(adapter, **kwargs))
    assert type(fast) is peft.PeftModelForCausalLM
    assert_same_peft(stock, fast)
    _assert_base_fast(reports)


@pytest.mark.parametrize("trainable", [False, True])
def test_peft_model_from_pretrained(layout, trainable):
    def load():
        base = transformers.AutoModelForCausalLM.from_pretrained(layout["base"], dtype=torch.float32)
        return PeftModel.from_pretrained(base, layout["path"], is_trainable=trainable)

    stock = load()
    fast, reports = _fast_reports(load)
    assert_same_peft(stock, fast)
    _assert_base_fast(reports)
    assert any(p.requires_grad for p in fast.parameters()) is trainable


def test_load_adapter_two_adapters(layout):
    def load():
        model = transformers.AutoModelForCausalLM.from_pretrained(layout["base"])
        model.load_adapter(layout["path"], adapter_name="first")
        model.load_adapter(layout["second"], adapter_name="second", is_trainable=True)
        return model

    stock = load()
    fast, reports = _fast_reports(load)
    assert_same_peft(stock, fast)
    _assert_base_fast(reports)
    assert sorted(fast.peft_config) == ["first", "second"]


def test_fast_from_pretrained_with_adapter_folder(layout):
    """Without model_class, the class comes from the base model's config (the adapter folder has none)."""
    stock = transformers.AutoModelForCausalLM.from_pretrained(layout["path"])
    fast = hf_fastload.fast_from_pretrained(layout["path"])
    report = hf_fastload.last_report()
    assert report.path == "fast" and report.model_class == "LlamaForCausalLM"
    assert report.adapter == layout["path"]
    assert os.path.join(layout["base"], "model.safetensors") in report.files
    assert_same_peft(stock, fast)
    strict = hf_fastload.fast_from_pretrained(layout["path"], strict=True, dtype=torch.float32)
    assert_same_peft(transformers.AutoModelForCausalLM.from_pretrained(layout["path"], dtype=torch.float32), strict)


def test_broken_base_is_named(layout, tmp_path):
    """The base folder of an adapter is checked like any folder: a broken index names itself."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(layout["base"], base)
    (base / "model.safetensors.index.json").write_text("{not json")
    adapter = _save_adapter(transformers.LlamaForCausalLM.from_pretrained(layout["base"]), str(tmp_path / "lora"),
                            str(base), 1, ["q_proj"])  # fmt: skip
    with pytest.raises(hf_fastload.CheckpointContentError, match="index"):
        hf_fastload.fast_from_pretrained(adapter, model_class=transformers.AutoModelForCausalLM)


# --- HF_FASTLOAD=1: an unmodified PEFT script ----------------------------------------------------------------------


def test_unmodified_peft_script_loads_its_bases_fast(layout, tmp_path, monkeypatch, capsys):
    """The script's output in this process (stock) and under ``hf-fastload run`` (the HF_FASTLOAD=1 opt-in, with or
    without the startup hook installed) in a fresh one: the same, and every base model load on the fast path."""
    import importlib.util

    args = [ADAPTER_ID, layout["second"]]
    _adapter_and_kwargs(layout, "hub", monkeypatch)
    spec = importlib.util.spec_from_file_location("peft_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    capsys.readouterr()
    script.main(args)
    stock = capsys.readouterr().out

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_FASTLOAD")}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=layout["cache"], TRANSFORMERS_VERBOSITY="error")
    env["PYTHONPATH"] = os.pathsep.join([REPO, *filter(None, [env.get("PYTHONPATH")])])
    report = tmp_path / "loads.jsonl"
    cmd = [sys.executable, "-m", "hf_fastload.tools.cli", "run", "--report", str(report), SCRIPT, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "load_adapter: trainable" in stock
    assert proc.stdout == stock
    with open(report) as fh:
        lines = [json.loads(line) for line in fh]
    # AutoModelForCausalLM(adapter), AutoPeftModelForCausalLM's base, and the bases of PeftModel and load_adapter
    assert len(lines) == 4, lines
    assert all(line["path"] == "fast" and line["tensors_loaded"] > 0 for line in lines), lines
    assert lines[0]["adapter"] == ADAPTER_ID
