"""Cold start, as a user feels it: a fresh process, the page cache dropped, imports + load + a pass over every weight.

Example:
    ```bash
    sudo python benchmarks/cold_start.py ~/.cache/hf_fastload/bench-llama-1b-bf16 --rounds 5 --json cold.json
    ```

Each round drops the page cache (``sync; echo 3 > /proc/sys/vm/drop_caches``, so it needs root) before every process,
then runs an ordinary transformers program in a fresh interpreter::

    import torch, transformers                                    # counted: the clock starts at interpreter start
    model = AutoModelForCausalLM.from_pretrained(path, dtype=...)  # stock, or under HF_FASTLOAD=1
    sum of every weight, in float32                               # touches every page of every tensor

Modes, alternating which goes first:

- ``stock``: the program as is;
- ``fast``: the same program with ``HF_FASTLOAD=1`` (the kernel readahead off, the default);
- ``fast-entry``: ``HF_FASTLOAD=1 HF_FASTLOAD_READAHEAD=entry`` (the readahead of the checkpoint starts at the entry
  of ``from_pretrained``, while transformers imports the model's code and builds it);
- ``fast-open``: ``HF_FASTLOAD=1 HF_FASTLOAD_READAHEAD=open`` (the readahead starts when each file is opened).

The program prints its own phase times (imports, load, touch) measured from ``time.time()`` at start against the
interpreter's start time (``/proc/self/stat``), so interpreter start-up is in the total too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PROGRAM = r"""
import json, os, sys, time
def _started():  # the interpreter's start, from /proc/self/stat (clock ticks since boot)
    with open("/proc/self/stat") as fh:
        start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as fh:
        uptime = float(fh.read().split()[0])
    return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
t_start = _started()
t0 = time.time()
import torch, transformers
t_import = time.time()
kwargs = {"dtype": getattr(torch, sys.argv[2])} if sys.argv[2] != "none" else {}
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], **kwargs)
t_load = time.time()
total = 0.0
with torch.no_grad():
    for p in model.parameters():
        total += float(p.float().sum())
t_touch = time.time()
out = {"interpreter": t0 - t_start, "imports": t_import - t0, "load": t_load - t_import, "touch": t_touch - t_load,
       "total": t_touch - t_start, "checksum": total}
try:
    import hf_fastload
    r = hf_fastload.last_report()
    out["path"] = r.path if r is not None else "stock"
except Exception:
    out["path"] = "stock"
print(json.dumps(out))
"""

MODES = {
    "stock": {},
    "fast": {"HF_FASTLOAD": "1"},
    "fast-entry": {"HF_FASTLOAD": "1", "HF_FASTLOAD_READAHEAD": "entry"},
    "fast-open": {"HF_FASTLOAD": "1", "HF_FASTLOAD_READAHEAD": "open"},
}


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as fh:
        fh.write("3\n")


def run_one(path: str, dtype: str, mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_FASTLOAD")}
    env.update(MODES[mode], HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    drop_caches()
    proc = subprocess.run([sys.executable, "-c", PROGRAM, path, dtype], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed: {proc.stderr[-2000:]}")
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    record["mode"] = mode
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a local checkpoint folder")
    parser.add_argument("--dtype", default="bfloat16", help="dtype passed to from_pretrained ('none': not passed)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--modes", default="stock,fast,fast-entry")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    modes = args.modes.split(",")
    records = []
    for r in range(args.rounds):
        order = modes if r % 2 == 0 else list(reversed(modes))
        for mode in order:
            rec = run_one(os.path.abspath(args.path), args.dtype, mode)
            rec["round"] = r
            records.append(rec)
        print(f"round {r + 1}: " + ", ".join(f"{x['mode']} {x['total']:.2f}s" for x in records if x["round"] == r),
              flush=True)
    sums = {x["checksum"] for x in records}
    summary = {}
    for mode in modes:
        recs = [x for x in records if x["mode"] == mode]
        phases = ("interpreter", "imports", "load", "touch", "total")
        summary[mode] = {k: statistics.median(x[k] for x in recs) for k in phases}
        summary[mode]["paths"] = sorted({x["path"] for x in recs})
    if "stock" in summary:
        for mode in modes:
            summary[mode]["stock_over_mode"] = summary["stock"]["total"] / summary[mode]["total"]
        pairs = {}
        for mode in modes:
            if mode != "stock":
                ratios = sorted(s["total"] / f["total"] for s in records if s["mode"] == "stock"
                                for f in records if f["mode"] == mode and f["round"] == s["round"])  # fmt: skip
                pairs[mode] = [round(x, 3) for x in ratios]
        summary["pair_ratios"] = pairs
    print(f"{'mode':<18}{'total':>8}{'imports':>9}{'load':>8}{'touch':>8}{'stock/mode':>12}")
    for mode in modes:
        s = summary[mode]
        print(f"{mode:<18}{s['total']:>8.2f}{s['imports']:>9.2f}{s['load']:>8.2f}{s['touch']:>8.2f}"
              f"{s.get('stock_over_mode', float('nan')):>12.2f}")
    print("weights identical in every run:", len(sums) == 1)
    if args.json_path:
        import platform

        import transformers

        with open(args.json_path, "w", encoding="utf-8") as fh:
            json.dump({"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": platform.platform(),
                       "cpus": os.cpu_count(), "transformers": transformers.__version__, "path": args.path,
                       "dtype": args.dtype, "records": records, "summary": summary}, fh, indent=2)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
