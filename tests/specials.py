"""Values that conversions get wrong first — NaNs (many payloads, both signs), infinities, subnormals, signed zeros,
extremes, rounding ties — and a check that hf_fastload converts them with the CPU's bits on any device.

Plain functions (no pytest): ``tests/test_stream.py`` and ``benchmarks/gpu_check.py`` (on a GPU) both use them.

Example:
    ```python
    from specials import load_specials

    load_specials("/tmp/x", "cuda")   # raises AssertionError naming the direction and the first differing bits
    ```
"""

from __future__ import annotations

import os

import torch


def _bits(t):
    return t.reshape(-1).view(torch.uint8) if t.numel() else t


def _ints(t):
    return t.reshape(-1).view({2: torch.int16, 4: torch.int32}[t.element_size()]).to(torch.int64) & (
        (1 << (8 * t.element_size())) - 1
    )


def _f32(bits):
    return torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in bits], dtype=torch.int32).view(torch.float32)


def special_values() -> dict[str, torch.Tensor]:
    """Every 16-bit pattern of bf16 and fp16 (all NaNs, both signs, infinities, subnormals, zeros, extremes), and
    fp32 values covering the same cases plus rounding ties, overflow to infinity and subnormal results."""
    g = torch.Generator().manual_seed(7)
    patterns = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    specials = [
        0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x00800000, 0x80800000,
        0x00000001, 0x80000001, 0x007FFFFF, 0x807FFFFF, 0x3F808000, 0x3F818000, 0x3F807FFF, 0x477FF000,
        0x477FEFFF, 0x33800000, 0x33000000, 0x33C00000, 0x387FC000,  # fp16: 65520 -> inf, 2^-24, ties, subnormals
        0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FC12345, 0x7FA00000,
        0xFFBFFFFF, 0x7F810000, 0x7FBFE000, 0x7F802000, 0xFF800100,  # NaNs: quiet, signalling, payloads
    ]  # fmt: skip
    nan_payloads = torch.randint(1, 1 << 23, (3000,), generator=g, dtype=torch.int32) | 0x7F800000
    nan_payloads[::2] |= -(1 << 31)
    numbers = torch.randn(4000, generator=g) * torch.logspace(-45, 38, 4000).clamp(max=3e38)
    fp32 = torch.cat([_f32(specials), nan_payloads.view(torch.float32), numbers, -numbers])
    return {"bf16": patterns.view(torch.bfloat16), "fp16": patterns.clone().view(torch.float16), "fp32": fp32}


DIRECTIONS = [
    ("fp32", torch.bfloat16), ("fp32", torch.float16), ("bf16", torch.float32), ("fp16", torch.float32),
    ("bf16", torch.float16), ("fp16", torch.bfloat16),
]  # fmt: skip


def load_specials(folder: str, device: str) -> str:
    """Writes :func:`special_values` to ``folder``, loads each in every direction to ``device`` through hf_fastload's
    engine, and asserts every element's bits equal the CPU's ``.to(dtype)`` (what stock's blocking copy gives)."""
    from safetensors.torch import save_file

    from hf_fastload.engine.context import LoadContext

    values = special_values()
    path = os.path.join(folder, "specials.safetensors")
    save_file(values, path)
    ctx = LoadContext(io="pread", threads=4)
    f = ctx.open(path)
    try:
        for name, dtype in DIRECTIONS:
            out = ctx.materialize(f.get_slice(name), device, dtype)
            want = values[name].to(dtype)
            got = out.cpu()
            if not (got.dtype == dtype and torch.equal(_bits(got), _bits(want))):
                differ = (_ints(got) != _ints(want)).nonzero().view(-1)
                at = differ[:3]
                raise AssertionError(
                    f"{name} -> {dtype}: {differ.numel()} of {want.numel()} elements differ from the CPU's, e.g. at "
                    f"{at.tolist()}: source {[hex(v) for v in _ints(values[name])[at].tolist()]}, got "
                    f"{[hex(v) for v in _ints(got)[at].tolist()]}, want {[hex(v) for v in _ints(want)[at].tolist()]}"
                )
        return f"{len(DIRECTIONS)} directions, {sum(v.numel() for v in values.values())} values, methods {ctx.methods}"
    finally:
        ctx.close()
