"""The Hub workflows that need the core: pull one node's shard by HTTP ranges, and publish a model's metadata.

`pull_shard` reads each remote safetensors header (one or two range requests per file, through
`williw.remote.HttpRangeSource`), validates it like a local one, then hands the node's tensors to the same
streaming writer as ``williw split`` (`williw.shards.write_shards`), whose source fetches only those tensors'
bytes. The shard file is therefore byte-identical to the split's, and the bytes downloaded are the node's tensors
plus the headers (and the small config/tokenizer files), not the model.

`MetadataUploader` lives here rather than in `williw.hub` because it validates the file with `williw.metadata`,
which sits above the Hub client in the import order.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from williw import jsonio
from williw.checkpoint import TensorInfo
from williw.errors import HubError, SplitError
from williw.header import FIRST_RANGE_BYTES
from williw.hub import (
    SAFETENSORS_INDEX,
    metadata_path_in_repo,
    upload_file,
)
from williw.metadata import load_metadata
from williw.planner.plan import Plan
from williw.planner.validate import check_plan
from williw.progress import get_logger
from williw.remote import BACKOFF_S, HttpRangeSource, merge_intervals, safe_file_name
from williw.remote_checkpoint import pinned_hub_source
from williw.shards import COPIED_FILES, read_manifest, sha256_file, write_shards
from williw.shards.manifest import check_node_id
from williw.shards.resume import ResumeSource, claim_partial, local_segments, subtract
from williw.splitter import as_plan, plan_specs
from williw.weightfiles import select_weight_files

log = get_logger(__name__)

@dataclass(frozen=True)
class PullResult:
    """One node's pulled shard. ``bytes_downloaded`` counts every body byte received (headers, the node's
    tensors, config and tokenizer files); ``tensor_bytes`` is what the node's tensors alone weigh."""

    node_id: str
    shard_path: str
    shard_bytes: int
    tensor_bytes: int
    header_bytes: int
    bytes_downloaded: int
    requests: int
    file_sha256: str
    source: str
    skipped: bool


def pull_shard(model: str, plan: Plan | dict[str, Any], node_id: str, output_dir: str | os.PathLike[str], *,
               revision: str | None = None, token: str | None = None, endpoint: str | None = None,
               model_name: str | None = None, first_range_bytes: int = FIRST_RANGE_BYTES,
               backoff_s: float = BACKOFF_S) -> PullResult:
    """Write ``node_id``'s shard under ``output_dir/<node_id>/`` from a remote model, fetching only its bytes.

    Args:
        model: a Hub repo id, or the URL of a server with ranges over a model folder (``williw serve-model``).
        plan: a `Plan` or the seed's plan dict.
        node_id: the node whose shard to write.
        output_dir: the shards folder.
        revision: branch, tag or commit on the Hub (default main); pinned to its commit for every read.
        token: Hub token (default ``HF_TOKEN``, then the saved login).
        endpoint: Hub address (default ``HF_ENDPOINT``).
        model_name: recorded in the manifest (default: the plan's, else the repo name).
        first_range_bytes: size of the first header read of each file.
        backoff_s: first wait before retrying a failed range (doubled each time).

    Returns:
        A `PullResult`.

    Raises:
        HubError: the model or a file cannot be fetched, or it has no safetensors weights.
        CheckpointError: a remote header is corrupt. PlanError: unknown node, or a tensor the model lacks.
        SplitError: unsafe node id, no disk space, a short read.
    """
    plan = as_plan(plan)
    plan.node(node_id)  # an unknown node fails before any request
    check_node_id(node_id, "plan")
    done = _already_complete(Path(output_dir) / node_id, plan, node_id, model)
    if done is not None:
        return done
    source, files = open_remote(model, revision, token, endpoint, first_range_bytes, backoff_s)
    with source:
        weights = weight_files(source, files, model)
        tensors, header_bytes = remote_tensors(source, weights, model)
        specs = plan_specs(plan, tensors, [node_id], Path(model))
        check_plan(list(tensors), plan, shown=3)  # as `split` does: no shard of a plan that is not the model
        for file in weights:
            source.wanted[file] = merge_intervals([(t.start, t.end) for t in specs[0].tensors  # type: ignore[misc]
                                                   if t.file == file])
        name = model_name or plan.model_name or model.rstrip("/").rsplit("/", 1)[-1]
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        resume, reader = _resume(out / node_id, list(specs[0].tensors), source, weights)
        with tempfile.TemporaryDirectory(prefix=".williw-pull-", dir=out) as tmp, resume:
            extra = []
            for f in COPIED_FILES:
                if files is None or f in files:
                    data = source.get_file(f, missing_ok=True)
                    if data is not None:
                        (Path(tmp) / f).write_bytes(data)
                        extra.append(Path(tmp) / f)
            written = write_shards(specs, reader, out, model_name=name, source_name=model,
                                   plan_sha256=plan.digest(), extra_files=extra, desc=f"pull {node_id}")[0]
    return PullResult(node_id=node_id, shard_path=str(written.path), shard_bytes=written.manifest.file_bytes,
                      tensor_bytes=sum(t.nbytes for t in specs[0].tensors), header_bytes=header_bytes,
                      bytes_downloaded=source.bytes_received, requests=source.requests,
                      file_sha256=written.manifest.file_sha256, source=model, skipped=written.skipped)


def _already_complete(shard_dir: Path, plan: Plan, node_id: str, model: str) -> PullResult | None:
    """The shard as a `PullResult` when its manifest says it was pulled from ``model`` for this very plan with
    this node's tensors, and its file and copied files are there with the recorded size and sha256: confirmed
    without a single request (a re-run of a finished pull used to fetch every header again)."""
    try:
        found = read_manifest(shard_dir)
    except SplitError:
        return None
    path = shard_dir / found.file
    if (found.node_id, found.source, found.plan_sha256) != (node_id, model, plan.digest()) or \
            sorted(t.name for t in found.tensors) != sorted(plan.node(node_id).tensor_names) or \
            path.is_symlink() or not path.is_file() or path.stat().st_size != found.file_bytes or \
            not all((shard_dir / f).is_file() for f in found.copied_files) or sha256_file(path) != found.file_sha256:
        return None
    return PullResult(node_id=node_id, shard_path=str(shard_dir), shard_bytes=found.file_bytes,
                      tensor_bytes=sum(t.bytes for t in found.tensors), header_bytes=0, bytes_downloaded=0,
                      requests=0, file_sha256=found.file_sha256, source=model, skipped=True)


class _Resume:
    """Context for one pull's leftover: closes the reader, and removes the leftover once the shard is written."""

    def __init__(self, partial: Path | None, reader: ResumeSource | None) -> None:
        self.partial, self.reader = partial, reader

    def __enter__(self) -> _Resume:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if self.reader is not None:
            self.reader.close()
        if exc_type is None and self.partial is not None:
            self.partial.unlink(missing_ok=True)


def _resume(shard_dir: Path, tensors: list[TensorInfo], source: HttpRangeSource,
            weights: list[str]) -> tuple[_Resume, Any]:
    """What a cut pull of this shard left (see `williw.shards.resume`), and the byte source to write from: the
    leftover for the bytes it holds (no longer wanted from the network), the network for the rest."""
    claimed = claim_partial(shard_dir, tensors) if shard_dir.is_dir() else None
    if claimed is None:
        return _Resume(None, None), source
    partial, have = claimed
    segments = local_segments(tensors, have)
    for file in weights:
        source.wanted[file] = subtract(source.wanted.get(file, []), segments.get(file, []))
    reader = ResumeSource(source, partial, segments)
    log.info("pull: resuming from %s (%s bytes already on disk)", partial, f"{have:,}")
    return _Resume(partial, reader), reader


def remote_tensors(source: HttpRangeSource, weights: list[str], model: str) -> tuple[dict[str, TensorInfo], int]:
    """Every tensor of the remote weights files (one or two range requests per header), and the header bytes.

    Raises:
        HubError: a file cannot be fetched, or two files hold the same tensor. CheckpointError: a corrupt header.
    """
    tensors: dict[str, TensorInfo] = {}
    header_bytes = 0
    for file in weights:
        header, _ = source.read_header(file)
        header_bytes += header.data_start
        if header.entries and all(e.name in tensors for e in header.entries):
            continue  # a second copy in another dtype: left out, as `williw.checkpoint.checkpoint_files` does
        for e in header.entries:
            if e.name in tensors:
                raise HubError(f"'{model}': tensor '{e.name}' is in both '{tensors[e.name].file}' and '{file}'")
            tensors[e.name] = TensorInfo(e.name, e.dtype, e.shape, file, e.start, e.end)
    return tensors, header_bytes


def open_remote(model: str, revision: str | None, token: str | None, endpoint: str | None,
                 first_range_bytes: int, backoff_s: float) -> tuple[HttpRangeSource, set[str] | None]:
    """A range source over the model and, on the Hub, its file list (a plain server has none to give)."""
    if model.startswith(("http://", "https://")):
        return HttpRangeSource(model, first_range_bytes=first_range_bytes, backoff_s=backoff_s), None
    source, listing, _sha = pinned_hub_source(model, revision=revision, token=token, endpoint=endpoint,
                                              first_range_bytes=first_range_bytes, backoff_s=backoff_s)
    return source, set(listing)


def weight_files(source: HttpRangeSource, files: set[str] | None, model: str) -> list[str]:
    index = None
    if files is None or SAFETENSORS_INDEX in files:
        index = source.get_file(SAFETENSORS_INDEX, missing_ok=True)
    if index is not None:
        try:
            weight_map = jsonio.parse(index)["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise HubError(f"'{model}': {SAFETENSORS_INDEX} is not a valid index (expected 'weight_map')") from None
        for n in names:
            if not isinstance(n, str) or not safe_file_name(n):
                raise HubError(f"'{model}': {SAFETENSORS_INDEX} names {n!r}, which is not a file name in the model")
        return names
    if files is None:
        return ["model.safetensors"]
    names, _ignored = select_weight_files(sorted(files))
    if not names or not names[0].endswith(".safetensors"):
        raise HubError(f"'{model}' has no safetensors weights; williw pull reads only safetensors: run "
                       "williw download, then williw split")
    return names


@dataclass(frozen=True)
class UploadConfig:
    """The seed's upload configuration."""

    metadata_file: str
    repo_id: str
    hf_token: str | None = None
    commit_message: str | None = None
    repo_type: str = "model"
    endpoint: str | None = None


@dataclass(frozen=True)
class UploadResult:
    url: str
    commit_id: str
    path_in_repo: str


class MetadataUploader:
    """The seed's uploader: ``upload_metadata(config)`` validates a metadata file and commits it to a repo."""

    def upload_metadata(self, config: UploadConfig) -> UploadResult:
        """Validate ``config.metadata_file`` and commit it to ``models/<org>--<name>/metadata.json`` of the repo
        (created if missing), so one metadata repo holds many models.

        Returns:
            The file's URL, the commit id and the path in the repo.

        Raises:
            MetadataError: the file is missing or not valid metadata (nothing is sent).
            HubError: no token, bad token, no write access, network failure.
        """
        meta = load_metadata(config.metadata_file)
        path = metadata_path_in_repo(meta.model_name)
        message = config.commit_message or f"Add metadata of {meta.model_name}"
        url, commit = upload_file(config.metadata_file, config.repo_id, path, token=config.hf_token,
                                  commit_message=message, repo_type=config.repo_type, endpoint=config.endpoint)
        return UploadResult(url=url, commit_id=commit, path_in_repo=path)
