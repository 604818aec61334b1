"""An ordinary PEFT script, with no hf_fastload in it: under the opt-in, each base model it loads goes through
hf_fastload.

Usage:
    python examples/peft_script.py ADAPTER [ADAPTER2]                  # stock transformers and peft
    HF_FASTLOAD=1 python examples/peft_script.py ADAPTER [ADAPTER2]    # the same output, bases loaded by hf_fastload
    hf-fastload run --report loads.jsonl examples/peft_script.py ADAPTER

ADAPTER is a LoRA adapter (a folder or a cached hub id) whose ``adapter_config.json`` names its base model; ADAPTER2
a second adapter of the same base, loaded with ``model.load_adapter``. The script loads the adapter the four usual
ways (``AutoModelForCausalLM``, ``AutoPeftModelForCausalLM``, ``PeftModel.from_pretrained``, ``load_adapter``) and
prints, for each, a hash of every tensor's bytes, of the logits, the module tree, the adapter config, the active
adapter and the trainable parameters: bit-identical loads print the same.
"""

from __future__ import annotations

import argparse
import hashlib
import json

import torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoModelForCausalLM


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _plain(value):
    return sorted(value) if isinstance(value, (set, frozenset)) else str(value)


def describe(label: str, model) -> None:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
        digest.update(_bytes(tensor))
    tree = hashlib.sha256(repr([(n, type(m).__name__) for n, m in model.named_modules()]).encode()).hexdigest()
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    configs = {name: c.to_dict() for name, c in getattr(model, "peft_config", {}).items()}
    active = sorted({tuple(m.active_adapters) for m in model.modules() if isinstance(m, BaseTunerLayer)})
    ids = (torch.arange(1, 9) % (model.config.vocab_size - 1) + 1).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    print(f"{label}: {type(model).__name__}, tensors {digest.hexdigest()[:16]}, modules {tree[:16]}")
    print(f"{label}: logits {hashlib.sha256(_bytes(logits)).hexdigest()[:16]}, active {active}")
    print(f"{label}: trainable {trainable}")
    print(f"{label}: peft_config {json.dumps(configs, sort_keys=True, default=_plain)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", help="a LoRA adapter folder or cached hub id")
    parser.add_argument("adapter2", nargs="?", help="a second adapter of the same base, for load_adapter")
    args = parser.parse_args(argv)

    describe("AutoModelForCausalLM", AutoModelForCausalLM.from_pretrained(args.adapter))
    describe("AutoPeftModelForCausalLM", AutoPeftModelForCausalLM.from_pretrained(args.adapter))
    base_id = PeftConfig.from_pretrained(args.adapter).base_model_name_or_path
    base = AutoModelForCausalLM.from_pretrained(base_id)
    describe("PeftModel.from_pretrained", PeftModel.from_pretrained(base, args.adapter, is_trainable=True))
    model = AutoModelForCausalLM.from_pretrained(base_id)
    model.load_adapter(args.adapter, adapter_name="first")
    if args.adapter2:
        model.load_adapter(args.adapter2, adapter_name="second", is_trainable=True)
    describe("load_adapter", model)


if __name__ == "__main__":
    main()
