"""``williw serve-model DIR``: serve a downloaded model folder over HTTP with range support, so that node agents
pull only their own tensors' bytes from the user node instead of from the Hub.

Only regular files under the folder are served; a request path is matched against the folder's own listing,
never joined onto the filesystem path, so ``..``, absolute paths and symlinks out of the folder cannot escape.
The listing is made at start, so each request also resolves the file's real path and answers 404 unless it is
exactly the listed path under the (resolved) root, with no symlink on the way, and a regular file, opened with
``O_NOFOLLOW``: a file or folder swapped for a symlink after start is not followed.
Byte counts per file are kept (``GET /_stats``) so that tests and benchmarks can prove what was sent;
``GET /_files`` lists the files with their sizes (as the Hub's tree API does), for ``williw metadata URL``.

Connections: a listen backlog of 128 (http.server's 5 made every sixth of 200 simultaneous connects wait for a
SYN retry, 1 s), and a connection idle or half-sent for `IDLE_TIMEOUT_S` is closed. Range numbers have at most
19 digits (int64); anything longer is a 416 like any other unsatisfiable range.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import threading
from collections import Counter
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from williw.progress import get_logger

log = get_logger(__name__)
_RANGE = re.compile(r"^bytes=(\d{0,19})-(\d{0,19})$")
IDLE_TIMEOUT_S = 30.0
LISTEN_BACKLOG = 128
# A hop's hidden state: 8,192 tokens of a 8,192-wide float32 model is 256 MiB.
MAX_STAGE_BODY = 256 << 20


def list_served_files(root: Path) -> dict[str, Path]:
    """Relative POSIX path -> file, for every regular, non-hidden file under ``root`` (symlinks not followed)."""
    root = root.resolve()
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            path = Path(dirpath) / name
            if not name.startswith(".") and path.is_file() and not path.is_symlink():
                files[path.relative_to(root).as_posix()] = path
    return files


class ModelServer(ThreadingHTTPServer):
    """A threaded HTTP server over one model folder; ``bytes_sent`` counts body bytes per file."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, root: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 0,
                 idle_timeout_s: float = IDLE_TIMEOUT_S) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            from williw.errors import CheckpointError

            raise CheckpointError(f"'{self.root}': no such folder to serve")
        self.real_root = self.root.resolve()
        self.idle_timeout_s = idle_timeout_s
        self.files = list_served_files(self.root)
        self.bytes_sent: Counter[str] = Counter()
        self.lock = threading.Lock()
        super().__init__((host, port), _Handler)

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that drops its keep-alive connection is normal; anything else is logged, never printed."""
        import sys

        exc = sys.exc_info()[1]
        if not isinstance(exc, ConnectionError):
            log.warning("serve-model: error answering %s: %r", client_address, exc)

    def lookup(self, rel: str) -> Path | None:
        """The file served at ``rel``, or None."""
        return self.files.get(rel)

    def file_size(self, rel: str) -> int | None:
        """The size of the file served at ``rel`` now, or None when it is no longer served."""
        f = self.open_checked(rel)
        if f is None:
            return None
        with f:
            return os.fstat(f.fileno()).st_size

    def open_checked(self, rel: str) -> BinaryIO | None:
        """The regular file at ``rel``, open for reading, if its real path is ``<real root>/<rel>`` (no symlink
        anywhere on the way, checked now, not at start), else None."""
        path = self.lookup(rel)
        if path is None:
            return None
        expected = self.real_root.joinpath(*rel.split("/"))
        try:
            if Path(os.path.realpath(path, strict=True)) != expected:
                return None
            f = open(expected, "rb", opener=lambda name, flags: os.open(name, flags | os.O_NOFOLLOW))  # noqa: SIM115
        except OSError:
            return None
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            f.close()
            return None
        return f

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> ModelServer:
        """Serve in a daemon thread (for tests and the in-process workflow)."""
        threading.Thread(target=self.serve_forever, name="williw-serve-model", daemon=True).start()
        return self


class ShardServer(ModelServer):
    """A node agent's shards, served to its peers during a migration: only
    ``<request_id>/v<version>/<node_id>/{model.safetensors,shard.json,config.json,...}`` of this node, looked up
    when asked (shards come and go) by a pattern that admits no other path (not the agent's token file).
    ``stages`` (set by the agent: `williw.node_stages.StageService`) answers the stage routes (POST, DELETE)."""

    stages = None

    def __init__(self, data_dir: str | os.PathLike[str], node_id: str, host: str = "127.0.0.1", port: int = 0) -> None:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(data_dir, host, port)
        self.files = {}
        from williw.shards import COPIED_FILES, MANIFEST_NAME, SAFETENSORS_FILE

        names = "|".join(re.escape(n) for n in (SAFETENSORS_FILE, MANIFEST_NAME, *COPIED_FILES))
        self._pattern = re.compile(rf"^[0-9a-f]{{32}}/v[1-9][0-9]{{0,8}}/{re.escape(node_id)}/({names})$")

    def lookup(self, rel: str) -> Path | None:
        if not self._pattern.match(rel):
            return None
        return self.root / rel  # `open_checked` refuses it unless it is a regular file with no symlink on the way


class _Handler(BaseHTTPRequestHandler):
    server: ModelServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        # StreamRequestHandler applies `timeout` to the socket: a read (an idle keep-alive connection, a half-sent
        # header) or a write that waits longer ends the connection.
        self.timeout = self.server.idle_timeout_s
        super().setup()
        # The headers and the body go out in two writes; with Nagle's algorithm the body would wait for the
        # client's delayed ACK of the headers (40 ms on Linux), on every stage hop of a generation.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._serve(body=False)

    def do_GET(self) -> None:  # noqa: N802
        if urlsplit(self.path).path.startswith("/stage/"):
            self._stage("GET")
            return
        if urlsplit(self.path).path == "/_stats":
            with self.server.lock:
                payload = json.dumps({"bytes_sent": dict(self.server.bytes_sent)}).encode()
            self._reply(HTTPStatus.OK, payload, "application/json")
            return
        if urlsplit(self.path).path == "/_files":  # what `williw metadata URL` reads instead of the Hub's tree API
            listing = {rel: self.server.file_size(rel) for rel in sorted(self.server.files)}
            payload = json.dumps({"files": {k: v for k, v in listing.items() if v is not None}}).encode()
            self._reply(HTTPStatus.OK, payload, "application/json")
            return
        self._serve(body=True)

    def do_POST(self) -> None:  # noqa: N802
        self._stage("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._stage("DELETE")

    def _stage(self, method: str) -> None:
        """A node's stage routes (`williw.node_stages`), when the agent serves its stage on this server."""
        service = getattr(self.server, "stages", None)
        length = self.headers.get("Content-Length") or "0"
        if service is None or not length.isdigit() or int(length) > MAX_STAGE_BODY:
            self.close_connection = True
            self._reply(HTTPStatus.NOT_FOUND if service is None else HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        b"no stage here, or a body over the limit\n")
            return
        body = self.rfile.read(int(length))
        status, content_type, payload, headers = service(method, self.path, body)
        self._reply(HTTPStatus(status), payload, content_type, headers)

    def _reply(self, status: HTTPStatus, payload: bytes, content_type: str = "text/plain",
               headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _serve(self, body: bool) -> None:
        rel = unquote(urlsplit(self.path).path).lstrip("/")
        f = self.server.open_checked(rel)
        if f is None:
            self._reply(HTTPStatus.NOT_FOUND, f"no file '{rel}' in this model folder\n".encode())
            return
        with f:
            self._serve_file(f, rel, body)

    def _serve_file(self, f: BinaryIO, rel: str, body: bool) -> None:
        size = os.fstat(f.fileno()).st_size
        start, end = 0, size  # half-open [start, end)
        status = HTTPStatus.OK
        header = self.headers.get("Range")
        if header:
            match = _RANGE.match(header.strip())
            first, last = (match.group(1), match.group(2)) if match else ("", "")
            if not match or (first == "" and last == ""):
                self._reply(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, b"only one bytes=a-b range is supported\n")
                return
            if first == "":  # suffix range: the last N bytes
                start, end = max(0, size - int(last)), size
            else:
                start, end = int(first), min(size, int(last) + 1) if last else size
            if start >= size or start >= end:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = HTTPStatus.PARTIAL_CONTENT
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start))
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if not body:
            return
        # Counted before the bytes leave, and corrected if fewer went: a client that has read them (and a test that
        # then reads the count) must find them counted, and this thread may run again only later.
        with self.server.lock:
            self.server.bytes_sent[rel] += end - start
        sent = 0
        try:
            sent = self._send_file(f, start, end)
        finally:
            if sent != end - start:
                with self.server.lock:
                    self.server.bytes_sent[rel] -= end - start - sent

    def _send_file(self, f: BinaryIO, start: int, end: int) -> int:
        """Zero-copy from the page cache to the socket; returns the bytes sent (fewer if the client left).

        ``socket.sendfile`` rather than ``os.sendfile``: the socket has a timeout, so it is non-blocking
        underneath, and socket.sendfile waits for it to be writable (up to the timeout) between calls."""
        f.seek(start)
        try:
            self.connection.sendfile(f, start, end - start)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        return f.tell() - start
