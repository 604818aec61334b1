"""Measures, without a GPU, how well the device pipeline overlaps reading with host-to-device copies.

The pipeline runs for real (reader threads, ring, back-pressure, side streams, device-side conversion) against the
stand-in device (:class:`~hf_fastload.engine.StandInBackend`), whose copies and reads take simulated time: one
copy link of ``C`` GB/s shared by all streams plus a per-copy latency, one disk/page cache of ``R`` GB/s shared by the
reader threads, and a per-thread read cap (a memory copy). Real bytes move too, so every load is also checked bit
for bit. The sizes are the real ones divided by ``--scale`` and so are the bandwidths: every chunk takes as long as
it would on the GPU machine, so per-chunk costs (Python, locks, the GIL) count as they would there, while the real
byte work is ``scale`` times smaller than the simulated time and hides inside it (the run is dominated by sleeps,
which keeps it meaningful on a busy 2-core machine).

For each read/copy ratio it reports achieved throughput against ``min(R, C)`` (perfect overlap) and
``1 / (1/R + 1/C)`` (no overlap), over reader threads x ring size x chunk size, then repeats the defaults.

Usage:
    python benchmarks/overlap.py                            # full sweep, ~5 min; JSON under benchmarks/results/
    python benchmarks/overlap.py --quick                    # the defaults only
    python benchmarks/overlap.py --plot-only RESULT.json --plot chart.png   # needs matplotlib
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

REAL_COPY_GBPS = 50.0  # pinned host-to-device on PCIe Gen5 x16 (H200): 50-55 GB/s
REAL_THREAD_READ_GBPS = 8.0  # one thread's pread from the page cache into pinned memory (a memcpy)
COPY_LATENCY_S = 10e-6  # from queuing a cudaMemcpyAsync to its DMA starting
RATIOS = {"read 2x copy": 2.0, "read = copy": 1.0, "copy 2x read": 0.5}
THREADS = (4, 8, 16)
RING_MB = (128, 256, 1024)
CHUNK_MB = (4, 16, 64)
LOADER_THREADS = 4  # transformers 5 materializes tensors from 4 threads


def make_checkpoint(folder: str, scale: int) -> tuple[str, list[str], int]:
    """A Llama-3-8B-shaped set of bf16 tensors, each with 1/scale of its rows (16 GB / scale in all)."""
    import torch
    from safetensors.torch import save_file

    path = os.path.join(folder, f"llama8b-div{scale}.safetensors")
    hidden, inter, kv, vocab, layers = 4096, 14336, 1024, 128256, 32
    shapes = {"embed": (vocab, hidden), "lm_head": (vocab, hidden)}
    for i in range(layers):
        for name, rows in (("q", hidden), ("k", kv), ("v", kv), ("o", hidden), ("gate", inter), ("up", inter),
                           ("down", hidden)):  # fmt: skip
            cols = inter if name == "down" else hidden
            shapes[f"l{i}.{name}"] = (rows, cols)
        shapes[f"l{i}.norm"] = (1, hidden)
    shapes = {k: (max(1, r // scale), c) for k, (r, c) in shapes.items()}
    if not os.path.exists(path):
        g = torch.Generator().manual_seed(0)
        save_file({k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in shapes.items()}, path)
    nbytes = sum(r * c * 2 for r, c in shapes.values())
    return path, list(shapes), nbytes


def run_once(path, names, nbytes, *, scale, slow, read_gbps, copy_gbps, threads, ring_mb, chunk_mb, dtype=None,
             check=None) -> dict:  # fmt: skip
    """One load of every tensor through the pipeline with the stand-in device; returns its record."""
    import torch

    from hf_fastload.engine import ring as ring_knobs
    from hf_fastload.engine.context import LoadContext
    from hf_fastload.engine.standin import StandInBackend, standin

    ring = ring_mb * 2**20 // scale
    chunk = chunk_mb * 2**20 // scale
    ring_knobs.pinned_budget = lambda: ring  # the sizes are scaled below a MiB: set them here, not through the knobs
    ring_knobs.chunk_bytes = lambda: chunk
    rate = scale * slow  # bandwidths: sizes are / scale, and time runs `slow` times slower than on the GPU machine
    dev = StandInBackend(
        copy_gbps=copy_gbps / rate, copy_latency=COPY_LATENCY_S * slow, read_gbps=read_gbps / rate,
        read_thread_gbps=REAL_THREAD_READ_GBPS / rate,
    )  # fmt: skip
    target = getattr(torch, dtype) if dtype else None
    with standin(dev):
        ctx = LoadContext(io="pread", threads=threads)
        f = ctx.open(path)
        start = time.perf_counter()
        # as transformers 5 with hf_fastload's hooks: every tensor submitted up front (planned and prefetched, as
        # compat's spawn_materialize does), then materialized by 4 loader threads in that order
        slices = [f.get_slice(n) for n in names]
        for ts in slices:
            if ctx.streams("cpu", ts.file):
                ctx.plan(ts, "cpu", target)
                ctx.prefetch()

        def load(ts):
            ready = ctx.take(ts, "cpu", target)
            return ready if ready is not None else ctx.materialize(ts, "cpu", target)

        with ThreadPoolExecutor(LOADER_THREADS) as pool:
            out = list(pool.map(load, slices))
        seconds = time.perf_counter() - start
        pipe = ctx.pipelines["cpu"]
        ctx.close()
    if check is not None:
        for name, t in zip(names, out):
            want = check.get_tensor(name)
            assert torch.equal(t, want.to(target) if target else want), f"{name} differs"
    achieved = nbytes * scale / (seconds / slow) / 1e9
    ideal = min(read_gbps, copy_gbps)
    none = 1 / (1 / read_gbps + 1 / copy_gbps)
    return {
        "read_gbps": read_gbps, "copy_gbps": copy_gbps, "threads": threads, "ring_mb": ring_mb,
        "chunk_mb": chunk_mb, "dtype": dtype or "bfloat16", "slots": pipe.nslots, "seconds": seconds,
        "achieved_gbps": achieved, "ideal_gbps": ideal, "no_overlap_gbps": none, "of_ideal": achieved / ideal,
        "peak_slots_in_use": pipe.peak_in_use,
    }  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=256, help="sizes divided by this (default 256)")
    parser.add_argument(
        "--slow",
        type=float,
        default=10.0,
        help="time runs this many times slower than on the GPU machine (default 10): per-chunk CPU "
        "costs shrink by as much, so a busy CPU does not decide the result",
    )
    parser.add_argument("--quick", action="store_true", help="the defaults only (no sweep)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of the defaults per ratio (median)")
    parser.add_argument("--defaults", default="8,256,16", help="threads,ring MiB,chunk MiB to repeat")
    parser.add_argument("--json", default=None, help="output (default benchmarks/results/overlap-cpu-DATE.json)")
    parser.add_argument("--plot", default=None, help="also draw the chart (needs matplotlib)")
    parser.add_argument("--plot-only", default=None, metavar="JSON", help="draw the chart of an earlier run")
    args = parser.parse_args(argv)
    if args.plot_only:
        with open(args.plot_only, encoding="utf-8") as fh:
            plot(json.load(fh), args.plot or args.plot_only.replace(".json", ".png"))
        return 0

    from safetensors import safe_open

    here = os.path.dirname(os.path.abspath(__file__))
    date = datetime.date.today().isoformat()
    out_path = args.json or os.path.join(here, "results", f"overlap-cpu-{date}.json")
    threads, ring_mb, chunk_mb = (int(x) for x in args.defaults.split(","))
    folder = os.path.join(tempfile.gettempdir(), "hf_fastload-overlap")
    os.makedirs(folder, exist_ok=True)
    path, names, nbytes = make_checkpoint(folder, args.scale)
    result = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "date": datetime.datetime.now().isoformat(timespec="seconds")},
        "model": {"scale": args.scale, "slow": args.slow, "bytes": nbytes, "real_bytes": nbytes * args.scale,
                  "tensors": len(names),
                  "copy_gbps": REAL_COPY_GBPS, "thread_read_gbps": REAL_THREAD_READ_GBPS,
                  "copy_latency_s": COPY_LATENCY_S, "loader_threads": LOADER_THREADS},
        "defaults": {"threads": threads, "ring_mb": ring_mb, "chunk_mb": chunk_mb},
        "sweep": [], "repeats": [],
    }  # fmt: skip
    started = time.perf_counter()
    with safe_open(path, "pt") as check:
        run_once(path, names[:20], nbytes, scale=args.scale, slow=args.slow, read_gbps=50, copy_gbps=50, threads=4,
                 ring_mb=256, chunk_mb=16)  # warm-up: page cache, thread pools  # fmt: skip
        for label, ratio in RATIOS.items():
            read_gbps = REAL_COPY_GBPS * ratio
            common = dict(scale=args.scale, slow=args.slow, read_gbps=read_gbps, copy_gbps=REAL_COPY_GBPS)
            if not args.quick:
                for t in THREADS:
                    for r in RING_MB:
                        for c in CHUNK_MB:
                            rec = run_once(path, names, nbytes, threads=t, ring_mb=r, chunk_mb=c, **common)
                            rec["ratio"] = label
                            result["sweep"].append(rec)
                            print(
                                f"{label:>13}  threads {t:>2}  ring {r:>4} MiB  chunk {c:>2} MiB  "
                                f"{rec['achieved_gbps']:5.1f} GB/s = {rec['of_ideal']:.2f} of ideal",
                                flush=True,
                            )
            for dtype in ("bfloat16", "float32"):
                for k in range(args.repeats):
                    rec = run_once(path, names, nbytes, threads=threads, ring_mb=ring_mb, chunk_mb=chunk_mb,
                                   dtype=None if dtype == "bfloat16" else dtype, check=check if k == 0 else None,
                                   **common)  # fmt: skip
                    rec.update(ratio=label, repeat=k)
                    result["repeats"].append(rec)
            with open(out_path, "w", encoding="utf-8") as fh:  # after every ratio: a cut run keeps its data
                json.dump(result, fh, indent=1)
    result["seconds"] = time.perf_counter() - started
    result["summary"] = summarize(result)
    with open(out_path, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    print(table(result))
    print(f"wrote {out_path} ({result['seconds']:.0f} s)")
    if args.plot:
        plot(result, args.plot)
    return 0


def summarize(result: dict) -> list[dict]:
    rows = []
    for label in RATIOS:
        for dtype in ("bfloat16", "float32"):
            recs = [r for r in result["repeats"] if r["ratio"] == label and r["dtype"] == dtype]
            if not recs:
                continue
            med = statistics.median(r["achieved_gbps"] for r in recs)
            rows.append({
                "ratio": label, "dtype": dtype, "read_gbps": recs[0]["read_gbps"], "copy_gbps": recs[0]["copy_gbps"],
                "ideal_gbps": recs[0]["ideal_gbps"], "no_overlap_gbps": recs[0]["no_overlap_gbps"],
                "achieved_gbps_median": med, "of_ideal": med / recs[0]["ideal_gbps"], "runs": len(recs),
            })  # fmt: skip
    return rows


def table(result: dict) -> str:
    d = result["defaults"]
    lines = [
        f"defaults: {d['threads']} threads, ring {d['ring_mb']} MiB, chunk {d['chunk_mb']} MiB "
        f"(bandwidths at real scale; sizes and rates / {result['model']['scale']})",
        "| read : copy | read GB/s | copy GB/s | no overlap | ideal | achieved (bf16) | of ideal | achieved "
        "(bf16 -> fp32 on device) | of ideal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["ratio"], r["dtype"]): r for r in result.get("summary") or summarize(result)}
    for label in RATIOS:
        same, cast = by.get((label, "bfloat16")), by.get((label, "float32"))
        if same is None:
            continue
        row = (
            f"| {label} | {same['read_gbps']:.0f} | {same['copy_gbps']:.0f} | {same['no_overlap_gbps']:.1f} | "
            f"{same['ideal_gbps']:.1f} | {same['achieved_gbps_median']:.1f} | {same['of_ideal']:.2f} |"
        )
        row += f" {cast['achieved_gbps_median']:.1f} | {cast['of_ideal']:.2f} |" if cast else " - | - |"
        lines.append(row)
    if result["sweep"]:
        lines.append("")
        lines.append("sweep, fraction of ideal (rows: threads x ring MiB; columns: chunk MiB per ratio)")
        head = "| threads | ring MiB | " + " | ".join(f"{lab} {c}" for lab in RATIOS for c in CHUNK_MB) + " |"
        lines += [head, "|" + "---|" * (2 + len(RATIOS) * len(CHUNK_MB))]
        cell = {(r["ratio"], r["threads"], r["ring_mb"], r["chunk_mb"]): r["of_ideal"] for r in result["sweep"]}
        for t in THREADS:
            for ring in RING_MB:
                vals = [cell.get((lab, t, ring, c)) for lab in RATIOS for c in CHUNK_MB]
                lines.append(f"| {t} | {ring} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in vals) + " |")
    return "\n".join(lines)


def plot(result: dict, out: str) -> None:
    """One panel per read/copy ratio: fraction of ideal for every threads x ring x chunk, the defaults' median,
    and where no overlap would be."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {4: "#9ecae1", 8: "#4292c6", 16: "#08519c"}
    fig, axes = plt.subplots(1, len(RATIOS), figsize=(15, 4.2), sharey=True)
    summary = {(r["ratio"], r["dtype"]): r for r in result.get("summary") or summarize(result)}
    for ax, label in zip(axes, RATIOS):
        recs = {(r["threads"], r["ring_mb"], r["chunk_mb"]): r for r in result["sweep"] if r["ratio"] == label}
        x, ticks, labels = 0, [], []
        for c in CHUNK_MB:
            for ring in RING_MB:
                for i, t in enumerate(THREADS):
                    rec = recs.get((t, ring, c))
                    if rec:
                        ax.bar(
                            x + i * 0.27,
                            rec["of_ideal"],
                            0.27,
                            color=colors[t],
                            label=f"{t} threads" if (c, ring) == (CHUNK_MB[0], RING_MB[0]) else None,
                        )
                ticks.append(x + 0.27)
                labels.append(f"{ring}\n{c} MiB" if ring == RING_MB[1] else f"{ring}")
                x += 1
            x += 0.5
        s = summary.get((label, "bfloat16"))
        if s:
            ax.axhline(s["no_overlap_gbps"] / s["ideal_gbps"], color="#c44e52", ls="--", lw=1, label="no overlap")
            ax.axhline(s["of_ideal"], color="#55a868", lw=1.5, label=f"defaults: {s['of_ideal']:.2f}")
        ax.axhline(0.9, color="#999999", ls=":", lw=1, label="0.9")
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(f"{label} (read {s['read_gbps']:.0f}, copy {s['copy_gbps']:.0f} GB/s)" if s else label,
                     fontsize=9)  # fmt: skip
        ax.set_ylim(0, 1.1)
        ax.set_xlabel("ring MiB, grouped by chunk MiB", fontsize=8)
    axes[0].set_ylabel("throughput / min(read, copy)")
    axes[-1].legend(fontsize=7, loc="lower right")
    d = result["defaults"]
    fig.suptitle(
        f"device pipeline overlap, stand-in device (simulated bandwidths, sizes / {result['model']['scale']}); "
        f"defaults {d['threads']} threads, ring {d['ring_mb']} MiB, chunk {d['chunk_mb']} MiB; "
        f"{result['machine']['date'][:10]}", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    sys.exit(main())
