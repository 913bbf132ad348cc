"""WorkerClient against the real service: retries while the worker starts, one-line errors."""

from __future__ import annotations

import re
import threading
import time

import pytest

from williw.client import WorkerClient, WorkerHTTPError
from williw.errors import WorkerError
from workerproc import WorkerProcess
from workerproc import free_port as _free_port


def test_retries_until_the_worker_is_up_then_maps_errors(tmp_path):
    port = _free_port()
    proc = WorkerProcess(f"sqlite:///{tmp_path / 'w.db'}", "tok")
    proc.port = port
    starter = threading.Timer(0.5, proc.start)
    starter.start()
    try:
        client = WorkerClient(f"http://127.0.0.1:{port}", "tok", retries=8, backoff=0.2)
        started = time.monotonic()
        assert client.healthz()["status"] == "ok"  # refused at first, then retried
        assert time.monotonic() - started >= 0.4
        starter.join()

        with pytest.raises(WorkerHTTPError) as exc:
            client.get_request("nope")
        assert (str(exc.value), exc.value.status_code, exc.value.detail) == (
            "GET /api/requests/nope: 404 request 'nope' does not exist", 404, "request 'nope' does not exist")
        with pytest.raises(WorkerHTTPError) as exc:
            client.with_token("bad").create_request("a/b")
        assert str(exc.value) == ("POST /api/request: 403 creating a request needs the admin token (WILLIW_TOKEN); "
                                  "the token sent is not it")
        with pytest.raises(WorkerHTTPError) as exc:
            client.create_request("a/b", batch_size=0)
        assert str(exc.value) == ("POST /api/request: 422 body field 'batch_size': Input should be greater than or "
                                  "equal to 1")
        # An id is sent as one escaped segment; the server decodes %2F, so no route matches: 404, not /healthz.
        with pytest.raises(WorkerHTTPError) as exc:
            client.get_request("../healthz")
        assert (exc.value.status_code, exc.value.detail) == (404, "Not Found")
        client.close()
    finally:
        starter.join()
        proc.stop()


def test_gives_up_with_one_line_after_the_retries():
    port = _free_port()
    client = WorkerClient(f"http://127.0.0.1:{port}", retries=2, backoff=0.01)
    with pytest.raises(WorkerError) as exc:
        client.list_nodes()
    message = str(exc.value)
    assert "\n" not in message
    assert re.fullmatch(rf"GET http://127\.0\.0\.1:{port}/api/nodes: cannot reach the worker \(ConnectError: .+\) "
                        r"after 3 attempt\(s\)", message), message
