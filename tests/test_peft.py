"""With peft installed or not, an Auto-class load of a plain checkpoint under the opt-in takes the fast path, and so
does a real PEFT adapter (its base model; ``tests/test_adapters.py`` has the adapter entry points in full).

transformers' Auto classes pass ``adapter_kwargs`` to every ``from_pretrained`` once peft is importable (5.x:
``{"revision": ...}``; 4.57: ``{}``, or ``{"token": ...}`` with a token), and transformers caches whether peft is
installed, so the ``HF_FASTLOAD=1`` checks run in fresh interpreters, once as installed (peft is in the test
extras) and once with ``tests/nopeft`` on ``PYTHONPATH``, which hides peft from transformers and from children.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from equivalence import assert_same_model
from models import VOCAB, build_checkpoint

import hf_fastload

TESTS = os.path.dirname(os.path.abspath(__file__))
NOPEFT = os.path.join(TESTS, "nopeft")
AUTO_CLASSES = ("AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification", "AutoModelForSeq2SeqLM")


def _peft_installed() -> bool:
    try:
        importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _peft_importable() -> bool:
    """Whether this process sees peft (False where tests/nopeft hides an installed one)."""
    return importlib.util.find_spec("peft") is not None


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    """Plain checkpoints for each Auto class, and (with peft) a LoRA adapter of the Llama one that peft saved, and a
    full model folder that also holds that adapter."""
    root = tmp_path_factory.mktemp("peft")
    out = {"llama": build_checkpoint("llama", str(root / "llama")), "t5": build_checkpoint("t5", str(root / "t5"))}
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                     vocab_size=VOCAB, max_position_embeddings=64, num_labels=3)  # fmt: skip
    transformers.BertForSequenceClassification(config).save_pretrained(root / "bert-cls")
    out["bert-cls"] = str(root / "bert-cls")
    if _peft_importable():
        from peft import LoraConfig, get_peft_model

        base = transformers.LlamaForCausalLM.from_pretrained(out["llama"])
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # non-zero B: visible
        get_peft_model(base, lora).save_pretrained(root / "adapter")
        out["adapter"] = str(root / "adapter")
        shutil.copytree(out["llama"], root / "embedded")  # a full model with its adapter next to it
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(root / "adapter" / name, root / "embedded" / name)
        out["embedded"] = str(root / "embedded")
    return out


def _cases(folders: dict[str, str]) -> list[tuple[str, str, dict]]:
    plain = [("AutoModel", "llama"), ("AutoModelForCausalLM", "llama"),
             ("AutoModelForSequenceClassification", "bert-cls"), ("AutoModelForSeq2SeqLM", "t5")]  # fmt: skip
    cases = [(cls, folders[kind], {}) for cls, kind in plain]
    # a token (4.57 copies it into adapter_kwargs) and the hub arguments scripts pass anyway
    cases.append(("AutoModelForCausalLM", folders["llama"], {"token": "unused", "revision": "main", "dtype": "auto"}))
    cases += [("AutoModelForCausalLM", folders[kind], {}) for kind in ("adapter", "embedded") if kind in folders]
    return cases


# Loads each case under HF_FASTLOAD=1, then with the opt-in switched off, and prints what happened as JSON. The Auto
# classes are imported before any load, as scripts do: their from_pretrained then stays transformers' own, and the
# concrete class's call, which the opt-in routes, gets the Auto class's keyword arguments.
_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification
from transformers.utils import is_peft_available
import hf_fastload
from hf_fastload.features import optin
from equivalence import assert_same_model

def load(cls, folder, kwargs):
    try:
        return cls.from_pretrained(folder, **kwargs), None
    except Exception as e:
        return None, type(e).__name__

out = {"opt_in": optin.is_enabled(), "peft": is_peft_available(), "loads": []}
for name, folder, kwargs in json.loads(sys.argv[2]):
    cls = globals()[name]
    fast, fast_error = load(cls, folder, kwargs)
    report = hf_fastload.last_report().to_dict() if fast is not None else {}
    hf_fastload.disable()
    stock, stock_error = load(cls, folder, kwargs)
    hf_fastload.enable()
    same = None
    if fast is not None and stock is not None:
        try:
            assert_same_model(stock, fast)
            same = True
        except AssertionError as e:
            same = str(e)
    out["loads"].append({"class": name, "folder": folder, "kwargs": kwargs, "path": report.get("path"),
                         "reason": report.get("reason"), "same": same, "errors": [stock_error, fast_error],
                         "lora": fast is not None and any("lora_" in k for k in fast.state_dict())})
print("RESULT", json.dumps(out))
"""


def _run(cases, peft_visible: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_FASTLOAD")}
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) != NOPEFT]
    paths = paths if peft_visible else [NOPEFT, *paths]
    env.update(HF_FASTLOAD="1", HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(paths))
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, TESTS, json.dumps(cases)], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))


@pytest.mark.parametrize("peft_visible", [True, False], ids=["with-peft", "without-peft"])
def test_auto_classes_under_hf_fastload(folders, peft_visible):
    if peft_visible and not _peft_installed():
        pytest.skip("peft is not installed here: pip install -e '.[test]' installs it")
    result = _run(_cases(folders), peft_visible)
    assert result["opt_in"] and result["peft"] is peft_visible
    by_folder = {}
    for load in result["loads"]:
        by_folder.setdefault(os.path.basename(load["folder"]), []).append(load)
    for load in by_folder.pop("adapter", []):  # the adapter folders exist where this process could import peft
        if peft_visible:  # stock loads the base model named in adapter_config.json, then the adapter on top
            assert (load["path"], load["reason"]) == ("fast", None), load
            assert load["same"] is True and load["lora"], load
        else:  # without peft the folder is not a model: stock and fast fail alike (no config.json)
            assert load["errors"][0] is not None and load["errors"][0] == load["errors"][1], load
    for load in by_folder.pop("embedded", []):
        if peft_visible:
            assert (load["path"], load["reason"]) == ("fast", None), load
            assert load["same"] is True and load["lora"], load
        else:  # transformers ignores adapter_config.json without peft: a plain load
            assert load["path"] == "fast" and load["same"] is True and not load["lora"], load
    plain = [load for loads in by_folder.values() for load in loads]
    assert {load["class"] for load in plain} == set(AUTO_CLASSES)
    for load in plain:
        assert load["errors"] == [None, None], load
        assert (load["path"], load["reason"], load["same"]) == ("fast", None, True), load


# --- in this process (peft as this run has it) ---------------------------------------------------------------------


@pytest.mark.parametrize("name", AUTO_CLASSES)
def test_auto_class_under_enable_is_fast(folders, name):
    kind = {"AutoModelForSequenceClassification": "bert-cls", "AutoModelForSeq2SeqLM": "t5"}.get(name, "llama")
    folder = folders[kind]
    cls = getattr(transformers, name)  # imported before enabling: the concrete class's call gets the Auto kwargs
    stock = cls.from_pretrained(folder)
    with hf_fastload.enabled():
        fast = cls.from_pretrained(folder)
    report = hf_fastload.last_report()
    assert (report.path, report.reason) == ("fast", None)
    assert_same_model(stock, fast)


def test_adapter_loads_fast(folders):
    if "adapter" not in folders:
        pytest.skip("needs peft (installed with the test extras), to write the adapter")
    for kind in ("adapter", "embedded"):
        stock = transformers.AutoModelForCausalLM.from_pretrained(folders[kind])
        with hf_fastload.enabled():
            fast = transformers.AutoModelForCausalLM.from_pretrained(folders[kind])
        report = hf_fastload.last_report()
        assert (report.path, report.reason) == ("fast", None) and report.adapter, report
        assert any("lora_" in k for k in fast.state_dict())
        assert_same_model(stock, fast)
        llama = transformers.LlamaForCausalLM
        assert_same_model(stock, hf_fastload.fast_from_pretrained(folders[kind], model_class=llama, strict=True))
