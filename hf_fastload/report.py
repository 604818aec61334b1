"""What one load did: :class:`LoadReport`, and :func:`last_report` for this thread's last load.

Example:
    ```python
    import hf_fastload

    model = hf_fastload.fast_from_pretrained("path/to/model", dtype="float32")
    report = hf_fastload.last_report()
    print(report)            # one short paragraph
    report.to_dict()         # JSON-ready
    ```
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["LoadReport", "last_report"]

PHASES = ("resolve", "build", "read", "finalize")


@dataclass
class LoadReport:
    """The record of one `fast_from_pretrained` call.

    Attributes:
        source (`str`): the name or path that was loaded.
        model_class (`str`): the class whose `from_pretrained` ran.
        path (`str`): `"fast"` when every checkpoint tensor went through hf_fastload's reader, else `"fallback"`.
        reason (`str`, *optional*): why the load fell back to stock `from_pretrained`.
        io (`str`): how bytes were read (`"mmap"` or `"pread"`), and `io_reason` why.
        files (`list[str]`): checkpoint files opened.
        bytes_read (`int`): tensor bytes read from them; for a tensor-parallel shard, the bytes of the slice (or, with
            `pread`, of the row span read to cut it), not the whole tensor.
        checkpoint_bytes (`int`): tensor bytes in those files; `read_share` (in `to_dict()`) is
            `bytes_read / checkpoint_bytes`, this rank's share of the checkpoint.
        rank, world_size (`int`): this process's rank and the number of ranks (`torch.distributed`, else the
            `RANK` / `WORLD_SIZE` environment); 0 and 1 outside a distributed run.
        tensors_loaded (`int`): tensors materialized; `zero_copy` of them are views of the file mapping;
            `methods` counts how each was made (`zero-copy`, `pread`, `convert`, `...+to(cuda)`).
        quantization (`str`, *optional*): how the model is quantized (``"bitsandbytes 4-bit, quantized on load"``,
            ``"bitsandbytes 8-bit, pre-quantized"``): the checkpoint's bytes went through hf_fastload, transformers'
            quantizer made the quantized tensors.
        adapter (`str`, *optional*): the PEFT adapter transformers loaded on top of the base model (a path or hub
            id); the base's weights went through hf_fastload.
        missing_keys (`dict[str, str]`): model keys the checkpoint lacks, and how each was initialized.
        unexpected_keys, mismatched_keys (`list[str]`): as transformers reports them.
        cache (`dict`, *optional*): with the converted-tensor cache on (``HF_FASTLOAD_CACHE``, ``fastload_cache``):
            `status` (`hit`, `miss`, `partial`, `unused` when no tensor needed converting, `bypassed`), `hits` and
            `misses` (tensors), `written` (tensors written to new entries), `entries_used`, `entries_written`,
            `reason` (what happened and why, e.g. why nothing was written), `warnings`; None when the cache is off.
        seconds (`dict[str, float]`): wall time of the phases and `total`: `resolve` (our checks, the config and
            class), `build` (inside `from_pretrained` until the first tensor is read: config, model on the meta
            device, key mapping), `read` (first tensor read started to last one finished, transformers' own work
            between reads included), `finalize` (tying, missing-key init, verification, the report).
    """

    source: str
    model_class: str = ""
    path: str = "fast"
    reason: str | None = None
    transformers_version: str = ""
    device: str = "cpu"
    dtype: str = ""
    io: str = "mmap"
    io_reason: str = ""
    threads: int = 1
    files: list[str] = field(default_factory=list)
    bytes_read: int = 0
    checkpoint_bytes: int = 0
    rank: int = 0
    world_size: int = 1
    tensors_loaded: int = 0
    zero_copy: int = 0
    methods: dict[str, int] = field(default_factory=dict)
    quantization: str | None = None
    adapter: str | None = None
    missing_keys: dict[str, str] = field(default_factory=dict)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_keys: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    cache: dict[str, Any] | None = None

    @property
    def gb_per_s(self) -> float:
        """Bytes read over the read phase's wall time, in GB/s (0 when nothing was read)."""
        read = self.seconds.get("read", 0.0)
        return self.bytes_read / read / 1e9 if read > 0 else 0.0

    @property
    def read_share(self) -> float:
        """``bytes_read / checkpoint_bytes``: the share of the checkpoint this process read (0 when unknown)."""
        return self.bytes_read / self.checkpoint_bytes if self.checkpoint_bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gb_per_s"] = round(self.gb_per_s, 3)
        d["read_share"] = round(self.read_share, 4)
        return d

    def __str__(self) -> str:
        head = f"hf_fastload: {self.model_class} from {self.source}: path={self.path}"
        if self.reason:
            head += f" ({self.reason})"
        if self.quantization:
            head += f", {self.quantization}"
        if self.adapter:
            head += f", adapter {self.adapter}"
        phases = ", ".join(f"{k} {self.seconds[k]:.3f}s" for k in (*PHASES, "total") if k in self.seconds)
        how = ", ".join(f"{n} {m}" for m, n in sorted(self.methods.items())) or "none"
        lines = [
            head,
            f"  {self.tensors_loaded} tensors ({how}), "
            f"{self.bytes_read / 2**20:.1f} MiB from "
            f"{len(self.files)} file(s), io={self.io}, {self.threads} threads, {self.gb_per_s:.2f} GB/s",
            f"  {phases}",
        ]
        if self.world_size > 1:
            lines.insert(
                2,
                f"  rank {self.rank} of {self.world_size}: read {self.bytes_read / 2**20:.1f} of "
                f"{self.checkpoint_bytes / 2**20:.1f} MiB of the checkpoint ({self.read_share:.1%})",
            )
        if self.cache:
            c = self.cache
            counts = f", {c.get('hits', 0)} hit(s), {c.get('misses', 0)} miss(es), {c.get('written', 0)} written"
            why = f": {c['reason']}" if c.get("reason") else ""
            lines.append(f"  cache {c.get('status')}{counts if 'hits' in c else ''}{why}")
        if self.missing_keys:
            shown = ", ".join(f"{k} ({v})" for k, v in list(self.missing_keys.items())[:5])
            more = f" and {len(self.missing_keys) - 5} more" if len(self.missing_keys) > 5 else ""
            lines.append(f"  missing from the checkpoint: {shown}{more}")
        if self.unexpected_keys:
            lines.append(f"  unexpected in the checkpoint: {len(self.unexpected_keys)} key(s)")
        return "\n".join(lines)


_local = threading.local()


def _set_last_report(report: LoadReport) -> None:
    _local.report = report


def last_report() -> LoadReport | None:
    """The :class:`LoadReport` of this thread's last `fast_from_pretrained` call, or `None` before the first."""
    return getattr(_local, "report", None)
