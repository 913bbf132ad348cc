"""Shard files: the byte-source interface, the one-pass streaming writer, and the ``shard.json`` manifest.

A node's shard is a folder ``<out>/<node_id>/`` holding ``model.safetensors`` (or ``model.pth``), the model's
``config.json`` and tokenizer files, and ``shard.json``. The manifest is written last, so a folder with a
manifest whose ``file_sha256`` matches the file is complete; anything else is redone.

The writer never decodes a tensor: it copies each tensor's raw bytes (bf16 and fp8 stay exact) from a
`ByteSource` into every shard that needs it, reading each source file once, front to back, in pieces of at most
`CHUNK_BYTES`. Tensors in a shard are laid out in source order (file name, then offset), so each shard is also
written front to back, and its sha256 is computed on the fly by a background thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shutil
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from williw.checkpoint import TensorInfo, is_plain_filename
from williw.errors import SplitError
from williw.fsutil import INCOMPLETE_SUFFIX, atomic_writer, write_json
from williw.header import serialize_header
from williw.progress import progress_bar

FORMAT_VERSION = 1
MANIFEST_NAME = "shard.json"
SAFETENSORS_FILE = "model.safetensors"
PTH_FILE = "model.pth"
# What a node needs besides its weights to build its part; copied when the model has them.
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "tokenizer.model", "special_tokens_map.json", "vocab.json", "vocab.txt", "merges.txt")
# 8 MiB pieces: large enough that syscalls cost nothing next to the copy, small enough that the few pieces
# in flight (read, being written, queued for hashing) keep the peak RSS far below 200 MB.
CHUNK_BYTES = 8 << 20
HASH_QUEUE_PIECES = 4
# Tensors of a file closer than this are fetched in one range: reading 1 MiB costs less than a seek or an
# HTTP request.
GAP_BYTES = 1 << 20


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


@dataclass(frozen=True)
class ShardSpec:
    """One node's shard: its tensors (any order; they are written in `shard_layout` order)."""

    node_id: str
    tensors: tuple[TensorInfo, ...]
    stage: int | None = None
    blocks: tuple[int, int] | None = None


@dataclass(frozen=True)
class ManifestTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    bytes: int


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
                "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "bytes": t.bytes}
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
            parsed.append(ManifestTensor(t["name"], t["dtype"], tuple(t["shape"]), t["bytes"]))
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
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SplitError(f"'{path}': no shard manifest (the shard is missing or its split did not finish)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SplitError(f"'{path}': not valid JSON ({exc})") from None
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
        file_bytes = len(_header(layout)) + sum(t.nbytes for t in layout)
    return ShardManifest(node_id=spec.node_id, model_name=model_name, source=source_name, plan_sha256=plan_sha256,
                         stage=spec.stage, blocks=spec.blocks, file=file, file_sha256="", file_bytes=file_bytes,
                         tensors=tuple(ManifestTensor(t.name, t.dtype, t.shape, t.nbytes) for t in layout),
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


def write_shards(specs: Sequence[ShardSpec], source: ByteSource, out_dir: str | os.PathLike[str], *,
                 model_name: str, source_name: str, plan_sha256: str, extra_files: Sequence[Path] = (),
                 desc: str = "split") -> list[WrittenShard]:
    """Write every spec's ``model.safetensors`` and manifest under ``out_dir/<node_id>/`` in one pass.

    Shards already complete (see `is_complete`) are skipped; the others are redone. Each needed range of each
    source file is requested once, in order, and each piece is written to every shard that holds those bytes.

    Args:
        specs: one per node; every tensor needs ``file``, ``start`` and ``end`` (absolute, ``[start, end)``).
        source: the bytes (`LocalFileSource`, an HTTP source, ...).
        out_dir: the shards folder.
        model_name, source_name, plan_sha256: recorded in each manifest.
        extra_files: local files copied into every shard (config.json, tokenizer files).
        desc: progress bar label.

    Returns:
        One `WrittenShard` per spec, in the order of ``specs``.

    Raises:
        SplitError: unsafe node id, a tensor without offsets, not enough disk space, a short source.
    """
    out = Path(out_dir)
    copied = [p.name for p in extra_files]
    expected = {}
    for spec in specs:
        check_node_id(spec.node_id, "plan")
        for t in spec.tensors:
            if t.start is None or t.end is None or t.end - t.start != t.nbytes:
                raise SplitError(f"node '{spec.node_id}': tensor '{t.name}' has no byte range in '{t.file}'")
        expected[spec.node_id] = expected_manifest(spec, model_name=model_name, source_name=source_name,
                                                   plan_sha256=plan_sha256, copied_files=copied)
    todo = [s for s in specs if not is_complete(out / s.node_id, expected[s.node_id])]
    check_free_space(out, sum(expected[s.node_id].file_bytes for s in todo))
    for spec in todo:
        prepare_shard_dir(out / spec.node_id)
    hashes = _stream(todo, source, out, desc) if todo else {}
    results = []
    for spec in specs:
        shard_dir = out / spec.node_id
        if spec.node_id in hashes:
            manifest = ShardManifest(**{**expected[spec.node_id].__dict__, "file_sha256": hashes[spec.node_id]})
            finish_shard(shard_dir, manifest, extra_files)
            results.append(WrittenShard(spec.node_id, shard_dir, manifest, skipped=False))
        else:
            results.append(WrittenShard(spec.node_id, shard_dir, read_manifest(shard_dir), skipped=True))
    return results


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


def _header(layout: Sequence[TensorInfo]) -> bytes:
    prefix, _ = serialize_header([(t.name, t.dtype, t.shape) for t in layout], {"format": "pt"})
    return prefix


class _Hasher:
    """sha256 of several files on one background thread. sha256 runs at ~1.4 GB/s per core (SHA-NI), slower
    than the copy, so hashing inline would halve throughput; hashlib releases the GIL on large updates, so a
    thread overlaps it with the copy. The bounded queue keeps the pieces in flight (and the RSS) small."""

    def __init__(self) -> None:
        self._queue: queue.Queue[list[tuple[Any, memoryview]] | None] = queue.Queue(maxsize=HASH_QUEUE_PIECES)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="williw-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (work := self._queue.get()) is not None:
            try:
                for h, view in work:
                    h.update(view)
            except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread in close()
                self._error = exc

    def submit(self, work: list[tuple[Any, memoryview]]) -> None:
        if work:
            self._queue.put(work)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


def _stream(specs: Sequence[ShardSpec], source: ByteSource, out: Path, desc: str) -> dict[str, str]:
    layouts = {s.node_id: shard_layout(s.tensors) for s in specs}
    holders: dict[tuple[str, str], list[str]] = {}
    by_file: dict[str, dict[str, TensorInfo]] = {}
    for node_id, layout in layouts.items():
        for t in layout:
            holders.setdefault((t.file, t.name), []).append(node_id)
            by_file.setdefault(t.file, {})[t.name] = t
    total = sum(t.nbytes for tensors in by_file.values() for t in tensors.values())
    hashers = {node_id: hashlib.sha256() for node_id in layouts}
    written = dict.fromkeys(layouts, 0)
    hasher = _Hasher()
    try:
        with ExitStack() as stack, progress_bar(total, desc) as bar:
            outs: dict[str, IO[bytes]] = {}
            for node_id, layout in layouts.items():
                outs[node_id] = stack.enter_context(atomic_writer(out / node_id / SAFETENSORS_FILE))
                prefix = _header(layout)
                outs[node_id].write(prefix)
                hashers[node_id].update(prefix)
            for file in sorted(by_file):
                for run in _runs(sorted(by_file[file].values(), key=lambda t: t.start or 0)):
                    _copy_run(file, run, source, holders, outs, hashers, written, hasher, bar)
            hasher.close()  # all bytes hashed before the files are renamed into place
            for node_id, layout in layouts.items():
                want = sum(t.nbytes for t in layout)
                if written[node_id] != want:  # pragma: no cover - _copy_run checks every range
                    raise SplitError(f"node '{node_id}': wrote {written[node_id]:,} of {want:,} tensor bytes")
    finally:
        if hasher._thread.is_alive():
            hasher.close()
    return {node_id: h.hexdigest() for node_id, h in hashers.items()}


def _runs(tensors: list[TensorInfo]) -> Iterator[list[TensorInfo]]:
    """Group a file's tensors (sorted by offset) into ranges fetched with one request each."""
    run: list[TensorInfo] = []
    for t in tensors:
        if run and t.start - run[-1].end > GAP_BYTES:  # type: ignore[operator]
            yield run
            run = []
        run.append(t)
    if run:
        yield run


def _copy_run(file: str, run: list[TensorInfo], source: ByteSource, holders: dict[tuple[str, str], list[str]],
              outs: dict[str, IO[bytes]], hashers: dict[str, Any], written: dict[str, int], hasher: _Hasher,
              bar: Any) -> None:
    start, end = run[0].start, max(t.end for t in run)  # type: ignore[type-var]
    assert start is not None and end is not None
    pos, i = start, 0
    for piece in source.read_range(file, start, end):
        view = memoryview(piece)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        piece_end = pos + view.nbytes
        if piece_end > end:
            raise SplitError(f"'{file}': the source returned {piece_end - start:,} bytes for the range "
                             f"[{start:,}, {end:,}), expected {end - start:,}")
        work = []
        while i < len(run) and run[i].start < piece_end:  # type: ignore[operator]
            t = run[i]
            lo, hi = max(t.start, pos), min(t.end, piece_end)  # type: ignore[type-var]
            if lo < hi:
                part = view[lo - pos:hi - pos]
                for node_id in holders[(file, t.name)]:
                    outs[node_id].write(part)
                    written[node_id] += len(part)
                    work.append((hashers[node_id], part))
            if t.end > piece_end:  # type: ignore[operator]
                break
            i += 1
        hasher.submit(work)
        bar.update(view.nbytes)
        pos = piece_end
    if pos != end:
        raise SplitError(f"'{file}': the source returned {pos - start:,} bytes for the range [{start:,}, {end:,}), "
                         f"expected {end - start:,}")
