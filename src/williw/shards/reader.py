"""Read a shard's tensors into fresh torch memory (torch imported inside the methods: it is an extra)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from williw.errors import VerifyError

if TYPE_CHECKING:
    import torch


class ShardReader:
    """Reads a safetensors file tensor by tensor with plain reads into fresh torch memory: one copy, aligned, and
    no memory-mapped pages left resident (``safe_open`` maps the file, and the mapped pages count in RSS on top of
    the copies until it closes, which doubled a stage's peak).

    Raises:
        CheckpointError: the file's header is corrupt (from williw.header).
    """

    def __init__(self, path: Path) -> None:
        import os

        from williw.header import read_header

        self.path = path
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        header = read_header(self._file, str(path), os.fstat(self._file.fileno()).st_size)
        self.entries = {e.name: e for e in header.entries}

    def keys(self) -> set[str]:
        return set(self.entries)

    def get_tensor(self, name: str) -> torch.Tensor:
        import torch

        from williw.units import SAFETENSORS_TO_TORCH

        e = self.entries[name]
        out = torch.empty(e.end - e.start, dtype=torch.uint8)
        self._file.seek(e.start)
        if self._file.readinto(out.numpy()) != e.end - e.start:
            raise VerifyError(f"'{self.path}': tensor '{name}' is cut short")
        return out.view(getattr(torch, SAFETENSORS_TO_TORCH[e.dtype])).reshape(e.shape)

    def read_all(self) -> dict[str, torch.Tensor]:
        return {n: self.get_tensor(n) for n in self.entries}

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
