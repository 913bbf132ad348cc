"""Resuming a pull: the bytes a cut pull left on disk are used again instead of being fetched again.

The shard writer writes ``model.safetensors`` front to back into ``model.safetensors.<uuid>.incomplete``: the
8-byte length and JSON header first, then the tensors in `shard_layout` order. A pull killed half-way leaves
that file, and everything in it up to its length is a prefix of the shard being written (the process died, the
page cache kept what it wrote). `claim_partial` takes the longest such leftover whose header is exactly the header
the shard will have (so a leftover of another plan or model is never used) and renames it ``RESUME_NAME``;
`ResumeSource` then answers the writer's reads from it for the bytes it covers and from the network for the rest.
The writer still hashes every byte of the new file, and ``williw check-shards`` verifies it against the model.

A power cut (not a kill) can leave a file whose length runs ahead of its data; a pull after one should start
afresh (delete the shard folder), as the README says.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator
from pathlib import Path

from williw.checkpoint import TensorInfo
from williw.fsutil import INCOMPLETE_SUFFIX
from williw.shards.manifest import SAFETENSORS_FILE, safetensors_prefix, shard_layout
from williw.shards.sources import ByteSource

RESUME_NAME = f"{SAFETENSORS_FILE}.resume"
PIECE_BYTES = 4 << 20


def claim_partial(shard_dir: Path, tensors: list[TensorInfo]) -> tuple[Path, int] | None:
    """Keep the longest usable leftover of a cut pull of this shard as ``shard_dir/RESUME_NAME``.

    Args:
        shard_dir: the node's shard folder.
        tensors: the shard's tensors (any order).

    Returns:
        The kept file and how many of its bytes (header included) are the shard's, or None when nothing is usable.
    """
    prefix = safetensors_prefix(shard_layout(tensors))
    total = len(prefix) + sum(t.nbytes for t in tensors)
    candidates = sorted(shard_dir.glob(f"{SAFETENSORS_FILE}.*{INCOMPLETE_SUFFIX}")) + [shard_dir / RESUME_NAME]
    best: tuple[int, Path] | None = None
    for path in candidates:
        try:
            if path.is_symlink() or not path.is_file():
                continue
            size = min(path.stat().st_size, total)
            with open(path, "rb") as f:
                if size <= len(prefix) or f.read(len(prefix)) != prefix:
                    continue
        except OSError:
            continue
        if best is None or size > best[0]:
            best = (size, path)
    for path in candidates:
        if best is not None and path == best[1]:
            continue
        path.unlink(missing_ok=True)
    if best is None:
        return None
    kept = shard_dir / RESUME_NAME
    if best[1] != kept:
        os.replace(best[1], kept)
    return kept, best[0]


def local_segments(tensors: list[TensorInfo], have: int) -> dict[str, list[tuple[int, int, int]]]:
    """Per source file, the ``(start, end, offset)`` source ranges ``[start, end)`` whose bytes are already at
    ``offset`` in a partial shard of ``have`` bytes, sorted by start."""
    layout = shard_layout(tensors)
    pos = len(safetensors_prefix(layout))
    out: dict[str, list[tuple[int, int, int]]] = {}
    for t in layout:
        if pos >= have:
            break
        n = min(t.nbytes, have - pos)
        out.setdefault(t.file, []).append((t.start, t.start + n, pos))  # type: ignore[operator]
        pos += t.nbytes
    for segs in out.values():
        segs.sort()
    return out


def subtract(intervals: list[tuple[int, int]], holes: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """``intervals`` minus the ``[start, end)`` of ``holes`` (both sorted, half-open)."""
    out = []
    for lo, hi in intervals:
        for s, e, _ in holes:
            if e <= lo or s >= hi:
                continue
            if s > lo:
                out.append((lo, s))
            lo = max(lo, e)
        if lo < hi:
            out.append((lo, hi))
    return out


class ResumeSource:
    """A `ByteSource` that reads the ranges in ``segments`` from the partial file and the rest from ``remote``."""

    def __init__(self, remote: ByteSource, partial: Path, segments: dict[str, list[tuple[int, int, int]]]) -> None:
        self.remote = remote
        self.segments = segments
        self.local_bytes = 0
        self._file = open(partial, "rb")  # noqa: SIM115 - closed by close()

    def close(self) -> None:
        self._file.close()

    def read_range(self, file: str, start: int, end: int) -> Iterator[bytes]:
        segs = self.segments.get(file, [])
        pos = start
        i = max(0, bisect.bisect_right([s for s, _, _ in segs], start) - 1)
        while pos < end:
            while i < len(segs) and segs[i][1] <= pos:
                i += 1
            if i < len(segs) and segs[i][0] <= pos:
                s, e, offset = segs[i]
                stop = min(e, end)
                while pos < stop:
                    n = min(PIECE_BYTES, stop - pos)
                    piece = os.pread(self._file.fileno(), n, offset + pos - s)
                    if len(piece) != n:
                        raise OSError(f"'{self._file.name}' shrank while resuming from it")
                    self.local_bytes += n
                    yield piece
                    pos += n
            else:
                stop = min(segs[i][0], end) if i < len(segs) else end
                yield from self.remote.read_range(file, pos, stop)
                pos = stop
