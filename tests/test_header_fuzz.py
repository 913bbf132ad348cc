"""Fuzzing the header parser the way safetensors' own fuzzer does: start from valid files, mutate them, and check
that each mutant either parses into a consistent layout or raises one-line CheckpointError, never anything else.

Random headers or random bytes alone almost never get past the length prefix or the first entry, so every
strategy here starts from a valid file; `test_mutants_reach_every_outcome` shows that the mutants do get deep.
"""

from __future__ import annotations

import json
import struct

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from williw.errors import CheckpointError
from williw.header import SafetensorsHeader, header_length, parse_header, serialize_header
from williw.units import DTYPE_BITS, tensor_nbytes

WHERE = "Failed to parse safetensors header for 'f.safetensors'"
DTYPES = sorted(DTYPE_BITS)
# One phrase per family of checks in williw.header, every one of them after the length prefix.
PHRASES = ("length", "not valid JSON", "expected an object", "has unknown dtype", "expected a list of integers",
           "expected [start, end]", "with end before start", "bytes in data_offsets but shape", "leaving a gap",
           "overlapping the previous tensor", "the file is truncated", "trailing bytes")


@st.composite
def layouts(draw) -> list[tuple[str, str, tuple[int, ...]]]:
    """1-5 tensors with unique names, any known dtype, shapes whose bit count is a whole number of bytes."""
    names = draw(st.lists(st.text(min_size=1, max_size=6).filter(lambda s: s != "__metadata__"), min_size=1,
                          max_size=5, unique=True))
    out = []
    for name in names:
        dtype = draw(st.sampled_from(DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        if tensor_nbytes(dtype, shape) is None:
            shape = (*shape, 8)  # 8 elements of any dtype are whole bytes
        out.append((name, dtype, shape))
    return out


@st.composite
def valid_files(draw) -> tuple[bytes, list[tuple[str, str, tuple[int, ...]]], dict[str, str]]:
    layout = draw(layouts())
    metadata = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2))
    prefix, offsets = serialize_header(layout, metadata)
    data = draw(st.binary(min_size=offsets[-1][1], max_size=offsets[-1][1]))
    return prefix + data, layout, metadata


def parse_file(blob: bytes) -> SafetensorsHeader:
    n = header_length(blob[:8], "f.safetensors", len(blob))
    return parse_header(blob[8:8 + n], "f.safetensors", len(blob))


def outcome(blob: bytes) -> SafetensorsHeader | str:
    """The parsed header, or the error message after checking it is one line naming the file."""
    try:
        parsed = parse_file(blob)
    except CheckpointError as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith(WHERE), message
        return message
    end = parsed.data_start
    for e in parsed.entries:  # accepted layouts tile the data exactly, each entry as long as shape × dtype
        assert (e.start, e.nbytes) == (end, tensor_nbytes(e.dtype, e.shape))
        end = e.end
    assert end == len(blob)
    return parsed


json_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 2**70) | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                       max_size=3), max_leaves=6)


@st.composite
def mutants(draw) -> tuple[bytes, bytes]:
    """(original, mutant): 0-1 edits of the JSON (drop an entry, shift, swap or reverse offsets, replace a field, an
    entry or the whole header; the length prefix then still matches), then 0-3 byte-level edits (fewer after a JSON
    edit), mostly inside the header, sometimes in the prefix or the data; at least one edit in all."""
    blob, layout, _ = draw(valid_files())
    n = struct.unpack("<Q", blob[:8])[0]
    header, data = json.loads(blob[8:8 + n]), blob[8 + n:]
    names = [name for name, _, _ in layout]
    edit = draw(st.sampled_from(["none", "drop", "shift", "swap", "reverse", "field", "entry", "whole"]))
    a, b = draw(st.sampled_from(names)), draw(st.sampled_from(names))
    if edit == "drop":
        del header[a]
    elif edit == "shift":
        d = draw(st.integers(-3, 3).filter(bool))
        header[a]["data_offsets"] = [x + d for x in header[a]["data_offsets"]]
    elif edit == "swap":
        header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
    elif edit == "reverse":
        header[a]["data_offsets"] = header[a]["data_offsets"][::-1]
    elif edit == "field":
        header[a][draw(st.sampled_from(["dtype", "shape", "data_offsets", "other"]))] = draw(json_values)
    elif edit == "entry":
        header[a] = draw(json_values)
    elif edit == "whole":
        header = draw(json_values)
    raw = json.dumps(header).encode()
    out = bytearray(struct.pack("<Q", len(raw)) + raw + data)
    n = len(raw)
    for _ in range(draw(st.sampled_from([0, 0, 1, 2] if edit != "none" else [1, 2, 3]))):
        region = draw(st.sampled_from(["header"] * 6 + ["prefix", "data", "end"]))
        lo, hi = {"header": (8, 8 + n), "prefix": (0, 8), "data": (8 + n, len(out)),
                  "end": (len(out), len(out))}[region]
        hi = min(max(lo, hi), len(out))
        lo = min(lo, hi)
        pos = draw(st.integers(lo, hi))
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if kind == "flip" and pos < len(out):
            out[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and pos < len(out):
            out[pos] = draw(st.sampled_from(b'0123456789{}[],:" \x00\xff'))
        elif kind == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete":
            del out[pos:pos + draw(st.integers(1, 4))]
        else:
            del out[pos:]
    return blob, bytes(out)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_files())
def test_valid_files_parse_back_exactly(case) -> None:
    blob, layout, metadata = case
    parsed = outcome(blob)
    assert isinstance(parsed, SafetensorsHeader), parsed
    assert parsed.metadata == metadata
    _, offsets = serialize_header(layout)
    expected = [(name, dtype, shape, *off) for (name, dtype, shape), off in zip(layout, offsets, strict=True)]
    assert sorted((e.name, e.dtype, e.shape, e.start - parsed.data_start, e.end - parsed.data_start)
                  for e in parsed.entries) == sorted(expected)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutants())
def test_mutated_files_parse_consistently_or_fail_in_one_line(case) -> None:
    _, mutant = case
    outcome(mutant)


def test_mutants_reach_every_outcome() -> None:
    """The same generator, derandomized: its examples get past the length prefix to every check of the parser."""
    seen: set[str] = set()

    @settings(max_examples=500, database=None, derandomize=True, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(mutants())
    def collect(case) -> None:
        blob, mutant = case
        got = outcome(mutant)
        if isinstance(got, str):
            seen.update(p for p in PHRASES if p in got)
        elif got.entries and [(e.name, e.dtype) for e in got.entries] != [
                (e.name, e.dtype) for e in parse_file(blob).entries]:
            seen.add("accepted although changed")  # e.g. a flipped bit in a name: past every check

    collect()
    assert sorted(seen) == sorted({"accepted although changed", *PHRASES})


@settings(max_examples=150, deadline=None)
@given(valid_files(), st.data())
def test_one_field_changed_gives_its_exact_message(case, data) -> None:
    blob, layout, _ = case
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    name, dtype, shape = data.draw(st.sampled_from(layout))
    shown = name if name.isprintable() else json.dumps(name)[1:-1]
    start, end = header[name]["data_offsets"]
    change = data.draw(st.sampled_from(["dtype", "shape", "trailing", "truncated"]))
    extra = b""
    if change == "dtype":
        header[name]["dtype"] = "F12"
        expected = f"{WHERE}: tensor '{shown}' has unknown dtype 'F12'"
    elif change == "shape":
        header[name]["shape"] = [*shape, 2]  # twice the elements: still whole bytes
        need = tensor_nbytes(dtype, [*shape, 2])
        expected = (f"{WHERE}: tensor '{shown}' has {end - start:,} bytes in data_offsets but shape "
                    f"{[*shape, 2]} of {dtype} needs {need:,}")
        if need == end - start:  # zero elements: still consistent, so still accepted
            expected = None
    elif change == "trailing":
        extra = b"\0" * data.draw(st.integers(1, 9))
        expected = None
    else:
        expected = None
    raw = json.dumps(header).encode()
    body = blob[8 + n:] + extra
    if change == "truncated":
        if not body:
            return
        body = body[:-1]
    mutant = struct.pack("<Q", len(raw)) + raw + body
    size = len(mutant)
    if change == "trailing":
        expected = (f"{WHERE}: the tensors end at {size - len(extra):,} but the file has {size:,} bytes "
                    f"({len(extra):,} trailing bytes)")
    elif change == "truncated":
        # The parser sorts by (start, end), stably: among equal offsets the last in the header comes last.
        last = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])[-1]
        last_shown = last if last.isprintable() else json.dumps(last)[1:-1]
        expected = (f"{WHERE}: offsets of '{last_shown}' end at {size + 1:,} but the file has {size:,} bytes; "
                    "the file is truncated")
    got = outcome(mutant)
    if expected is None:
        assert isinstance(got, SafetensorsHeader)
    else:
        assert got == expected


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40), st.integers(0, 100))
def test_random_bodies_behind_a_correct_length(body: bytes, extra: int) -> None:
    # The length prefix matches, so every example reaches the JSON parser (not just the prefix check).
    blob = struct.pack("<Q", len(body)) + body + bytes(extra)
    got = outcome(blob)
    assert isinstance(got, str) or (got.entries == () and extra == 0)


def test_serialized_header_round_trips() -> None:
    prefix, offsets = serialize_header([("a", "F32", (2, 3)), ("b", "F4", (4,)), ("c", "BF16", ())])
    n = header_length(prefix, "f", None)
    parsed = parse_header(prefix[8:8 + n], "f", len(prefix) + 24 + 2 + 2)

    assert len(prefix) % 8 == 0
    assert offsets == [(0, 24), (24, 26), (26, 28)]
    assert [(e.name, e.start - parsed.data_start, e.end - parsed.data_start) for e in parsed.entries] == [
        ("a", 0, 24), ("b", 24, 26), ("c", 26, 28)]
