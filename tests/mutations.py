"""Safetensors files for differential fuzzing: valid files as the writers of every safetensors version lay them out,
and the ways a file gets damaged or forged, as hypothesis strategies.

A file is a :class:`Draft`: the header as raw JSON pieces (so that keys can repeat and numbers can be written as
``-0``, ``4.0`` or ``1e400``), the data bytes, and the damage done around them (header length, trailing bytes,
truncation, flipped bytes). ``Draft.bytes()`` is the file.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field

from hypothesis import strategies as st

# dtype name -> bits per element, for the names the installed safetensors can turn into torch tensors
BITS = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8, "U16": 16,
    "U32": 32, "U64": 64, "BOOL": 8, "C64": 64, "F8_E4M3": 8, "F8_E4M3FNUZ": 8, "F8_E5M2": 8, "F8_E5M2FNUZ": 8,
    "F8_E8M0": 8, "F4": 4,
}  # fmt: skip
# names to put where a dtype goes: safetensors' own (F6 has no torch dtype), and names it does not know
DTYPE_NAMES = [*BITS, "F6_E2M3", "F6_E3M2", "F42", "f32", "", "float32", "Float32", "F32 ", "bf16"]
WHITESPACE = " \t\n\r"  # JSON's whitespace; the rest is not
OTHER_SPACE = "\x00\x0c\x0b\xa0\u2028\ufeff"

MUTATIONS = (
    "trailing", "drop_entry", "drop_tensor", "metadata", "shift", "header_len", "truncate", "dtype", "shape",
    "dup_tensor", "dup_field", "dup_metadata", "whitespace", "unknown_field", "array_form", "dtype_map",
    "number_token", "byte_flip", "rename", "reorder", "swap_data",
)  # fmt: skip


@dataclass
class Draft:
    """One safetensors file, in pieces. ``pairs`` are the header's ``(key JSON, value)`` pairs in order; a value is
    raw JSON text, or a list of ``(field JSON, value JSON)`` pairs for an object (a tensor entry)."""

    pairs: list[tuple[str, str | list[tuple[str, str]]]]
    data: bytes
    lead: str = ""  # before the JSON object, inside the header
    pad: str = ""  # after it, inside the header
    header_len_delta: int = 0
    tail: bytes = b""
    truncate_at: int | None = None
    flips: list[tuple[int, int]] = field(default_factory=list)  # (position in the header, xor mask)
    applied: list[str] = field(default_factory=list)

    def header_text(self) -> str:
        def value(v):
            return v if isinstance(v, str) else "{" + ",".join(f"{k}:{x}" for k, x in v) + "}"

        return self.lead + "{" + ",".join(f"{k}:{value(v)}" for k, v in self.pairs) + "}" + self.pad

    def bytes(self) -> bytes:
        text = bytearray(self.header_text().encode("utf-8", "surrogatepass"))
        for pos, mask in self.flips:
            if text:
                text[pos % len(text)] ^= mask
        blob = struct.pack("<Q", max(0, len(text) + self.header_len_delta)) + bytes(text) + self.data + self.tail
        return blob if self.truncate_at is None else blob[: self.truncate_at]

    def tensor_indices(self) -> list[int]:
        return [i for i, (k, v) in enumerate(self.pairs) if k != '"__metadata__"' and not isinstance(v, str)]

    def field(self, i: int, name: str) -> str | None:
        for k, v in self.pairs[i][1]:
            if k == json.dumps(name):
                return v
        return None

    def set_field(self, i: int, name: str, text: str) -> None:
        fields = self.pairs[i][1]
        for j, (k, _) in enumerate(fields):
            if k == json.dumps(name):
                fields[j] = (k, text)
                return
        fields.append((json.dumps(name), text))


def entry(dtype: str, shape: list[int], begin: int, end: int) -> list[tuple[str, str]]:
    return [('"dtype"', json.dumps(dtype)), ('"shape"', json.dumps(shape)), ('"data_offsets"', f"[{begin},{end}]")]


def from_file(raw: bytes) -> Draft:
    """A Draft of a valid file (one that json.loads reads), keeping its header order, padding and data."""
    (n,) = struct.unpack("<Q", raw[:8])
    text = raw[8 : 8 + n].decode()
    stripped = text.rstrip(WHITESPACE)
    pairs = []
    for key, value in json.loads(stripped).items():
        if key == "__metadata__":
            pairs.append(('"__metadata__"', json.dumps(value)))
        else:
            pairs.append((json.dumps(key), entry(value["dtype"], value["shape"], *value["data_offsets"])))
    return Draft(pairs, raw[8 + n :], pad=text[len(stripped) :])


# -- valid files -------------------------------------------------------------------------------------------------

_names = st.one_of(
    st.text(max_size=6).filter(lambda s: s != "__metadata__"),
    st.sampled_from(["model.norm.weight", "lm_head.weight", "a", "b", "\u00e9", "\U0001f600", "x\x7f"]),
)


@st.composite
def valid_files(draw) -> Draft:
    """A file any safetensors writer could have written: tensors of every dtype (zero-size and scalars too), data in
    any order (by dtype alignment and name since 0.3, by name before), header entries in any order, metadata or not,
    the header padded with spaces to 8 bytes (0.3.1+), by ``len % 8`` spaces (0.3.0) or not at all (0.2)."""
    names = draw(st.lists(_names, max_size=5, unique=True))
    tensors = []
    for name in names:
        dtype = draw(st.sampled_from(sorted(BITS)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        if dtype == "F4":  # two values per byte, along the last dimension
            shape = [*shape[:-1], 2 * shape[-1]] if shape else [2]
        nbytes = math.prod(shape) * BITS[dtype] // 8
        tensors.append((name, dtype, shape, draw(st.binary(min_size=nbytes, max_size=nbytes))))
    offsets, data, at = {}, b"", 0
    for i in draw(st.permutations(range(len(tensors)))):
        name, _, _, blob = tensors[i]
        offsets[name] = (at, at + len(blob))
        data, at = data + blob, at + len(blob)
    pairs = [(json.dumps(n), entry(d, s, *offsets[n])) for n, d, s, _ in draw(st.permutations(tensors))]
    metadata = draw(st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=8), max_size=3))
    if metadata is not None:
        pairs.insert(draw(st.integers(0, len(pairs))), ('"__metadata__"', json.dumps(metadata)))
    draft = Draft(pairs, data)
    length = len(draft.header_text().encode("utf-8", "surrogatepass"))
    draft.pad = " " * draw(st.sampled_from([-length % 8, length % 8, 0]))
    return draft


# -- damage ------------------------------------------------------------------------------------------------------

_json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5),
)  # fmt: skip
_json_values = st.recursive(
    _json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip
# JSON texts that Python's json reads and serde_json may not, or reads differently
_raw_values = st.sampled_from([
    "NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1.8e308", "1.7976931348623157e308", "1e308", "1e-400", "-0",
    "-0.0", "18446744073709551615", "18446744073709551616", "-18446744073709551616", "9" * 310, "1" + "0" * 308,
    "179769313486231570000" + "0" * 288, '"\\ud800"', '"\\udc00x"', '"\\ud83d\\ude00"', '"\\\\ud800"', "[]", "{}",
])  # fmt: skip


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@st.composite
def damaged_files(draw, base=None) -> Draft:
    """A valid file (``base``, else drawn) with one to three kinds of damage applied."""
    draft = base if base is not None else draw(valid_files())
    for kind in draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3)):
        mutate(draw, draft, kind)
    return draft


def _pick_tensor(draw, draft: Draft) -> int | None:
    indices = draft.tensor_indices()
    return draw(st.sampled_from(indices)) if indices else None


def _offsets(draft: Draft, i: int) -> list[int] | None:
    try:
        value = json.loads(draft.field(i, "data_offsets") or "null")
    except ValueError:
        return None
    return value if isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value) else None


def mutate(draw, draft: Draft, kind: str) -> None:
    """Applies one kind of damage (``MUTATIONS``) to ``draft`` in place; a kind that does not apply does nothing."""
    draft.applied.append(kind)
    i = _pick_tensor(draw, draft)
    if kind == "trailing":
        draft.tail += draw(st.binary(min_size=1, max_size=16))
    elif kind == "header_len":
        draft.header_len_delta += draw(st.integers(-9, 9).filter(bool))
    elif kind == "truncate":
        draft.truncate_at = draw(st.integers(0, max(0, len(draft.bytes()) - 1)))
    elif kind == "byte_flip":
        draft.flips.append((draw(st.integers(0, 1 << 16)), draw(st.integers(1, 255))))
    elif kind == "whitespace":
        spaces = st.text(alphabet=WHITESPACE + OTHER_SPACE, min_size=1, max_size=3)
        if draw(st.booleans()):
            draft.lead += draw(spaces)
        else:
            draft.pad += draw(spaces)
    elif kind == "metadata":
        value = draw(st.one_of(
            st.just("null"), _raw_values, _json_values.map(json.dumps),
            st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=3).map(json.dumps),
        ))  # fmt: skip
        for j, (k, _) in enumerate(draft.pairs):
            if k == '"__metadata__"':
                draft.pairs[j] = (k, value)
                break
        else:
            draft.pairs.insert(draw(st.integers(0, len(draft.pairs))), ('"__metadata__"', value))
    elif kind == "dup_metadata":
        value = draw(st.sampled_from(["{}", '{"format":"pt"}', "null"]))
        draft.pairs.insert(draw(st.integers(0, len(draft.pairs))), ('"__metadata__"', value))
    elif kind == "reorder":
        draft.pairs = draw(st.permutations(draft.pairs))
    elif i is None:
        return
    elif kind == "drop_entry":  # its bytes stay: a hole, or trailing bytes
        del draft.pairs[i]
    elif kind == "drop_tensor":  # the entry and its bytes: still a valid file
        offsets = _offsets(draft, i)
        if offsets is None or not 0 <= offsets[0] <= offsets[1] <= len(draft.data):
            return
        begin, end = offsets
        del draft.pairs[i]
        draft.data = draft.data[:begin] + draft.data[end:]
        for j in draft.tensor_indices():
            other = _offsets(draft, j)
            if other is not None:
                draft.set_field(j, "data_offsets", json.dumps([o - (end - begin) if o >= end else o for o in other]))
    elif kind == "swap_data":  # two tensors trade places in the data (and their offsets): still valid
        j = _pick_tensor(draw, draft)
        a, b = _offsets(draft, i), _offsets(draft, j)
        if a is None or b is None or a[1] > b[0] or b[1] > len(draft.data):
            return
        d = draft.data
        draft.data = d[: a[0]] + d[b[0] : b[1]] + d[a[1] : b[0]] + d[a[0] : a[1]] + d[b[1] :]
        shift = (b[1] - b[0]) - (a[1] - a[0])
        draft.set_field(i, "data_offsets", json.dumps([b[0] + shift, b[1]]))
        draft.set_field(j, "data_offsets", json.dumps([a[0], a[0] + b[1] - b[0]]))
        for k in draft.tensor_indices():
            o = _offsets(draft, k)
            if k not in (i, j) and o is not None and a[1] <= o[0] and o[1] <= b[0]:
                draft.set_field(k, "data_offsets", json.dumps([o[0] + shift, o[1] + shift]))
    elif kind == "shift":
        offsets = _offsets(draft, i)
        if offsets is not None:
            da, db = draw(st.integers(-8, 8)), draw(st.integers(-8, 8))
            draft.set_field(i, "data_offsets", json.dumps([offsets[0] + da, offsets[1] + db]))
    elif kind == "dtype":
        draft.set_field(i, "dtype", json.dumps(draw(st.sampled_from(DTYPE_NAMES))))
    elif kind == "dtype_map":
        try:
            name = json.loads(draft.field(i, "dtype") or '"F32"')
        except ValueError:
            name = "F32"
        name = name if isinstance(name, str) else "F32"
        draft.set_field(i, "dtype", draw(st.sampled_from([
            f"{{{json.dumps(name)}:null}}", f"{{{json.dumps(name)}:[]}}", f"{{{json.dumps(name)}:null,\"F16\":null}}",
            "{}", f"[{json.dumps(name)}]", "null",
        ])))  # fmt: skip
    elif kind == "shape":
        try:
            shape = json.loads(draft.field(i, "shape") or "[]")
            numel = math.prod(shape)
        except (ValueError, TypeError):
            shape, numel = [], 1
        new = draw(st.one_of(
            st.lists(st.integers(0, 8), max_size=4),
            st.just([numel]), st.just([1, numel]), st.just([numel, 1]), st.just([]) if numel == 1 else st.just([0]),
            st.just(list(reversed(shape))),
            st.sampled_from([[-1], [2.0], [True], "x", None, [2**64], [0, 2**63], [0, 2**63 - 1], [2**32, 2**32, 0],
                             [0, 2**32, 2**32], [2**62], [[1]], {}]),
        ))  # fmt: skip
        draft.set_field(i, "shape", json.dumps(new))
    elif kind == "dup_tensor":
        key, fields = draft.pairs[i]
        copy = list(fields)
        if draw(st.booleans()):  # a different entry under the same name: another dtype
            copy = [(k, ('"F32"' if v == '"I32"' else '"I32"') if k == '"dtype"' else v) for k, v in copy]
        draft.pairs.insert(draw(st.integers(0, len(draft.pairs))), (key, copy))
    elif kind == "dup_field":
        fields = draft.pairs[i][1]
        k, v = draw(st.sampled_from(fields))
        fields.insert(draw(st.integers(0, len(fields))), (k, v if draw(st.booleans()) else draw(_raw_values)))
    elif kind == "unknown_field":
        value = draw(st.one_of(
            _json_values.map(json.dumps), _raw_values,
            st.integers(120, 130).map(_nested), st.integers(120, 130).map(lambda d: '{"k":' * d + "1" + "}" * d),
        ))  # fmt: skip
        name = draw(st.sampled_from(['"x"', '"dtype2"', '"__metadata__"', '"Dtype"']))
        fields = draft.pairs[i][1]
        fields.insert(draw(st.integers(0, len(fields))), (name, value))
    elif kind == "array_form":
        values = [draft.field(i, f) or "null" for f in ("dtype", "shape", "data_offsets")]
        values = draw(st.sampled_from([values, values[:2], [*values, "1"], values[::-1]]))
        draft.pairs[i] = (draft.pairs[i][0], "[" + ",".join(values) + "]")
    elif kind == "number_token":
        name = draw(st.sampled_from(["shape", "data_offsets"]))
        try:
            numbers = json.loads(draft.field(i, name) or "[]")
        except ValueError:
            return
        if not isinstance(numbers, list) or not numbers or not all(type(x) is int for x in numbers):
            return
        j = draw(st.integers(0, len(numbers) - 1))
        v = numbers[j]
        tokens = [str(x) for x in numbers]
        tokens[j] = draw(st.sampled_from([
            f"{v}.0", f"{v}e0", f"{v}E+0", f"{v * 10}e-1", f"-{v}", str(v + 2**64), f"0{v}", f" {v} ", "1e400",
        ] + (["-0", "-0.0", "0e5"] if v == 0 else [])))  # fmt: skip
        draft.set_field(i, name, "[" + ",".join(tokens) + "]")
    elif kind == "rename":
        names = ['"\\ud800"', '"\\udfff"', '"\\ud83d\\ude00"', '""', '"__metadata__"', '"a\\u0000"', draft.pairs[0][0]]
        draft.pairs[i] = (draw(st.sampled_from(names)), draft.pairs[i][1])
