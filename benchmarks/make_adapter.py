"""Writes a random LoRA adapter for a Llama checkpoint, without building the model:
``python benchmarks/make_adapter.py BASE OUT --r 16``.

The adapter is what ``peft`` saves for ``LoraConfig(r, target_modules=...)`` on that base: ``adapter_config.json``
naming BASE as ``base_model_name_or_path``, and ``adapter_model.safetensors`` with ``lora_A`` / ``lora_B`` of each
targeted projection (float32, random), shaped from BASE's ``config.json``.

Example:
    ```bash
    python benchmarks/make_checkpoint.py /tmp/llama-1b --params 1e9 --dtype bf16
    python benchmarks/make_adapter.py /tmp/llama-1b /tmp/llama-1b-lora --r 16
    hf-fastload bench /tmp/llama-1b --adapter /tmp/llama-1b-lora
    ```
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from peft import LoraConfig
from safetensors.torch import save_file

__all__ = ["main", "make_adapter"]

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def make_adapter(base: str, out: str, r: int = 16, targets: tuple[str, ...] = TARGETS, seed: int = 0) -> str:
    """Writes the adapter folder ``out`` for the Llama checkpoint ``base``; returns ``out``."""
    with open(os.path.join(base, "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or config["num_attention_heads"]
    shapes = {  # (in, out) of each projection
        "q_proj": (hidden, config["num_attention_heads"] * head_dim),
        "k_proj": (hidden, kv * head_dim),
        "v_proj": (hidden, kv * head_dim),
        "o_proj": (config["num_attention_heads"] * head_dim, hidden),
    }
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for name in targets:
            fan_in, fan_out = shapes[name]
            prefix = f"base_model.model.model.layers.{i}.self_attn.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, fan_in, generator=generator) / fan_in**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, r, generator=generator) / r
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "adapter_model.safetensors"))
    lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), task_type="CAUSAL_LM",
                      base_model_name_or_path=os.path.abspath(base))  # fmt: skip
    lora.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a random LoRA adapter for a Llama checkpoint.")
    parser.add_argument("base", help="the base model's checkpoint folder")
    parser.add_argument("out", help="output folder (created if missing)")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"projections (default {','.join(TARGETS)})")
    args = parser.parse_args(argv)
    make_adapter(args.base, args.out, args.r, tuple(args.targets.split(",")))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
