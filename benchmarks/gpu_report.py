"""The table at the end of ``benchmarks/gpu.sh``: every step, the checks, the numbers next to their targets.

Usage:
    python benchmarks/gpu_report.py RESULTS_FOLDER      # reads what gpu.sh wrote there; prints Markdown
"""

from __future__ import annotations

import json
import os
import sys


def _load(folder: str, name: str):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    folder = argv[0] if argv else "."
    out = ["## steps", "", "| step | status | seconds |", "|---|---|---|"]
    steps_path = os.path.join(folder, "steps.tsv")
    if os.path.isfile(steps_path):
        with open(steps_path, encoding="utf-8") as fh:
            for line in list(fh)[1:]:
                name, status, seconds = line.rstrip("\n").split("\t")
                out.append(f"| {name} | {status} | {seconds} |")

    for name, label in (("gpu-check.json", "correctness"), ("gpu-check-sanitizer.json", "under the sanitizer")):
        data = _load(folder, name)
        if data is None:
            continue
        counts = f"{data['passed']} passed, {data['failed']} failed, {data.get('skipped', 0)} skipped"
        where = f"{data['device']}, torch {data['torch']}, transformers {data['transformers']}"
        out += ["", f"## {label}: {counts} ({where})", ""]
        out += [f"- {c['status']} {c['check']} ({c['seconds']}s)" for c in data["checks"]]

    bench = _load(folder, "gpu-bench-bf16.json")
    if bench is not None:
        s, c = bench["summary"], bench["checkpoint"]
        out += ["", f"## {c['tensor_bytes'] / 1e9:.1f} GB {c['stored_dtype']}, device {bench['args']['device']}, "
                f"medians of {len([r for r in bench['runs'] if r['mode'] == 'fast'])}", ""]  # fmt: skip
        out += ["| mode | median s | GB/s |", "|---|---|---|"]
        for mode in ("stock", "fast", "floor"):
            if mode in s:
                out.append(f"| {mode} | {s[mode]['seconds_median']:.3f} | {s[mode]['gb_per_s']:.1f} |")
        h2d = s.get("floor", {}).get("h2d_gb_per_s_median")
        ratio, fast_gbps = s.get("stock_over_fast"), s.get("fast_gb_per_s")
        out += ["", "| target | measured | met |", "|---|---|---|"]
        if ratio:
            out.append(f"| >= 5x stock | {ratio:.2f}x | {'yes' if ratio >= 5 else 'no'} |")
        if fast_gbps:
            out.append(f"| >= 30 GB/s | {fast_gbps:.1f} GB/s | {'yes' if fast_gbps >= 30 else 'no'} |")
        if h2d and fast_gbps:
            out.append(f"| >= 0.85 x pinned H2D ({h2d:.1f} GB/s) | {fast_gbps / h2d:.2f}x | "
                       f"{'yes' if fast_gbps / h2d >= 0.85 else 'no'} |")  # fmt: skip
        if "checksums" in s:
            k = s["checksums"]
            seen = f"all {k['tensors']}" if k["equal"] else ", ".join(k["differ"])
            out.append(f"| per-tensor checksums equal to stock's | {seen} | {'yes' if k['equal'] else 'NO'} |")

    sweep = _load(folder, "gpu-sweep.json")
    if sweep is not None:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from gpu_sweep import summarize, table

        sweep.setdefault("summary", summarize(sweep))
        out += ["", "## sweep and conversions", "", table(sweep)]
        best = sweep["summary"].get("best")
        if best:
            out.append(f"\nbest: threads {best['threads']}, ring {best['ring_mb']} MiB, chunk {best['chunk_mb']} MiB: "
                       f"{best['gb_per_s']:.1f} GB/s")  # fmt: skip
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
