"""Draws the README's chart from `hf-fastload bench --json` results: one group of bars per case (stock, fast, floor).

Usage:
    python benchmarks/plot_results.py benchmarks/results/cpu-*.json --out benchmarks/results/cpu.png

Needs matplotlib. Each bar is the median load time of its JSON; the label under each group is the file's case
(its name without the date) and the stock/fast ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import re


def _case(path: str) -> str:
    name = os.path.basename(path).removesuffix(".json")
    return re.sub(r"-\d{4}-\d{2}-\d{2}.*$", "", name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="JSON files written by hf-fastload bench --json")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--title", default=None)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases, bars = [], {"stock": [], "fast": [], "floor": []}
    machine = None
    for path in args.results:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        summary = data["summary"]
        machine = machine or data.get("machine", {})
        ratio = summary.get("stock_over_fast")
        cases.append(f"{_case(path)}\n{ratio:.2f}x" if ratio else _case(path))
        for mode in bars:
            bars[mode].append(summary.get(mode, {}).get("seconds_median", 0.0))

    fig, ax = plt.subplots(figsize=(max(6, 2.0 * len(cases)), 4))
    width = 0.27
    colors = {"stock": "#c44e52", "fast": "#4c72b0", "floor": "#999999"}
    for i, (mode, values) in enumerate(bars.items()):
        xs = [x + (i - 1) * width for x in range(len(cases))]
        ax.bar(xs, values, width, label=mode, color=colors[mode])
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, fontsize=8)
    ax.set_ylabel("load time, median (s)")
    where = f"{machine.get('cpu_count', '?')} cores, torch {machine.get('torch', '?')}, {machine.get('date', '')[:10]}"
    ax.set_title(args.title or f"stock vs hf_fastload vs floor ({where})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
