"""``/api/process`` with ``metadata_repo``: the worker reads the metadata from a (fake) Hub, as the seed does."""

from __future__ import annotations

import json

import pytest

from hubserver import FakeHub
from williw.client import WorkerClient, WorkerHTTPError
from williw.hub import metadata_path_in_repo
from williw.metadata import generate_metadata
from workerproc import WorkerProcess


def test_process_reads_metadata_from_the_hub(tmp_path, tiny_llama):
    meta = json.loads(json.dumps(generate_metadata(tiny_llama, model_name="org/tiny").to_dict()))
    with FakeHub() as hub:
        hub.add_repo("me/williw-metadata", files={metadata_path_in_repo("org/tiny"): json.dumps(meta).encode()})
        with WorkerProcess(f"sqlite:///{tmp_path / 'w.db'}", extra_args=("--hub-endpoint", hub.url)) as proc, \
                WorkerClient(proc.url) as client:
            client.register_node("hub-node", 10.0, 8.0)
            rid = client.create_request("org/tiny")["request_id"]
            from_hub = client.process(rid, metadata_repo="me/williw-metadata")
            inline_rid = client.create_request("org/tiny")["request_id"]
            inline = client.process(inline_rid, metadata=meta)
            assert from_hub["plan"] == inline["plan"]

            missing = client.create_request("org/absent")["request_id"]
            with pytest.raises(WorkerHTTPError) as exc:
                client.process(missing, metadata_repo="me/williw-metadata")
            assert exc.value.status_code == 502
            assert exc.value.detail.startswith(f"request '{missing}' failed: cannot read the metadata of "
                                               "'org/absent' from Hub repo 'me/williw-metadata': ")
            request = client.get_request(missing)
            assert request["status"] == "failed"
            assert exc.value.detail == f"request '{missing}' failed: {request['reason']}"


def test_an_unreachable_hub_is_a_502_at_once(tmp_path):
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with WorkerProcess(f"sqlite:///{tmp_path / 'w.db'}", extra_args=("--hub-endpoint", dead)) as proc, \
            WorkerClient(proc.url) as client:
        client.register_node("hub-node", 10.0, 8.0)
        rid = client.create_request("org/tiny")["request_id"]
        started = time.monotonic()
        with pytest.raises(WorkerHTTPError) as exc:
            client.process(rid, metadata_repo="me/williw-metadata")
        assert time.monotonic() - started < 5  # huggingface_hub alone retried for ~23 s
        assert (exc.value.status_code, exc.value.detail) == (
            502, f"request '{rid}' failed: cannot read the metadata of 'org/tiny' from Hub repo 'me/williw-metadata': "
                 f"cannot reach {dead} ([Errno 111] Connection refused): check the network connection and "
                 "HF_ENDPOINT, then retry")
