"""The PostgreSQL server the tests (and bench/worker.py) use, started here when none is running.

`pg_url` answers, in this order:
1. ``WILLIW_TEST_PG_URL`` when set (a server someone runs on purpose; if it does not answer, tests fail);
2. the machine's server, ``postgres@127.0.0.1:5432/test`` with trust auth, when it answers;
3. a throwaway server of this test run: ``initdb`` into a temporary folder and ``pg_ctl start`` on a free loopback
   port, from the PostgreSQL binaries on PATH or under ``/usr/lib/postgresql/<version>/bin`` (Debian's
   ``postgresql`` package; `.ci/run` installs it when missing). PostgreSQL refuses to run as root, so under root
   the server runs as the ``postgres`` user (or ``nobody``). It is stopped and deleted when the run ends.
   ``WILLIW_TEST_PG_URL=start`` forces this case.

When none of these works, `pg_url` raises with what is missing: tests marked ``postgres`` then fail loudly
instead of being skipped.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
_started: list[str] = []


def pg_url() -> str:
    """A SQLAlchemy URL of a database the tests may create schemas in (see the module doc).

    Raises:
        RuntimeError: no server answers and none can be started here.
    """
    configured = os.environ.get("WILLIW_TEST_PG_URL")
    if configured and configured != "start":
        return configured
    if _started:
        return _started[0]
    if configured != "start" and _answers(DEFAULT_URL):
        return DEFAULT_URL
    _started.append(_start_server())
    return _started[0]


def _answers(url: str) -> bool:
    import psycopg

    try:
        psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), connect_timeout=3).close()
    except psycopg.Error:
        return False
    return True


def _bin_dir() -> Path:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not versions:
        raise RuntimeError("no PostgreSQL server answers at 127.0.0.1:5432 and no PostgreSQL binaries are installed "
                           "to start one: apt-get install postgresql, or set WILLIW_TEST_PG_URL")
    return Path(versions[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server() -> str:
    bin_dir = _bin_dir()
    folder = Path(tempfile.mkdtemp(prefix="williw-pg-"))
    run_as: dict[str, int] = {}
    if os.geteuid() == 0:
        for name in ("postgres", "nobody"):
            try:
                user = pwd.getpwnam(name)
            except KeyError:
                continue
            run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
            break
        folder.chmod(0o755)
        os.chown(folder, run_as["user"], run_as["group"])
    data, port = folder / "data", _free_port()

    def run(*args: str) -> None:
        proc = subprocess.run([str(bin_dir / args[0]), *args[1:]], capture_output=True, text=True, cwd=folder,
                              timeout=120, **run_as)
        if proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}) starting the tests' PostgreSQL server: "
                               f"{(proc.stderr or proc.stdout).strip()[-500:]}")

    run("initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync")
    atexit.register(_stop, bin_dir, data, folder, run_as)
    run("pg_ctl", "-D", str(data), "-l", str(folder / "server.log"), "-w", "-t", "60", "start", "-o",
        f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c max_connections=200")
    import psycopg

    with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True) as conn:
        conn.execute("CREATE DATABASE test")
    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/test"


def _stop(bin_dir: Path, data: Path, folder: Path, run_as: dict[str, int]) -> None:
    subprocess.run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True,
                   cwd=folder, timeout=60, **run_as)
    shutil.rmtree(folder, ignore_errors=True)
