"""The device pipeline's knobs swept on a GPU, and the conversion cases, in one process.

Usage:
    python benchmarks/gpu_sweep.py CKPT --json OUT.json [--threads 4,8,16] [--ring 128,256,1024] [--chunk 4,16,64]
                                   [--casts FP32_CKPT] [--rounds 2] [--seconds 150]

Every combination of ``HF_FASTLOAD_THREADS`` x ``HF_FASTLOAD_PINNED_MB`` x ``HF_FASTLOAD_CHUNK_MB`` loads ``CKPT``
(bf16) once with ``fast_from_pretrained(device_map="cuda", dtype=torch.bfloat16)``, timed to a
``torch.cuda.synchronize()``; the model is dropped before the next. The page cache is warm (the files are read
once first), imports and the CUDA context are paid before the first load, and each combination pays its own ring
(a new shape), as a fresh process would. Then the conversion cases, stock and fast alternating, ``--rounds``
each: ``CKPT`` loaded as fp32, and ``FP32_CKPT`` loaded as bf16. The JSON is rewritten after every load, and no load
starts after ``--seconds``, so a run cut short keeps what it measured. Without CUDA (a dry run) everything runs on
the stand-in device.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt")
    parser.add_argument("--json", required=True)
    parser.add_argument("--threads", default="4,8,16")
    parser.add_argument("--ring", default="128,256,1024")
    parser.add_argument("--chunk", default="4,16,64")
    parser.add_argument("--casts", default=None, metavar="FP32_CKPT", help="also the conversion cases")
    parser.add_argument("--rounds", type=int, default=2, help="stock/fast rounds of each conversion case")
    parser.add_argument("--seconds", type=float, default=150.0, help="start no load after this many seconds")
    args = parser.parse_args(argv)
    t0 = time.monotonic()

    import contextlib

    import torch
    import transformers

    import hf_fastload
    from hf_fastload.engine.standin import StandInBackend, standin
    from hf_fastload.tools.bench import _warm_page_cache, checkpoint_files, machine_info

    cuda = torch.cuda.is_available()
    where = {"device_map": "cuda"} if cuda else {}
    cls = transformers.LlamaForCausalLM
    result = {"machine": machine_info(), "device": torch.cuda.get_device_name() if cuda else "stand-in (no CUDA)",
              "ckpt": os.path.abspath(args.ckpt), "sweep": [], "casts": [], "skipped": []}  # fmt: skip
    for path in [args.ckpt] + ([args.casts] if args.casts else []):
        _warm_page_cache(checkpoint_files(path))
    if cuda:
        torch.zeros(1, device="cuda")  # the CUDA context, before the first timed load
    nbytes = {p: sum(os.path.getsize(f) for f in checkpoint_files(p)) for p in [args.ckpt, args.casts] if p}

    def save():
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(mode, path, **kwargs) -> dict:
        place = contextlib.nullcontext() if cuda else standin(StandInBackend())
        with place:
            sync()
            start = time.perf_counter()
            if mode == "stock":
                model = cls.from_pretrained(path, **where, **kwargs)
            else:
                model = hf_fastload.fast_from_pretrained(path, model_class=cls, **where, **kwargs)
            sync()
            seconds = time.perf_counter() - start
            rec = {"mode": mode, "seconds": seconds, "gb_per_s": nbytes[path] / seconds / 1e9,
                   "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}  # fmt: skip
            if mode == "fast":
                r = hf_fastload.last_report()
                rec.update(path=r.path, read_gb_per_s=r.gb_per_s, phases=r.seconds, methods=r.methods,
                           io=r.io_reason[-160:])  # fmt: skip
            del model
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        return rec

    def in_time(what: str) -> bool:
        if time.monotonic() - t0 < args.seconds:
            return True
        result["skipped"].append(what)
        return False

    for t in (int(x) for x in args.threads.split(",")):
        for ring in (int(x) for x in args.ring.split(",")):
            for chunk in (int(x) for x in args.chunk.split(",")):
                label = f"threads {t}, ring {ring} MiB, chunk {chunk} MiB"
                if not in_time(label):
                    continue
                os.environ.update(HF_FASTLOAD_THREADS=str(t), HF_FASTLOAD_PINNED_MB=str(ring),
                                  HF_FASTLOAD_CHUNK_MB=str(chunk))  # fmt: skip
                try:
                    rec = timed("fast", args.ckpt, dtype=torch.bfloat16)
                except Exception as e:  # noqa: BLE001 - recorded; the sweep goes on
                    rec = {"mode": "fast", "error": f"{type(e).__name__}: {e}"[:500]}
                rec.update(threads=t, ring_mb=ring, chunk_mb=chunk)
                result["sweep"].append(rec)
                save()
                print(f"{label}: " + (f"{rec['seconds']:.3f}s, {rec['gb_per_s']:.1f} GB/s" if "seconds" in rec
                                      else rec["error"]), flush=True)  # fmt: skip
    for key in ("HF_FASTLOAD_THREADS", "HF_FASTLOAD_PINNED_MB", "HF_FASTLOAD_CHUNK_MB"):
        os.environ.pop(key, None)

    cases = [("bf16 -> fp32", args.ckpt, torch.float32)]
    if args.casts:
        cases.append(("fp32 -> bf16", args.casts, torch.bfloat16))
    for name, path, dtype in cases:
        for k in range(args.rounds):
            for mode in ("stock", "fast") if k % 2 == 0 else ("fast", "stock"):
                if not in_time(f"{name} {mode} round {k}"):
                    continue
                try:
                    rec = timed(mode, path, dtype=dtype)
                except Exception as e:  # noqa: BLE001 - recorded; the run goes on
                    rec = {"mode": mode, "error": f"{type(e).__name__}: {e}"[:500]}
                rec.update(case=name, round=k)
                result["casts"].append(rec)
                save()
                print(
                    f"{name} {mode}: " + (f"{rec['seconds']:.3f}s" if "seconds" in rec else rec["error"]), flush=True
                )
    result["summary"] = summarize(result)
    result["seconds"] = time.monotonic() - t0
    save()
    print(table(result))
    return 0


def summarize(result: dict) -> dict:
    ok = [r for r in result["sweep"] if "seconds" in r]
    best = min(ok, key=lambda r: r["seconds"]) if ok else None
    casts = {}
    for r in result["casts"]:
        if "seconds" in r:
            casts.setdefault(r["case"], {}).setdefault(r["mode"], []).append(r["seconds"])
    cast_rows = {case: {mode: statistics.median(v) for mode, v in modes.items()} for case, modes in casts.items()}
    for row in cast_rows.values():
        if "stock" in row and "fast" in row:
            row["stock_over_fast"] = row["stock"] / row["fast"]
    return {"best": best, "casts": cast_rows}


def table(result: dict) -> str:
    lines = [
        f"sweep on {result['device']}: fast_from_pretrained(device_map='cuda', dtype=bf16), one load each",
        "| threads | ring MiB | chunk MiB | seconds | GB/s | read phase GB/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["sweep"]:
        if "seconds" in r:
            lines.append(f"| {r['threads']} | {r['ring_mb']} | {r['chunk_mb']} | {r['seconds']:.3f} | "
                         f"{r['gb_per_s']:.1f} | {r.get('read_gb_per_s', 0):.1f} |")  # fmt: skip
        else:
            lines.append(f"| {r['threads']} | {r['ring_mb']} | {r['chunk_mb']} | error: {r['error'][:80]} | | |")
    lines += ["", "| conversion | stock s | fast s | stock/fast |", "|---|---|---|---|"]
    for case, row in result["summary"]["casts"].items():
        lines.append(f"| {case} | {row.get('stock', float('nan')):.3f} | {row.get('fast', float('nan')):.3f} | "
                     f"{row.get('stock_over_fast', float('nan')):.2f}x |")  # fmt: skip
    if result["skipped"]:
        lines.append(f"skipped (out of time): {', '.join(result['skipped'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
