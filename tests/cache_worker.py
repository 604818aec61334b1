"""One process of the cache tests (tests/test_cache.py): loads a checkpoint through the cache and checks it.

Usage:
    python tests/cache_worker.py CKPT CACHE_DIR [GO_FILE]

With ``CACHE_WORKER_SLOW_FSYNC=SECONDS``, ``os.fsync`` sleeps that long first (a slow disk). Waits for ``GO_FILE``
to exist (so that several workers start loading at the same moment), loads ``CKPT`` as float32
with ``fastload_cache=CACHE_DIR``, compares the model with stock ``from_pretrained`` bit for bit, and prints one JSON
line: ``{"ok": bool, "error": str | None, "cache": report.cache}``. The entry it writes, if any, is published before
the process exits.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(ckpt: str, cache: str, go: str | None = None) -> dict:
    import torch
    import transformers
    from equivalence import assert_same_model

    import hf_fastload

    slow = float(os.environ.get("CACHE_WORKER_SLOW_FSYNC", "0"))
    if slow:  # a slow disk: the program ends before its entry is durable (the library must hand the rest off)
        real_fsync = os.fsync

        def slow_fsync(fd):
            time.sleep(slow)
            return real_fsync(fd)

        os.fsync = slow_fsync
    while go and not os.path.exists(go):
        time.sleep(0.005)
    fast = hf_fastload.fast_from_pretrained(ckpt, model_class=transformers.LlamaForCausalLM, dtype=torch.float32,
                                            fastload_cache=cache)  # fmt: skip
    report = hf_fastload.last_report()
    stock = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    assert_same_model(stock, fast)
    return {"ok": True, "error": None, "cache": report.cache}


if __name__ == "__main__":
    try:
        result = main(*sys.argv[1:])
    except BaseException as e:  # the parent reads the outcome from stdout
        result = {"ok": False, "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}", "cache": None}
    print(json.dumps(result, default=str), flush=True)
