"""Load a causal LM with hf_fastload and generate a few tokens; prints the load report.

Usage:
    python examples/load_and_generate.py PATH [--dtype float32]

Without PATH it builds a tiny random Llama in a temporary folder first, so it runs anywhere, offline.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import transformers

import hf_fastload


def tiny_llama(folder: str) -> str:
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256)  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    path = args.path or tiny_llama(tempfile.mkdtemp(prefix="hf_fastload-example-"))

    model = hf_fastload.fast_from_pretrained(path, dtype=getattr(torch, args.dtype))
    print(hf_fastload.last_report())
    with torch.no_grad():
        out = model.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=8, do_sample=False)
    print("generated:", out[0].tolist())


if __name__ == "__main__":
    main()
