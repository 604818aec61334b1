"""The converted-tensor cache (issue 17): stock vs fast vs the cache's first (writing) and later (mapped) loads, and
several processes mapping one entry at once.

Example:
    ```bash
    python benchmarks/make_checkpoint.py /tmp/bench/llama-1b --params 1e9 --dtype bf16
    python benchmarks/cache_bench.py /tmp/bench/llama-1b --runs 5 --json benchmarks/results/cache.json
    ```

Every timed load is a fresh ``python -m hf_fastload.tools.bench_worker`` process (everything imported before the
clock; see there), loading as ``--dtype`` (default float32: a bf16 checkpoint converted), with ``--forward``: one
forward pass over 8 tokens right after the load, so that the mapped loads pay for faulting their pages in too. Modes,
each round in this order (stock and fast swap places every other round):

- ``stock``: ``from_pretrained``; ``fast``: ``fast_from_pretrained`` without the cache;
- ``first``: ``fast_from_pretrained`` with ``HF_FASTLOAD_CACHE`` on an emptied cache folder: converts and writes the
  entry. ``exit_wait_seconds`` is how long the process then took to exit: the background ``fsync`` and ``rename``
  that publish the entry. With ``--write after`` (``HF_FASTLOAD_CACHE_WRITE=after``) a detached process writes the
  entry after the load; the bench waits for it before the next load (``writer_seconds``: from the load's end to the
  entry's publication);
- ``cached``: the same, with the entry there: a hit;
- ``cached-content`` (``--content-key``): a hit with ``HF_FASTLOAD_CACHE_KEY=content``, whose key hashes the whole
  source file at every load: what that costs.

Then ``--procs`` processes (default 4) load the cached model at the same moment and each touches every weight; while
they all hold it, the parent reads ``/proc/PID/smaps`` of each and sums the proportional set size (PSS: a page shared
by N processes counts 1/N in each) over the mappings of the cache entry (the weights) and over everything, next to an
idle process that imported the same modules (the interpreter, torch and transformers, per process).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from hf_fastload.tools.bench import _warm_page_cache, checkpoint_files, machine_info  # noqa: E402

MODES = ("stock", "fast", "first", "cached", "cached-content")


WRITE = {"mode": "inline"}  # HF_FASTLOAD_CACHE_WRITE of the cached loads (--write)


def _env(cache: str | None = None, key: str | None = None) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    for name in ("HF_FASTLOAD_CACHE", "HF_FASTLOAD_CACHE_KEY", "HF_FASTLOAD_CACHE_WRITE"):
        env.pop(name, None)
    if cache:
        env["HF_FASTLOAD_CACHE"] = cache
        env["HF_FASTLOAD_CACHE_WRITE"] = WRITE["mode"]
    if key:
        env["HF_FASTLOAD_CACHE_KEY"] = key
    return env


def timed_load(mode: str, path: str, dtype: str, env: dict[str, str], forward: bool) -> dict:
    """One bench_worker process; adds ``exit_wait_seconds`` (its JSON line to its exit)."""
    worker = "stock" if mode == "stock" else "fast"
    cmd = [sys.executable, "-m", "hf_fastload.tools.bench_worker", worker, path, "--dtype", dtype]
    cmd += ["--forward"] * forward
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    t_line = time.perf_counter()
    rest, err = proc.communicate()
    exit_wait = time.perf_counter() - t_line
    if proc.returncode != 0 or not line.startswith("{"):
        raise RuntimeError(f"{mode} worker failed ({proc.returncode}): {(err or rest)[-3000:]}")
    record = json.loads(line)
    record.update(mode=mode, exit_wait_seconds=exit_wait)
    report = record.get("report") or {}
    record["cache"] = report.get("cache")
    pids = (record["cache"] or {}).get("writer_pids") or []
    if pids:  # --write after: the entry is written by a detached process; wait for it (polling: not our child)
        while any(os.path.exists(f"/proc/{pid}") and not _zombie(pid) for pid in pids):
            time.sleep(0.02)
        record["writer_seconds"] = time.perf_counter() - t_line
    return record


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] == "Z"
    except OSError:
        return True


HOLD = """
import json, os, sys, time
import torch, transformers, hf_fastload
from hf_fastload.integration import loader  # noqa: F401  (imported before the clock, as in bench_worker)
path, dtype, load = sys.argv[1], sys.argv[2], sys.argv[3] == "load"
if load:
    t0 = time.perf_counter()
    cls = transformers.LlamaForCausalLM
    model = hf_fastload.fast_from_pretrained(path, model_class=cls, dtype=getattr(torch, dtype))
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        total = sum(float(p.sum()) for p in model.parameters())  # touches every weight's pages
    r = hf_fastload.last_report()
    print(json.dumps({"seconds": seconds, "cache": r.cache, "zero_copy": r.zero_copy, "tensors": r.tensors_loaded,
                      "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}), flush=True)
else:
    print(json.dumps({"idle": True}), flush=True)
sys.stdin.readline()
"""


def _smaps(pid: int, prefix: str) -> dict[str, int]:
    """PSS and RSS of process ``pid``, in total and over mappings whose file is under ``prefix``, in bytes."""
    out = {"pss": 0, "rss": 0, "pss_entry": 0, "rss_entry": 0}
    current = ""
    with open(f"/proc/{pid}/smaps", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            head = line.split()
            if not head:
                continue
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                current = head[5] if len(head) >= 6 else ""
                continue
            if head[0] in ("Pss:", "Rss:"):
                key = head[0][:-1].lower()
                value = int(head[1]) * 1024
                out[key] += value
                if current.startswith(prefix):
                    out[key + "_entry"] += value
    return out


def shared_memory(path: str, dtype: str, cache: str, procs: int) -> dict:
    """``procs`` processes load the cached model at once and touch every weight; their PSS while all hold it."""
    env = _env(cache)
    cmd = [sys.executable, "-c", HOLD, path, dtype]
    workers = [subprocess.Popen(cmd + ["load"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
               for _ in range(procs)]  # fmt: skip
    idle = subprocess.Popen(cmd + ["idle"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        results = [json.loads(w.stdout.readline()) for w in workers]
        json.loads(idle.stdout.readline())
        entries = os.path.join(os.path.abspath(cache), "entries")
        mem = [_smaps(w.pid, entries) for w in workers]
        idle_mem = _smaps(idle.pid, entries)
    finally:
        for w in (*workers, idle):
            if w.poll() is None:
                w.stdin.write("\n")
                w.stdin.flush()
            w.wait()
    model = results[0]["model_bytes"]
    return {
        "procs": procs,
        "model_bytes": model,
        "load_seconds": [r["seconds"] for r in results],
        "statuses": [r["cache"]["status"] for r in results],
        "per_process": mem,
        "idle_process": idle_mem,
        "pss_entry_total": sum(m["pss_entry"] for m in mem),
        "pss_total": sum(m["pss"] for m in mem),
        "rss_total": sum(m["rss"] for m in mem),
        "pss_entry_over_model": sum(m["pss_entry"] for m in mem) / model,
        "pss_total_less_idle_over_model": (sum(m["pss"] for m in mem) - procs * idle_mem["pss"]) / model,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a local checkpoint folder (bf16, to be loaded as --dtype)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cache", help="cache folder (default: PATH + '-fastload-cache'; emptied by the first loads)")
    parser.add_argument("--procs", type=int, default=4, help="processes mapping one entry at once (0: skip)")
    parser.add_argument("--content-key", action="store_true", help="also time hits with HF_FASTLOAD_CACHE_KEY=content")
    parser.add_argument("--no-forward", dest="forward", action="store_false", help="time the load only")
    parser.add_argument("--write", choices=("inline", "after"), default="inline",
                        help="HF_FASTLOAD_CACHE_WRITE of the cached loads (after: the bench waits for the writer)")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args(argv)
    WRITE["mode"] = args.write

    path = os.path.abspath(args.path)
    cache = os.path.abspath(args.cache or path.rstrip("/") + "-fastload-cache")
    content_cache = cache + "-content"
    files = checkpoint_files(path)
    _warm_page_cache(files)
    if args.content_key:
        shutil.rmtree(content_cache, ignore_errors=True)
        timed_load("first", path, args.dtype, _env(content_cache, "content"), False)  # the entry (untimed)
    records = []
    for run in range(args.runs):
        order = ["stock", "fast"] if run % 2 == 0 else ["fast", "stock"]
        order += ["first", "cached"] + ["cached-content"] * args.content_key
        for mode in order:
            if mode == "first":
                shutil.rmtree(cache, ignore_errors=True)
            env = {
                "first": _env(cache), "cached": _env(cache), "cached-content": _env(content_cache, "content"),
            }.get(mode, _env())  # fmt: skip
            record = timed_load(mode, path, args.dtype, env, args.forward)
            record["run"] = run
            records.append(record)
        done = ", ".join(f"{r['mode']} {r['seconds']:.2f}s" for r in records if r["run"] == run)
        print(f"run {run + 1}/{args.runs}: {done}", flush=True)

    summary: dict = {}
    for mode in MODES:
        recs = [r for r in records if r["mode"] == mode]
        if not recs:
            continue
        s = {
            "seconds_median": statistics.median(r["seconds"] for r in recs),
            "seconds_all": [round(r["seconds"], 3) for r in recs],
            "peak_rss_over_preload_median": statistics.median(r["peak_rss_over_preload_bytes"] for r in recs),
            "model_bytes": recs[0]["model_bytes"],
            "exit_wait_seconds_median": statistics.median(r["exit_wait_seconds"] for r in recs),
            "cache_statuses": sorted({str((r.get("cache") or {}).get("status")) for r in recs}),
        }
        if any("writer_seconds" in r for r in recs):
            s["writer_seconds_median"] = statistics.median(r["writer_seconds"] for r in recs if "writer_seconds" in r)
        if args.forward:
            s["load_forward_seconds_median"] = statistics.median(r["load_forward_seconds"] for r in recs)
        summary[mode] = s
    med = {m: summary[m]["seconds_median"] for m in summary}
    summary["stock_over_cached"] = med["stock"] / med["cached"]
    summary["first_over_fast"] = med["first"] / med["fast"]
    cached = summary["cached"]
    summary["cached_peak_over_model"] = cached["peak_rss_over_preload_median"] / cached["model_bytes"]
    if args.forward:
        summary["stock_over_cached_with_forward"] = (
            summary["stock"]["load_forward_seconds_median"] / summary["cached"]["load_forward_seconds_median"]
        )
    result = {"machine": machine_info(), "args": vars(args), "checkpoint": {"path": path, "files": files},
              "runs": records, "summary": summary}  # fmt: skip
    if args.procs:
        if not os.path.isdir(os.path.join(cache, "entries")):
            timed_load("first", path, args.dtype, _env(cache), False)
        result["shared"] = shared_memory(path, args.dtype, cache, args.procs)

    gib = 2**30
    print(f"{'mode':<15}{'median s':>10}{'load+fwd s':>12}{'peak MiB':>10}{'exit wait s':>13}  cache")
    for mode in MODES:
        if mode in summary:
            s = summary[mode]
            print(f"{mode:<15}{s['seconds_median']:>10.3f}{s.get('load_forward_seconds_median', 0):>12.3f}"
                  f"{s['peak_rss_over_preload_median'] / 2**20:>10.0f}{s['exit_wait_seconds_median']:>13.2f}  "
                  f"{','.join(s['cache_statuses'])}")  # fmt: skip
    print(
        f"stock/cached {summary['stock_over_cached']:.2f}x, first/fast {summary['first_over_fast']:.2f}x, "
        f"cached peak {summary['cached_peak_over_model']:.4f}x the model (write={args.write})"
    )
    if "writer_seconds_median" in summary["first"]:
        print(f"the entry was published {summary['first']['writer_seconds_median']:.2f} s after the first load ended")
    if "shared" in result:
        sh = result["shared"]
        print(
            f"{sh['procs']} processes mapping one entry: weights PSS {sh['pss_entry_total'] / gib:.2f} GiB "
            f"({sh['pss_entry_over_model']:.2f}x the {sh['model_bytes'] / gib:.2f} GiB model); all PSS "
            f"{sh['pss_total'] / gib:.2f} GiB, less {sh['procs']} idle interpreters "
            f"({sh['idle_process']['pss'] / gib:.2f} GiB each): {sh['pss_total_less_idle_over_model']:.2f}x; "
            f"RSS sum {sh['rss_total'] / gib:.2f} GiB; statuses {sh['statuses']}"
        )
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
