"""JSON as safetensors' parser (serde_json) reads it, on top of Python's ``json``: what it refuses, refused.

Example:
    ```python
    import json
    from hf_fastload.format.jsonrules import object_pairs, refuse_constant, repeated, serde_f64

    header = json.loads(text, object_pairs_hook=object_pairs, parse_constant=refuse_constant, parse_float=serde_f64)
    repeated(header)   # [(key, earlier value, later value), ...] for keys given twice ("json.loads" keeps the last)
    ```

Python's ``json`` accepts ``NaN`` and ``Infinity``, numbers of any size and lone UTF-16 surrogates; serde_json refuses
them, reads ``-0`` as a float, parses numbers digit by digit into an f64 with its own overflow rules, and nests at
most 127 levels. The helpers here make a header that safetensors refuses fail here too
(:func:`hf_fastload.format.header.parse_header`).
"""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = [
    "MAX_DEPTH", "U64", "JSONError", "JSONObject", "has_surrogate", "int_or_float_zero", "object_pairs",
    "refuse_constant", "repeated", "serde_f64",
]  # fmt: skip

U64 = 1 << 64  # header integers are Rust usize (u64): larger ones are read as floats, which are not integers
MAX_DEPTH = 127  # serde_json refuses 128 nested arrays or objects


class JSONObject(dict):
    """A JSON object in which some key is given more than once: ``repeated`` lists each repeat as ``(key, earlier
    value, later value)`` (``json.loads`` keeps the last)."""

    __slots__ = ("repeated",)


def object_pairs(pairs: list[tuple[str, Any]]) -> dict:
    """``json.loads``' ``object_pairs_hook``: a plain dict, or a JSONObject where a key is given twice."""
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    obj, seen = JSONObject(obj), {}
    obj.repeated = []
    for key, value in pairs:
        if key in seen:
            obj.repeated.append((key, seen[key], value))
        seen[key] = value
    return obj


def repeated(obj: dict) -> list[tuple[str, Any, Any]]:
    return obj.repeated if type(obj) is JSONObject else []


class JSONError(ValueError):
    """JSON that Python's ``json`` reads but safetensors' parser (serde_json) refuses."""


def refuse_constant(name: str) -> None:
    raise JSONError(f"{name} is not a JSON value")


def int_or_float_zero(token: str) -> int | float:
    return -0.0 if token == "-0" else int(token)  # serde_json reads -0 as a float, which no integer field takes


_NUMBER = re.compile(r"(-?)(\d+)(?:\.(\d+))?(?:[eE]([+-]?)(\d+))?")
_POW10 = [float(f"1e{i}") for i in range(309)]  # serde_json's table: 1e0 ... 1e308


def _overflows(acc: int, digit: int, limit: int) -> bool:
    """serde_json's check before ``acc * 10 + digit``: would it pass ``limit``?"""
    return acc > limit // 10 or (acc == limit // 10 and digit > limit % 10)


def serde_f64(token: str) -> float:
    """A JSON number as serde_json (safetensors' parser, without its float_roundtrip feature) reads it into an f64;
    raises JSONError where it says "number out of range". The same digit-by-digit steps, so the same edge cases."""
    sign, whole, fraction, exp_sign, exp_digits = _NUMBER.fullmatch(token).groups()
    u64, i32 = (1 << 64) - 1, (1 << 31) - 1
    significand = exponent = 0
    for i, d in enumerate(map(int, whole)):
        if _overflows(significand, d, u64):
            exponent = len(whole) - i  # the remaining digits only scale
            break
        significand = significand * 10 + d
    for d in map(int, fraction or ""):
        if _overflows(significand, d, u64):
            break  # further fraction digits are ignored
        significand, exponent = significand * 10 + d, exponent - 1
    if exp_digits is not None:
        value = 0
        for d in map(int, exp_digits):
            if _overflows(value, d, i32):
                if significand and exp_sign != "-":
                    raise JSONError(f"number {token[:40]} out of range")
                return -0.0 if sign else 0.0
            value = value * 10 + d
        exponent = max(-i32 - 1, min(i32, exponent + (-value if exp_sign == "-" else value)))  # saturating
    f = float(significand)
    while True:
        if abs(exponent) <= 308:
            if exponent >= 0:
                f *= _POW10[exponent]
                if math.isinf(f):
                    raise JSONError(f"number {token[:40]} out of range")
            else:
                f /= _POW10[-exponent]
            break
        if f == 0.0:
            break
        if exponent >= 0:
            raise JSONError(f"number {token[:40]} out of range")
        f, exponent = f / 1e308, exponent + 308
    return -f if sign else f


def has_surrogate(value: Any) -> bool:
    """True if a string anywhere in ``value`` holds a lone UTF-16 surrogate (``"\\ud800"``: not a character)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
            stack.extend(first for _, first, _ in repeated(item))
        elif isinstance(item, list):
            stack.extend(item)
    return False
