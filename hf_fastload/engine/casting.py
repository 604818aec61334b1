"""Device-side dtype conversions with the CPU's bits: what stock's blocking ``.to(device, dtype)`` gives.

Example:
    ```python
    import torch
    from hf_fastload.engine.casting import cast_rule

    rule = cast_rule(torch.float32, torch.bfloat16).on(torch.device("cuda:0"))
    rule.apply(out_bf16_chunk, staged_fp32_chunk, lambda dst, src: dst.copy_(src))
    ```

Stock converts on the CPU, whose NaN bits differ from a GPU's (fp32 -> bf16 NaN is 0xFFFF with AVX2/AVX-512 and
0x7FC0 without, CUDA's ``cvt.rn.bf16.f32`` gives 0x7FFF; fp16 -> fp32 quiets NaNs on the CPU). A :class:`CastRule`
holds the CPU's answer, computed once per process with the CPU's own ``.to()``: the whole table for 16-bit sources
(65536 patterns; the device then converts by table lookup), and for fp32 sources the NaN results (the device
converts with round-to-nearest-even as the CPU does, then NaNs are rewritten from the table).
"""

from __future__ import annotations

import functools
import threading

import torch

__all__ = ["BITS", "FLOATS", "CastRule", "cast_rule"]

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
_MANTISSA = {torch.bfloat16: 7, torch.float16: 10}


class CastRule:
    """How a device converts ``src`` to ``dst`` so that the result equals the CPU's ``.to(dst)`` bit for bit.

    Built once per process on the CPU, with the CPU's own conversion (so it follows the CPU kernel that stock uses
    on this machine: AVX-512, AVX2 or scalar). Attributes:

    - ``table``: for 16-bit sources, the bits of ``src.to(dst)`` for all 65536 source patterns; the device converts
      by looking each element up (exact for every value, NaN payloads included);
    - for fp32 sources, the device converts with its own round-to-nearest-even (the same as the CPU's for every
      number), then rewrites NaNs: to ``nan_const`` where the CPU gives one pattern for every NaN (x86: 0xFFFF for
      bf16), else from ``nan_table``, indexed by the sign and the top ``nan_keep`` mantissa bits (x86 fp16: the
      payload is truncated and quieted). Which of these holds is read off the CPU's results for every sign and top
      bits with 16 low-bit patterns each (the rounding boundaries and random ones); where the low bits matter, the
      table holds all 2^24 NaNs.
    """

    def __init__(self, src: torch.dtype, dst: torch.dtype):
        self.src, self.dst = src, dst
        self.table: torch.Tensor | None = None
        self.nan_const: int | None = None
        self.nan_table: torch.Tensor | None = None
        self.nan_keep = 23
        self._on: dict[str, CastRule] = {}
        self._lock = threading.Lock()
        out_bits = BITS[dst.itemsize]
        if src.itemsize == 2:
            patterns = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
            table = patterns.view(src).to(dst).view(out_bits)
            # index = pattern & 0xFFFF: rotate so that entry i belongs to pattern i
            self.table = torch.cat([table[1 << 15 :], table[: 1 << 15]])
            return
        keep = _MANTISSA[dst]
        drop = 23 - keep
        # every sign and top-`keep` mantissa bits, with low bits at the rounding boundaries and a few random ones
        g = torch.Generator().manual_seed(0)
        lows = torch.tensor([0, 1, 2, (1 << (drop - 1)) - 1, 1 << (drop - 1), (1 << (drop - 1)) + 1, (1 << drop) - 1])
        lows = torch.cat([lows, torch.randint(0, 1 << drop, (9,), generator=g)]).to(torch.int32)
        top = torch.arange(1 << keep, dtype=torch.int32).view(-1, 1) << drop
        mantissa = (top | lows.view(1, -1)).view(1, 1 << keep, -1)
        sign = torch.tensor([0, -(1 << 31)], dtype=torch.int32).view(2, 1, 1)
        bits = (mantissa | sign | 0x7F800000).clone()
        bits[:, 0, 0] |= 1  # mantissa 0 would be an infinity
        sample = bits.view(torch.float32).to(dst).view(out_bits).to(torch.int32) & ((1 << (8 * dst.itemsize)) - 1)
        first = int(sample[0, 0, 0])
        if bool((sample == first).all()):
            self.nan_const = first  # the CPU gives one pattern for every NaN
        elif bool((sample == sample[:, :, :1]).all()):
            self.nan_keep, self.nan_table = keep, sample[:, :, 0].reshape(-1).to(out_bits)  # sign and top bits
        else:  # the CPU's NaN depends on low mantissa bits too: the whole table (2^24 entries, built once)
            mantissa = torch.arange(1 << 23, dtype=torch.int32)
            nans = []
            for sign_bit in (0, -(1 << 31)):
                bits = mantissa | 0x7F800000 | sign_bit
                bits[0] |= 1
                nans.append(bits.view(torch.float32).to(dst).view(out_bits))
            self.nan_table = torch.cat(nans)

    def on(self, device: torch.device) -> CastRule:
        """This rule with its tables on ``device`` (copied once per device, from the calling thread)."""
        key = str(device)
        with self._lock:
            bound = self._on.get(key)
            if bound is None:
                bound = CastRule.__new__(CastRule)
                bound.__dict__.update(self.__dict__)
                for name in ("table", "nan_table"):
                    t = getattr(self, name)
                    if t is not None:
                        setattr(bound, name, t.to(device))
                bound._on = {}
                self._on[key] = bound
        return bound

    def apply(self, dst: torch.Tensor, src: torch.Tensor, device_cast) -> None:
        """``dst`` (1-D, ``self.dst``) = ``src`` (1-D, ``self.src``) as the CPU converts it; runs on the tensors'
        device and current stream. ``device_cast(dst, src)`` is the device's own conversion (fp32 sources)."""
        out_bits = dst.view(BITS[self.dst.itemsize])
        if self.table is not None:
            index = src.view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF)
            torch.index_select(self.table, 0, index, out=out_bits)
            return
        device_cast(dst, src)
        nan = torch.isnan(src)
        if self.nan_const is not None:
            c = self.nan_const
            out_bits.masked_fill_(nan, c - (1 << 16) if c >= 1 << 15 else c)
            return
        bits = src.view(torch.int32)
        index = (bits >> (23 - self.nan_keep)).bitwise_and_((1 << self.nan_keep) - 1)
        index.bitwise_or_((bits >> 31).bitwise_and_(1).bitwise_left_shift_(self.nan_keep))
        fixed = torch.index_select(self.nan_table, 0, index)
        torch.where(nan, fixed, out_bits, out=out_bits)


@functools.cache
def cast_rule(src: torch.dtype, dst: torch.dtype) -> CastRule:
    """The process's :class:`CastRule` for ``src`` -> ``dst`` (both among float32, bfloat16, float16)."""
    if src not in FLOATS or dst not in FLOATS or src == dst:
        raise ValueError(f"no device conversion rule for {src} -> {dst}")
    return CastRule(src, dst)


# -- backends ---------------------------------------------------------------------------------------------------------
