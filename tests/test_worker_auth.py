"""Every auth rule of the worker (see williw.worker.auth), over real HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import ast
import hashlib
import re
from pathlib import Path

import httpx
import pytest

from workerproc import WorkerProcess, backends, database

TOKEN = "the-admin-token"
MISSING = ("{action} needs 'Authorization: Bearer <token>' (the admin token, or a node's own token for its "
           "heartbeat, update and delete)")
NODE = {"compute_tflops": 1.0, "memory_gb": 1.0}


@pytest.fixture(scope="module", params=backends())
def worker(request, tmp_path_factory):
    with database(request.param, tmp_path_factory.mktemp("auth")) as url, WorkerProcess(url, TOKEN) as proc:
        yield proc


def call(worker, method, path, token=None, body=None, raw_auth=None):
    headers = {"Authorization": raw_auth} if raw_auth else {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.request(method, f"{worker.url}{path}", json=body, headers=headers)


def register(worker, node_id, token=TOKEN):
    r = call(worker, "POST", "/api/nodes", token, {"node_id": node_id, **NODE})
    assert r.status_code in (200, 201), r.text
    return r.json()["node_token"]


@pytest.fixture(scope="module")
def tokens(worker):
    return {"n1": register(worker, "n1"), "n2": register(worker, "n2")}


def assert_error(r, status, detail):
    assert (r.status_code, r.json()) == (status, {"detail": detail})


@pytest.mark.parametrize(("path", "body", "action"), [
    ("/api/request", {"model_name": "a/b"}, "creating a request"),
    ("/api/process", {"request_id": "x", "metadata": {}}, "processing a request"),
])
def test_user_endpoints_need_the_admin_token(worker, tokens, path, body, action):
    r = call(worker, "POST", path, None, body)
    assert_error(r, 401, MISSING.format(action=action))
    assert r.headers["www-authenticate"] == "Bearer"
    assert_error(call(worker, "POST", path, None, body, raw_auth=f"Basic {TOKEN}"), 401, MISSING.format(action=action))
    wrong = f"{action} needs the admin token (WILLIW_TOKEN); the token sent is not it"
    assert_error(call(worker, "POST", path, "wrong", body), 403, wrong)
    assert_error(call(worker, "POST", path, tokens["n1"], body), 403, wrong)


def test_admin_can_create_requests(worker):
    r = call(worker, "POST", "/api/request", TOKEN, {"model_name": "a/b"})
    assert r.status_code == 201 and r.json()["status"] == "received"


def test_heartbeat_own_token_or_admin_only(worker, tokens):
    assert call(worker, "POST", "/api/nodes/n1/heartbeat", tokens["n1"]).status_code == 200
    assert call(worker, "POST", "/api/nodes/n1/heartbeat", TOKEN).status_code == 200
    other = "a heartbeat needs the admin token or node 'n1''s own token; the token sent is neither"
    assert_error(call(worker, "POST", "/api/nodes/n1/heartbeat", tokens["n2"]), 403, other)
    assert_error(call(worker, "POST", "/api/nodes/n1/heartbeat", "garbage"), 403, other)
    assert_error(call(worker, "POST", "/api/nodes/n1/heartbeat"), 401, MISSING.format(action="a heartbeat"))


def test_a_node_updates_only_itself_and_keeps_its_token(worker, tokens):
    r = call(worker, "POST", "/api/nodes", tokens["n1"], {"node_id": "n1", "compute_tflops": 5.0, "memory_gb": 2.0})
    assert r.status_code == 200
    assert (r.json()["created"], r.json()["node_token"], r.json()["node"]["compute_tflops"]) == \
        (False, tokens["n1"], 5.0)
    assert_error(call(worker, "POST", "/api/nodes", tokens["n1"], {"node_id": "n2", **NODE}), 403,
                 "registering a node needs the admin token or node 'n2''s own token; the token sent is neither")
    assert_error(call(worker, "POST", "/api/nodes", tokens["n1"], {"node_id": "brand-new", **NODE}), 403,
                 "registering a new node ('brand-new') needs the admin token")
    assert_error(call(worker, "POST", "/api/nodes", None, {"node_id": "n1", **NODE}), 401,
                 MISSING.format(action="registering a node"))


def test_admin_re_registration_rotates_the_node_token(worker):
    old = register(worker, "rotated")
    new = register(worker, "rotated")
    assert new != old and new.startswith("wn_")
    assert call(worker, "POST", "/api/nodes/rotated/heartbeat", new).status_code == 200
    assert call(worker, "POST", "/api/nodes/rotated/heartbeat", old).status_code == 403


def test_delete_own_node_only(worker):
    a, b = register(worker, "del-a"), register(worker, "del-b")
    assert_error(call(worker, "DELETE", "/api/nodes/del-a", b), 403,
                 "deleting a node needs the admin token or node 'del-a''s own token; the token sent is neither")
    assert_error(call(worker, "DELETE", "/api/nodes/del-a"), 401, MISSING.format(action="deleting a node"))
    r = call(worker, "DELETE", "/api/nodes/del-a", a)
    assert (r.status_code, r.json()) == (200, {"node_id": "del-a", "deleted": True})
    assert call(worker, "DELETE", "/api/nodes/del-b", TOKEN).status_code == 200
    # The node and its token are gone together.
    assert_error(call(worker, "POST", "/api/nodes/del-a/heartbeat", a), 404, "node 'del-a' is not registered")


def test_reads_need_no_token(worker, tokens):
    assert call(worker, "GET", "/healthz").json()["auth"] == "token"
    nodes = call(worker, "GET", "/api/nodes")
    assert nodes.status_code == 200
    assert {"n1", "n2"} <= {n["node_id"] for n in nodes.json()["nodes"]}
    assert "token_hash" not in nodes.json()["nodes"][0] and "node_token" not in nodes.json()["nodes"][0]
    assert call(worker, "GET", "/api/nodes/n1").status_code == 200
    rid = call(worker, "POST", "/api/request", TOKEN, {"model_name": "a/b"}).json()["request_id"]
    assert call(worker, "GET", f"/api/requests/{rid}").status_code == 200
    assert call(worker, "POST", "/api/get-plan", None, {"request_id": rid}).status_code == 409


def test_only_the_sha256_of_a_node_token_is_stored(worker, tokens):
    from sqlalchemy import MetaData, create_engine, select

    engine = create_engine(worker.db_url)
    try:
        tables = MetaData()
        tables.reflect(engine)
        with engine.connect() as conn:
            stored = dict(conn.execute(select(tables.tables["nodes"].c.node_id,
                                              tables.tables["nodes"].c.token_hash)).all())
            cells = [str(v) for t in tables.tables.values() for row in conn.execute(select(t)) for v in row]
    finally:
        engine.dispose()
    for node_id, token in tokens.items():
        assert stored[node_id] == hashlib.sha256(token.encode()).hexdigest()
        assert not any(token in c or token[3:] in c for c in cells)  # nowhere in any table, prefix or not
    if worker.db_url.startswith("sqlite:///"):  # nor anywhere in the database's files, WAL included
        db = Path(worker.db_url.removeprefix("sqlite:///"))
        raw = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
        assert all(token[3:].encode() not in raw for token in tokens.values())


def test_tokens_are_compared_in_constant_time():
    # Timing cannot be measured reliably on a shared machine, so check the code: every comparison of a token or
    # of its hash in williw.worker.auth goes through hmac.compare_digest, whose time does not depend on where
    # the strings differ; none uses == or !=.
    import williw.worker.auth as auth

    tree = ast.parse(Path(auth.__file__).read_text())
    secret = re.compile(r"token|hash", re.IGNORECASE)
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
            operands = [ast.unparse(x) for x in (node.left, *node.comparators)]
            assert not any(secret.search(x) for x in operands), f"auth.py line {node.lineno}: {ast.unparse(node)}"
    digests = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == "hmac.compare_digest"]
    assert sorted(ast.unparse(n) for n in digests) == [
        "hmac.compare_digest(hash_token(token), self._admin_hash)",
        "hmac.compare_digest(hash_token(token), stored_hash())"]
