"""Start the real worker service (``williw worker``) as a subprocess for tests and benchmarks.

`WorkerProcess` starts it on a free loopback port (``--port 0``; the port is read from the ``--json`` startup
line), waits for ``/healthz``, and can SIGKILL and restart it on the same port with the same database.
`postgres_schema` gives a test run its own PostgreSQL schema and drops it afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from pgserver import pg_url

VENV_BIN = Path(sys.executable).parent


class WorkerProcess:
    """One ``williw worker`` process.

    Args:
        db_url: the ``--db`` value.
        token: the admin token (``--token``), or None for an open service.
        node_ttl: ``--node-ttl`` seconds.
        extra_args: more command-line options.
        cwd: the working folder (where a relative SQLite file lands).
    """

    def __init__(self, db_url: str, token: str | None = None, *, node_ttl: float | None = None,
                 extra_args: tuple[str, ...] = (), cwd: str | os.PathLike[str] | None = None,
                 log_path: str | os.PathLike[str] | None = None) -> None:
        self.db_url = db_url
        self.token = token
        self.node_ttl = node_ttl
        self.extra_args = extra_args
        self.cwd = cwd
        self.port = 0
        self.url = ""
        self.proc: subprocess.Popen[str] | None = None
        self.log_path = Path(log_path) if log_path else None
        self._log = None

    def start(self, timeout: float = 30.0) -> WorkerProcess:
        """Start the process (on the port it had before, after a kill) and wait until /healthz answers 200."""
        args = [str(VENV_BIN / "williw"), "worker", "--json", "--port", str(self.port), "--db", self.db_url,
                *self.extra_args]
        if self.node_ttl is not None:
            args += ["--node-ttl", str(self.node_ttl)]
        env = {k: v for k, v in os.environ.items() if k != "WILLIW_TOKEN"}
        if self.token:
            env["WILLIW_TOKEN"] = self.token
        self._log = open(self.log_path, "a") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env,
                                     cwd=self.cwd)
        line = _read_line(self.proc, timeout)
        try:
            info = json.loads(line)
        except json.JSONDecodeError:
            self.kill()
            raise RuntimeError(f"williw worker did not announce its URL; it printed {line!r} "
                               f"(exit code {self.proc.poll()})") from None
        self.url = info["url"]
        self.port = int(self.url.rsplit(":", 1)[1])
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"williw worker exited with code {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"williw worker at {self.url} did not become healthy in {timeout} s")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._close()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 10 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._close()

    def restart(self, timeout: float = 30.0) -> WorkerProcess:
        self.kill()
        return self.start(timeout)

    def _close(self) -> None:
        if self.proc is not None and self.proc.stdout:
            self.proc.stdout.close()
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()  # type: ignore[union-attr]
        self._log = None

    def __enter__(self) -> WorkerProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline() if proc.stdout else ""),
                              daemon=True)
    reader.start()
    reader.join(timeout)
    return result[0] if result else ""


@contextmanager
def postgres_schema(base_url: str | None = None) -> Iterator[str]:
    """A fresh schema on the test PostgreSQL server (`pgserver.pg_url`, started if need be); yields a URL whose
    connections use it, drops it after.

    Raises:
        RuntimeError: the server cannot be reached or started (run with ``-m "not postgres"`` to skip these tests).
    """
    from sqlalchemy import create_engine, text

    base_url = base_url or pg_url()
    name = f"williw_test_{uuid.uuid4().hex[:12]}"
    engine = create_engine(base_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{name}"'))  # name is ours: letters, digits, '_'
    except Exception as exc:
        engine.dispose()
        raise RuntimeError(f"cannot reach PostgreSQL at {base_url} ({type(exc).__name__}); set WILLIW_TEST_PG_URL "
                           "or deselect with -m 'not postgres'") from exc
    sep = "&" if "?" in base_url else "?"
    try:
        yield f"{base_url}{sep}options=-csearch_path%3D{name}"
    finally:
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{name}" CASCADE'))
        engine.dispose()


@contextmanager
def database(kind: str, folder: Path) -> Iterator[str]:
    """A database URL for ``kind`` (``sqlite``: a file in ``folder``; ``postgres``: a fresh schema)."""
    if kind == "sqlite":
        yield f"sqlite:///{folder / 'worker.db'}"
    else:
        with postgres_schema() as url:
            yield url


def backends():
    """Parameters for a module-scoped fixture: every test runs on SQLite and (marked) on PostgreSQL."""
    import pytest

    return ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def free_port() -> int:
    """A TCP port on loopback that nothing listens on (now)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float = 60.0, interval: float = 0.1):
    """``check()``'s first truthy answer, polled until ``timeout`` seconds (generous: it returns as soon as the
    event happens, so a loaded machine only makes it slower, never red)."""
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what} ({timeout} s)"
        time.sleep(interval)
    return found


def stop_processes(procs) -> None:
    """Terminate every process still running, wait up to 10 s each, kill what does not stop."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
