"""Correctness of the device path on a GPU, bit for bit against stock ``from_pretrained``, without pytest.

Usage:
    python benchmarks/gpu_check.py [--json OUT.json] [--quick]
    TORCH_CUDA_SANITIZER=1 python benchmarks/gpu_check.py --quick     # under torch's CUDA stream sanitizer

Each check loads with stock and with hf_fastload and compares everything ``tests/equivalence.py`` compares (keys,
dtypes, devices, every tensor's bits, tying, logits), or, for the conversion check, every element's bits against
the CPU's ``.to(dtype)``. The checks: every conversion between fp32, bf16 and fp16 of NaNs (many payloads, both
signs), infinities, subnormals, zeros and extremes; a Llama checkpoint stored in fp32, bf16 and fp16 loaded as
each of them and as stored, every tensor in several chunks (a 1 MiB ring); sharded files; ``HF_FASTLOAD_IO=direct``;
a ``device_map`` over ``cuda:0`` and ``cuda:1`` when there are two GPUs (else ``"cuda"``, ``"cuda:0"`` and ``0``
mixed on one). Without CUDA every check runs on the stand-in device instead (a dry run of this script).
A failed check is reported and the others still run; the exit status is 1 if any failed. A check whose stock load
fails (nothing to compare) is reported as skipped. ``--quick`` (for the sanitizer, which slows every kernel launch):
the conversions, bf16 as stored and as fp32, fp32 as bf16, direct I/O, the device map.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # models.py, equivalence.py: plain modules, no pytest
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def medium_llama(folder: str, dtype, sharded: bool = False) -> str:
    """A Llama with tensors of up to 1 MiB (several chunks each with a 1 MiB ring), saved in ``dtype``."""
    import torch
    import transformers

    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                                      max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder, **({"max_shard_size": "1MB"} if sharded else {}))
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="a subset (for the sanitizer run)")
    args = parser.parse_args(argv)

    import torch
    import transformers
    from equivalence import assert_same_model
    from specials import load_specials

    import hf_fastload
    from hf_fastload.engine.standin import StandInBackend, standin

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    sanitizer = os.environ.get("TORCH_CUDA_SANITIZER", "") not in ("", "0")
    results = {"device": torch.cuda.get_device_name() if cuda else "stand-in (no CUDA)", "sanitizer": sanitizer,
               "torch": torch.__version__, "transformers": transformers.__version__, "checks": []}  # fmt: skip
    os.environ["HF_FASTLOAD_PINNED_MB"] = "1"  # a 1 MiB ring: 64 KiB chunks, so every big tensor goes in several
    os.environ["HF_FASTLOAD_STRICT"] = "1"  # a fallback is a failure here

    def place():
        return contextlib.nullcontext() if cuda else standin(StandInBackend())

    def check(name, fn):
        start = time.perf_counter()
        try:
            with place():
                note = fn()
            status = "pass"
        except StockRefuses as e:
            status, note = "skip", str(e)
        except Exception as e:  # noqa: BLE001 - every check runs; failures are reported
            status, note = "FAIL", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"
        seconds = time.perf_counter() - start
        results["checks"].append({"check": name, "status": status, "seconds": round(seconds, 3), "note": note})
        print(f"{status:4}  {seconds:6.2f}s  {name}" + (f"\n{note}" if status != "pass" else ""), flush=True)

    quick = args.quick

    class StockRefuses(Exception):
        """Stock from_pretrained itself failed: nothing to compare (reported, not a failure of hf_fastload)."""

    def same(path, **kwargs):
        cls = transformers.LlamaForCausalLM
        torch.manual_seed(1234)
        try:
            stock, stock_info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
        except Exception as e:
            raise StockRefuses(f"stock from_pretrained({kwargs}) failed: {type(e).__name__}: {e}"[:400]) from e
        torch.manual_seed(1234)
        fast, fast_info = hf_fastload.fast_from_pretrained(path, model_class=cls, output_loading_info=True, **kwargs)
        assert_same_model(stock, fast, stock_info, fast_info)
        report = hf_fastload.last_report()
        assert report.path == "fast", report.reason
        methods = sorted(report.methods)
        if cuda:
            assert all(m.startswith("stream(cuda)") for m in methods), methods
        del stock, fast
        if cuda:
            torch.cuda.empty_cache()
        return f"{report.tensors_loaded} tensors, {methods}, {report.io_reason[-80:]}"

    tmp = tempfile.mkdtemp(prefix="hf_fastload-gpu-check-")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    ckpts = {k: medium_llama(os.path.join(tmp, k), v) for k, v in dtypes.items()}
    where = {"device_map": device} if cuda else {}

    check("conversions: NaNs, infinities, subnormals, zeros, extremes; fp32<->bf16<->fp16",
          lambda: load_specials(tmp, device))  # fmt: skip
    plan = {s: [None, *dtypes] for s in ckpts} if not quick else {"bf16": [None, "fp32"], "fp32": ["bf16"]}
    for stored, wants in plan.items():
        path = ckpts[stored]
        for want in wants:
            kwargs = dict(where, **({"dtype": dtypes[want]} if want else {}))
            check(
                f"llama stored {stored}, loaded as {want or 'stored'}, multi-chunk",
                lambda p=path, k=kwargs: same(p, **k),
            )
    if not quick:
        sharded = medium_llama(os.path.join(tmp, "sharded"), torch.bfloat16, sharded=True)
        check("sharded bf16 checkpoint, loaded as fp32", lambda: same(sharded, dtype=torch.float32, **where))

    def direct(**kwargs):
        os.environ["HF_FASTLOAD_IO"] = "direct"
        try:
            return same(ckpts["bf16"], **where, **kwargs)
        finally:
            del os.environ["HF_FASTLOAD_IO"]

    if not quick:
        check("HF_FASTLOAD_IO=direct, bf16 as stored", direct)
    check("HF_FASTLOAD_IO=direct, bf16 -> fp32", lambda: direct(dtype=torch.float32))

    if cuda:
        second = "cuda:1" if torch.cuda.device_count() > 1 else 0
        device_map = {"model.embed_tokens": "cuda", "model.layers.0": "cuda:0", "model.layers.1": second,
                      "model.norm": second, "model.rotary_emb": second, "lm_head": second}  # fmt: skip
        label = "cuda:0 and cuda:1" if second == "cuda:1" else '"cuda", "cuda:0" and 0 on one GPU'
        check(f"device_map over {label}, bf16 -> fp32", lambda: same(ckpts["bf16"], device_map=device_map,
                                                                     dtype=torch.float32))  # fmt: skip
    failed = [c for c in results["checks"] if c["status"] == "FAIL"]
    results["passed"] = sum(c["status"] == "pass" for c in results["checks"])
    results["failed"], results["skipped"] = len(failed), sum(c["status"] == "skip" for c in results["checks"])
    print(
        f"{results['passed']} passed, {results['failed']} failed, {results['skipped']} skipped (stock refused)"
        + ("" if cuda else " (stand-in device: no CUDA)")
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
