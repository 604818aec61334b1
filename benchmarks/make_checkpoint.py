"""Writes a synthetic Llama checkpoint for benchmarks: ``python benchmarks/make_checkpoint.py OUT --params 1e9``.

A thin command line over :mod:`hf_fastload.tools.checkpoint_maker` (which the package's ``hf-fastload demo`` uses too).

Example:
    ```bash
    python benchmarks/make_checkpoint.py /tmp/llama-1b --params 1e9 --dtype bf16 --shards 2
    python benchmarks/make_checkpoint.py /tmp/llama-8b --params 8e9   # Llama-3-8B shapes
    hf-fastload bench /tmp/llama-1b --dtype float32
    ```
"""

from __future__ import annotations

import argparse
import sys
import time

from hf_fastload.tools.checkpoint_maker import DTYPE_NAMES, LlamaDims, llama_dims, make_checkpoint

__all__ = ["LlamaDims", "llama_dims", "main", "make_checkpoint"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a random Llama-shaped checkpoint without building the model.")
    parser.add_argument("out", help="output folder (created if missing)")
    parser.add_argument("--params", type=float, default=1e9, help="wanted parameter count (default 1e9)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_NAMES), help="stored dtype (default bf16)")
    parser.add_argument("--shards", type=int, default=1, help="number of safetensors files (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    dims = llama_dims(args.params)
    print(f"{dims} = {dims.num_parameters() / 1e9:.3f}B parameters", flush=True)
    start = time.perf_counter()
    out = make_checkpoint(args.out, dtype=args.dtype, shards=args.shards, seed=args.seed, dims=dims)
    print(f"wrote {out} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
