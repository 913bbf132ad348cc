"""The workflow with a repo id (issue 18): the user's node reads config and headers only, the nodes pull their
ranges from the Hub at the commit the metadata was read at; and a worker that makes the metadata itself."""
# ruff: noqa: F811

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hubserver import FakeHub, fake_hub  # noqa: F401 - the fixture
from williw.client import WorkerClient, WorkerHTTPError
from williw.metadata import generate_metadata
from williw.planner.plan import Plan
from williw.splitter import split_all
from williw.workflow import NodeClient
from williw.workflow.embedded import EmbeddedWorker
from workerproc import WorkerProcess

# 300 KB each against a 0.66 MB model: no two nodes can hold it, so the plan has three stages.
NODES = [{"node_id": "node-a", "compute_tflops": 8.0, "memory_gb": 0.00042},
         {"node_id": "node-b", "compute_tflops": 4.0, "memory_gb": 0.00042},
         {"node_id": "node-c", "compute_tflops": 2.0, "memory_gb": 0.00042}]


def test_run_with_a_repo_id_downloads_no_weights_on_the_users_node(fake_hub: FakeHub, tiny_llama_sharded: Path,
                                                                   tmp_path: Path) -> None:
    repo = fake_hub.add_repo("org/m", tiny_llama_sharded)
    worker = EmbeddedWorker(tmp_path / "worker.db").start()
    try:
        worker.start_local_nodes(NODES, tmp_path / "fleet")
        result = NodeClient(worker.url, node_id="user", work_dir=tmp_path / "user", timeout_s=60) \
            .execute_complete_workflow("org/m", 1, 32)
    finally:
        worker.stop()

    steps = {s.step: s for s in result.steps}
    assert steps["download"].status == "skipped" and result.source == "org/m" and result.model_dir == ""
    # The user's node holds the run's JSON files, and nothing of the model (no download, nothing in the HF cache).
    user_files = sorted(p.relative_to(tmp_path / "user").as_posix() for p in (tmp_path / "user").rglob("*")
                        if p.is_file())
    assert user_files == ["metadata.json", "plan.json", "run-state.json"]
    assert not [p for p in (tmp_path / "hf-home").rglob("*") if p.is_file()]
    meta = json.loads((tmp_path / "user" / "metadata.json").read_text())
    assert meta["commit"] == repo.sha
    # Every node pulled at that commit, and each shard is byte-identical to the split's.
    weights = [p for m, p, _ in fake_hub.requests if p.endswith(".safetensors")]
    assert weights and all(f"/resolve/{repo.sha}/" in p for p in weights)
    plan = Plan.from_dict(result.plan)
    assert len(plan.assignments) == 3
    split_all(tiny_llama_sharded, plan, tmp_path / "split", model_name="org/m")
    for node, shard in result.shards.items():
        assert (Path(shard["shard_path"]) / "model.safetensors").read_bytes() == \
            (tmp_path / "split" / node / "model.safetensors").read_bytes(), node


def test_worker_makes_the_metadata_from_the_model_repo(tmp_path: Path, tiny_llama: Path) -> None:
    meta = json.loads(json.dumps(generate_metadata(tiny_llama, model_name="org/tiny").to_dict()))
    with FakeHub() as hub:
        hub.add_repo("org/tiny", tiny_llama)
        with WorkerProcess(f"sqlite:///{tmp_path / 'w.db'}", extra_args=("--hub-endpoint", hub.url)) as proc, \
                WorkerClient(proc.url) as client:
            client.register_node("hub-node", 10.0, 8.0)
            rid = client.create_request("org/tiny", sequence_length=512)["request_id"]
            from_headers = client.process(rid, model_repo="org/tiny")
            inline = client.process(client.create_request("org/tiny")["request_id"], metadata=meta)
            assert from_headers["plan"] == inline["plan"]
            assert hub.sent("org/tiny", ".safetensors") == FIRST_RANGE

            missing = client.create_request("org/absent")["request_id"]
            with pytest.raises(WorkerHTTPError) as exc:
                client.process(missing, model_repo="org/absent")
            assert exc.value.status_code == 502
            assert exc.value.detail == (
                f"request '{missing}' failed: cannot read the headers of Hub model 'org/absent': model "
                f"'org/absent' was not found on {hub.url}: check the name, or if it is private set HF_TOKEN (or "
                "pass --token) to a token that can read it")
            with pytest.raises(WorkerHTTPError) as exc:
                client.process(rid, model_repo="org/tiny", metadata=meta)
            assert exc.value.status_code == 422


FIRST_RANGE = 100_000
