"""The on-disk shard: ``<out>/<node_id>/`` with the weights file, config and tokenizer files, and ``shard.json``.

The manifest is written last, so a folder whose manifest's ``file_sha256`` matches its file is complete;
anything else is redone (`is_complete`, `prepare_shard_dir`, `finish_shard`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from williw.checkpoint import TensorInfo, is_plain_filename
from williw.errors import SplitError
from williw.fsutil import INCOMPLETE_SUFFIX, atomic_writer, read_json, write_json
from williw.header import serialize_header

FORMAT_VERSION = 1
MANIFEST_NAME = "shard.json"
SAFETENSORS_FILE = "model.safetensors"
PTH_FILE = "model.pth"
# What a node needs besides its weights to build its part; copied when the model has them.
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "tokenizer.model", "special_tokens_map.json", "vocab.json", "vocab.txt", "merges.txt",
                # transformers 5 saves the chat template beside tokenizer_config.json; generate's chat needs it
                "chat_template.jinja", "chat_template.json")
# 8 MiB pieces: large enough that syscalls cost nothing next to the copy, small enough that the few pieces
# in flight (read, being written, queued for hashing) keep the peak RSS far below 200 MB.
CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class ShardSpec:
    """One node's shard: its tensors (any order; they are written in `shard_layout` order)."""

    node_id: str
    tensors: tuple[TensorInfo, ...]
    stage: int | None = None
    blocks: tuple[int, int] | None = None


@dataclass(frozen=True)
class ManifestTensor:
    """One tensor of a shard. ``source_at`` is where it starts in the model's own files (file name, offset): the
    shard's order is the model's, and a node gathering a shard from peers' shards learns that order from here."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    bytes: int
    source_at: tuple[str, int] | None = None


@dataclass(frozen=True)
class ShardManifest:
    """``shard.json``. ``file`` is the weights file name in the shard folder; ``blocks`` is ``[start, end)``."""

    node_id: str
    model_name: str
    source: str  # the model folder or Hub repo the bytes came from
    plan_sha256: str
    stage: int | None
    blocks: tuple[int, int] | None
    file: str
    file_sha256: str
    file_bytes: int
    tensors: tuple[ManifestTensor, ...]
    copied_files: tuple[str, ...] = ()
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": self.format_version, "node_id": self.node_id, "model_name": self.model_name,
                "source": self.source, "plan_sha256": self.plan_sha256, "stage": self.stage,
                "blocks": list(self.blocks) if self.blocks is not None else None, "file": self.file,
                "file_sha256": self.file_sha256, "file_bytes": self.file_bytes,
                "copied_files": list(self.copied_files),
                "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "bytes": t.bytes,
                             **({"source_at": list(t.source_at)} if t.source_at is not None else {})}
                            for t in self.tensors]}

    @staticmethod
    def from_dict(d: Any, source: str = MANIFEST_NAME) -> ShardManifest:
        """Validate a loaded manifest.

        Raises:
            SplitError: one line naming ``source`` and the field.
        """
        if not isinstance(d, dict):
            raise SplitError(f"'{source}': a shard manifest must be a JSON object")
        if d.get("format_version") != FORMAT_VERSION:
            raise SplitError(f"'{source}': field 'format_version' must be {FORMAT_VERSION}, "
                             f"got {d.get('format_version')!r}")
        for key in ("node_id", "model_name", "source", "plan_sha256", "file", "file_sha256"):
            if not isinstance(d.get(key), str):
                raise SplitError(f"'{source}': field '{key}' must be a string")
        if not isinstance(d.get("file_bytes"), int) or d["file_bytes"] < 0:
            raise SplitError(f"'{source}': field 'file_bytes' must be an integer >= 0")
        if d["file"] not in (SAFETENSORS_FILE, PTH_FILE):
            raise SplitError(f"'{source}': field 'file' must be {SAFETENSORS_FILE} or {PTH_FILE}, got {d['file']!r}")
        blocks = d.get("blocks")
        if blocks is not None and not (isinstance(blocks, list) and len(blocks) == 2
                                       and all(isinstance(b, int) for b in blocks)):
            raise SplitError(f"'{source}': field 'blocks' must be [start, end) or null")
        copied = d.get("copied_files", [])
        if not isinstance(copied, list) or not all(isinstance(c, str) and is_plain_filename(c) for c in copied):
            raise SplitError(f"'{source}': field 'copied_files' must be a list of file names")
        tensors = d.get("tensors")
        if not isinstance(tensors, list):
            raise SplitError(f"'{source}': field 'tensors' must be a list of {{name, dtype, shape, bytes}}")
        parsed = []
        for i, t in enumerate(tensors):
            if not (isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("dtype"), str)
                    and isinstance(t.get("shape"), list) and all(isinstance(s, int) for s in t["shape"])
                    and isinstance(t.get("bytes"), int)):
                raise SplitError(f"'{source}': tensors[{i}] must be {{name, dtype, shape, bytes}}")
            at = t.get("source_at")
            if at is not None and not (isinstance(at, list) and len(at) == 2 and isinstance(at[0], str)
                                       and is_plain_filename(at[0]) and isinstance(at[1], int) and at[1] >= 0):
                raise SplitError(f"'{source}': tensors[{i}].source_at must be [file name, offset >= 0]")
            parsed.append(ManifestTensor(t["name"], t["dtype"], tuple(t["shape"]), t["bytes"],
                                         (at[0], at[1]) if at is not None else None))
        stage = d.get("stage")
        return ShardManifest(node_id=d["node_id"], model_name=d["model_name"], source=d["source"],
                             plan_sha256=d["plan_sha256"], stage=stage if isinstance(stage, int) else None,
                             blocks=tuple(blocks) if blocks is not None else None,  # type: ignore[arg-type]
                             file=d["file"], file_sha256=d["file_sha256"], file_bytes=d["file_bytes"],
                             tensors=tuple(parsed), copied_files=tuple(copied))


def read_manifest(shard_dir: str | os.PathLike[str]) -> ShardManifest:
    """Read ``<shard_dir>/shard.json``.

    Raises:
        SplitError: missing, not JSON, or a field of the wrong type.
    """
    path = Path(shard_dir) / MANIFEST_NAME
    data = read_json(path, SplitError, "no shard manifest (the shard is missing or its split did not finish)")
    return ShardManifest.from_dict(data, str(path))


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = CHUNK_BYTES) -> str:
    """sha256 of a file, read in bounded pieces."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while piece := f.read(chunk_bytes):
            h.update(piece)
    return h.hexdigest()


def shard_layout(tensors: Sequence[TensorInfo]) -> list[TensorInfo]:
    """The order tensors take in a shard: source order (file name, then offset), so the copy is sequential."""
    return sorted(tensors, key=lambda t: (t.file, t.start or 0, t.name))


def check_node_id(node_id: str, where: str) -> None:
    """Refuse a node id that is not a safe folder name (it becomes ``<out>/<node_id>/``).

    The rule is `williw.fleet.check_node_id`'s (the planner owns it); its message is re-raised as `SplitError`.
    Until that module is committed, the same rule and message are applied here.

    Raises:
        SplitError: naming ``where`` and the id.
    """
    try:
        from williw.fleet import check_node_id as fleet_check
    except ImportError:  # pragma: no cover - fleet.py lands with the planner
        fleet_check = None
    if fleet_check is not None:
        try:
            fleet_check(node_id, where)
        except ValueError as exc:
            raise SplitError(str(exc)) from None
        return
    if not isinstance(node_id, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", node_id) or node_id in (".", ".."):
        raise SplitError(f"{where}: node_id must be 1-64 characters from A-Z a-z 0-9 . _ - (and not '.' or "
                         f"'..'), got {node_id!r}")


@dataclass(frozen=True)
class WrittenShard:
    """A shard on disk; ``skipped`` when an identical shard was already there."""

    node_id: str
    shard_dir: Path
    manifest: ShardManifest
    skipped: bool

    @property
    def path(self) -> Path:
        return self.shard_dir / self.manifest.file


def expected_manifest(spec: ShardSpec, *, model_name: str, source_name: str, plan_sha256: str,
                      file: str = SAFETENSORS_FILE, copied_files: Sequence[str] = ()) -> ShardManifest:
    """The manifest a shard of ``spec`` will have, before its sha256 is known (``file_sha256`` empty)."""
    layout = shard_layout(spec.tensors)
    file_bytes = 0
    if file == SAFETENSORS_FILE:
        file_bytes = len(safetensors_prefix(layout)) + sum(t.nbytes for t in layout)
    return ShardManifest(node_id=spec.node_id, model_name=model_name, source=source_name, plan_sha256=plan_sha256,
                         stage=spec.stage, blocks=spec.blocks, file=file, file_sha256="", file_bytes=file_bytes,
                         tensors=tuple(ManifestTensor(t.name, t.dtype, t.shape, t.nbytes,
                                                      (t.file, t.start) if t.start is not None else None)
                                       for t in layout),
                         copied_files=tuple(copied_files))


def is_complete(shard_dir: Path, expected: ShardManifest) -> bool:
    """True when ``shard_dir`` already holds this shard: same manifest (bar the checksum), the file's size and
    sha256 equal to the manifest's, and the copied files present."""
    try:
        found = read_manifest(shard_dir)
    except SplitError:
        return False
    same = found == ShardManifest(**{**expected.__dict__, "file_sha256": found.file_sha256,
                                     "file_bytes": found.file_bytes if expected.file == PTH_FILE
                                     else expected.file_bytes})
    path = shard_dir / found.file
    if not same or not path.is_file() or path.stat().st_size != found.file_bytes:
        return False
    if not all((shard_dir / name).is_file() for name in found.copied_files):
        return False
    return sha256_file(path) == found.file_sha256


def prepare_shard_dir(shard_dir: Path) -> None:
    """Make the folder, and drop what an earlier run left: its manifest first (so the shard stops looking
    complete before anything changes), then half-written temporaries."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    (shard_dir / MANIFEST_NAME).unlink(missing_ok=True)
    for leftover in shard_dir.glob(f"*{INCOMPLETE_SUFFIX}"):
        leftover.unlink(missing_ok=True)


def finish_shard(shard_dir: Path, manifest: ShardManifest, extra_files: Sequence[Path]) -> None:
    """Copy ``extra_files`` (config, tokenizer) into the shard, then write the manifest, last and atomically."""
    for src in extra_files:
        with open(src, "rb") as fin, atomic_writer(shard_dir / src.name) as fout:
            shutil.copyfileobj(fin, fout)
    write_json(shard_dir / MANIFEST_NAME, manifest.to_dict())


def check_free_space(out: Path, need: int) -> None:
    """Refuse to start a split that cannot fit, rather than fail half-way.

    Raises:
        SplitError: naming the folder and both sizes.
    """
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        from williw.units import format_bytes

        raise SplitError(f"'{out}': the shards need {format_bytes(need)} but only {format_bytes(free)} is free")


def safetensors_prefix(layout: Sequence[TensorInfo]) -> bytes:
    """The 8-byte length and JSON header of a shard holding ``layout`` back to back (``format: pt``)."""
    prefix, _ = serialize_header([(t.name, t.dtype, t.shape) for t in layout], {"format": "pt"})
    return prefix


