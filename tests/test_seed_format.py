"""The seed document's own formats work everywhere (issue 16): its metadata example (section "元数据格式" of
001_3db2fb4e272570cb.txt, copied verbatim below: torch dtype names, no bytes, block or placement) is read by
``validate``, ``plan`` and the worker's ``/api/process``, and its plan example by ``show-plan``."""

from __future__ import annotations

import json

import httpx

from williw.metadata import ModelMetadata
from williw.planner.plan import Plan
from workerproc import WorkerProcess, database

SEED_METADATA = """{
  "model_name": "meta-llama/Llama-3.2-1B-Instruct",
  "model_type": "transformer",
  "batch_size": 1,
  "sequence_length": 512,
  "layers": [
    {
      "name": "transformer.h.0.attn.q_proj.weight",
      "shape": [4096, 4096],
      "num_params": 16777216,
      "compute_required": 134.22,
      "layer_type": "attention",
      "dtype": "torch.float32"
    }
  ],
  "total_compute": 1234.56,
  "total_layers": 100
}"""

SEED_PLAN = """{
  "node_001": {
    "layer_names": ["layer1", "layer2"],
    "total_compute": 100.0,
    "compute_utilization": 0.5
  }
}"""

NOTE = ("'{}': seed-format metadata: block and placement, bytes derived from shapes, dtypes and names "
        "(1 tensors, 1 blocks)")
NODES = [{"node_id": "node_001", "compute_tflops": 10, "memory_gb": 1},
         {"node_id": "node_002", "compute_tflops": 5, "memory_gb": 1}]


def test_seed_metadata_is_read_with_derived_fields():
    meta = ModelMetadata.from_dict(json.loads(SEED_METADATA), "seed.json")
    (x,) = meta.layers
    assert (x.dtype, x.bytes, x.num_params, x.block, x.placement) == ("F32", 4096 * 4096 * 4, 16777216, 0, "block")
    assert [(b.index, b.tensors, b.bytes, b.compute) for b in meta.blocks] == [(0, 1, 67108864, 134.22)]
    assert meta.notes == (NOTE.format("seed.json"),)
    assert "notes" not in meta.to_dict()
    bf16 = json.loads(SEED_METADATA.replace("torch.float32", "torch.bfloat16"))
    assert ModelMetadata.from_dict(bf16).layers[0].bytes == 4096 * 4096 * 2


def test_seed_metadata_through_plan_and_validate(williw, tmp_path):
    meta, nodes = tmp_path / "seed.json", tmp_path / "nodes.json"
    meta.write_text(SEED_METADATA)
    nodes.write_text(json.dumps(NODES))
    for strategy in ("greedy", "pipeline"):
        plan = tmp_path / f"{strategy}.json"
        r = williw("plan", str(meta), "--nodes", str(nodes), "--strategy", strategy, "-o", str(plan), "--json")
        assert (r.returncode, r.stderr) == (0, f"note: {NOTE.format(meta)}\n")
        assert Plan.from_dict(json.loads(plan.read_text())).node("node_001").layer_names == (
            "transformer.h.0.attn.q_proj.weight",)
        r = williw("validate", str(meta), str(plan), "--nodes", str(nodes))
        assert (r.returncode, r.stdout) == (0, f"{plan}: valid {strategy} plan, 1 nodes, 1 tensors\n")


def test_seed_plan_example_is_read(williw, tmp_path):
    plan = tmp_path / "seed_plan.json"
    plan.write_text(SEED_PLAN)
    assert Plan.from_dict(json.loads(SEED_PLAN)).node("node_001").layer_names == ("layer1", "layer2")
    r = williw("show-plan", str(plan), "--svg", str(tmp_path / "p.svg"))
    assert (r.returncode, r.stdout) == (0, f"wrote {tmp_path / 'p.svg'} (1 node bars)\n")


def test_worker_plans_the_seed_metadata(tmp_path):
    token = "seed-token"
    admin = {"Authorization": f"Bearer {token}"}
    with database("sqlite", tmp_path) as url, WorkerProcess(url, token) as worker:
        for n in NODES:
            assert httpx.post(f"{worker.url}/api/nodes", json=n, headers=admin).status_code == 201
        rid = httpx.post(f"{worker.url}/api/request", json={"model_name": "meta-llama/Llama-3.2-1B-Instruct"},
                         headers=admin).json()["request_id"]
        r = httpx.post(f"{worker.url}/api/process", json={"request_id": rid, "metadata": json.loads(SEED_METADATA),
                                                          "strategy": "greedy"}, headers=admin)
        assert r.status_code == 200, r.text
        plan = Plan.from_dict(r.json()["plan"])
        assert plan.node("node_001").layer_names == ("transformer.h.0.attn.q_proj.weight",)
