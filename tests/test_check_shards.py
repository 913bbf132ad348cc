"""check-shards catches what can go wrong after a split: a flipped byte, a missing tensor, another plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from test_split_helpers import greedy_plan, pipeline_plan
from williw.fsutil import write_json
from williw.planner.plan import save_plan
from williw.shards import read_manifest, sha256_file
from williw.splitter import check_shards, split_all


@pytest.fixture
def split(tiny_llama_sharded: Path, tmp_path: Path):
    plan = pipeline_plan(tiny_llama_sharded)
    split_all(tiny_llama_sharded, plan, tmp_path / "shards")
    save_plan(plan, tmp_path / "plan.json")
    return plan, tmp_path / "shards", tiny_llama_sharded


def _data_offset(path: Path, name: str) -> int:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return 8 + n + json.loads(raw[8:8 + n])[name]["data_offsets"][0]


def test_a_tampered_byte_is_named(split):
    plan, shards, model = split
    shard = shards / "stage-1" / "model.safetensors"
    name = "model.layers.2.mlp.up_proj.weight"
    data = bytearray(shard.read_bytes())
    data[_data_offset(shard, name) + 1000] ^= 0x01
    shard.write_bytes(bytes(data))

    report = check_shards(shards, plan, model)

    assert not report.ok
    assert report.problems == (f"node 'stage-1': '{shard}' does not match the sha256 in its manifest",
                               f"node 'stage-1': tensor '{name}' differs from the model's at byte 1,000")
    assert [n.ok for n in report.nodes] == [True, False, True]


def test_a_missing_tensor_is_named_even_with_a_consistent_manifest(split):
    plan, shards, model = split
    shard_dir = shards / "stage-2"
    tensors = load_file(shard_dir / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, shard_dir / "model.safetensors", metadata={"format": "pt"})
    manifest = read_manifest(shard_dir).to_dict()
    manifest["tensors"] = [t for t in manifest["tensors"] if t["name"] != "model.norm.weight"]
    manifest["file_sha256"] = sha256_file(shard_dir / "model.safetensors")
    manifest["file_bytes"] = (shard_dir / "model.safetensors").stat().st_size
    write_json(shard_dir / "shard.json", manifest)

    report = check_shards(shards, plan, model)

    assert report.problems == ("node 'stage-2': the manifest's tensor list differs from the tensors in "
                               f"'{shard_dir / 'model.safetensors'}'",
                               "node 'stage-2': tensor 'model.norm.weight' of the plan is missing from the shard",
                               "tensor 'model.norm.weight' of the model is in no shard")


def test_a_missing_shard_and_another_plan(split, tmp_path: Path):
    plan, shards, model = split
    (shards / "stage-0" / "shard.json").unlink()
    other = greedy_plan(model)
    report = check_shards(shards, plan, model)
    assert report.problems[0] == (f"node 'stage-0': '{shards / 'stage-0' / 'shard.json'}': no shard manifest "
                                  "(the shard is missing or its split did not finish)")
    assert report.unassigned[0] == "model.embed_tokens.weight"
    report = check_shards(shards, other, model)
    assert report.nodes[0].problems[0] == f"node 'node_000': '{shards / 'node_000' / 'shard.json'}': no shard " \
                                          "manifest (the shard is missing or its split did not finish)"


def test_cli_check_shards_exits_1_and_lists_problems(split, williw, tmp_path: Path):
    plan, shards, model = split
    shard = shards / "stage-0" / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x80
    shard.write_bytes(bytes(data))
    proc = williw("check-shards", str(shards), "--plan", str(tmp_path / "plan.json"), "--model", str(model), "--json")
    assert proc.returncode == 1
    result = json.loads(proc.stdout)
    assert result["ok"] is False and [n["ok"] for n in result["nodes"]] == [False, True, True]
    assert result["problems"][0] == f"node 'stage-0': '{shard}' does not match the sha256 in its manifest"
