"""Ranged HTTP reads of a model's files, from the Hub or any server that serves a model folder with ranges.

A remote model is a base URL plus file names: ``<endpoint>/<repo>/resolve/<commit>/`` on the Hub, or
``http://host:port/`` for ``williw serve-model``. `HttpRangeSource` reads safetensors headers the way
``huggingface_hub.parse_safetensors_file_metadata`` does (the first 100,000 bytes, a second range only when the
header is longer) and serves tensor bytes to the shard writer (`williw.shards.ByteSource`), fetching only the
ranges it was told are wanted, adjacent ones merged, with ``Accept-Encoding: identity`` so no server compresses a
range, and resuming from the last byte received after a transient failure.

This module knows the Hub's error headers (``X-Error-Code``) but not its client: `williw.hub` is the only user of
``huggingface_hub``, and shares the one-line messages defined here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

import httpx

from williw.errors import HubError
from williw.header import FIRST_RANGE_BYTES, SafetensorsHeader, header_length, parse_header
from williw.progress import get_logger

log = get_logger(__name__)

# Transient answers: retried with backoff, resuming from the last byte received.
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
RETRIES = 5
BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
PIECE_BYTES = 4 << 20
INVALID_TOKEN = "Invalid credentials in Authorization header"


@dataclass(frozen=True)
class HubContext:
    """What a message needs to say what went wrong and what to do.

    ``token_source`` names where the token came from (``--token``, ``HF_TOKEN``, ``the saved login``) or is None
    when no token was sent.
    """

    endpoint: str
    repo_id: str
    revision: str = "main"
    token_source: str | None = None


def hub_error_message(ctx: HubContext, status: int | None, error_code: str | None = None,
                      server_message: str | None = None, *, file: str | None = None, write: bool = False) -> str:
    """The one-line message for a Hub error answer (``status``, ``X-Error-Code``, ``X-Error-Message``)."""
    repo, ep = ctx.repo_id, ctx.endpoint
    set_token = "set HF_TOKEN (or pass --token)"
    if status == 401 and server_message == INVALID_TOKEN:
        return (f"{ep} rejected the token from {ctx.token_source or 'the request'} as invalid or expired: create "
                f"one at {ep}/settings/tokens and {set_token}")
    if error_code == "GatedRepo":
        if ctx.token_source is None:
            return (f"'{repo}' is a gated model: accept its conditions at {ep}/{repo}, then {set_token} to a token "
                    "of that account")
        return (f"the token from {ctx.token_source} has no access to the gated model '{repo}': request access at "
                f"{ep}/{repo}, or use a token of an account that has it")
    if error_code == "RepoNotFound" or (status in (401, 404) and error_code is None and file is None):
        if ctx.token_source is None:
            return (f"model '{repo}' was not found on {ep}: check the name, or if it is private {set_token} to a "
                    "token that can read it")
        return (f"model '{repo}' was not found on {ep}, or the token from {ctx.token_source} cannot read it: check "
                "the name and the token's access")
    if error_code == "RevisionNotFound":
        return f"model '{repo}' has no revision '{ctx.revision}': check --revision (a branch, tag or commit id)"
    if error_code == "EntryNotFound" or status == 404:
        return f"model '{repo}' has no file '{file}' at revision '{ctx.revision}'"
    if status in (401, 403):
        need = "write" if write else "read"
        detail = f": {server_message}" if server_message else ""
        return (f"{ep} refused access to '{repo}' ({status}{detail}); use a token with {need} access to it "
                f"({set_token})")
    return f"{ep} answered {status} for '{repo}'{f' file {file!r}' if file else ''}: try again later"


def network_message(endpoint: str, exc: BaseException) -> str:
    reason = str(exc).strip() or type(exc).__name__
    return f"cannot reach {endpoint} ({reason}): check the network connection and HF_ENDPOINT, then retry"


def safe_file_name(name: str) -> bool:
    """True for a bare file name (the weights of a model folder); index files from outside name the files we
    fetch, so '..', folders and absolute paths are refused before they reach a URL or a path."""
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..") \
        and not name.startswith(".") and "\x00" not in name


class HttpRangeSource:
    """Reads byte ranges of ``base_url + file`` (a `williw.shards.ByteSource`).

    Args:
        base_url: ends with the folder, e.g. ``<endpoint>/<repo>/resolve/<commit>/`` or ``http://host:port/``.
        headers: sent with every request (``Authorization`` for the Hub; httpx drops it on a redirect to another
            host, as the Hub's CDN redirects require).
        hub: when set, error answers become the Hub's one-line messages; otherwise the URL and status are named.
        first_range_bytes: the first header read (huggingface_hub's 100,000: "97% of headers are < 100 KB").
        retries, backoff_s: transient failures are retried ``retries`` times per range, waiting
            ``backoff_s * 2**attempt`` (capped at 30 s); the count resets whenever bytes arrive.
    """

    def __init__(self, base_url: str, *, headers: dict[str, str] | None = None, hub: HubContext | None = None,
                 first_range_bytes: int = FIRST_RANGE_BYTES, retries: int = RETRIES, backoff_s: float = BACKOFF_S,
                 timeout_s: float = 60.0) -> None:
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.hub = hub
        self.first_range_bytes = max(8, first_range_bytes)
        self.retries = retries
        self.backoff_s = backoff_s
        self.bytes_received = 0
        self.requests = 0
        self._count_lock = threading.Lock()  # headers are read from several threads at once (remote metadata)
        # Per file: the [start, end) intervals the caller needs; anything else read_range is asked for is padding
        # between tensors of other nodes, which is never fetched (see read_range).
        self.wanted: dict[str, list[tuple[int, int]]] = {}
        self._prefix: dict[str, bytes] = {}  # the first bytes of each file, kept from the header read
        self._client = httpx.Client(headers={**(headers or {}), "Accept-Encoding": "identity"},
                                    follow_redirects=True, timeout=httpx.Timeout(timeout_s, connect=10.0))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HttpRangeSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def url(self, file: str) -> str:
        if not safe_file_name(file):
            raise HubError(f"refusing to fetch {file!r}: not a file name in the model folder")
        return self.base_url + quote(file)

    # --- whole small files and headers ---------------------------------------------------------------------
    def get_file(self, file: str, *, missing_ok: bool = False, max_bytes: int = 64 << 20) -> bytes | None:
        """The whole of a small file (config, tokenizer, index); None when it is missing and ``missing_ok``.

        Raises:
            HubError: the file is missing (unless ``missing_ok``), larger than ``max_bytes``, or unreachable.
        """
        buf = bytearray()
        try:
            for piece in self._get(file, 0, None, missing_ok=missing_ok):
                buf += piece
                if len(buf) > max_bytes:
                    raise HubError(f"'{self.url(file)}' is larger than {max_bytes:,} bytes; expected a small file")
        except _Missing:
            return None
        return bytes(buf)

    def read_header(self, file: str) -> tuple[SafetensorsHeader, int]:
        """Fetch and validate a safetensors header with one range request (two when it exceeds the first range).

        Returns:
            The parsed header and the file's size in bytes.

        Raises:
            HubError: the file cannot be fetched. CheckpointError: the header is corrupt.
        """
        size_box: list[int] = []
        prefix = b"".join(self._get(file, 0, self.first_range_bytes, size_out=size_box))
        size = size_box[0] if size_box else len(prefix)
        n = header_length(prefix, file, size)
        if 8 + n > len(prefix):
            prefix += b"".join(self._get(file, len(prefix), 8 + n, size_out=size_box))
        self._prefix[file] = prefix
        return parse_header(prefix[8:8 + n], file, size), size

    # --- the ByteSource ------------------------------------------------------------------------------------
    def read_range(self, file: str, start: int, end: int) -> Iterator[bytes]:
        """Yield ``[start, end)`` of ``file``. Bytes outside ``wanted[file]`` (when set) are yielded as zeros and
        never fetched: the shard writer asks for whole runs of nearby tensors and discards what lies between
        them, but over HTTP that padding would cost real bytes."""
        wanted = self.wanted.get(file, [(start, end)])
        pos = start
        for lo, hi in _clip(wanted, start, end):
            while pos < lo:  # padding, not fetched
                n = min(PIECE_BYTES, lo - pos)
                yield bytes(n)
                pos += n
            yield from self._cached_or_fetched(file, lo, hi)
            pos = hi
        while pos < end:
            n = min(PIECE_BYTES, end - pos)
            yield bytes(n)
            pos += n

    def _cached_or_fetched(self, file: str, start: int, end: int) -> Iterator[bytes]:
        prefix = self._prefix.get(file, b"")
        if start < len(prefix):  # already received with the header
            cut = min(end, len(prefix))
            yield prefix[start:cut]
            start = cut
        if start < end:
            yield from self._get(file, start, end)

    # --- one ranged GET, retried and resumed ---------------------------------------------------------------
    def _get(self, file: str, start: int, end: int | None, *, missing_ok: bool = False,
             size_out: list[int] | None = None) -> Iterator[bytes]:
        """Yield ``[start, end)`` (``end`` None: to the end of the file), resuming after transient failures."""
        url = self.url(file)
        pos, failures = start, 0
        while end is None or pos < end:
            headers = {"Range": f"bytes={pos}-{'' if end is None else end - 1}"} if pos or end is not None else {}
            try:
                with self._client.stream("GET", url, headers=headers) as resp:
                    with self._count_lock:
                        self.requests += 1
                    if resp.status_code in RETRY_STATUS:
                        raise _Transient(f"{resp.status_code} {resp.reason_phrase}")
                    if resp.status_code >= 400:
                        if resp.status_code == 404 and missing_ok:
                            raise _Missing
                        raise HubError(self._message(resp, file))
                    first, total = _content_range(resp, pos, url)
                    if size_out is not None and total is not None and not size_out:
                        size_out.append(total)
                    if end is not None and total is not None:
                        end = min(end, total)
                    if first != pos and pos:  # 200 to a ranged request: the server ignores Range
                        raise HubError(f"'{url}' ignores HTTP range requests (answered 200 to 'Range: "
                                       f"{headers.get('Range')}'); serve the model with ranges, or run "
                                       "williw download and williw split")
                    # Pieces as they arrive (bounded by the socket reads), not re-chunked: a chunker would
                    # hold back up to a chunk that a dropped connection then loses instead of resuming after.
                    for piece in resp.iter_bytes():
                        if end is not None and pos + len(piece) > end:
                            piece = piece[:end - pos]
                        if piece:
                            pos += len(piece)
                            with self._count_lock:
                                self.bytes_received += len(piece)
                            failures = 0
                            yield piece
                        if end is not None and pos >= end:
                            break
                    if end is None:
                        return
                    if pos < end:
                        raise _Transient(f"the answer ended at byte {pos:,} of {end:,}")
            except (_Transient, httpx.TransportError) as exc:
                failures += 1
                if failures > self.retries:
                    if isinstance(exc, httpx.TransportError):
                        raise HubError(network_message(self._where(url), exc)) from None
                    raise HubError(f"'{url}': {exc} after {self.retries} retries; try again later") from None
                wait = min(MAX_BACKOFF_S, self.backoff_s * 2 ** (failures - 1))
                log.warning("reading %s at byte %d failed (%s); retrying in %.1f s", url, pos, exc, wait)
                time.sleep(wait)

    def _where(self, url: str) -> str:
        return self.hub.endpoint if self.hub else url

    def _message(self, resp: httpx.Response, file: str) -> str:
        if self.hub is not None:
            return hub_error_message(self.hub, resp.status_code, resp.headers.get("X-Error-Code"),
                                     resp.headers.get("X-Error-Message"), file=file)
        if resp.status_code == 404:
            return f"'{resp.request.url}': not found (404); check the model URL"
        if resp.status_code in (401, 403):
            return f"'{resp.request.url}': access refused ({resp.status_code}); check the token or the server"
        return f"'{resp.request.url}': the server answered {resp.status_code}"


class _Transient(Exception):
    pass


class _Missing(Exception):
    pass


def _content_range(resp: httpx.Response, pos: int, url: str) -> tuple[int, int | None]:
    """(first byte of the body, size of the file) from a 200 or 206 answer."""
    if resp.headers.get("Content-Encoding", "identity").lower() not in ("identity", ""):
        raise HubError(f"'{url}': the server compressed a byte range ({resp.headers['Content-Encoding']}) "
                       "although identity was asked for")
    if resp.status_code == 206:
        value = resp.headers.get("Content-Range", "")
        try:
            span, total = value.removeprefix("bytes ").split("/")
            first = int(span.split("-")[0])
            return first, (None if total == "*" else int(total))
        except ValueError:
            raise HubError(f"'{url}': malformed Content-Range {value!r}") from None
    length = resp.headers.get("Content-Length")
    return 0, int(length) if length is not None else None


def _clip(intervals: list[tuple[int, int]], start: int, end: int) -> Iterator[tuple[int, int]]:
    """The parts of sorted, non-overlapping ``intervals`` inside ``[start, end)``."""
    for lo, hi in intervals:
        lo, hi = max(lo, start), min(hi, end)
        if lo < hi:
            yield lo, hi


def merge_intervals(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort and merge overlapping or touching ``[start, end)`` intervals (adjacent tensors: one request)."""
    merged: list[list[int]] = []
    for lo, hi in sorted(intervals):
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return [(lo, hi) for lo, hi in merged]
