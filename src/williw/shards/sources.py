"""Where tensor bytes come from: the `ByteSource` protocol, local safetensors files, torch pickles."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from williw.checkpoint import Checkpoint, TensorInfo, is_plain_filename, load_torch_state_dict, open_checkpoint
from williw.errors import SplitError
from williw.shards.manifest import CHUNK_BYTES


class ByteSource(Protocol):
    """Where tensor bytes come from: local files, HTTP range reads, a torch state dict.

    ``file`` is `TensorInfo.file` and ``start``/``end`` are absolute offsets in it, half-open ``[start, end)``.
    """

    def read_range(self, file: str, start: int, end: int) -> Iterator[bytes | bytearray | memoryview]:
        """Yield the bytes of ``[start, end)`` of ``file`` in order, in pieces of any size.

        The pieces must add up to exactly ``end - start`` bytes (the writer raises `SplitError` otherwise) and
        belong to the caller: the writer may still hold a piece after asking for the next one, so a source must
        not reuse a buffer it has yielded. Keep pieces bounded (a few MiB) so memory stays small. Raise a
        `williw.errors.WilliwError` (SplitError, HubError) with a one-line message on failure.
        """
        ...


class LocalFileSource:
    """Reads tensors from files in a local folder, sequentially, in pieces of ``chunk_bytes``."""

    def __init__(self, root: str | os.PathLike[str], chunk_bytes: int = CHUNK_BYTES) -> None:
        self.root = Path(root)
        self.chunk_bytes = chunk_bytes

    def read_range(self, file: str, start: int, end: int) -> Iterator[bytes]:
        if not is_plain_filename(file):
            raise SplitError(f"'{self.root}': refusing to read {file!r}, which is not a file name in the folder")
        path = self.root / file
        with open(path, "rb", buffering=0) as f:
            # Tell the kernel to read ahead aggressively: we read the range once, front to back.
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), start, end - start, os.POSIX_FADV_SEQUENTIAL)
            f.seek(start)
            pos = start
            while pos < end:
                piece = f.read(min(self.chunk_bytes, end - pos))
                if not piece:
                    raise SplitError(f"'{path}': ends at byte {pos:,} but tensors extend to {end:,}; the file "
                                     "was truncated or changed while it was being read")
                pos += len(piece)
                yield piece




class TorchSource:
    """A `ByteSource` over torch pickles: each tensor gets a virtual ``[start, end)`` in its file (the tensors
    laid end to end in state-dict order, see `torch_offsets`), and its storage bytes are served from the
    memory-mapped state dict, exactly as stored (bf16 included)."""

    def __init__(self, model_dir: Path, tensors: Sequence[TensorInfo]) -> None:
        self.model_dir = model_dir
        self._by_file: dict[str, list[TensorInfo]] = {}
        for t in tensors:
            self._by_file.setdefault(t.file, []).append(t)
        self._loaded: tuple[str, dict[str, Any]] | None = None  # one file's state dict at a time

    def _state(self, file: str) -> dict[str, Any]:
        if self._loaded is None or self._loaded[0] != file:
            self._loaded = (file, load_torch_state_dict(self.model_dir / file))
        return self._loaded[1]

    def read_range(self, file: str, start: int, end: int) -> Iterator[memoryview]:
        import torch

        state = self._state(file)
        for t in self._by_file.get(file, []):
            assert t.start is not None and t.end is not None
            lo, hi = max(t.start, start), min(t.end, end)
            if lo >= hi:
                continue
            raw = state[t.name].detach().contiguous().reshape(-1).view(torch.uint8)
            yield memoryview(raw.numpy())[lo - t.start:hi - t.start]


def torch_offsets(checkpoint: Checkpoint) -> list[TensorInfo]:
    """The checkpoint's tensors with byte ranges: real ones for safetensors, virtual ones for torch files."""
    if checkpoint.format == "safetensors":
        return list(checkpoint.tensors)
    out, pos = [], {}
    for t in checkpoint.tensors:
        start = pos.get(t.file, 0)
        out.append(replace(t, start=start, end=start + t.nbytes))
        pos[t.file] = start + t.nbytes
    return out


def open_source(model_path: str | os.PathLike[str]) -> tuple[Checkpoint, dict[str, TensorInfo], ByteSource]:
    """Open a model folder for copying: its checkpoint, its tensors by name (with byte ranges), a byte source.

    Raises:
        CheckpointError: the folder is not a readable checkpoint.
    """
    checkpoint = open_checkpoint(model_path)
    tensors = torch_offsets(checkpoint)
    source: ByteSource
    if checkpoint.format == "safetensors":
        source = LocalFileSource(checkpoint.path)
    else:
        source = TorchSource(checkpoint.path, tensors)
    return checkpoint, {t.name: t for t in tensors}, source


