"""Gather one node's shard of a new plan version from the cheapest place each tensor is: the node's own shards of
earlier versions (a local copy), a peer that holds it (its shard server, by HTTP ranges), and only for the rest
the model's source (a ``williw serve-model`` URL or a Hub repo).

This is the pull side of a migration (`williw.planner.migrate`): the node pulls what it lacked, and nothing it
already had. The shard is written by the same streaming writer as ``williw split`` and ``williw pull``, so it is
byte-identical to theirs. A peer that cannot be read (gone, not serving) costs nothing but a fallback: its
tensors come from the model instead, and the result says so.

A node whose tensors did not change (most nodes of a re-plan) gets a new manifest and a hard link to its old
weights file: the bytes would be identical (a shard's header does not depend on the plan), so copying them
would only cost disk and time.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from williw import jsonio
from williw.checkpoint import TensorInfo
from williw.errors import CheckpointError, HubError, SplitError
from williw.fsutil import INCOMPLETE_SUFFIX
from williw.header import FIRST_RANGE_BYTES, read_header
from williw.planner.plan import Plan
from williw.pull import open_remote, remote_tensors, weight_files
from williw.remote import BACKOFF_S, HttpRangeSource, merge_intervals
from williw.shards import (
    COPIED_FILES,
    MANIFEST_NAME,
    SAFETENSORS_FILE,
    LocalFileSource,
    ShardManifest,
    ShardSpec,
    expected_manifest,
    is_complete,
    read_manifest,
    shard_layout,
    write_shards,
)
from williw.shards.manifest import finish_shard, prepare_shard_dir
from williw.splitter import as_plan, plan_specs


@dataclass(frozen=True)
class GatherResult:
    """Where the node's tensor bytes came from. ``bytes_downloaded`` counts every body byte received (headers
    included); ``peer_bytes`` is by peer URL; ``peer_failures`` names the peers that could not be read."""

    node_id: str
    shard_dir: str
    file_sha256: str
    local_bytes: int
    peer_bytes: dict[str, int]
    model_bytes: int
    bytes_downloaded: int
    peer_failures: tuple[str, ...]
    skipped: bool
    linked: bool = False  # the weights file is a hard link to this node's older shard (same tensors)


class _Routed:
    """A `ByteSource` over several, addressed by where each tensor sits in the model's own files.

    Tensors carry their model position (file, offset), so the shard's layout is the model's order, the same as
    ``split`` and ``pull`` write, wherever the bytes come from; a read of a model range is served tensor by tensor
    from the source that has each one (the gaps between them, other nodes' tensors, are zeros the writer drops).
    """

    def __init__(self) -> None:
        self.segments: dict[str, list[tuple[int, int, Any, str, int]]] = {}  # model file → (start, end, src, file, at)

    def add(self, at: tuple[str, int], nbytes: int, source: Any, file: str, start: int) -> None:
        """Add one tensor; call in model order (`shard_layout`), as `read_range` walks each list once."""
        self.segments.setdefault(at[0], []).append((at[1], at[1] + nbytes, source, file, start))

    def read_range(self, file: str, start: int, end: int) -> Iterator[Any]:
        pos = start
        for lo, hi, source, real, at in self.segments.get(file, ()):
            if hi <= start or lo >= end:
                continue
            a, b = max(lo, start), min(hi, end)
            while pos < a:
                n = min(a - pos, 1 << 20)
                yield bytes(n)
                pos += n
            yield from source.read_range(real, at + (a - lo), at + (b - lo))
            pos = b
        while pos < end:
            n = min(end - pos, 1 << 20)
            yield bytes(n)
            pos += n


@dataclass
class _Found:
    """Where one wanted tensor's bytes are: ``kind`` is "local", a peer URL or "model"."""

    entry: Any  # a header entry: name, dtype, shape, start, end in ``file``
    source: Any
    file: str
    kind: str


def gather_shard(model: str, plan: Plan | dict[str, Any], node_id: str, output_dir: str | os.PathLike[str], *,
                 local: Sequence[str | os.PathLike[str]] = (), peers: Mapping[str, str] | None = None,
                 revision: str | None = None, token: str | None = None, endpoint: str | None = None,
                 model_name: str | None = None, first_range_bytes: int = FIRST_RANGE_BYTES,
                 backoff_s: float = BACKOFF_S) -> GatherResult:
    """Write ``node_id``'s shard under ``output_dir/<node_id>/``, reading each tensor from the cheapest place.

    Args:
        model: the model's source: a Hub repo id or a ``williw serve-model`` URL.
        plan: the plan version to write the shard of.
        node_id: this node.
        output_dir: the shards folder of this version.
        local: shard folders this node holds (earlier versions); unreadable ones are ignored.
        peers: tensor name → URL of a peer's shard folder (its ``model.safetensors`` and ``shard.json``).
        revision, token, endpoint: for a Hub source, as in `williw.pull.pull_shard`.
        model_name: recorded in the manifest (default: the plan's).
        first_range_bytes, backoff_s: the first header read of each remote file; the first retry's wait.

    Raises:
        HubError: the model's source cannot be read. CheckpointError: a corrupt remote header.
        PlanError: unknown node, or a tensor nobody has. SplitError: unsafe node id, no disk space, a short read.
    """
    plan = as_plan(plan)
    want = set(plan.node(node_id).tensor_names)
    found: dict[str, _Found] = {}
    at: dict[str, tuple[str, int]] = {}  # tensor → its position in the model's files, from manifests or headers
    extra_from: Path | None = None
    whole: list[tuple[Path, ShardManifest]] = []  # local shards holding exactly this node's tensors
    for folder in (Path(p) for p in local):
        try:
            manifest = read_manifest(folder)
            path = folder / manifest.file
            with open(path, "rb") as f:
                header = read_header(f, manifest.file, path.stat().st_size)
        except (SplitError, CheckpointError, OSError):
            continue  # a shard being deleted, or never finished: the tensors come from elsewhere
        _positions(at, manifest)
        source = LocalFileSource(folder)
        if {e.name for e in header.entries} == want and manifest.file == SAFETENSORS_FILE:
            whole.append((folder, manifest))
        for e in header.entries:
            if e.name in want and e.name not in found:
                found[e.name] = _Found(e, source, manifest.file, "local")
        if extra_from is None and manifest.copied_files:
            extra_from = folder
    out = Path(output_dir)
    name = model_name or plan.model_name or model
    if want <= set(found) and all(n in at for n in want):
        for folder, manifest in whole:
            linked = _link(_spec(plan, node_id, found, at, model), folder, manifest, out, model_name=name,
                           source_name=model, plan_sha256=plan.digest())
            if linked is not None:
                return linked
    opened: list[HttpRangeSource] = []
    failures: list[str] = []
    extra_peer: tuple[HttpRangeSource, tuple[str, ...]] | None = None  # a peer's config and tokenizer files
    try:
        by_peer: dict[str, set[str]] = {}
        for tensor, url in (peers or {}).items():
            if tensor in want and tensor not in found:
                by_peer.setdefault(url, set()).add(tensor)
        for url, names in sorted(by_peer.items()):
            source = HttpRangeSource(url, first_range_bytes=first_range_bytes, backoff_s=backoff_s, retries=1)
            opened.append(source)
            try:
                header, _ = source.read_header(SAFETENSORS_FILE)
            except (HubError, CheckpointError):
                failures.append(url)
                continue
            manifest = _peer_manifest(source)
            if manifest is not None:
                _positions(at, manifest)
                if extra_from is None and extra_peer is None:
                    extra_peer = (source, tuple(f for f in manifest.copied_files if f in COPIED_FILES))
            hits = [e for e in header.entries if e.name in names]
            source.wanted[SAFETENSORS_FILE] = merge_intervals([(e.start, e.end) for e in hits])
            for e in hits:
                found[e.name] = _Found(e, source, SAFETENSORS_FILE, url)
        missing = want - set(found)
        model_source: HttpRangeSource | None = None
        files: set[str] | None = None
        unplaced = any(n not in at for n in want)
        if missing or unplaced or (extra_from is None and extra_peer is None):
            try:
                model_source, files = open_remote(model, revision, token, endpoint, first_range_bytes, backoff_s)
                opened.append(model_source)
                remote, _ = remote_tensors(model_source, weight_files(model_source, files, model), model)
            except (HubError, CheckpointError):
                if missing or (extra_from is None and extra_peer is None):
                    raise
                remote = {}  # only the model's order was wanted: keep the order the sources give
            for n, t in remote.items():
                at[n] = (t.file, t.start)  # type: ignore[assignment]
            for n in missing & set(remote):
                found[n] = _Found(remote[n], model_source, remote[n].file, "model")
            for file in {remote[n].file for n in missing if n in remote}:
                model_source.wanted[file] = merge_intervals(  # type: ignore[union-attr]
                    [(remote[n].start, remote[n].end) for n in missing if n in remote and remote[n].file == file])
        spec = _spec(plan, node_id, found, at, model)
        routed = _Routed()
        for t in shard_layout(spec.tensors):  # by model position: read_range walks each file's list in order
            f = found[t.name]
            routed.add((t.file, t.start), t.nbytes, f.source, f.file, f.entry.start)  # type: ignore[arg-type]
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".williw-gather-", dir=out) as tmp:
            extra = _extra_files(Path(tmp), extra_from, extra_peer, model_source, files)
            written = write_shards([spec], routed, out, model_name=name, source_name=model,
                                   plan_sha256=plan.digest(), extra_files=extra, desc=f"gather {node_id}")[0]
    finally:
        for s in opened:
            s.close()
    size = {t.name: t.nbytes for t in spec.tensors}
    peer_bytes: dict[str, int] = {}
    for n, f in found.items():
        if f.kind not in ("local", "model") and n in size:
            peer_bytes[f.kind] = peer_bytes.get(f.kind, 0) + size[n]
    return GatherResult(node_id=node_id, shard_dir=str(written.path.parent), file_sha256=written.manifest.file_sha256,
                        local_bytes=sum(size[n] for n, f in found.items() if f.kind == "local" and n in size),
                        peer_bytes=peer_bytes,
                        model_bytes=sum(size[n] for n, f in found.items() if f.kind == "model" and n in size),
                        bytes_downloaded=sum(s.bytes_received for s in opened), peer_failures=tuple(failures),
                        skipped=written.skipped)


def _positions(at: dict[str, tuple[str, int]], manifest: ShardManifest) -> None:
    for t in manifest.tensors:
        if t.source_at is not None:
            at.setdefault(t.name, t.source_at)


def _spec(plan: Plan, node_id: str, found: dict[str, _Found], at: dict[str, tuple[str, int]],
          model: str) -> ShardSpec:
    """The node's shard with each tensor at its model position (or, unknown, after them in the order found)."""
    infos = {}
    for n, f in found.items():
        e = f.entry
        file, start = at.get(n, (f"~{f.kind}/{f.file}", e.start))
        infos[n] = TensorInfo(n, e.dtype, e.shape, file, start, start + (e.end - e.start))
    return plan_specs(plan, infos, [node_id], Path(model))[0]


def _link(spec: ShardSpec, folder: Path, old: ShardManifest, out: Path, **manifest: str) -> GatherResult | None:
    """The shard of ``spec`` as a hard link to ``folder``'s identical weights file and a new manifest; None when
    the two files would differ or the link cannot be made (another filesystem): then the bytes are copied."""
    new = expected_manifest(spec, copied_files=old.copied_files, **manifest)
    if (new.tensors, new.file_bytes, new.file) != (old.tensors, old.file_bytes, old.file):
        return None
    new = ShardManifest(**{**new.__dict__, "file_sha256": old.file_sha256})
    shard_dir = out / spec.node_id
    result = GatherResult(node_id=spec.node_id, shard_dir=str(shard_dir), file_sha256=old.file_sha256,
                          local_bytes=sum(t.nbytes for t in spec.tensors), peer_bytes={}, model_bytes=0,
                          bytes_downloaded=0, peer_failures=(), skipped=False, linked=True)
    if is_complete(shard_dir, new):
        return GatherResult(**{**result.__dict__, "skipped": True})
    prepare_shard_dir(shard_dir)
    tmp = shard_dir / f"{new.file}{INCOMPLETE_SUFFIX}"
    tmp.unlink(missing_ok=True)
    try:
        os.link(folder / old.file, tmp)
    except OSError:
        return None
    os.replace(tmp, shard_dir / new.file)
    finish_shard(shard_dir, new, [folder / f for f in old.copied_files])
    return result


def _peer_manifest(source: HttpRangeSource) -> ShardManifest | None:
    """The peer's shard manifest (model positions, config files), or None when it cannot be read."""
    try:
        raw = source.get_file(MANIFEST_NAME, missing_ok=True, max_bytes=64 << 20)
        return ShardManifest.from_dict(jsonio.parse(raw or b""), f"{source.base_url}{MANIFEST_NAME}")
    except (HubError, SplitError, ValueError):
        return None


def _extra_files(tmp: Path, local: Path | None, peer: tuple[HttpRangeSource, tuple[str, ...]] | None,
                 model: HttpRangeSource | None, files: set[str] | None) -> list[Path]:
    """config.json and the tokenizer files: from a local shard that has them, else a peer's, else the model."""
    out = []
    for f in COPIED_FILES:
        if local is not None:
            data = (local / f).read_bytes() if (local / f).is_file() else None
        elif peer is not None:
            data = peer[0].get_file(f, missing_ok=True) if f in peer[1] else None
        elif model is not None and (files is None or f in files):
            data = model.get_file(f, missing_ok=True)
        else:
            data = None
        if data is not None:
            (tmp / f).write_bytes(data)
            out.append(tmp / f)
    return out


__all__ = ["GatherResult", "gather_shard"]
