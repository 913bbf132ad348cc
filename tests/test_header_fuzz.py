"""A fuzzed header either parses into a consistent layout or raises CheckpointError, never anything else."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from williw.errors import CheckpointError
from williw.header import header_length, parse_header, serialize_header

json_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 2**70) | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                       max_size=3), max_leaves=8)
entries = st.dictionaries(st.text(min_size=1, max_size=6),
                          st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "BF16", "I8", "F4", "X"]),
                                                 "shape": st.lists(st.integers(0, 4), max_size=3),
                                                 "data_offsets": st.lists(st.integers(0, 64), min_size=2,
                                                                          max_size=2)}) | json_values,
                          max_size=4)


@settings(max_examples=300, deadline=None)
@given(entries, st.integers(0, 200))
def test_random_headers(header: dict, data_len: int) -> None:
    raw = json.dumps(header).encode()
    try:
        parsed = parse_header(raw, "f.safetensors", 8 + len(raw) + data_len)
    except CheckpointError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("Failed to parse safetensors header for 'f.safetensors'")
        return
    end = parsed.data_start
    for e in parsed.entries:  # accepted layouts tile the data exactly
        assert e.start == end
        end = e.end
    assert end == 8 + len(raw) + data_len


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40), st.integers(0, 100))
def test_random_bytes(blob: bytes, extra: int) -> None:
    try:
        n = header_length(blob, "f", len(blob) + extra)
        parse_header(blob[8:8 + n], "f", len(blob) + extra)
    except CheckpointError:
        pass


def test_serialized_header_round_trips() -> None:
    prefix, offsets = serialize_header([("a", "F32", (2, 3)), ("b", "F4", (4,)), ("c", "BF16", ())])
    n = header_length(prefix, "f", None)
    parsed = parse_header(prefix[8:8 + n], "f", len(prefix) + 24 + 2 + 2)

    assert len(prefix) % 8 == 0
    assert offsets == [(0, 24), (24, 26), (26, 28)]
    assert [(e.name, e.start - parsed.data_start, e.end - parsed.data_start) for e in parsed.entries] == [
        ("a", 0, 24), ("b", 24, 26), ("c", 26, 28)]
