"""An ordinary transformers script, with no hf_fastload in it: the opt-in makes its loads go through hf_fastload.

Usage:
    python examples/optin_script.py CHECKPOINT                     # stock transformers
    HF_FASTLOAD=1 python examples/optin_script.py CHECKPOINT       # the same output, loaded by hf_fastload
    hf-fastload run --report loads.jsonl examples/optin_script.py CHECKPOINT

CHECKPOINT is a local causal-LM folder; if it has a tokenizer, the script also runs a text-generation pipeline.
It prints a hash of the logits' bytes (bit-identical loads print the same), their sum, and greedily generated ids.
"""

from __future__ import annotations

import argparse
import hashlib
import os

import torch
import transformers
from transformers import AutoModelForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a local causal-LM checkpoint folder")
    path = parser.parse_args().checkpoint

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = (torch.arange(1, 9) % (model.config.vocab_size - 1) + 1).unsqueeze(0)
    with torch.no_grad():
        logits = model(ids).logits
    print("logits sha256:", hashlib.sha256(logits.numpy().tobytes()).hexdigest())
    print("logits sum:", repr(logits.sum().item()))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    print("generated:", out[0].tolist())

    if any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        generator = transformers.pipeline("text-generation", model=path, tokenizer=path)
        print("pipeline:", generator("the quick brown fox", max_new_tokens=6, do_sample=False))


if __name__ == "__main__":
    main()
