"""The store without HTTP: migrations, URLs, and the versioned plans."""

from __future__ import annotations

import re
import sqlite3

import pytest

from williw.worker.records import NodeRecord
from williw.worker.store import NotFound, Store, StoreError, normalize_url
from workerproc import backends, database


def test_migrations_run_once_and_record_the_version(tmp_path):
    path = tmp_path / "w.db"
    store = Store(str(path))
    assert store.schema_version() == 5
    store.upsert_node({"node_id": "n", "compute_tflops": 1.0, "memory_gb": 1.0}, "hash", 5.0)
    store.close()
    again = Store(f"sqlite:///{path}")  # reopening migrates nothing and keeps the data
    assert again.schema_version() == 5
    assert [n.node_id for n in again.list_nodes()] == ["n"]
    again.close()
    rows = sqlite3.connect(path).execute("SELECT version, name FROM williw_schema_version").fetchall()
    assert rows == [(1, "nodes, requests, plans"), (2, "assignments"), (3, "re-planning"),
                    (4, "node latency and memory reserve"), (5, "node device, dtype and weights")]
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_version_2_database_migrates_to_the_latest_and_keeps_its_rows(tmp_path):
    from williw.worker import schema

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # what williw with migrations 1 and 2 left behind
        db.execute(schema.SCHEMA_VERSION_DDL)
        for version, name, statements in schema.MIGRATIONS[:2]:
            for statement in statements:
                db.execute(statement)
            db.execute("INSERT INTO williw_schema_version VALUES (?, ?, 0)", (version, name))
        db.execute("INSERT INTO nodes VALUES ('n', 1.0, 2.0, NULL, NULL, '[]', 'h', 1, 1, 1)")
        db.execute("INSERT INTO requests VALUES ('r', 'm', NULL, 1, 8, 'received', NULL, NULL, 1, 1)")
    store = Store(str(path))
    assert store.schema_version() == 5
    assert [(n.node_id, n.memory_gb, n.latency_ms, n.memory_reserve_gb) for n in store.list_nodes()] == \
        [("n", 2.0, None, None)]
    request = store.get_request("r")
    assert (request.model_name, request.metadata_digest, request.auto_replan) == ("m", None, None)
    store.close()


@pytest.mark.parametrize("kind", backends())
def test_a_version_3_database_gets_the_node_fields_and_keeps_its_rows(kind, tmp_path):
    from sqlalchemy import create_engine, text

    from williw.worker import schema

    with database(kind, tmp_path) as url:
        engine = create_engine(normalize_url(url))
        with engine.begin() as db:  # what williw with migrations 1 to 3 left behind
            db.execute(text(schema.SCHEMA_VERSION_DDL))
            for version, name, statements in schema.MIGRATIONS[:3]:
                for statement in statements:
                    db.execute(text(statement))
                db.execute(text("INSERT INTO williw_schema_version VALUES (:v, :n, 0)"), {"v": version, "n": name})
            db.execute(text("INSERT INTO nodes VALUES ('n', 1.0, 2.0, 300.0, 1.5, '[\"gpu\"]', 'h', 1, 2, 3, "
                            "'http://n:1')"))
        engine.dispose()
        store = Store(url)
        try:
            assert store.schema_version() == 5
            assert store.list_nodes() == [NodeRecord("n", 1.0, 2.0, 300.0, 1.5, ("gpu",), 1.0, 2.0, 3.0, None, None)]
            fields = {"node_id": "n", "compute_tflops": 1.0, "memory_gb": 2.0, "latency_ms": 0.5,
                      "memory_reserve_gb": 0.25}
            record, created = store.upsert_node(fields, None, 9.0)
            assert (created, record.latency_ms, record.memory_reserve_gb) == (False, 0.5, 0.25)
            assert store.node_token_hash("n") == "h"
            assert record.fleet_dict() == {"node_id": "n", "compute_tflops": 1.0, "memory_gb": 2.0, "labels": [],
                                           "latency_ms": 0.5, "memory_reserve_gb": 0.25}
        finally:
            store.close()


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "w.db"
    Store(str(path)).close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO williw_schema_version VALUES (99, 'future', 0)")
    with pytest.raises(StoreError, match=r"^the database is at schema version 99, newer than this williw's 5: "
                                         r"upgrade williw$"):
        Store(str(path))


@pytest.mark.parametrize(("url", "message"), [
    ("sqlite://", "the worker needs a SQLite file"),
    ("sqlite:///:memory:", "the worker needs a SQLite file"),
    ("mysql://u@h/db", "unsupported database 'mysql'"),
])
def test_bad_urls(url, message):
    with pytest.raises(StoreError, match=f"^{message}"):
        normalize_url(url)


@pytest.mark.parametrize(("url", "message"), [
    ("postgresql+psycopg://u@h:port/db", "the database URL cannot be parsed: invalid literal for int"),
    ("postgresql+psycopg://postgres:pw@127.0.0.1:1/db",
     "cannot open the database postgresql+psycopg://postgres:***@127.0.0.1:1/db: connection failed: "),
    ("sqlite:////no/such/folder/w.db", "cannot open the database sqlite:////no/such/folder/w.db: unable to open"),
])
def test_unopenable_databases_are_one_line(url, message, williw):
    # Before, each was a 140-line SQLAlchemy traceback from `williw worker` (exit 1), the password included.
    with pytest.raises(StoreError, match=f"^{re.escape(message)}"):
        Store(url)
    proc = williw("worker", "--port", "0", "--db", url, check=False)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: ")
    assert ":pw@" not in proc.stderr


def test_url_spellings():
    assert normalize_url("w.db") == "sqlite:///w.db"
    assert normalize_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"


def test_plan_versions_only_grow(tmp_path):
    store = Store(str(tmp_path / "w.db"))
    store.create_request("r", "m", None, 1, 8, 1.0)
    assert [store.save_plan("r", lambda v: {"v": v}, 2.0) for _ in range(3)] == [(1, {"v": 1}), (2, {"v": 2}),
                                                                               (3, {"v": 3})]
    assert store.get_plan("r", 2) == {"v": 2}
    assert store.get_request("r").plan_version == 3
    store.mark_failed("r", "why", 3.0)
    assert (store.get_request("r").status, store.get_request("r").plan_version) == ("failed", 3)
    with pytest.raises(NotFound, match="^request 'r' has no plan version 9$"):
        store.get_plan("r", 9)
    with pytest.raises(NotFound, match="^request 'q' does not exist$"):
        store.save_plan("q", lambda v: {}, 1.0)
    store.close()


def test_an_address_in_use_is_named(tmp_path, williw):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        proc = williw("worker", "--port", str(port), "--db", str(tmp_path / "w.db"), check=False)
    # Was "error: [Errno 98] Address already in use", without the address.
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        2, "", f"error: '127.0.0.1:{port}': Address already in use\n")
