"""The one-pass streaming writer: every node's ``model.safetensors`` from one sequential read of the source.

The writer never decodes a tensor: it copies each tensor's raw bytes (bf16 and fp8 stay exact) from a
`ByteSource` into every shard that needs it, reading each needed range of each source file once, front to
back, in pieces of at most `CHUNK_BYTES`. Tensors in a shard are laid out in source order (file name, then
offset), so each shard is also written front to back and its sha256 is computed on the fly, on a background
thread; another thread reads ahead, so the disk (or network) never waits for the writes.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Generator, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

from williw.checkpoint import TensorInfo
from williw.errors import SplitError
from williw.fsutil import atomic_writer, kill_point
from williw.progress import progress_bar
from williw.shards.manifest import (
    SAFETENSORS_FILE,
    ShardManifest,
    ShardSpec,
    WrittenShard,
    check_free_space,
    check_node_id,
    expected_manifest,
    finish_shard,
    is_complete,
    prepare_shard_dir,
    read_manifest,
    safetensors_prefix,
    shard_layout,
)
from williw.shards.sources import ByteSource

HASH_QUEUE_PIECES = 4
READ_AHEAD_PIECES = 2
# Start writing a shard's dirty pages to disk every 64 MiB rather than leaving gigabytes for the final fsync
# (the kernel's default background threshold is 10% of RAM), so the disk writes overlap the reads.
WRITEBACK_BYTES = 64 << 20
# Tensors of a file closer than this are fetched in one range: reading 1 MiB costs less than a seek or an
# HTTP request.
GAP_BYTES = 1 << 20


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
    kill_point("split-renamed")  # every weights file in place, no manifest yet
    results = []
    for spec in specs:
        shard_dir = out / spec.node_id
        if spec.node_id in hashes:
            manifest = ShardManifest(**{**expected[spec.node_id].__dict__, "file_sha256": hashes[spec.node_id]})
            finish_shard(shard_dir, manifest, extra_files)
            kill_point("split-manifest")  # the first shard complete, the others without their manifests
            results.append(WrittenShard(spec.node_id, shard_dir, manifest, skipped=False))
        else:
            results.append(WrittenShard(spec.node_id, shard_dir, read_manifest(shard_dir), skipped=True))
    return results


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
                prefix = safetensors_prefix(layout)
                outs[node_id].write(prefix)
                hashers[node_id].update(prefix)
            runs = [(file, run) for file in sorted(by_file)
                    for run in _runs(sorted(by_file[file].values(), key=lambda t: t.start or 0))]
            pieces = _read_ahead(_pieces(runs, source), READ_AHEAD_PIECES)
            try:
                for file, run in runs:
                    _copy_run(file, run, pieces, holders, outs, hashers, written, hasher, bar)
                    kill_point("split-copying")  # after the first run of bytes: temporaries half-written
            finally:
                pieces.close()
            hasher.close()  # all bytes hashed before the files are renamed into place
            kill_point("split-copied")  # every byte handed to the temporaries, nothing renamed yet
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


def _start_writeback(f: IO[bytes]) -> None:
    """Ask the kernel to write back (and then drop) what is dirty so far, without waiting: on Linux
    POSIX_FADV_DONTNEED starts asynchronous writeback of dirty pages and frees the clean ones."""
    if hasattr(os, "posix_fadvise"):
        f.flush()
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def _pieces(runs: list[tuple[str, list[TensorInfo]]], source: ByteSource) -> Iterator[Any]:
    """Every piece of every run, in order; ``None`` closes each run."""
    for file, run in runs:
        yield from source.read_range(file, run[0].start, max(t.end for t in run))  # type: ignore[arg-type,type-var]
        yield None


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _read_ahead(items: Iterator[Any], depth: int) -> Generator[Any, None, None]:
    """Run ``items`` on a background thread, ``depth`` items ahead, so reading the source (disk readahead
    misses, network) overlaps with writing the shards; exceptions surface on the consumer's side."""
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(_Failed(exc))

    thread = threading.Thread(target=run, name="williw-read-ahead", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()


def _copy_run(file: str, run: list[TensorInfo], pieces: Iterator[Any], holders: dict[tuple[str, str], list[str]],
              outs: dict[str, IO[bytes]], hashers: dict[str, Any], written: dict[str, int], hasher: _Hasher,
              bar: Any) -> None:
    start, end = run[0].start, max(t.end for t in run)  # type: ignore[type-var]
    assert start is not None and end is not None
    pos, i = start, 0
    while (piece := next(pieces)) is not None:
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
                    before = written[node_id]
                    written[node_id] += len(part)
                    work.append((hashers[node_id], part))
                    if before // WRITEBACK_BYTES != written[node_id] // WRITEBACK_BYTES:
                        _start_writeback(outs[node_id])
            if t.end > piece_end:  # type: ignore[operator]
                break
            i += 1
        hasher.submit(work)
        bar.update(view.nbytes)
        pos = piece_end
    if pos != end:
        raise SplitError(f"'{file}': the source returned {pos - start:,} bytes for the range [{start:,}, {end:,}), "
                         f"expected {end - start:,}")
