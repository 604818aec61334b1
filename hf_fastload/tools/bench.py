"""``hf-fastload bench`` and ``demo``: stock vs fast vs the bytes floor, in alternating fresh processes.

Example:
    ```python
    from hf_fastload.tools.bench import bench, format_table

    result = bench("./llama-1b", dtype="float32", runs=5, json_path="bench.json")
    print(format_table(result))
    ```

Every measured load runs in a fresh ``python -m hf_fastload.tools.bench_worker`` process (see there for what is
timed), stock and fast alternating which goes first, after one read of the checkpoint files so that every mode finds
them in the page cache. Importing this module is cheap (it reads headers with ``json``, not through the format
layer, which imports torch): torch and transformers are imported by the workers.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from typing import Any

from .checkpoint_maker import llama_dims, make_checkpoint

__all__ = [
    "MODES", "QUANTIZE", "WorkerError", "bench", "checkpoint_files", "demo", "format_table", "machine_info",
    "write_plot",
]  # fmt: skip

MODES = ("stock", "fast", "floor")
DTYPES = ("auto", "none", "float32", "bfloat16", "float16")
QUANTIZE = ("4bit", "8bit")
_INDEX_NAME = "model.safetensors.index.json"
_ST_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


class WorkerError(RuntimeError):
    """A benchmark worker process failed; the message holds the end of its stderr."""


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a local checkpoint folder: the index's shards, else ``model.safetensors``, else all."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a folder: hf-fastload bench needs a local checkpoint folder")
    index = os.path.join(path, _INDEX_NAME)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as fh:
                return [os.path.join(path, f) for f in sorted(set(json.load(fh)["weight_map"].values()))]
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} has no 'weight_map' of tensor name to shard file: {e!r}") from None
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    found = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not found:
        raise FileNotFoundError(f"no safetensors files in {path}")
    return found


def _header(file: str) -> dict:
    with open(file, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(n))


def _checkpoint_info(files: list[str]) -> dict[str, Any]:
    tensor_bytes, dtypes = 0, {}
    for f in files:
        for name, entry in _header(f).items():
            if name != "__metadata__":
                size = entry["data_offsets"][1] - entry["data_offsets"][0]
                tensor_bytes += size
                dtypes[entry["dtype"]] = dtypes.get(entry["dtype"], 0) + size
    stored = max(dtypes, key=dtypes.get) if dtypes else "?"
    stored = _ST_DTYPES.get(stored, stored)
    return {"files": files, "tensor_bytes": tensor_bytes, "stored_dtype": stored}


def _warm_page_cache(files: list[str]) -> None:
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.read(16 << 20):
                pass


def _version(dist: str) -> str:
    try:
        return dist_version(dist)
    except PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, Any]:
    mem = 0
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            mem = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu_count": os.cpu_count(),
        "memory_bytes": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "hf_fastload": _version("hf_fastload"),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def _run_worker(mode: str, path: str, options: list[str], env: dict[str, str], timeout: float | None = None):
    cmd = [sys.executable, "-m", "hf_fastload.tools.bench_worker", mode, path, *options]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise WorkerError(f"the {mode} worker did not finish in {timeout:g}s: {' '.join(cmd)}") from e
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-25:])
        raise WorkerError(f"the {mode} worker failed (exit code {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return json.loads(lines[-1])


def _summarize(records: list[dict], info: dict) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for mode in MODES:
        recs = [r for r in records if r["mode"] == mode]
        if not recs:
            continue
        secs = [r["seconds"] for r in recs]
        s = {
            "seconds_median": statistics.median(secs),
            "seconds_min": min(secs),
            "seconds_max": max(secs),
            "peak_rss_over_preload_bytes_median": statistics.median(r["peak_rss_over_preload_bytes"] for r in recs),
            "model_bytes": recs[0].get("model_bytes"),
        }
        s["gb_per_s"] = info["tensor_bytes"] / s["seconds_median"] / 1e9 if s["seconds_median"] > 0 else 0.0
        if "forward_seconds" in recs[0]:
            s["forward_seconds_median"] = statistics.median(r["forward_seconds"] for r in recs)
            s["load_forward_seconds_median"] = statistics.median(r["load_forward_seconds"] for r in recs)
        if mode == "fast":
            s["paths"] = sorted({str(r.get("path")) for r in recs})
            reports = [r["report"] for r in recs if r.get("report")]
            s["io"] = sorted({rep["io"] for rep in reports})
            s["threads"] = reports[0]["threads"] if reports else None
        if mode == "floor" and "h2d_gb_per_s" in recs[0]:
            s["h2d_gb_per_s_median"] = statistics.median(r["h2d_gb_per_s"] for r in recs)
            s["read_seconds_median"] = statistics.median(r["read_seconds"] for r in recs)
            s["serial_seconds_median"] = statistics.median(r["serial_seconds"] for r in recs)
        summary[mode] = s
    med = {m: summary[m]["seconds_median"] for m in summary}
    summary.update(_compare_checksums(records))
    if med.get("fast"):
        summary["stock_over_fast"] = med["stock"] / med["fast"] if "stock" in med else None
        summary["fast_over_floor"] = med["fast"] / med["floor"] if med.get("floor") else None
        summary["fast_gb_per_s"] = summary["fast"]["gb_per_s"]
    return summary


def _compare_checksums(records: list[dict]) -> dict[str, Any]:
    """Per-tensor checksums of every fast run against the first stock run's: ``{"checksums": {...}}`` or {}."""
    stock = next((r["checksums"] for r in records if r["mode"] == "stock" and "checksums" in r), None)
    fast = [r["checksums"] for r in records if r["mode"] == "fast" and "checksums" in r]
    if stock is None or not fast:
        return {}
    bad = sorted({k for f in fast for k in set(stock) | set(f) if stock.get(k) != f.get(k)})
    return {"checksums": {"tensors": len(stock), "fast_runs": len(fast), "equal": not bad, "differ": bad[:20]}}


def bench(
    path: str,
    device: str = "cpu",
    dtype: str = "auto",
    io: str | None = None,
    disable_mmap: bool = False,
    runs: int = 3,
    forward: bool = False,
    json_path: str | None = None,
    plot_path: str | None = None,
    verbose: bool = True,
    checksums: bool = False,
    timeout: float | None = None,
    quantize: str | None = None,
    adapter: str | None = None,
) -> dict[str, Any]:
    """Times stock ``from_pretrained``, ``fast_from_pretrained`` and the bytes floor on ``path``, ``runs`` times each.

    Args:
        path (`str`): a local checkpoint folder.
        device (`str`, *optional*, defaults to `"cpu"`): `"cpu"`, or `"cuda"` (loads with `device_map="cuda"`).
        dtype (`str`, *optional*, defaults to `"auto"`): the `dtype` passed to both loads; `"none"` passes none.
        io (`str`, *optional*): `HF_FASTLOAD_IO` for the workers (`auto`, `mmap` or `pread`).
        disable_mmap (`bool`, *optional*, defaults to `False`): pass `disable_mmap=True` (transformers 5 only).
        runs (`int`, *optional*, defaults to `3`): rounds of stock, fast and floor; stock goes first in even rounds.
        forward (`bool`, *optional*, defaults to `False`): also time one forward pass over 8 tokens.
        json_path, plot_path (`str`, *optional*): where to write the raw results (after every round, so a cut run
            keeps what it measured), and a bar chart (needs matplotlib).
        verbose (`bool`, *optional*, defaults to `True`): print each round and the final table.
        checksums (`bool`, *optional*, defaults to `False`): compare per-tensor checksums of fast's model with stock's.
        timeout (`float`, *optional*): seconds each worker may take.
        quantize (`str`, *optional*): `"4bit"` or `"8bit"`: both loads pass
            `quantization_config=BitsAndBytesConfig(load_in_4bit/8bit=True)` (bitsandbytes quantizes on load).
        adapter (`str`, *optional*): a PEFT adapter folder whose base is `path`: both loads are
            `AutoModelForCausalLM.from_pretrained(adapter)` (the base, then the adapter on top); the floor reads
            `path`.

    Returns:
        `dict`: `machine`, `args`, `checkpoint`, `runs` (one record per worker) and `summary` (medians, ratios).

    Raises:
        `WorkerError`: a worker failed; the message ends with its stderr.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if runs < 1:
        raise ValueError(f"runs must be at least 1; got {runs}")
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}; got {quantize!r}")
    if adapter is not None and not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise FileNotFoundError(f"{adapter} has no adapter_config.json: --adapter needs a PEFT adapter folder")
    path = os.path.abspath(path)
    files = checkpoint_files(path)
    info = _checkpoint_info(files)
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    if io is not None:
        env["HF_FASTLOAD_IO"] = io
    source_tree = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.isfile(os.path.join(source_tree, "pyproject.toml")):  # run from a checkout: workers import the same
        env["PYTHONPATH"] = os.pathsep.join(p for p in (source_tree, env.get("PYTHONPATH")) if p)
    options = ["--dtype", dtype, "--device", device]
    options += ["--disable-mmap"] * disable_mmap + ["--forward"] * forward + ["--checksums"] * checksums
    if quantize is not None:
        options += ["--quantize", quantize]
    if adapter is not None:
        options += ["--adapter", os.path.abspath(adapter)]
    _warm_page_cache(files)

    records: list[dict] = []

    def result_so_far() -> dict[str, Any]:
        machine = machine_info()
        cuda = next((r["cuda_device"] for r in records if r.get("cuda_device")), None)
        if cuda:
            machine["cuda_device"] = cuda
        return {
            "machine": machine,
            "args": {"device": device, "dtype": dtype, "io": io or os.environ.get("HF_FASTLOAD_IO", "auto"),
                     "disable_mmap": disable_mmap, "runs": runs, "forward": forward, "page_cache": "warm",
                     "quantize": quantize, "adapter": adapter},
            "checkpoint": {"path": path, **info},
            "runs": [{k: v for k, v in r.items() if k != "checksums"} for r in records],
            "summary": _summarize(records, info),
        }  # fmt: skip

    for run in range(runs):
        order = ("stock", "fast", "floor") if run % 2 == 0 else ("fast", "stock", "floor")
        for position, mode in enumerate(order):
            extra = ["--files", *files] if mode == "floor" else []
            record = _run_worker(mode, path, options + extra, env, timeout)
            record.update(run=run, position=position)
            records.append(record)
        if verbose:
            done = ", ".join(f"{r['mode']} {r['seconds']:.3f}s" for r in records if r["run"] == run)
            print(f"run {run + 1}/{runs}: {done}", flush=True)
        if json_path:  # after every round: a run cut short keeps what it measured
            with open(json_path, "w", encoding="utf-8") as fh:
                json.dump(result_so_far(), fh, indent=2)

    result = result_so_far()
    if verbose:
        print(format_table(result), flush=True)
    if plot_path:
        write_plot(result, plot_path)
    return result


def _mib(n: float | None) -> str:
    return f"{n / 2**20:.1f} MiB" if n is not None else "-"


def format_table(result: dict[str, Any]) -> str:
    """The result of :func:`bench` as a few aligned lines of text."""
    m, a, c, s = result["machine"], result["args"], result["checkpoint"], result["summary"]
    target = next((r.get("model_dtype") for r in result["runs"] if r.get("model_dtype")), a["dtype"])
    lines = [
        f"hf-fastload bench {c['path']}",
        f"  checkpoint: {c['tensor_bytes'] / 1e9:.3f} GB in {len(c['files'])} file(s), stored {c['stored_dtype']}, "
        f"loaded as {target} (dtype={a['dtype']}), device {a['device']}, io={a['io']}, {a['runs']} run(s), "
        f"page cache {a['page_cache']}"
        + (f", bitsandbytes {a['quantize']}" if a.get("quantize") else "")
        + (f", adapter {a['adapter']}" if a.get("adapter") else ""),
        f"  machine: {m['cpu_count']} CPUs, {m['memory_bytes'] / 2**30:.1f} GiB RAM, {m['platform']}, "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, {m['date']}"
        + (f", {m['cuda_device']}" if m.get("cuda_device") else ""),
    ]
    forward = any("forward_seconds_median" in s.get(mode, {}) for mode in MODES)
    head = f"  {'mode':<6}{'median s':>10}{'min s':>9}{'max s':>9}{'peak RSS over pre-load':>25}{'GB/s':>8}"
    lines.append(head + (f"{'load+forward s':>16}" if forward else ""))
    for mode in MODES:
        if mode not in s:
            continue
        r = s[mode]
        row = (
            f"  {mode:<6}{r['seconds_median']:>10.3f}{r['seconds_min']:>9.3f}{r['seconds_max']:>9.3f}"
            f"{_mib(r['peak_rss_over_preload_bytes_median']):>25}{r['gb_per_s']:>8.2f}"
        )
        if forward and "load_forward_seconds_median" in r:
            row += f"{r['load_forward_seconds_median']:>16.3f}"
        lines.append(row)
    if "fast" in s:
        fast = s["fast"]
        ratios = []
        if s.get("stock_over_fast"):
            ratios.append(f"stock/fast {s['stock_over_fast']:.2f}x")
        if s.get("fast_over_floor"):
            ratios.append(f"fast/floor {s['fast_over_floor']:.2f}x")
        ratios.append(
            f"fast {s['fast_gb_per_s']:.2f} GB/s (path {'+'.join(fast['paths'])}, io {'+'.join(fast['io'])}, "
            f"{fast['threads']} threads)"
        )
        lines.append("  " + "   ".join(ratios))
        if fast["paths"] != ["fast"]:
            lines.append("  WARNING: the fast mode fell back to stock loading; see runs[].report.reason in --json")
    if s.get("floor", {}).get("h2d_gb_per_s_median"):
        f = s["floor"]
        copy = c["tensor_bytes"] / f["h2d_gb_per_s_median"] / 1e9
        lines.append(
            f"  pinned host-to-device: {f['h2d_gb_per_s_median']:.1f} GB/s; floor = max(read "
            f"{f['read_seconds_median']:.3f}s, copy {copy:.3f}s); no overlap: {f['serial_seconds_median']:.3f}s"
        )
    if "checksums" in s:
        k = s["checksums"]
        seen = "all equal" if k["equal"] else "DIFFER: " + ", ".join(k["differ"])
        runs = f"{k['tensors']} tensors, {k['fast_runs']} fast run(s)"
        lines.append(f"  per-tensor checksums, fast vs stock: {seen} ({runs})")
    notes = sorted({n for r in result["runs"] for n in r.get("notes", [])})
    lines += [f"  note: {n}" for n in notes]
    return "\n".join(lines)


def write_plot(result: dict[str, Any], path: str) -> bool:
    """A PNG bar chart of median seconds and peak RSS per mode; prints a note and returns False without matplotlib."""
    try:
        import matplotlib  # optional (the `bench` extra): only for --plot

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed, so no plot was written to {path} (pip install matplotlib)")
        return False
    s = result["summary"]
    modes = [m for m in MODES if m in s]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    med = [s[m]["seconds_median"] for m in modes]
    err = [[med[i] - s[m]["seconds_min"] for i, m in enumerate(modes)],
           [s[m]["seconds_max"] - med[i] for i, m in enumerate(modes)]]  # fmt: skip
    ax1.bar(modes, med, yerr=err, capsize=4, color=["#999999", "#ff9d00", "#4c72b0"][: len(modes)])
    ax1.set_ylabel("load seconds (median, min-max)")
    ax2.bar(modes, [s[m]["peak_rss_over_preload_bytes_median"] / 2**30 for m in modes], color="#55a868")
    ax2.set_ylabel("peak RSS over pre-load (GiB)")
    c, a = result["checkpoint"], result["args"]
    fig.suptitle(f"{os.path.basename(c['path'])}: {c['tensor_bytes'] / 1e9:.2f} GB, dtype={a['dtype']}, {a['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _params_label(params: float) -> str:
    return f"{params / 1e9:g}B" if params >= 1e9 else f"{params / 1e6:g}M"


def demo(params: float = 1.5e8, directory: str | None = None, runs: int = 3) -> dict[str, Any]:
    """Builds (once) a bf16 Llama checkpoint of about ``params`` parameters and benchmarks loading it as float32.

    Args:
        params (`float`, *optional*, defaults to `1.5e8`): parameters of the demo model.
        directory (`str`, *optional*): where the checkpoint lives; defaults to `~/.cache/hf_fastload/demo-<params>`.
        runs (`int`, *optional*, defaults to `3`): benchmark rounds.
    """
    directory = directory or os.path.join(
        os.path.expanduser("~"), ".cache", "hf_fastload", f"demo-{_params_label(params)}"
    )
    if not os.path.isfile(os.path.join(directory, "config.json")):  # written last: its absence means incomplete
        dims = llama_dims(params)
        print(f"building a {dims.num_parameters() / 1e6:.0f}M-parameter bf16 Llama checkpoint in {directory} (once)")
        make_checkpoint(directory, dtype="bf16", dims=dims)
    print("loading it as float32 (a bf16 -> fp32 conversion), each load in a fresh process")
    result = bench(directory, dtype="float32", runs=runs)
    s = result["summary"]
    ratio = s["stock_over_fast"]
    than = f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower"
    print(
        f"stock from_pretrained: {s['stock']['seconds_median']:.2f}s, hf_fastload: {s['fast']['seconds_median']:.2f}s "
        f"({than}); reading the bytes alone: {s['floor']['seconds_median']:.2f}s"
    )
    return result
