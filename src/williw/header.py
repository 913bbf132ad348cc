"""Parse and validate safetensors headers without reading tensor data.

A safetensors file is ``[u64 little-endian N][N bytes of JSON header][data]``. The checks are those of the
safetensors Rust crate's ``validate()``: every dtype known, ``shape × dtype`` equal to the byte length of the
entry, and the entries tiling the data section exactly (contiguous from 0, no gap, no overlap, ending at the end
of the file). Each kind of corruption gets its own one-line message naming the file.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import BinaryIO

from williw import jsonio
from williw.errors import CheckpointError
from williw.units import DTYPE_BITS, numel, tensor_nbytes

# The safetensors crate refuses headers above 100 MB; so do we, before allocating them.
MAX_HEADER_BYTES = 100_000_000
# huggingface_hub fetches this much first: "97% of headers are < 100 KB".
FIRST_RANGE_BYTES = 100_000


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a safetensors file. Offsets are absolute in the file, half-open ``[start, end)``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed header: the data section starts at ``data_start`` (8 + header length)."""

    data_start: int
    entries: tuple[HeaderEntry, ...]  # in offset order
    metadata: dict[str, str]

    @property
    def header_bytes(self) -> int:
        return self.data_start


def header_length(prefix: bytes, filename: str, file_size: int | None) -> int:
    """Read the 8-byte header length and check it against the file size."""
    if len(prefix) < 8:
        raise CheckpointError(
            f"Failed to parse safetensors header for '{filename}': the file has {len(prefix)} bytes, "
            "fewer than the 8-byte header length"
        )
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(
            f"Failed to parse safetensors header for '{filename}': header length {n:,} exceeds the "
            f"{MAX_HEADER_BYTES:,}-byte limit (not a safetensors file, or corrupt)"
        )
    if file_size is not None and 8 + n > file_size:
        raise CheckpointError(
            f"Failed to parse safetensors header for '{filename}': header length {n:,} runs past the end of "
            f"the file ({file_size:,} bytes); the file is truncated"
        )
    return n


def parse_header(raw: bytes, filename: str, file_size: int) -> SafetensorsHeader:
    """Validate a header's JSON (``raw`` excludes the 8-byte length) against a file of ``file_size`` bytes.

    Raises:
        CheckpointError: one line naming ``filename`` and the first problem found.
    """
    where = f"Failed to parse safetensors header for '{filename}'"
    try:
        obj = jsonio.parse(raw)
    except jsonio.JsonInputError as exc:
        raise CheckpointError(f"{where}: the header is {exc}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where}: the header is a JSON {type(obj).__name__}, expected an object")
    data_start = 8 + len(raw)
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{where}: '__metadata__' must be an object of strings")
    entries = [_entry(name, info, where, data_start) for name, info in obj.items()]
    entries.sort(key=lambda e: (e.start, e.end))
    expected = data_start
    for entry in entries:
        if entry.start < expected:
            raise CheckpointError(
                f"{where}: offsets of '{shown(entry.name)}' start at {entry.start - data_start:,}, overlapping the "
                f"previous tensor which ends at {expected - data_start:,}"
            )
        if entry.start > expected:
            raise CheckpointError(
                f"{where}: offsets of '{shown(entry.name)}' start at {entry.start - data_start:,}, leaving a gap "
                f"after {expected - data_start:,}"
            )
        expected = entry.end
    if expected > file_size:
        last = entries[-1]
        raise CheckpointError(
            f"{where}: offsets of '{shown(last.name)}' end at {last.end:,} but the file has {file_size:,} bytes; "
            "the file is truncated"
        )
    if expected < file_size:
        raise CheckpointError(
            f"{where}: the tensors end at {expected:,} but the file has {file_size:,} bytes "
            f"({file_size - expected:,} trailing bytes)"
        )
    return SafetensorsHeader(data_start=data_start, entries=tuple(entries), metadata=dict(metadata))


def shown(name: str) -> str:
    """A name as it appears in a one-line message: escaped when it holds newlines or other unprintables."""
    return name if name.isprintable() else json.dumps(name)[1:-1]


def _entry(raw_name: str, info: object, where: str, data_start: int) -> HeaderEntry:
    name = shown(raw_name)
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: entry '{name}' must be an object with dtype, shape and data_offsets")
    dtype = info.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:  # a list or object is unhashable: not a dtype
        raise CheckpointError(f"{where}: tensor '{name}' has unknown dtype {dtype!r}")
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise CheckpointError(f"{where}: tensor '{name}' has shape {shape!r}, expected a list of integers >= 0")
    offsets = info.get("data_offsets")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
        raise CheckpointError(f"{where}: tensor '{name}' has data_offsets {offsets!r}, expected [start, end]")
    start, end = offsets
    if end < start:
        raise CheckpointError(f"{where}: tensor '{name}' has data_offsets [{start}, {end}] with end before start")
    nbytes = tensor_nbytes(dtype, shape)
    if nbytes is None:
        raise CheckpointError(
            f"{where}: tensor '{name}' of shape {shape} has {numel(shape) * DTYPE_BITS[dtype]} bits of {dtype}, "
            "not a whole number of bytes"
        )
    if end - start != nbytes:
        raise CheckpointError(
            f"{where}: tensor '{name}' has {end - start:,} bytes in data_offsets but shape {shape} of {dtype} "
            f"needs {nbytes:,}"
        )
    return HeaderEntry(name=raw_name, dtype=dtype, shape=tuple(shape), start=data_start + start,
                       end=data_start + end)


def read_header(f: BinaryIO, filename: str, file_size: int) -> SafetensorsHeader:
    """Read and validate the header of an open local safetensors file (reads only the header bytes)."""
    n = header_length(f.read(8), filename, file_size)
    raw = f.read(n)
    return parse_header(raw, filename, file_size)


def serialize_header(entries: list[tuple[str, str, tuple[int, ...]]],
                     metadata: dict[str, str] | None = None) -> tuple[bytes, list[tuple[int, int]]]:
    """Build a safetensors header for tensors written back to back in this order.

    Args:
        entries: (name, dtype, shape) in the order their bytes will follow the header.
        metadata: optional ``__metadata__`` strings.

    Returns:
        The full prefix (8-byte length + JSON, padded with spaces to a multiple of 8 bytes as the safetensors
        writer does) and each tensor's ``[start, end)`` relative to the data section.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offsets = []
    pos = 0
    for name, dtype, shape in entries:
        nbytes = tensor_nbytes(dtype, shape)
        if nbytes is None:
            raise CheckpointError(f"cannot serialize tensor '{name}': dtype {dtype} shape {list(shape)}")
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets.append((pos, pos + nbytes))
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets
