"""The Hugging Face Hub, through the real ``huggingface_hub`` client: download what a split needs, upload and fetch
metadata files, and the addresses and headers that `williw.remote` uses for ranged reads.

This is the only module that imports ``huggingface_hub`` (inside functions, so ``import williw`` stays light).
The Hub's address is read from ``HF_ENDPOINT`` at call time and passed explicitly, because the client reads it
into a constant once, when it is first imported. Every client error becomes a `HubError` with one line saying
what to do (`williw.remote.hub_error_message`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from williw import jsonio
from williw.errors import HubError
from williw.remote import HubContext, hub_error_message, network_message
from williw.weightfiles import SAFETENSORS_INDEX, TORCH_INDEX, select_weight_files

DEFAULT_ENDPOINT = "https://huggingface.co"
MIB = 1024 * 1024
# Besides the weights, what a node needs to build its part (the splitter copies these into every shard).
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
              "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
              "spiece.model", "chat_template.jinja", "chat_template.json")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[\w.-]{1,96})?$")


def hub_endpoint(endpoint: str | None = None) -> str:
    """``endpoint``, else ``HF_ENDPOINT``, else huggingface.co; without a trailing slash."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def resolve_token(token: str | None = None) -> tuple[str | None, str | None]:
    """The token to send and where it came from: ``token`` (--token), ``HF_TOKEN``, or the saved login.

    Returns:
        (token, source) or (None, None) when there is none.
    """
    if token:
        return token, "--token"
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"), "HF_TOKEN"
    from huggingface_hub import get_token

    saved = get_token()
    return (saved, "the saved login") if saved else (None, None)


def is_repo_id(name: str) -> bool:
    """True for ``name`` or ``org/name`` as the Hub spells repo ids (no '..', no '--' at the ends)."""
    return bool(_REPO_ID.match(name)) and ".." not in name and not name.endswith((".", "-"))


@contextmanager
def hub_errors(ctx: HubContext, *, file: str | None = None, write: bool = False) -> Iterator[None]:
    """Turn the client's exceptions into one-line `HubError` s naming the repo and the fix."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        yield
    except HubError:
        raise
    except HfHubHTTPError as exc:
        resp = exc.response
        raise HubError(hub_error_message(ctx, resp.status_code, resp.headers.get("X-Error-Code"),
                                         resp.headers.get("X-Error-Message"), file=file, write=write)) from None
    except LocalEntryNotFoundError as exc:  # snapshot_download's wrapper of a network failure
        cause = exc.__cause__
        if isinstance(cause, HfHubHTTPError):
            resp = cause.response
            raise HubError(hub_error_message(ctx, resp.status_code, resp.headers.get("X-Error-Code"),
                                             resp.headers.get("X-Error-Message"), file=file)) from None
        raise HubError(network_message(ctx.endpoint, cause or exc)) from None
    except (*_transport_errors(), ConnectionError, TimeoutError) as exc:
        raise HubError(network_message(ctx.endpoint, exc)) from None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's network errors: huggingface_hub 2 sends through httpx2, 1.x through httpx."""
    import importlib

    found = []
    for name in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(name).TransportError)
        except ImportError:
            continue
    return tuple(found)


def _api(ctx: HubContext, token: str | None) -> Any:
    from huggingface_hub import HfApi

    # token=False: send nothing rather than let the client look for a login we already looked for.
    return HfApi(endpoint=ctx.endpoint, token=token or False, library_name="williw")


def repo_files(repo_id: str, *, revision: str | None = None, token: str | None = None,
               endpoint: str | None = None, token_source: str | None = None) -> tuple[str, dict[str, int]]:
    """The commit a revision points to and every file of the repo at that commit with its size.

    Raises:
        HubError: missing repo or revision, no access, network failure.
    """
    ctx = HubContext(hub_endpoint(endpoint), repo_id, revision or "main", token_source if token else None)
    from huggingface_hub.hf_api import RepoFile

    api = _api(ctx, token)
    with hub_errors(ctx):
        sha = api.repo_info(repo_id, revision=ctx.revision).sha
        files = {f.path: int(f.size or 0) for f in api.list_repo_tree(repo_id, revision=sha, recursive=True)
                 if isinstance(f, RepoFile)}
    return sha, files


def resolve_base_url(repo_id: str, revision: str, endpoint: str | None = None) -> str:
    """``<endpoint>/<repo>/resolve/<revision>/``: append a file name to get its bytes (with ranges)."""
    return f"{hub_endpoint(endpoint)}/{repo_id}/resolve/{quote(revision, safe='')}/"


def auth_headers(token: str | None) -> dict[str, str]:
    """Headers the Hub expects (user agent, and the token when there is one)."""
    from huggingface_hub.utils import build_hf_headers

    return dict(build_hf_headers(token=token or False, library_name="williw"))


def choose_files(files: list[str], weight_map_files: list[str] | None = None) -> list[str]:
    """The files of a repo a split needs: config and tokenizer files, and one copy of the weights.

    The weights are those `williw.weightfiles.select_weight_files` chooses (the rule every step uses), with the
    index; never onnx, gguf, flax, tf or msgpack duplicates, Mistral's ``consolidated*`` copy, or files in
    subfolders (``original/``, ``onnx/``), which the split does not read.

    Args:
        files: every path of the repo.
        weight_map_files: the files named by the index's ``weight_map`` (safetensors or torch), when known.
    """
    top = [f for f in files if "/" not in f]
    chosen = [f for f in top if f in SIDE_FILES or f.endswith(".tiktoken")]
    weights, _ignored = select_weight_files(files, weight_map_files)
    index = [i for i in (SAFETENSORS_INDEX, TORCH_INDEX) if i in top and weights
             and weights[0].endswith(".safetensors") == (i == SAFETENSORS_INDEX)]
    return sorted(set(chosen + index[:1] + weights))


@dataclass(frozen=True)
class DownloadConfig:
    """The seed's download configuration. ``model_name`` is a Hub repo id or a local folder (used as is)."""

    model_name: str
    cache_dir: str | None = None
    hf_token: str | None = None
    revision: str | None = None
    local_dir: str | None = None  # files placed here instead of in the cache
    endpoint: str | None = None


@dataclass(frozen=True)
class DownloadResult:
    """Where the model is, its files (relative paths), and their total size in MiB (1024² bytes)."""

    local_path: str
    files: tuple[str, ...]
    total_size_mb: float
    commit: str | None = None  # None for a local folder


class ModelDownloader:
    """The seed's downloader: ``download_model(config)`` fetches what a split needs, resumably.

    Args:
        token: used when the config has no ``hf_token``; then ``HF_TOKEN``, then the saved login.
    """

    def __init__(self, token: str | None = None) -> None:
        self.token = token

    def download_model(self, config: DownloadConfig) -> DownloadResult:
        """Download config, tokenizer and weights files of ``config.model_name`` (or return a local folder).

        Files already complete in the cache or ``local_dir`` are not fetched again; a download cut by the
        network resumes from the last byte (huggingface_hub retries it).

        Returns:
            The local folder, its files and their size.

        Raises:
            HubError: not a folder nor a repo id; missing repo, revision or file; gated or private without a
                token; bad token; network failure (one line each, saying what to do).
        """
        name = config.model_name
        if Path(name).expanduser().is_dir():
            return _local_result(Path(name).expanduser())
        if not is_repo_id(name):
            raise HubError(f"'{name}' is neither a folder nor a Hugging Face repo id (like 'org/model')")
        token, source = resolve_token(config.hf_token or self.token)
        sha, files = repo_files(name, revision=config.revision, token=token, endpoint=config.endpoint,
                                token_source=source)
        ctx = HubContext(hub_endpoint(config.endpoint), name, config.revision or "main", source if token else None)
        from huggingface_hub import hf_hub_download, snapshot_download

        kwargs = dict(revision=sha, cache_dir=config.cache_dir, local_dir=config.local_dir, token=token or False,
                      endpoint=ctx.endpoint, library_name="williw")
        weight_map_files = None
        index = next((i for i in (SAFETENSORS_INDEX, TORCH_INDEX) if i in files), None)
        if index and (index == SAFETENSORS_INDEX or not any(f.endswith(".safetensors") for f in files)):
            with hub_errors(ctx, file=index):
                weight_map_files = _weight_map_files(Path(hf_hub_download(name, index, **kwargs)))
        wanted = choose_files(list(files), weight_map_files)
        if not any(f.endswith((".safetensors", ".bin", ".pth", ".pt")) for f in wanted):
            _, nested = select_weight_files(list(files))
            where = f"; its weights are in '{nested[0].split('/')[0]}/' (a sentence-transformers layout?), which " \
                "williw does not read from a repo: download that folder and give its path" if nested else \
                "; williw splits only those formats"
            raise HubError(f"model '{name}' has no safetensors or PyTorch weights at its top level "
                           f"({len(files)} files){where}")
        with hub_errors(ctx):
            path = snapshot_download(name, allow_patterns=[_glob_escape(f) for f in wanted], **kwargs)
        return DownloadResult(local_path=path, files=tuple(wanted),
                              total_size_mb=sum(files[f] for f in wanted) / MIB, commit=sha)


def _glob_escape(name: str) -> str:
    # allow_patterns are fnmatch patterns; a file name with [ ] * ? must match only itself.
    return re.sub(r"([\[\]*?])", r"[\1]", name)


def _weight_map_files(index: Path) -> list[str]:
    try:
        weight_map = jsonio.parse(index.read_bytes())["weight_map"]
        return sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise HubError(f"'{index}': not a valid index (expected a 'weight_map' object)") from None


def _local_result(folder: Path) -> DownloadResult:
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    size = sum((folder / f).stat().st_size for f in files)
    return DownloadResult(local_path=str(folder.resolve()), files=tuple(files), total_size_mb=size / MIB)


def metadata_path_in_repo(model_name: str) -> str:
    """Where a model's metadata lives in a metadata repo: ``models/<org>--<name>/metadata.json``.

    The name is reduced to ``[A-Za-z0-9._-]`` ('/' becomes '--', anything else '_'), so a model name cannot
    climb out of ``models/`` or hide in a folder of its own.

    Raises:
        HubError: the name is empty after sanitising.
    """
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", model_name.strip().replace("/", "--")).strip("._-")
    if not slug or set(slug) <= {".", "-", "_"}:
        raise HubError(f"model name {model_name!r} has no letters or digits to name its metadata file")
    return f"models/{slug}/metadata.json"


def upload_file(local_file: str | os.PathLike[str], repo_id: str, path_in_repo: str, *, token: str | None = None,
                commit_message: str | None = None, repo_type: str = "model", endpoint: str | None = None,
                private: bool = False) -> tuple[str, str]:
    """Create the repo if missing (``exist_ok``) and commit one file to it.

    Returns:
        The file's URL (``resolve/main``) and the commit id.

    Raises:
        HubError: no token, bad token, no write access, network failure.
    """
    token, source = resolve_token(token)
    ctx = HubContext(hub_endpoint(endpoint), repo_id, "main", source)
    if token is None:
        raise HubError(f"uploading to '{repo_id}' needs a token with write access: create one at "
                       f"{ctx.endpoint}/settings/tokens and set HF_TOKEN (or pass --token)")
    api = _api(ctx, token)
    with hub_errors(ctx, write=True):
        api.create_repo(repo_id, repo_type=repo_type, exist_ok=True, private=private)
        info = api.upload_file(path_or_fileobj=str(local_file), path_in_repo=path_in_repo, repo_id=repo_id,
                               repo_type=repo_type, commit_message=commit_message or f"Upload {path_in_repo}")
    from huggingface_hub import hf_hub_url

    url = hf_hub_url(repo_id, path_in_repo, repo_type=repo_type, revision="main", endpoint=ctx.endpoint)
    return url, info.oid


def _check_reachable(endpoint: str, timeout_s: float = 5.0) -> None:
    """Fail at once when nothing accepts a TCP connection at the Hub's address: huggingface_hub retries a refused
    connection five times with backoff (1 + 2 + 4 + 8 + 8 s), so the worker's ``process`` answered 502 only after
    ~23 s. A slow or flaky Hub that does accept connections still gets huggingface_hub's retries.

    Raises:
        HubError: the one-line "cannot reach" message.
    """
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(endpoint)
    if not parts.hostname:
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as exc:
        raise HubError(network_message(endpoint, exc)) from None


def fetch_metadata(repo_id: str, model_name: str, *, token: str | None = None, endpoint: str | None = None,
                   revision: str | None = None, repo_type: str = "model") -> dict[str, Any]:
    """Download the metadata of ``model_name`` from a metadata repo (see `metadata_path_in_repo`).

    Returns:
        The parsed JSON object (validate it with ``williw.metadata``).

    Raises:
        HubError: missing repo, file or revision; no access; not JSON; network failure.
    """
    path = metadata_path_in_repo(model_name)
    token, source = resolve_token(token)
    ctx = HubContext(hub_endpoint(endpoint), repo_id, revision or "main", source if token else None)
    _check_reachable(ctx.endpoint)
    import tempfile

    from huggingface_hub import hf_hub_download

    with tempfile.TemporaryDirectory(prefix="williw-meta-") as tmp, hub_errors(ctx, file=path):
        local = hf_hub_download(repo_id, path, repo_type=repo_type, revision=revision, local_dir=tmp,
                                token=token or False, endpoint=ctx.endpoint, library_name="williw")
        data = jsonio.loads(Path(local).read_bytes(), f"'{repo_id}/{path}'", HubError)
    if not isinstance(data, dict):
        raise HubError(f"'{repo_id}/{path}': expected a JSON object")
    return data
