"""A fake Hugging Face Hub on 127.0.0.1: the part of the Hub's HTTP protocol that the real ``huggingface_hub``
client uses to download, upload and read ranges, so tests drive the real client without the internet.

Endpoints (as ``huggingface_hub`` 1.x/2.x calls them):
  * ``GET /api/models/<repo>`` and ``GET /api/models/<repo>/revision/<rev>``: repo info (``sha``, ``siblings``);
  * ``GET /api/models/<repo>/tree/<rev>[?recursive=..]``: the file list with sizes (one page, no ``Link``);
  * ``HEAD|GET /<repo>/resolve/<rev>/<path>``: file metadata (``X-Repo-Commit``, ``ETag``, ``Content-Length``)
    and bytes, with single ``bytes=a-b`` ranges. No ``X-Xet-*`` headers, so the client uses plain HTTP;
  * ``POST /api/repos/create``, ``POST /api/models/<repo>/preupload/<rev>`` (always ``regular``, never LFS or
    Xet) and ``POST /api/models/<repo>/commit/<rev>`` (ndjson, base64 files).

Access follows the Hub: an unknown token gets 401 "Invalid credentials in Authorization header"; a missing or
private repo gets 401 (no token) or 404 with ``X-Error-Code: RepoNotFound``; a gated repo's files get 401 (no
token) or 403 (token without access) with ``X-Error-Code: GatedRepo``; a missing file ``EntryNotFound``; a
missing revision ``RevisionNotFound``.

Use it as a fixture (``from hubserver import fake_hub``) or as a context manager::

    with FakeHub() as hub:
        hub.add_repo("org/model", folder)          # or files={"config.json": b"{}"}
        os.environ["HF_ENDPOINT"] = hub.url
        ...
        assert hub.bytes_sent["org/model", "model.safetensors"] == size

``bytes_sent`` counts body bytes written per (repo, path); ``requests`` logs (method, path, Range header);
``fail(...)`` makes the next matching requests answer a status or cut the body after some bytes.

``add_repo(folder, on_disk=True)`` serves the folder's files from disk, read in 1 MiB pieces, instead of holding
them in memory (a 140 GB model of sparse files, in bench/metadata.py); their ETag is then made from the path, size
and mtime rather than the git hash of their content.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

INVALID_TOKEN = "Invalid credentials in Authorization header"
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file, which the Hub uses as the ETag and ``oid`` of a non-LFS file."""
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


PIECE = 1 << 20


def file_size(data: bytes | Path) -> int:
    return data.stat().st_size if isinstance(data, Path) else len(data)


def file_oid(data: bytes | Path) -> str:
    """The git blob id of bytes held in memory; for a file on disk, a stand-in from its path, size and mtime."""
    if isinstance(data, Path):
        st = data.stat()
        return hashlib.sha1(f"{data}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    return git_blob_sha1(data)


def file_pieces(data: bytes | Path, start: int, end: int) -> Iterator[bytes]:
    """``[start, end)`` of the file, in pieces of at most 1 MiB."""
    if not isinstance(data, Path):
        yield data[start:end]
        return
    with open(data, "rb") as f:
        f.seek(start)
        while start < end:
            piece = f.read(min(PIECE, end - start))
            if not piece:
                return
            start += len(piece)
            yield piece


@dataclass
class Repo:
    repo_id: str
    files: dict[str, bytes | Path]
    private: bool = False
    gated: bool = False
    commits: list[str] = field(default_factory=list)  # newest last; "main" is the last one
    branches: dict[str, str] = field(default_factory=dict)

    @property
    def sha(self) -> str:
        return self.commits[-1]


@dataclass
class Fault:
    """Answer ``times`` requests whose path contains ``path`` with ``status``, or, when ``cut_after`` is set, send
    the headers of a normal answer and close the connection after ``cut_after`` body bytes. The first ``after``
    matching requests (counted from when the fault is added, whatever answers them) are let through."""

    path: str
    status: int = 503
    cut_after: int | None = None
    times: int = 1
    method: str = "GET"
    after: int = 0


@dataclass
class Token:
    write: bool = False
    gated_access: bool = True


class FakeHub(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that drops its connection is normal (the real Hub says nothing); other errors print."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos: dict[str, Repo] = {}
        self.tokens: dict[str, Token] = {}
        self.bytes_sent: Counter[tuple[str, str]] = Counter()
        self.requests: list[tuple[str, str, str | None]] = []
        self.errors: list[int] = []  # status of every error answer, in order
        self.faults: list[Fault] = []
        self.created: list[str] = []
        self.commit_payloads: list[list[dict]] = []
        self.lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()

    # --- set-up helpers -------------------------------------------------------------------------------------
    def add_repo(self, repo_id: str, folder: str | Path | None = None, *, files: dict[str, bytes] | None = None,
                 private: bool = False, gated: bool = False, on_disk: bool = False) -> Repo:
        """Serve ``folder``'s files (recursively) and/or ``files`` as the repo's first commit; ``on_disk``: read
        the folder's files from disk when asked instead of holding them in memory."""
        content: dict[str, bytes | Path] = {}
        if folder is not None:
            root = Path(folder)
            for p in sorted(root.rglob("*")):
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts):
                    content[p.relative_to(root).as_posix()] = p if on_disk else p.read_bytes()
        content.update(files or {})
        repo = Repo(repo_id, content, private=private, gated=gated)
        repo.commits.append(hashlib.sha1(f"{repo_id}:0".encode()).hexdigest())
        self.repos[repo_id] = repo
        return repo

    def add_token(self, token: str, *, write: bool = False, gated_access: bool = True) -> None:
        self.tokens[token] = Token(write=write, gated_access=gated_access)

    def fail(self, path: str, *, status: int = 503, cut_after: int | None = None, times: int = 1,
             method: str = "GET", after: int = 0) -> None:
        self.faults.append(Fault(path, status, cut_after, times, method, after))

    def sent(self, repo_id: str, suffix: str = "") -> int:
        """Body bytes sent for the repo's files whose path ends with ``suffix``."""
        return sum(n for (r, p), n in self.bytes_sent.items() if r == repo_id and p.endswith(suffix))

    def ranges(self, path_suffix: str) -> list[str | None]:
        """The Range headers of the GETs of files whose URL path ends with ``path_suffix``."""
        return [r for m, p, r in self.requests if m == "GET" and p.endswith(path_suffix)]

    def take_fault(self, method: str, path: str) -> Fault | None:
        chosen = None
        with self.lock:
            for f in self.faults:
                if f.method != method or f.path not in path:
                    continue
                if f.after > 0:
                    f.after -= 1
                elif chosen is None and f.times > 0:
                    f.times -= 1
                    chosen = f
        return chosen


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    # --- plumbing -------------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        if status >= 400:
            with self.server.lock:
                self.server.errors.append(status)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: object, status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode())

    def _error(self, status: int, code: str | None, message: str, extra: dict[str, str] | None = None) -> None:
        headers = {"X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers)

    def _token(self) -> tuple[str | None, Token | None, bool]:
        """(token, its grants, ok). ok is False for a token the hub does not know (answered 401 already)."""
        auth = self.headers.get("Authorization", "")
        if not auth.lower().startswith("bearer "):
            return None, None, True
        token = auth[7:].strip()
        grants = self.server.tokens.get(token)
        if grants is None:
            self._error(401, None, INVALID_TOKEN)
            return token, None, False
        return token, grants, True

    def _repo(self, repo_id: str, *, files: bool) -> Repo | None:
        """The repo if this request may read it; else the Hub's error has been sent and None is returned."""
        token, grants, ok = self._token()
        if not ok:
            return None
        repo = self.server.repos.get(repo_id)
        if repo is None or (repo.private and grants is None):
            self._error(401 if token is None else 404, "RepoNotFound", "Repository not found")
            return None
        if files and repo.gated and (grants is None or not grants.gated_access):
            if grants is None:
                self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to it "
                                              "and be authenticated to access it. Please log in.")
            else:
                self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in the "
                                              "authorized list. Visit https://huggingface.co/" + repo_id +
                                              " to ask for access.")
            return None
        return repo

    def _commit_of(self, repo: Repo, rev: str) -> str | None:
        rev = unquote(rev)
        if rev in ("main", repo.sha):
            return repo.sha
        if rev in repo.commits:
            return rev
        if rev in repo.branches:
            return repo.branches[rev]
        self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return None

    def _fault(self) -> Fault | None:
        fault = self.server.take_fault(self.command, urlsplit(self.path).path)
        if fault is not None and fault.cut_after is None:
            self._error(fault.status, None, "injected failure")
        return fault

    # --- routes ---------------------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._route()

    def do_HEAD(self) -> None:  # noqa: N802
        self._route()

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        with self.server.lock:
            self.server.requests.append((self.command, urlsplit(self.path).path, None))
        fault = self._fault()
        if fault is not None and fault.cut_after is None:
            return
        path = urlsplit(self.path).path
        if path == "/api/repos/create":
            self._create(json.loads(body or b"{}"))
            return
        m = re.fullmatch(r"/api/models/(.+)/(preupload|commit)/([^/]+)", path)
        if m:
            self._write_op(unquote(m.group(1)), m.group(2), m.group(3), body)
            return
        self._error(404, None, f"no route {path}")

    def _route(self) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        with self.server.lock:
            self.server.requests.append((self.command, parts.path, self.headers.get("Range")))
        fault = self._fault()
        if fault is not None and fault.cut_after is None:
            return
        m = re.fullmatch(r"/api/models/(.+?)/tree/([^/]+)(/.*)?", path)
        if m:
            self._tree(m.group(1), m.group(2))
            return
        m = re.fullmatch(r"/api/models/(.+?)(?:/revision/([^/]+))?", path)
        if m:
            self._info(m.group(1), m.group(2) or "main")
            return
        m = re.fullmatch(r"/([^/]+/[^/]+|[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            self._resolve(m.group(1), m.group(2), m.group(3), fault)
            return
        self._error(404, None, f"no route {path}")

    def _info(self, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_id, files=False)
        if repo is None:
            return
        sha = self._commit_of(repo, rev)
        if sha is None:
            return
        self._json({"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                    "gated": "manual" if repo.gated else False, "disabled": False,
                    "siblings": [{"rfilename": p} for p in sorted(repo.files)]})

    def _tree(self, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_id, files=False)
        if repo is None or self._commit_of(repo, rev) is None:
            return
        recursive = parse_qs(urlsplit(self.path).query).get("recursive", ["false"])[0].lower() == "true"
        entries: list[dict] = []
        folders: set[str] = set()
        for p, data in sorted(repo.files.items()):
            if "/" in p and not recursive:
                folders.add(p.split("/")[0])
                continue
            entries.append({"type": "file", "path": p, "size": file_size(data), "oid": file_oid(data)})
        entries += [{"type": "directory", "path": f, "oid": "0" * 40, "size": 0} for f in sorted(folders)]
        self._json(entries)

    def _resolve(self, repo_id: str, rev: str, file: str, fault: Fault | None) -> None:
        repo = self._repo(repo_id, files=True)
        if repo is None:
            return
        sha = self._commit_of(repo, rev)
        if sha is None:
            return
        data = repo.files.get(file)
        if data is None:
            self._error(404, "EntryNotFound", f"{file} does not exist on \"{rev}\"", {"X-Repo-Commit": sha})
            return
        size = file_size(data)
        start, end, status = 0, size, 200  # [start, end)
        header = self.headers.get("Range")
        if header and self.command == "GET":
            match = _RANGE.match(header.strip())
            if not match or match.group(1) == "" or int(match.group(1)) >= size:
                self._send(416, b"", {"Content-Range": f"bytes */{size}"})
                return
            start = int(match.group(1))
            end = min(size, int(match.group(2)) + 1) if match.group(2) else size
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{file_oid(data)}"')
        self.send_header("X-Repo-Commit", sha)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault is not None and fault.cut_after is not None:
            end = min(end, start + fault.cut_after)
        for body in file_pieces(data, start, end):
            # Counted before the write: a client may have read the bytes, and a test asserted the count, before
            # this thread runs again (seen once in a full run: 0 counted for bytes the client had).
            with self.server.lock:
                self.server.bytes_sent[repo_id, file] += len(body)
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                with self.server.lock:
                    self.server.bytes_sent[repo_id, file] -= len(body)
                return
        try:
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            return
        if fault is not None and fault.cut_after is not None:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    def _create(self, payload: dict) -> None:
        token, grants, ok = self._token()
        if not ok:
            return
        name, org = payload.get("name"), payload.get("organization")
        repo_id = f"{org}/{name}" if org else name
        if grants is None or not grants.write:
            self._error(401 if grants is None else 403, None,
                        f"You don't have the rights to create a model under the namespace \"{org}\"")
            return
        if repo_id in self.server.repos:
            # The Hub's 409 carries the repo's url, which the client reads when exist_ok=True.
            self._send(409, json.dumps({"error": "You already created this model repo",
                                        "url": f"{self.server.url}/{repo_id}"}).encode(),
                       {"X-Error-Message": "You already created this model repo"})
            return
        self.server.add_repo(repo_id, private=payload.get("visibility") == "private")
        self.server.created.append(repo_id)
        self._json({"url": f"{self.server.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _write_op(self, repo_id: str, op: str, rev: str, body: bytes) -> None:
        token, grants, ok = self._token()
        if not ok:
            return
        repo = self.server.repos.get(repo_id)
        if repo is None or (repo.private and grants is None):
            self._error(401 if token is None else 404, "RepoNotFound", "Repository not found")
            return
        if grants is None or not grants.write:
            self._error(403, None, "You don't have the rights to write to this repo")
            return
        if self._commit_of(repo, rev) is None:
            return
        if op == "preupload":
            files = json.loads(body)["files"]
            self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                   "oid": file_oid(repo.files[f["path"]]) if f["path"] in repo.files else None}
                                  for f in files]})
            return
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        with self.server.lock:
            self.server.commit_payloads.append(lines)
            for item in lines:
                if item["key"] == "file":
                    repo.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] == "deletedFile":
                    repo.files.pop(item["value"]["path"], None)
                elif item["key"] != "header":
                    self._error(400, None, f"the fake hub does not support {item['key']!r}")
                    return
            repo.commits.append(hashlib.sha1(f"{repo_id}:{len(repo.commits)}".encode()).hexdigest())
        self._json({"commitUrl": f"{self.server.url}/{repo_id}/commit/{repo.sha}", "commitOid": repo.sha,
                    "pullRequestUrl": None})


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    """A running fake Hub; HF_ENDPOINT points at it, HF_HOME is empty and HF_TOKEN unset for this test."""
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        yield hub
