"""A model's checkpoint read where it lives, on the Hub or on a `williw serve-model` server: ``config.json``, the
index and every safetensors header by HTTP range, never a weight.

The rules are `williw.checkpoint`'s, run on the repo's file list instead of a folder's (`RemoteFiles` is a
`williw.checkpoint.ModelFiles`): the same files are the checkpoint, the same copies are left out, the same
structure step reads the config, so the metadata of a repo equals that of the same files in a folder, field for
field. On the Hub everything is pinned to the commit the revision resolves to (``repo_info``, through
huggingface_hub, with its endpoint and token handling), and the file list with sizes comes from the tree API.

Each header costs one range request of the first 100,000 bytes, and a second one only when the header is longer,
as ``huggingface_hub.parse_safetensors_file_metadata`` does (`williw.remote.HttpRangeSource.read_header`). We do
not call that function itself: it returns neither the header's length nor its bytes, so the checks that a local
header gets (`williw.header.parse_header`: offsets tiling the file up to its size, as safetensors' ``validate()``)
could not run, and a corrupt shard would give another message on the Hub than in a folder. Headers of several
shard files are read concurrently (8 at a time), with a progress bar per file.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from williw import jsonio
from williw.checkpoint import Checkpoint, TensorInfo, open_model_files
from williw.errors import HubError
from williw.header import FIRST_RANGE_BYTES, SafetensorsHeader
from williw.hub import auth_headers, hub_endpoint, is_repo_id, repo_files, resolve_base_url, resolve_token
from williw.progress import progress_bar
from williw.remote import BACKOFF_S, HttpRangeSource, HubContext

HEADER_WORKERS = 8  # concurrent header reads: enough to hide a round trip per shard, few enough for any server
LISTING = "_files"  # `williw serve-model`'s file list: {"files": {path: size}}


@dataclass(frozen=True)
class RemoteCheckpoint:
    """A checkpoint read over HTTP, with what reading it cost.

    Attributes:
        checkpoint: the tensors (``location`` is the repo id or URL, ``commit`` the Hub commit, else None).
        header_bytes: the weight files' headers (8-byte length + JSON), summed.
        bytes_received: every body byte received by range reads (headers' first ranges, config, index).
        requests: range and file requests (besides the Hub API's repo-info and tree calls).
    """

    checkpoint: Checkpoint
    header_bytes: int
    bytes_received: int
    requests: int


def is_remote_model(model: str) -> bool:
    """True for an http(s) URL or a name spelled like a Hub repo id that is not a local path."""
    return model.startswith(("http://", "https://")) or (is_repo_id(model) and not Path(model).expanduser().exists())


def open_source(model: str, *, revision: str | None = None, token: str | None = None, endpoint: str | None = None,
                first_range_bytes: int = FIRST_RANGE_BYTES,
                backoff_s: float = BACKOFF_S) -> tuple[HttpRangeSource, dict[str, int] | None, str | None]:
    """A range source over a remote model, its files with their sizes, and the commit it is pinned to.

    ``model`` is a Hub repo id (every read pinned to the commit ``revision`` resolves to) or the URL of a server
    over a model folder; a plain server's file list is None unless it answers ``GET /_files`` (serve-model does).

    Raises:
        HubError: not a repo id or URL; missing repo or revision; no access; bad token; network failure.
    """
    if model.startswith(("http://", "https://")):
        source = HttpRangeSource(model, first_range_bytes=first_range_bytes, backoff_s=backoff_s)
        return source, _served_listing(source), None
    return pinned_hub_source(model, revision=revision, token=token, endpoint=endpoint,
                             first_range_bytes=first_range_bytes, backoff_s=backoff_s)


def pinned_hub_source(model: str, *, revision: str | None, token: str | None, endpoint: str | None,
                      first_range_bytes: int = FIRST_RANGE_BYTES,
                      backoff_s: float = BACKOFF_S) -> tuple[HttpRangeSource, dict[str, int], str]:
    """A range source over Hub repo ``model`` pinned to the commit ``revision`` resolves to (every range of every
    file then comes from one version of the model), its files with their sizes, and that commit.

    Raises:
        HubError: not a repo id; missing repo or revision; no access; bad token; network failure.
    """
    if not is_repo_id(model):
        raise HubError(f"'{model}' is neither a Hugging Face repo id (like 'org/model') nor an http(s) URL")
    token, token_source = resolve_token(token)
    sha, listing = repo_files(model, revision=revision, token=token, endpoint=endpoint, token_source=token_source)
    ctx = HubContext(hub_endpoint(endpoint), model, revision or "main", token_source if token else None)
    source = HttpRangeSource(resolve_base_url(model, sha, endpoint), headers=auth_headers(token), hub=ctx,
                             first_range_bytes=first_range_bytes, backoff_s=backoff_s)
    return source, listing, sha


def _served_listing(source: HttpRangeSource) -> dict[str, int] | None:
    raw = source.get_file(LISTING, missing_ok=True)
    if raw is None:
        return None
    data = jsonio.loads(raw, f"'{source.url(LISTING)}'", HubError)
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in files.items()):
        raise HubError(f"'{source.url(LISTING)}': expected {{\"files\": {{path: size}}}}")
    return files


def open_remote_checkpoint(model: str, *, revision: str | None = None, token: str | None = None,
                           endpoint: str | None = None, first_range_bytes: int = FIRST_RANGE_BYTES,
                           workers: int = HEADER_WORKERS) -> RemoteCheckpoint:
    """Read a remote model's checkpoint from its config, index and headers; no weight byte is fetched.

    Args:
        model: a Hub repo id (``org/name``) or the URL of ``williw serve-model``.
        revision: branch, tag or commit on the Hub (default main), resolved once to a commit.
        token: Hub token (default ``HF_TOKEN``, then the saved login). endpoint: default ``HF_ENDPOINT``.
        first_range_bytes: the first read of each header (100,000 bytes, as huggingface_hub).
        workers: headers read at once.

    Returns:
        A `RemoteCheckpoint`.

    Raises:
        HubError: missing, gated or private repo, bad token, network failure; a repo whose weights are only
            torch pickles (their layout needs the files: ``--download``). CheckpointError: no weights, a corrupt
            header, config or index (the same messages as for a folder, naming ``<repo>/<file>``).
    """
    source, listing, commit = open_source(model, revision=revision, token=token, endpoint=endpoint,
                                          first_range_bytes=first_range_bytes)
    where = model.rstrip("/")
    files = RemoteFiles(source, where, listing, workers)
    with source:
        ckpt = open_model_files(files, Path(where.rsplit("/", 1)[-1]), location=where, commit=commit)
    header_bytes = sum(h.data_start for h in files.headers(list(ckpt.files)).values())
    return RemoteCheckpoint(checkpoint=ckpt, header_bytes=header_bytes, bytes_received=source.bytes_received,
                            requests=source.requests)


class RemoteFiles:
    """A remote model's files as `williw.checkpoint.ModelFiles`.

    Args:
        source: the range source (pinned to a commit on the Hub).
        where: the repo id or URL, as messages name it.
        listing: path -> size of every file (None: a server that does not list its files, refused).
        workers: headers read at once.
    """

    def __init__(self, source: HttpRangeSource, where: str, listing: dict[str, int] | None,
                 workers: int = HEADER_WORKERS) -> None:
        self.source, self.where, self.listing, self.workers = source, where, listing, max(1, workers)
        self._headers: dict[str, SafetensorsHeader] = {}
        self._small: dict[str, bytes | None] = {}

    def label(self, name: str) -> str:
        return f"{self.where}/{name}"

    def names(self) -> list[str]:
        if self.listing is None:
            raise HubError(f"'{self.where}' does not list its files (GET /{LISTING}); serve the model folder with "
                           "williw serve-model, or give its Hub repo id")
        # As a folder is listed (`williw.checkpoint._listing`): top level, and one folder down, not hidden ones.
        return sorted(n for n in self.listing if n.count("/") <= 1 and not (n.count("/") and n.startswith(".")))

    def read_small(self, name: str) -> bytes | None:
        if self.listing is not None and name not in self.listing:
            return None  # no request for a file the list does not have
        if name not in self._small:
            self._small[name] = self.source.get_file(name, missing_ok=True)
        return self._small[name]

    def headers(self, files: list[str]) -> dict[str, SafetensorsHeader]:
        todo = [f for f in dict.fromkeys(files) if f not in self._headers]
        if todo:
            with progress_bar(len(todo), f"headers of {self.where}", unit="file") as bar, \
                    ThreadPoolExecutor(min(self.workers, len(todo)), thread_name_prefix="williw-header") as pool:
                futures = {f: pool.submit(self.source.read_header, f) for f in todo}
                try:
                    for f, future in futures.items():
                        self._headers[f] = future.result()[0]
                        bar.update(1)
                finally:
                    for future in futures.values():
                        future.cancel()
        return {f: self._headers[f] for f in files}

    def torch_tensors(self, files: list[str]) -> list[TensorInfo]:
        raise HubError(f"'{self.where}' has only PyTorch pickle weights ({', '.join(files[:3])}"
                       f"{', ...' if len(files) > 3 else ''}), whose tensor layout cannot be read without "
                       f"downloading them: run williw metadata {self.where} --download (fetches the weights, then "
                       "reads them), or convert the repo to safetensors")
