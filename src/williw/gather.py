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

import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    """A `ByteSource` over several: a tensor's ``file`` is a key naming the source and its real file."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[Any, str]] = {}

    def add(self, key: str, source: Any, file: str) -> str:
        self.routes[key] = (source, file)
        return key

    def read_range(self, file: str, start: int, end: int) -> Iterator[Any]:
        source, real = self.routes[file]
        return source.read_range(real, start, end)


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
    routed = _Routed()
    infos: dict[str, TensorInfo] = {}
    kind: dict[str, str] = {}  # tensor → "local" | peer URL | "model"
    extra_from: Path | None = None
    whole: list[tuple[Path, ShardManifest]] = []  # local shards holding exactly this node's tensors
    for i, folder in enumerate(Path(p) for p in local):
        try:
            manifest = read_manifest(folder)
            path = folder / manifest.file
            with open(path, "rb") as f:
                header = read_header(f, manifest.file, path.stat().st_size)
        except (SplitError, CheckpointError, OSError):
            continue  # a shard being deleted, or never finished: the tensors come from elsewhere
        key = routed.add(f"local{i}", LocalFileSource(folder), manifest.file)
        if {e.name for e in header.entries} == want and manifest.file == SAFETENSORS_FILE:
            whole.append((folder, manifest))
        for e in header.entries:
            if e.name in want and e.name not in infos:
                infos[e.name] = TensorInfo(e.name, e.dtype, e.shape, key, e.start, e.end)
                kind[e.name] = "local"
        if extra_from is None and manifest.copied_files:
            extra_from = folder
    out = Path(output_dir)
    if want <= set(infos):
        specs = plan_specs(plan, infos, [node_id], Path(model))
        for folder, manifest in whole:
            linked = _link(specs[0], folder, manifest, out, model_name=model_name or plan.model_name or model,
                           source_name=model, plan_sha256=plan.digest())
            if linked is not None:
                return linked
    opened: list[HttpRangeSource] = []
    failures: list[str] = []
    extra_peer: tuple[HttpRangeSource, tuple[str, ...]] | None = None  # a peer's config and tokenizer files
    try:
        by_peer: dict[str, set[str]] = {}
        for name, url in (peers or {}).items():
            if name in want and name not in infos:
                by_peer.setdefault(url, set()).add(name)
        for j, (url, names) in enumerate(sorted(by_peer.items())):
            source = HttpRangeSource(url, first_range_bytes=first_range_bytes, backoff_s=backoff_s, retries=1)
            opened.append(source)
            try:
                header, _ = source.read_header("model.safetensors")
            except (HubError, CheckpointError):
                failures.append(url)
                continue
            if extra_from is None and extra_peer is None:
                extra_peer = _peer_extras(source)
            key = routed.add(f"peer{j}", source, "model.safetensors")
            found = [e for e in header.entries if e.name in names]
            source.wanted["model.safetensors"] = merge_intervals([(e.start, e.end) for e in found])
            for e in found:
                infos[e.name] = TensorInfo(e.name, e.dtype, e.shape, key, e.start, e.end)
                kind[e.name] = url
        missing = want - set(infos)
        model_source: HttpRangeSource | None = None
        files: set[str] | None = None
        if missing or (extra_from is None and extra_peer is None):
            model_source, files = open_remote(model, revision, token, endpoint, first_range_bytes, backoff_s)
            opened.append(model_source)
        if missing:
            assert model_source is not None
            remote, _ = remote_tensors(model_source, weight_files(model_source, files, model), model)
            for name in missing & set(remote):
                t = remote[name]
                infos[name] = TensorInfo(name, t.dtype, t.shape, routed.add(f"model:{t.file}", model_source, t.file),
                                         t.start, t.end)
                kind[name] = "model"
            for file in {remote[n].file for n in missing if n in remote}:
                model_source.wanted[file] = merge_intervals([(remote[n].start, remote[n].end) for n in missing
                                                             if n in remote and remote[n].file == file])
        specs = plan_specs(plan, infos, [node_id], Path(model))
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".williw-gather-", dir=out) as tmp:
            extra = _extra_files(Path(tmp), extra_from, extra_peer, model_source, files)
            written = write_shards(specs, routed, out, model_name=model_name or plan.model_name or model,
                                   source_name=model, plan_sha256=plan.digest(), extra_files=extra,
                                   desc=f"gather {node_id}")[0]
    finally:
        for s in opened:
            s.close()
    size = {t.name: t.nbytes for t in specs[0].tensors}
    peer_bytes: dict[str, int] = {}
    for name, k in kind.items():
        if k not in ("local", "model"):
            peer_bytes[k] = peer_bytes.get(k, 0) + size[name]
    return GatherResult(node_id=node_id, shard_dir=str(written.path.parent), file_sha256=written.manifest.file_sha256,
                        local_bytes=sum(size[n] for n, k in kind.items() if k == "local"), peer_bytes=peer_bytes,
                        model_bytes=sum(size[n] for n, k in kind.items() if k == "model"),
                        bytes_downloaded=sum(s.bytes_received for s in opened), peer_failures=tuple(failures),
                        skipped=written.skipped)


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


def _peer_extras(source: HttpRangeSource) -> tuple[HttpRangeSource, tuple[str, ...]] | None:
    """The peer and the config/tokenizer files its manifest says its shard folder holds; None if unreadable."""
    try:
        raw = source.get_file(MANIFEST_NAME, missing_ok=True, max_bytes=64 << 20)
        manifest = ShardManifest.from_dict(json.loads(raw or b""), f"{source.base_url}{MANIFEST_NAME}")
    except (HubError, SplitError, ValueError):
        return None
    return source, tuple(f for f in manifest.copied_files if f in COPIED_FILES)


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
