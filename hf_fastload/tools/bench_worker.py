"""One timed load in a fresh process, for ``hf-fastload bench``: prints one JSON line on stdout.

Example:
    ```bash
    python -m hf_fastload.tools.bench_worker fast ./llama-1b --dtype float32
    python -m hf_fastload.tools.bench_worker floor ./llama-1b --dtype float32
    ```

Modes:

- ``stock``: ``cls.from_pretrained(path, **kwargs)``, ``cls`` being the config's ``architectures[0]`` class;
- ``fast``: ``hf_fastload.fast_from_pretrained(path, model_class=cls, **kwargs)``;
- ``floor``: no model, only the bytes: every tensor of the checkpoint read with ``os.preadv`` into fresh memory
  (``torch.empty``), or, when the requested dtype differs from the stored one, read in 8 MiB chunks into a reused
  per-thread buffer and converted into a fresh tensor of that dtype; as many threads as the fast loader uses. A load
  that owns its tensors cannot do less work. On CUDA the bytes are read as stored (the device converts) and the
  pinned host-to-device bandwidth is measured; the floor is then ``max(read, bytes / bandwidth)``, what a load that
  overlaps reading and copying perfectly takes (``read + bytes / bandwidth``, no overlap, is reported too).

With ``--checksums``, stock and fast also report two checksums of every tensor of the loaded model (the sum of its
bit patterns, and a position-weighted sum), computed where the tensor is, so the parent can compare them.

``--quantize 4bit|8bit`` adds ``quantization_config=BitsAndBytesConfig(load_in_4bit/8bit=True)`` (and
``device_map="cpu"`` unless on CUDA); ``--adapter ADAPTER`` loads ``AutoModelForCausalLM.from_pretrained(ADAPTER)``,
a PEFT adapter whose base is the checkpoint (the floor still reads the checkpoint).

Everything is imported and the class resolved before the clock starts. The peak RSS counter is reset just before
(``/proc/self/clear_refs``), so ``peak_rss_over_preload_bytes`` is the load's own peak above the RSS before it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version as dist_version

from .bench import checkpoint_files

__all__ = ["h2d_bandwidth", "main", "reset_peak_rss", "run_floor", "run_load", "vm_bytes"]

CHUNK_BYTES = 8 << 20


def vm_bytes(field: str) -> int:
    """A ``Vm*`` line of /proc/self/status, in bytes (0 where unavailable)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _model_bytes(model) -> int:
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        nbytes = t.numel() * t.element_size()
        key = (t.device.type, t.data_ptr(), nbytes)
        if key not in seen:
            seen.add(key)
            total += nbytes
    return total


def _target_dtype(path: str, requested: str, stored):
    """The dtype a load with ``dtype=requested`` ends in, for the floor (``none`` follows the installed default)."""
    import torch  # import cost: this module imports nothing heavy at the top (the CLI test checks it)

    # compat.TRANSFORMERS_V5, read from the metadata: the floor does not import transformers.
    if requested == "none" and int(dist_version("transformers").split(".")[0]) < 5:
        return torch.float32  # 4.x loads into torch's default dtype
    if requested in ("none", "auto"):
        with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
            config = json.load(fh)
        name = config.get("dtype") or config.get("torch_dtype")
        return getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else stored
    return getattr(torch, requested)


_staging = threading.local()


def _usage() -> tuple[float, int, int]:
    """CPU seconds of every thread of this process, minor and major page faults so far."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime, u.ru_minflt, u.ru_majflt


def _usage_since(before: tuple[float, int, int]) -> dict:
    now = _usage()
    return {"cpu_seconds": now[0] - before[0], "minor_faults": now[1] - before[1], "major_faults": now[2] - before[2]}


def _floor_chunk(file, info, dest, lo: int, hi: int) -> None:
    """Bytes ``[lo, hi)`` of one tensor: read straight into ``dest`` (uint8), or via a reused staging buffer and
    converted into ``dest`` (the target dtype), so each output byte is written once."""
    import torch  # import cost, as everywhere in this module

    from ..engine.cpu import tensor_buffer
    from ..format.file import pread_into

    if dest.dtype == torch.uint8:
        pread_into(file._fd(), file.path, tensor_buffer(dest)[lo:hi], info.start + lo, info.name)
        return
    buf = getattr(_staging, "buf", None)
    if buf is None:
        buf = _staging.buf = torch.empty(CHUNK_BYTES, dtype=torch.uint8)
    pread_into(file._fd(), file.path, tensor_buffer(buf)[: hi - lo], info.start + lo, info.name)
    size = info.torch_dtype.itemsize
    dest.view(-1)[lo // size : hi // size].copy_(buf[: hi - lo].view(info.torch_dtype))


def checksums(model) -> dict[str, list[int]]:
    """Two checksums of every tensor of ``model.state_dict()``: the sum of its bit patterns and a position-weighted
    sum (int64, wrapping), computed on the tensor's device in blocks."""
    import torch

    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    out = {}
    for name, t in model.state_dict().items():
        flat = t.detach().contiguous().view(-1)
        if flat.dtype.is_complex or flat.element_size() not in ints:
            continue
        bits = flat.view(ints[flat.element_size()])
        plain = weighted = 0
        block = 1 << 26
        for lo in range(0, bits.numel(), block):
            part = bits[lo : lo + block].to(torch.int64)
            w = torch.arange(lo, lo + part.numel(), device=part.device, dtype=torch.int64) % 65521 + 1
            plain += int(part.sum())
            weighted += int((part * w).sum())
        out[name] = [plain % (1 << 64), weighted % (1 << 64)]
    return out


def run_floor(path: str, files: list[str], requested: str, threads: int, device: str = "cpu") -> dict:
    """Reads (and converts) every tensor of ``files`` with ``threads`` threads; returns what the parent needs."""
    import torch  # import cost, as everywhere in this module

    from ..format.file import SafetensorsFile

    handles = [SafetensorsFile(f, io="pread") for f in files]
    infos = [(h, info) for h in handles for info in h.tensors.values()]
    stored = infos[0][1].torch_dtype if infos else torch.float32
    target = _target_dtype(path, requested, stored)
    converted = target
    if device == "cuda":
        target = None  # the device pipeline reads the bytes as stored; the conversion runs on the GPU
    kept = []
    reset_peak_rss()
    rss0 = vm_bytes("VmRSS")
    usage = _usage()
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        futures = []
        for h, info in infos:
            same = target is None or info.torch_dtype == target
            dest = torch.empty(info.nbytes, dtype=torch.uint8) if same else torch.empty(info.shape, dtype=target)
            kept.append(dest)
            # Chunks hold whole elements: CHUNK_BYTES is a multiple of every itemsize.
            for lo in range(0, info.nbytes, CHUNK_BYTES):
                futures.append(pool.submit(_floor_chunk, h, info, dest, lo, min(lo + CHUNK_BYTES, info.nbytes)))
        for f in futures:
            f.result()
    seconds = time.perf_counter() - start
    result = {
        "seconds": seconds,
        **_usage_since(usage),
        "peak_rss_over_preload_bytes": max(0, vm_bytes("VmHWM") - rss0),
        "model_bytes": sum(info.numel for _, info in infos) * converted.itemsize,
        "bytes_read": sum(info.nbytes for _, info in infos),
        "floor_dtype": str(converted).removeprefix("torch."),
        "threads": threads,
    }
    for h in handles:
        h.close()
    return result


def h2d_bandwidth(gib: int = 1, repeats: int = 3) -> dict:
    """Pinned host-to-device copy bandwidth in GB/s (best of ``repeats``), or {} without CUDA."""
    import torch  # import cost, as everywhere in this module

    if not torch.cuda.is_available():
        return {}
    host = torch.empty(gib << 30, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty_like(host, device="cuda")
    best = float("inf")
    for _ in range(repeats + 1):  # the first copy warms up the context
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return {"h2d_gb_per_s": host.numel() / best / 1e9, "cuda_device": torch.cuda.get_device_name()}


def run_load(args) -> dict:
    """Loads the model in ``args.mode`` (stock or fast), timed, with the counters the parent reports."""
    import torch  # import cost, as everywhere in this module (and the loader's modules below)
    import transformers

    import hf_fastload
    from hf_fastload.integration import compat, loader  # noqa: F401  (imported before the clock starts)

    with open(os.path.join(args.path, "config.json"), encoding="utf-8") as fh:
        archs = json.load(fh).get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if not (isinstance(cls, type) and hasattr(cls, "from_pretrained")):
        cls = transformers.AutoModel
    source = args.path
    if args.adapter:  # transformers loads the adapter's base (args.path), then the adapter on top
        import peft  # noqa: F401  (imported before the clock starts)

        source, cls = args.adapter, transformers.AutoModelForCausalLM
    kwargs = {}
    if args.quantize:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(**{f"load_in_{args.quantize}": True})
        kwargs.setdefault("device_map", "cpu")
    if args.dtype != "none":
        kwargs["dtype"] = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.device == "cuda":
        kwargs["device_map"] = "cuda"
    notes = []
    if args.disable_mmap:
        if compat.HAS_DISABLE_MMAP:
            kwargs["disable_mmap"] = True
        else:
            notes.append(f"disable_mmap ignored: transformers {transformers.__version__} has no such argument")

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    peak_reset = reset_peak_rss()
    rss0 = vm_bytes("VmRSS")
    usage = _usage()
    start = time.perf_counter()
    if args.mode == "stock":
        model = cls.from_pretrained(source, **kwargs)
    else:
        model = hf_fastload.fast_from_pretrained(source, model_class=cls, **kwargs)
    sync()
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, **_usage_since(usage)}
    result["peak_rss_over_preload_bytes"] = max(0, vm_bytes("VmHWM") - rss0)
    result["rss_after_over_preload_bytes"] = max(0, vm_bytes("VmRSS") - rss0)
    result["peak_reset"] = peak_reset
    result["model_bytes"] = _model_bytes(model)
    result["model_class"] = cls.__name__
    result["model_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    if args.mode == "fast":
        report = hf_fastload.last_report()
        result["report"] = report.to_dict() if report is not None else None
        result["path"] = report.path if report is not None else None
    if args.checksums:
        result["checksums"] = checksums(model)
    if args.forward:
        vocab = getattr(model.config, "vocab_size", None) or 100
        ids = torch.randint(0, vocab, (1, 8), device=next(model.parameters()).device)
        t0 = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids)
        sync()
        result["forward_seconds"] = time.perf_counter() - t0
        result["load_forward_seconds"] = time.perf_counter() - start
    if notes:
        result["notes"] = notes
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("stock", "fast", "floor"))
    parser.add_argument("path")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--disable-mmap", action="store_true")
    parser.add_argument("--forward", action="store_true")
    parser.add_argument("--checksums", action="store_true", help="stock, fast: per-tensor checksums of the model")
    parser.add_argument("--files", nargs="*", default=None, help="floor: the safetensors files")
    parser.add_argument("--quantize", choices=("4bit", "8bit"), help="bitsandbytes quantization on load")
    parser.add_argument("--adapter", help="load this PEFT adapter of PATH instead of PATH")
    args = parser.parse_args(argv)

    if args.mode == "floor":
        from ..engine.knobs import settings  # import cost: the floor imports torch, not transformers

        files = args.files or checkpoint_files(args.path)
        result = run_floor(args.path, files, args.dtype, settings()["threads"], args.device)
        if args.device == "cuda":
            result.update(h2d_bandwidth())
            if result.get("h2d_gb_per_s"):
                result["read_seconds"] = result["seconds"]
                result["h2d_seconds"] = result["bytes_read"] / (result["h2d_gb_per_s"] * 1e9)
                result["serial_seconds"] = result["read_seconds"] + result["h2d_seconds"]
                result["seconds"] = max(result["read_seconds"], result["h2d_seconds"])
    else:
        result = run_load(args)
    result["mode"] = args.mode
    result["transformers_version"] = dist_version("transformers")
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
