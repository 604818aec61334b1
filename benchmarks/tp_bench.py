"""Stock vs fast tensor-parallel loads: ``from_pretrained(path, tp_plan="auto")`` under ``torchrun`` on CPU ranks.

Example:
    ```bash
    python benchmarks/make_checkpoint.py /tmp/bench/llama-0.5b --params 5e8 --dtype bf16
    python benchmarks/tp_bench.py /tmp/bench/llama-0.5b --runs 5 --dtype bfloat16 --json benchmarks/results/tp.json
    ```

Each run is one fresh ``torchrun --nproc-per-node N`` launch per mode (gloo, CPU), stock and fast alternating and
their order swapped every run. In each rank, everything is imported, the process group initialized and the class
resolved before the clock starts; the ranks meet at a barrier, then each times its own load. A launch's time is its
slowest rank's. The fast loads' reports give the bytes each rank read and its share of the checkpoint.
Results: medians per mode, and every run, in ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime

HERE = os.path.dirname(os.path.abspath(__file__))


def _vm(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def worker(mode: str, path: str, dtype: str, out_dir: str, disable_mmap: bool = False) -> int:
    """One rank: init gloo, barrier, timed load, write ``out_dir/rank<N>.json``."""
    import warnings

    warnings.simplefilter("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch
    import torch.distributed as dist
    import transformers

    import hf_fastload
    from hf_fastload.integration import compat, distributed, loader  # noqa: F401  (imported before the clock)

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
        cls = getattr(transformers, json.load(fh)["architectures"][0])
    kwargs = {"tp_plan": "auto"}
    if dtype != "none":
        kwargs["dtype"] = dtype if dtype == "auto" else getattr(torch, dtype)
    if disable_mmap:
        kwargs["disable_mmap"] = True  # 5.x stock then reads each file whole into memory, on every rank
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")
    rss0 = _vm("VmRSS")
    dist.barrier()
    start = time.perf_counter()
    if mode == "stock":
        model = cls.from_pretrained(path, **kwargs)
    else:
        model = hf_fastload.fast_from_pretrained(path, model_class=cls, **kwargs)
    seconds = time.perf_counter() - start
    result = {
        "mode": mode,
        "rank": rank,
        "world_size": dist.get_world_size(),
        "seconds": seconds,
        "peak_rss_over_preload_bytes": max(0, _vm("VmHWM") - rss0),
        "local_bytes": sum(
            (p.to_local() if hasattr(p, "to_local") else p).nbytes for p in model.state_dict().values()
        ),
        "transformers_version": transformers.__version__,
    }
    if mode == "fast":
        report = hf_fastload.last_report()
        result.update(
            path=report.path,
            bytes_read=report.bytes_read,
            checkpoint_bytes=report.checkpoint_bytes,
            read_share=report.read_share,
            methods=report.methods,
            report_seconds=report.seconds,
        )
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, args) -> dict:
    """One fresh torchrun launch of ``mode``; the ranks' results and the launch's time."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), os.path.abspath(__file__),
            "--worker", mode, args.path, "--dtype", args.dtype, "--out", out,
        ] + (["--disable-mmap"] if args.disable_mmap else [])  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{mode} launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        ranks = []
        for rank in range(args.nproc):
            with open(os.path.join(out, f"rank{rank}.json"), encoding="utf-8") as fh:
                ranks.append(json.load(fh))
    return {"mode": mode, "seconds": max(r["seconds"] for r in ranks), "launch_wall_seconds": wall, "ranks": ranks}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="checkpoint folder (benchmarks/make_checkpoint.py makes one)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--nproc", type=int, default=2, help="ranks per launch (default 2)")
    parser.add_argument("--dtype", default="bfloat16", help="from_pretrained dtype: a torch dtype name, auto or none")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per launch")
    parser.add_argument("--disable-mmap", action="store_true", help="pass disable_mmap=True (transformers 5.x)")
    parser.add_argument("--json", default=None, help="write every run and the summary here")
    parser.add_argument("--worker", choices=("stock", "fast"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.path, args.dtype, args.out, args.disable_mmap)

    import torch
    import transformers

    runs = []
    for i in range(args.runs):
        for mode in ("stock", "fast") if i % 2 == 0 else ("fast", "stock"):
            run = launch(mode, args)
            run["run"] = i
            runs.append(run)
            extra = ""
            if mode == "fast":
                shares = ", ".join(
                    f"rank {r['rank']} {r['bytes_read'] / 1e9:.3f} GB ({r['read_share']:.1%})" for r in run["ranks"]
                )
                extra = f"  read: {shares}"
            print(f"run {i} {mode:5s} {run['seconds']:.3f}s (launch {run['launch_wall_seconds']:.1f}s){extra}")
            sys.stdout.flush()
    summary = {}
    for mode in ("stock", "fast"):
        mine = [r for r in runs if r["mode"] == mode]
        summary[mode] = {
            "median_seconds": statistics.median(r["seconds"] for r in mine),
            "min_seconds": min(r["seconds"] for r in mine),
            "median_peak_rss_over_preload_bytes_per_rank": statistics.median(
                max(x["peak_rss_over_preload_bytes"] for x in r["ranks"]) for r in mine
            ),
        }
    fast_ranks = [x for r in runs if r["mode"] == "fast" for x in r["ranks"]]
    per_rank = {}
    for x in fast_ranks:
        per_rank.setdefault(x["rank"], (x["bytes_read"], x["checkpoint_bytes"], x["read_share"]))
    summary["speedup"] = summary["stock"]["median_seconds"] / summary["fast"]["median_seconds"]
    summary["bytes_read_per_rank"] = {
        str(k): {"bytes_read": b, "checkpoint_bytes": c, "read_share": s} for k, (b, c, s) in sorted(per_rank.items())
    }
    print(
        f"transformers {transformers.__version__}, {args.nproc} ranks, dtype {args.dtype}"
        f"{', disable_mmap=True' if args.disable_mmap else ''}: "
        f"stock median {summary['stock']['median_seconds']:.3f}s, "
        f"fast median {summary['fast']['median_seconds']:.3f}s ({summary['speedup']:.2f}x)"
    )
    for k, (b, c, s) in sorted(per_rank.items()):
        print(f"  rank {k}: read {b / 1e9:.3f} GB of {c / 1e9:.3f} GB ({s:.1%})")
    if args.json:
        doc = {
            "machine": {
                "cpu_count": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "date": datetime.now().isoformat(timespec="seconds"),
            },
            "args": {
                "path": args.path,
                "runs": args.runs,
                "nproc": args.nproc,
                "dtype": args.dtype,
                "disable_mmap": args.disable_mmap,
                "backend": "gloo",
                "device": "cpu",
                "page_cache": "warm",
            },
            "summary": summary,
            "runs": runs,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
