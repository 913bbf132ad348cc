"""``serve-model``: ranges, safety of paths, and byte counts."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from williw.serve import ModelServer


@pytest.fixture
def served(tmp_path: Path):
    (tmp_path / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "tok.json").write_text("{}")
    (tmp_path / ".secret").write_text("no")
    (tmp_path.parent / "outside.txt").write_text("no")
    server = ModelServer(tmp_path).start()
    yield server, tmp_path
    server.shutdown()
    server.server_close()


def test_whole_file_and_ranges(served) -> None:
    server, root = served
    data = (root / "model.safetensors").read_bytes()
    with httpx.Client(base_url=server.url) as http:
        assert http.get("/model.safetensors").content == data
        part = http.get("/model.safetensors", headers={"Range": "bytes=10-19"})
        suffix = http.get("/model.safetensors", headers={"Range": "bytes=-8"})
        open_ended = http.get("/model.safetensors", headers={"Range": "bytes=1000-"})
        head = http.head("/model.safetensors")
        stats = http.get("/_stats").json()

    assert (part.status_code, part.content, part.headers["content-range"]) == (206, data[10:20], "bytes 10-19/1024")
    assert suffix.content == data[-8:]
    assert open_ended.content == data[1000:]
    assert head.headers["content-length"] == "1024" and head.content == b""
    assert stats == {"bytes_sent": {"model.safetensors": 1024 + 10 + 8 + 24}}


@pytest.mark.parametrize("path", ["/../outside.txt", "/%2e%2e/outside.txt", "/.secret", "//etc/passwd",
                                  "/sub/../../outside.txt", "/nope.bin"])
def test_nothing_outside_the_listing_is_served(served, path: str) -> None:
    server, _ = served
    with httpx.Client(base_url=server.url) as http:
        assert http.get(path).status_code == 404


def test_subfolders_and_unsatisfiable_range(served) -> None:
    server, _ = served
    with httpx.Client(base_url=server.url) as http:
        assert http.get("/sub/tok.json").text == "{}"
        bad = http.get("/model.safetensors", headers={"Range": "bytes=5000-6000"})
    assert (bad.status_code, bad.headers["content-range"]) == (416, "bytes */1024")


def test_shard_server_answers_only_its_own_shard_files(tmp_path: Path) -> None:
    from williw.serve import ShardServer

    rid = "ab" * 16
    shard = tmp_path / rid / "v3" / "n1"
    shard.mkdir(parents=True)
    for name in ("model.safetensors", "shard.json", "config.json", "secret.txt"):
        (shard / name).write_bytes(name.encode())
    (tmp_path / "node.json").write_text('{"node_token": "t"}')
    other = tmp_path / rid / "v3" / "n2"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"other")
    server = ShardServer(tmp_path, "n1").start()
    try:
        ok = httpx.get(f"{server.url}/{rid}/v3/n1/model.safetensors", headers={"Range": "bytes=1-3"})
        assert (ok.status_code, ok.content) == (206, b"ode")
        assert httpx.get(f"{server.url}/{rid}/v3/n1/config.json").content == b"config.json"
        for bad in ("node.json", f"{rid}/v3/n1/secret.txt", f"{rid}/v3/n2/model.safetensors",
                    f"{rid}/v3/n1/../n2/model.safetensors", f"{rid}/v03/n1/model.safetensors",
                    f"{rid}/v3/n1/%2e%2e/n2/model.safetensors"):
            assert httpx.get(f"{server.url}/{bad}").status_code == 404, bad
        assert server.bytes_sent == {f"{rid}/v3/n1/model.safetensors": 3, f"{rid}/v3/n1/config.json": 11}
    finally:
        server.shutdown()
