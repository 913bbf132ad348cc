"""Run the app under uvicorn on a socket williw binds itself, so that ``--port 0`` works (the caller learns the
port from the startup line) and a restarted worker can take its port back at once (SO_REUSEADDR).

One uvicorn worker process: on SQLite a second process would be a second writer on the same file, which is
exactly what the store avoids; to scale out, run several ``williw worker`` processes on one PostgreSQL database.
"""

from __future__ import annotations

import gc
import socket
from collections.abc import Callable
from typing import Any

from williw.progress import get_logger
from williw.worker.service import WorkerSettings

log = get_logger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port).

    Raises:
        OSError: the address is in use or cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:  # the bare "[Errno 98] Address already in use" did not say which address
        sock.close()
        raise OSError(exc.errno, exc.strerror, f"{host}:{port}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(settings: WorkerSettings, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "warning",
          access_log: bool = False, on_listening: Callable[[str], None] | None = None) -> None:
    """Open the database, bind, and serve until SIGINT/SIGTERM.

    Args:
        settings: the worker's settings.
        host, port: where to listen; port 0 picks a free port.
        log_level: uvicorn's log level.
        access_log: log every request (costs about a tenth of the heartbeat throughput).
        on_listening: called with the base URL once the socket is bound and the database is migrated.

    Raises:
        StoreError: the database cannot be opened.
        OSError: the address cannot be bound.
    """
    import uvicorn

    from williw.worker.app import create_app
    from williw.worker.planning import PlanningPool
    from williw.worker.protocol import http_protocol

    app = create_app(settings)
    # The planner runs in a child process so that process calls do not hold the event loop's GIL (see planning).
    planning = app.state.planning_pool = PlanningPool()
    sock = bind(host, port)
    bound_port = sock.getsockname()[1]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{bound_port}"
    if not settings.token and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("the worker listens on %s without a token: anyone who can reach it can change its state; "
                    "set WILLIW_TOKEN or --token", host)
    # loop="auto" and uvicorn's default http="auto" use uvloop and httptools when installed (uvicorn[standard]).
    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, workers=1, loop="auto",
                            timeout_keep_alive=30, backlog=2048, http=http_protocol())
    server = uvicorn.Server(config)
    # In the app's shutdown, not only in `finally`: uvicorn re-raises SIGTERM once it has shut down, and the
    # default handler ends the process before `finally` runs.
    app.router.add_event_handler("shutdown", lambda: _close_planning(planning))
    try:
        planning.warm()
        if on_listening is not None:
            on_listening(url)
        # The ~80k objects of the imported modules and the app live as long as the process. Frozen (moved out of
        # the collector's generations), a full collection no longer walks them: it paused the loop ~20 ms each
        # time, which was most of the heartbeats' p99 under load (48 ms, 14 ms frozen).
        gc.freeze()
        server.run(sockets=[sock])
    finally:
        sock.close()
        _close_planning(planning)


def _close_planning(planning: Any) -> None:
    planning.close()
    # The executor's queues hold five semaphores, released when the queues are collected; frozen objects never
    # are, and the resource tracker warned "5 leaked semaphore objects" on every SIGTERM.
    gc.unfreeze()
    gc.collect()
