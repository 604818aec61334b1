"""The ``hf-fastload`` command: ``run`` (a program with the opt-in on), ``bench`` (stock vs fast vs the bytes
floor, fresh processes) and ``demo``.

Example:
    ```bash
    hf-fastload run --report loads.jsonl train.py --lr 3e-4   # train.py unchanged; its loads go through hf_fastload
    hf-fastload run -m my_package.serve --port 8000
    hf-fastload demo                                   # builds a 150M bf16 Llama once, loads it as float32
    hf-fastload bench ./llama-1b --dtype float32 --runs 5 --json bench.json --plot bench.png
    hf-fastload bench ./llama-8b --device cuda --dtype bfloat16 --forward
    hf-fastload cache ls                               # the converted-tensor cache (HF_FASTLOAD_CACHE): verify, clear
    ```

The commands live in :mod:`~hf_fastload.tools.run`, :mod:`~hf_fastload.tools.bench` and
:mod:`~hf_fastload.tools.cache_cmd`; this module is their argument parsing. Importing it is cheap: torch and
transformers are imported by the commands that need them.
"""

from __future__ import annotations

import argparse
import sys

from .bench import DTYPES, QUANTIZE, WorkerError, bench, demo
from .cache_cmd import cache_command
from .run import run, split_run_argv

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    program: list[str] = []
    if argv and argv[0] == "run":
        ours, program = split_run_argv(argv[1:])
        argv = ["run", *ours]
    parser = argparse.ArgumentParser(prog="hf-fastload", description="hf_fastload: fast from_pretrained.")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "run",
        help="run a Python program with HF_FASTLOAD=1: its from_pretrained and pipeline() calls load fast",
        usage="hf-fastload run [--report PATH] [--verbose] (SCRIPT | -m MODULE) [ARGS...]",
    )
    r.add_argument("--report", metavar="PATH", help="append one JSON line per load to PATH (HF_FASTLOAD_REPORT)")
    r.add_argument("--verbose", action="store_true", help="log each load's report (HF_FASTLOAD_VERBOSE=1)")
    r.add_argument("-m", dest="module", metavar="MODULE", help="run a module, as python -m does")
    r.add_argument("args", nargs="*", metavar="SCRIPT [ARGS...]", help="the script and its arguments")
    b = sub.add_parser("bench", help="time stock vs fast loading of a local checkpoint, in fresh processes")
    b.add_argument("path", help="a local checkpoint folder (config.json + safetensors)")
    b.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    b.add_argument("--dtype", default="auto", choices=DTYPES, help="dtype passed to both loads (none: not passed)")
    b.add_argument("--io", choices=("auto", "mmap", "pread", "direct"), help="HF_FASTLOAD_IO for the fast loads")
    b.add_argument("--disable-mmap", action="store_true", help="pass disable_mmap=True (transformers 5)")
    b.add_argument("--runs", type=int, default=3, help="rounds of stock, fast and floor (default 3)")
    b.add_argument("--json", dest="json_path", metavar="OUT.json", help="write raw runs, summary and machine info")
    b.add_argument("--plot", dest="plot_path", metavar="OUT.png", help="write a bar chart (needs matplotlib)")
    b.add_argument("--forward", action="store_true", help="also time one forward pass over 8 tokens")
    b.add_argument(
        "--checksums", action="store_true", help="compare per-tensor checksums of fast's model with stock's"
    )
    b.add_argument("--timeout", type=float, default=None, help="seconds each worker process may take")
    b.add_argument("--quantize", choices=QUANTIZE, help="quantize on load with bitsandbytes (BitsAndBytesConfig)")
    b.add_argument("--adapter", metavar="ADAPTER", help="load this PEFT adapter of PATH (AutoModelForCausalLM)")
    d = sub.add_parser("demo", help="build a small bf16 Llama once and bench loading it as float32")
    d.add_argument("--params", type=float, default=1.5e8, help="parameters of the demo model (default 1.5e8)")
    d.add_argument("--dir", dest="directory", help="checkpoint folder (default ~/.cache/hf_fastload/demo-<params>)")
    d.add_argument("--runs", type=int, default=3)
    c = sub.add_parser("cache", help="list, verify or clear the converted-tensor cache (HF_FASTLOAD_CACHE)")
    c.add_argument("action", choices=("ls", "verify", "clear"),
                   help="ls: entries, sizes, sources; verify: also compare each with its source converted again; "
                        "clear: remove entries")  # fmt: skip
    c.add_argument("--dir", dest="directory", help="the cache folder (default: HF_FASTLOAD_CACHE)")
    c.add_argument("--stale", action="store_true", help="clear only entries no load can use (stale, orphan, corrupt)")
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    try:
        if command == "run":
            return run(program, module=args["module"], report=args["report"], verbose=args["verbose"])
        if command == "cache":
            return cache_command(**args)
        if command == "bench":
            bench(**args)
        else:
            demo(**args)
    except (WorkerError, FileNotFoundError, ValueError) as e:
        print(f"hf-fastload {command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
