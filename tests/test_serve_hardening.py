"""The file servers check each request, not only their start: a file or a version folder swapped for a symlink
after start is a 404, Range numbers are bounded, the backlog is not 5, and idle or half-sent connections are
closed (issue 16). Real servers, real sockets."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx

from williw.serve import LISTEN_BACKLOG, ModelServer, ShardServer


def test_a_served_file_swapped_for_a_symlink_after_start_is_404(tmp_path: Path) -> None:
    root = tmp_path / "model"
    root.mkdir()
    (root / "model.safetensors").write_bytes(b"weights")
    (root / "sub").mkdir()
    (root / "sub" / "tok.json").write_text("{}")
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    server = ModelServer(root).start()
    try:
        assert httpx.get(f"{server.url}/model.safetensors").content == b"weights"
        (root / "model.safetensors").unlink()
        (root / "model.safetensors").symlink_to(secret)
        r = httpx.get(f"{server.url}/model.safetensors")
        assert (r.status_code, r.text) == (404, "no file 'model.safetensors' in this model folder\n")
        # A folder on the way swapped for a symlink (to a folder with the same file name) is refused too.
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / "tok.json").write_text("outside")
        (root / "sub" / "tok.json").unlink()
        (root / "sub").rmdir()
        (root / "sub").symlink_to(elsewhere)
        assert httpx.get(f"{server.url}/sub/tok.json").status_code == 404
        assert server.bytes_sent == {"model.safetensors": 7}
    finally:
        server.shutdown()
        server.server_close()


def test_a_version_folder_swapped_for_a_symlink_is_404(tmp_path: Path) -> None:
    rid = "cd" * 16
    data = tmp_path / "data"
    shard = data / rid / "v1" / "n1"
    shard.mkdir(parents=True)
    (shard / "model.safetensors").write_bytes(b"mine")
    outside = tmp_path / "outside" / "n1"
    outside.mkdir(parents=True)
    (outside / "model.safetensors").write_bytes(b"not in the data folder")
    server = ShardServer(data, "n1").start()
    try:
        assert httpx.get(f"{server.url}/{rid}/v1/n1/model.safetensors").content == b"mine"
        (data / rid / "v2").symlink_to(tmp_path / "outside")
        r = httpx.get(f"{server.url}/{rid}/v2/n1/model.safetensors")
        assert (r.status_code, r.text) == (404, f"no file '{rid}/v2/n1/model.safetensors' in this model folder\n")
    finally:
        server.shutdown()
        server.server_close()


def _raw(server: ModelServer, request: bytes, wait_s: float = 5.0) -> bytes:
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=wait_s) as s:
        s.sendall(request)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def test_range_numbers_thousands_of_digits_long_are_416(tmp_path: Path) -> None:
    (tmp_path / "f.bin").write_bytes(b"x" * 100)
    server = ModelServer(tmp_path).start()
    try:
        huge = "9" * 5000
        for value in (f"bytes={huge}-", f"bytes=0-{huge}", f"bytes=-{huge}"):
            with httpx.Client(base_url=server.url) as http:
                r = http.get("/f.bin", headers={"Range": value})
                assert (r.status_code, r.text) == (416, "only one bytes=a-b range is supported\n")
                assert http.get("/f.bin").content == b"x" * 100  # the same keep-alive connection still works
    finally:
        server.shutdown()
        server.server_close()


def test_backlog_and_idle_and_half_sent_connections_are_closed(tmp_path: Path) -> None:
    (tmp_path / "f.bin").write_bytes(b"x" * 10)
    server = ModelServer(tmp_path, idle_timeout_s=0.5).start()
    try:
        assert server.request_queue_size == LISTEN_BACKLOG == 128
        t0 = time.monotonic()
        assert _raw(server, b"GET /f.bin HTTP/1.1\r\nHost: x\r\n") == b""  # half-sent header: closed
        assert _raw(server, b"") == b""  # idle: closed
        kept = _raw(server, b"GET /f.bin HTTP/1.1\r\nHost: x\r\n\r\n")  # answered, then closed when idle
        assert kept.startswith(b"HTTP/1.1 200 OK\r\n") and kept.endswith(b"\r\n\r\nxxxxxxxxxx")
        assert time.monotonic() - t0 < 4.0
    finally:
        server.shutdown()
        server.server_close()
