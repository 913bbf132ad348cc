"""What a node runs its stages on and in (``device``, ``dtype``, ``weights``): fields of a nodes file, of the
worker's registry (registered by `williw node`, listed, handed to the planner) and of the stage a node loads."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from williw.client import WorkerClient
from williw.devices import describe_device
from williw.errors import NodesError
from williw.fleet import Node, load_fleet, parse_nodes
from williw.worker.records import NodeRecord
from williw.worker.store import Store
from workerproc import VENV_BIN, WorkerProcess, backends, database, wait_for

TOKEN = "precision-admin"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
GPU = {"node_id": "gpu", "compute_tflops": 312, "memory_gb": 80, "device": "cuda", "dtype": "bfloat16",
       "weights": ["int8", "as-stored"]}


# -- nodes files -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_nodes_file_round_trips_the_fields(tmp_path, suffix):
    import yaml

    text = {".json": json.dumps, ".yaml": yaml.safe_dump}[suffix]
    path = tmp_path / f"nodes{suffix}"
    path.write_text(text({"nodes": [GPU, {"node_id": "mac", "compute_tflops": 5, "memory_gb": 16, "device": "mps",
                                          "weights": ["int8"]}, {"node_id": "old", "compute_tflops": 1,
                                                                 "memory_gb": 2, "device": None}]}))
    fleet = load_fleet(path)
    assert [(n.device, n.dtype, n.weights) for n in fleet.nodes] == [
        ("cuda", "bfloat16", ("as-stored", "int8")),  # kept highest precision first
        ("mps", "float32", ("int8",)),
        ("cpu", "float32", ("as-stored",)),  # not given (or null): a CPU node at float32, weights as stored
    ]
    assert fleet.to_dict()["nodes"] == [
        {**GPU, "weights": ["as-stored", "int8"]},
        {"node_id": "mac", "compute_tflops": 5, "memory_gb": 16, "device": "mps", "weights": ["int8"]},
        {"node_id": "old", "compute_tflops": 1, "memory_gb": 2},  # the defaults are not written
    ]
    again = tmp_path / f"again{suffix}"
    again.write_text(text(fleet.to_dict()))
    assert load_fleet(again) == fleet


@pytest.mark.parametrize(("field", "value", "message"), [
    ("device", "gpu", "field 'device' must be one of cpu, cuda, mps, got 'gpu'"),
    ("device", "cuda:0", "field 'device' must be one of cpu, cuda, mps, got 'cuda:0'"),
    ("device", 1, "field 'device' must be one of cpu, cuda, mps, got 1"),
    ("dtype", "fp16", "field 'dtype' must be one of float32, bfloat16, float16, got 'fp16'"),
    ("dtype", ["float32"], "field 'dtype' must be one of float32, bfloat16, float16, got ['float32']"),
    ("weights", "int8", "field 'weights' must be a non-empty list of as-stored, int8, int4 (each at most once), "
                        "got 'int8'"),
    ("weights", [], "field 'weights' must be a non-empty list of as-stored, int8, int4 (each at most once), got []"),
    ("weights", ["int8", "int8"], "field 'weights' must be a non-empty list of as-stored, int8, int4 (each at most "
                                  "once), got ['int8', 'int8']"),
    ("weights", ["int8", "fp8"], "field 'weights' must be a non-empty list of as-stored, int8, int4 (each at most "
                                 "once), got ['int8', 'fp8']"),
    ("weights", [["int8"]], "field 'weights' must be a non-empty list of as-stored, int8, int4 (each at most "
                            "once), got [['int8']]"),
])
def test_bad_fields_are_one_line_errors_naming_the_node_and_field(field, value, message):
    nodes = [{"node_id": "a", "compute_tflops": 1, "memory_gb": 1}, {**GPU, field: value}]
    with pytest.raises(NodesError) as exc:
        parse_nodes(nodes, "nodes.json")
    assert str(exc.value) == f"'nodes.json': entry 1 (node 'gpu'): {message}"


def test_formats_the_device_cannot_run_are_refused_in_a_nodes_file():
    with pytest.raises(NodesError) as exc:
        parse_nodes([{**GPU, "device": "mps", "dtype": "float16", "weights": ["int8", "int4"]}], "nodes.json")
    assert str(exc.value) == ("'nodes.json': entry 0 (node 'gpu'): field 'weights' cannot run on device mps at "
                              "float16: torch has no int4 kernel for MPS")


def test_a_node_file_entry_defaults():
    assert Node("a", 1.0, 1.0) == parse_nodes([{"node_id": "a", "compute_tflops": 1, "memory_gb": 1}])[0]
    assert (Node("a", 1.0, 1.0).device, Node("a", 1.0, 1.0).dtype, Node("a", 1.0, 1.0).weights) == \
        ("cpu", "float32", ("as-stored",))


# -- the worker's registry -----------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=backends())
def worker(request, tmp_path_factory):
    with database(request.param, tmp_path_factory.mktemp("precision")) as url, WorkerProcess(url, TOKEN) as proc:
        yield proc


@pytest.fixture
def client(worker):
    with WorkerClient(worker.url, TOKEN) as c:
        yield c
        for n in c.list_nodes():
            c.delete_node(n["node_id"])


def _runs(node: dict) -> tuple:
    return node["device"], node["device_name"], node["dtype"], node["weights"], node["device_memory_bytes"]


def test_williw_node_registers_its_device_dtype_and_weights(client, worker, tmp_path):
    cpu = describe_device("cpu")
    proc = subprocess.Popen([str(VENV_BIN / "williw"), "node", "--worker", worker.url, "--node-id", "agent-bf16",
                             "--compute-tflops", "1", "--memory-gb", "2", "--data-dir", str(tmp_path), "--token",
                             TOKEN, "--serve-host", "none", "--dtype", "bfloat16", "--weights", "int8", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline()]
        while lines[-1] not in ("}\n", ""):  # --json prints indented objects
            lines.append(proc.stdout.readline())
        first = json.loads("".join(lines))
        node = wait_for("the agent's registration", lambda: next(
            (n for n in client.list_nodes() if n["node_id"] == "agent-bf16"), None), timeout=60)
    finally:
        proc.terminate()
        proc.wait(10)
    expected = ("cpu", cpu["name"], "bfloat16", ["int8"], cpu["memory_bytes"])
    assert _runs(node) == _runs(client.get_node("agent-bf16")) == expected  # --device auto: this machine's CPU
    assert (first["status"], first["device"], first["dtype"], first["weights"]) == ("running", "cpu", "bfloat16",
                                                                                   ["int8"])


def test_old_clients_register_a_cpu_node_at_float32_as_stored(client, worker):
    r = httpx.post(f"{worker.url}/api/nodes", json={"node_id": "old", "compute_tflops": 1, "memory_gb": 1},
                   headers=ADMIN)
    assert r.status_code == 201
    assert _runs(r.json()["node"]) == _runs(client.get_node("old")) == ("cpu", None, "float32", ["as-stored"], None)
    # Registering again states the node anew; the client sends only what it is given.
    client.register_node("old", 1, 1, device="cuda", device_name="NVIDIA H100 80GB HBM3", dtype="bfloat16",
                         weights=("int4", "int8"), device_memory_bytes=85_045_231_616)
    assert _runs(client.get_node("old")) == ("cuda", "NVIDIA H100 80GB HBM3", "bfloat16", ["int8", "int4"],
                                             85_045_231_616)
    client.register_node("old", 1, 1)
    assert _runs(client.get_node("old")) == ("cpu", None, "float32", ["as-stored"], None)


@pytest.mark.parametrize(("field", "value", "detail"), [
    ("device", "tpu", "body field 'device': must be one of cpu, cuda, mps, got 'tpu'"),
    ("dtype", "float64", "body field 'dtype': must be one of float32, bfloat16, float16, got 'float64'"),
    ("weights", ["int8", "int8"], "body field 'weights': must be a non-empty list of as-stored, int8, int4 (each at "
                                  "most once), got ['int8', 'int8']"),
    ("weights", [], "body field 'weights': must be a non-empty list of as-stored, int8, int4 (each at most once), "
                    "got []"),
    ("weights", "int8", "body field 'weights': Input should be a valid list"),
    ("device_memory_bytes", -1, "body field 'device_memory_bytes': Input should be greater than or equal to 0"),
    # formats the device cannot run: refused as `williw node` refuses them (a breaker registered both)
    ({"device": "mps", "dtype": "float16"}, ["int8", "int4"],
     "body: weights int8, int4 cannot run on device mps at float16: torch has no int4 kernel for MPS"),
    ({"device": "cuda", "dtype": "float16"}, ["int4"],
     "body: weights int4 cannot run on device cuda at float16: torch's CUDA int4 kernel (tinygemm) "
     "computes in bfloat16, not float16"),
])
def test_bad_registry_fields_are_one_line_422s(worker, field, value, detail):
    extra = {**field, "weights": value} if isinstance(field, dict) else {field: value}
    body = {"node_id": "bad", "compute_tflops": 1, "memory_gb": 1, **extra}
    r = httpx.post(f"{worker.url}/api/nodes", json=body, headers=ADMIN)
    assert (r.status_code, r.json()["detail"]) == (422, detail)


def test_the_worker_hands_them_to_the_planner(client, worker):
    from williw.worker.service import WorkerSettings, planning_job

    client.register_node("gpu", 312, 80, device="cuda", device_name="NVIDIA A100", dtype="bfloat16",
                         weights=["as-stored", "int8", "int4"], device_memory_bytes=85_899_345_920)
    client.register_node("cpu", 1, 8)
    request_id = client.create_request("t/m")["request_id"]
    store = Store(worker.db_url)
    try:
        job = planning_job(store, WorkerSettings(worker.db_url), request_id, metadata={"m": 1}, metadata_repo=None)
    finally:
        store.close()
    fleet = job.args[2]  # `williw.worker.planning.plan_dict`'s fleet
    assert fleet == [{"node_id": "cpu", "compute_tflops": 1.0, "memory_gb": 8.0, "labels": []},
                     {"node_id": "gpu", "compute_tflops": 312.0, "memory_gb": 80.0, "labels": [], "device": "cuda",
                      "dtype": "bfloat16", "weights": ["as-stored", "int8", "int4"]}]
    assert [(n.device, n.dtype, n.weights) for n in parse_nodes(fleet)] == [
        ("cpu", "float32", ("as-stored",)), ("cuda", "bfloat16", ("as-stored", "int8", "int4"))]


def test_a_version_4_database_reads_its_nodes_as_cpu_float32_as_stored(tmp_path):
    from williw.worker import schema

    path = tmp_path / "v4.db"
    with sqlite3.connect(path) as db:  # what williw with migrations 1 to 4 left behind
        db.execute(schema.SCHEMA_VERSION_DDL)
        for version, name, statements in schema.MIGRATIONS[:4]:
            for statement in statements:
                db.execute(statement)
            db.execute("INSERT INTO williw_schema_version VALUES (?, ?, 0)", (version, name))
        db.execute("INSERT INTO nodes VALUES ('n', 1.0, 2.0, NULL, NULL, '[]', 'h', 1, 2, 3, NULL, 5.0, NULL)")
    store = Store(str(path))
    try:
        assert store.schema_version() == 5
        assert store.list_nodes() == [NodeRecord("n", 1.0, 2.0, None, None, (), 1.0, 2.0, 3.0, 5.0, None)]
        record, _ = store.upsert_node({"node_id": "n", "compute_tflops": 1.0, "memory_gb": 2.0, "device": "cuda",
                                       "dtype": "float16", "weights": ("int8",), "device_memory_bytes": 2**40}, None,
                                      9.0)
        assert (record.device, record.dtype, record.weights, record.device_memory_bytes) == \
            ("cuda", "float16", ("int8",), 2**40)
    finally:
        store.close()


# -- the stage a node loads ------------------------------------------------------------------------------------

RID = "0" * 32


class _Stages:
    """A node's `StageService` whose stage build is recorded instead of run (`williw.runtime.load_host`)."""

    def __init__(self, tmp_path: Path, monkeypatch, entry: dict, **runs) -> None:
        from williw.node_stages import StageService
        from williw.planner.plan import NodeAssignment, Plan

        plan = Plan("pipeline", (NodeAssignment("a", (), 0.0, 0.0, stage=0, blocks=(0, 2)),
                                 NodeAssignment("b", (), 0.0, 0.0, stage=1, blocks=(2, 4)))).to_dict()
        plan["b"].update(entry)
        shard = tmp_path / RID / "v1" / "b"
        shard.mkdir(parents=True)
        (shard / "model.safetensors").write_bytes(b"")
        self.calls: list[dict] = []
        self.built = threading.Event()

        def load_host(shard_dir, blocks, where, **kwargs):
            self.calls.append({"blocks": blocks, **kwargs})
            self.built.set()
            return SimpleNamespace(stage=SimpleNamespace(blocks=blocks))

        config = SimpleNamespace(get_text_config=lambda: SimpleNamespace(num_hidden_layers=4))
        monkeypatch.setattr("williw.runtime.load_host", load_host)
        monkeypatch.setattr("williw.stages.load_config", lambda shard_dir: config)
        self.service = StageService(tmp_path, "b", lambda r, v: plan, lambda r: {"batch_size": 2,
                                                                                  "sequence_length": 16}, **runs)

    def get(self) -> dict:
        status, _, body, _ = self.service("GET", f"/stage/{RID}/v1", b"")
        assert status == 200
        return json.loads(body)

    def load(self) -> dict:
        self.service.preload(RID, 1)
        return wait_for("the stage load", lambda: (s := self.get())["state"] in ("loaded", "failed") and s, 10)


def test_a_node_runs_its_stage_in_the_format_the_plan_chose(tmp_path, monkeypatch):
    stages = _Stages(tmp_path, monkeypatch, {"weights": "int8", "dtype": "bfloat16"}, device="cpu",
                     dtype="bfloat16", weights=("as-stored", "int8"))
    assert {k: stages.get()[k] for k in ("state", "device", "dtype", "weights")} == \
        {"state": "not loaded", "device": None, "dtype": None, "weights": None}
    state = stages.load()
    assert {k: state[k] for k in ("state", "blocks", "device", "dtype", "weights")} == \
        {"state": "loaded", "blocks": [2, 4], "device": "cpu", "dtype": "bfloat16", "weights": "int8"}
    assert stages.calls == [{"blocks": (2, 4), "max_sessions": 2, "max_tokens": 16, "dtype": "bfloat16",
                             "weights": "int8", "device": "cpu"}]


def test_without_a_choice_in_the_plan_a_node_runs_its_first_format(tmp_path, monkeypatch):
    stages = _Stages(tmp_path, monkeypatch, {}, dtype="float16", weights=("int8", "int4"))
    assert {k: stages.load()[k] for k in ("device", "dtype", "weights")} == \
        {"device": "cpu", "dtype": "float16", "weights": "int8"}
    assert (stages.calls[0]["weights"], stages.calls[0]["dtype"]) == ("int8", "float16")


def test_a_plan_choosing_a_format_the_node_does_not_accept_is_one_line(tmp_path, monkeypatch):
    stages = _Stages(tmp_path, monkeypatch, {"weights": "int4"}, weights=("as-stored", "int8"))
    state = stages.load()
    message = ("node 'b': plan version 1 runs its stage with weights 'int4', which this node does not accept (it "
               "accepts as-stored, int8: williw node --weights)")
    assert (state["state"], state["error"], stages.calls) == ("failed", message, [])
    started = time.monotonic()
    status, _, body, headers = stages.service("POST", f"/stage/{RID}/v1/forward?session={'1' * 32}&start=0", b"")
    assert (status, body.decode(), headers) == (409, message + "\n", {"X-Williw-Node": "b"})
    assert time.monotonic() - started < 5
