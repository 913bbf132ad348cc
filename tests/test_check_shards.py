"""check-shards catches what can go wrong after a split: a flipped byte, a missing tensor, another plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_split_helpers import greedy_plan, pipeline_plan
from williw.fsutil import write_json
from williw.planner.plan import Plan, save_plan
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


def _rewrite_shard(shard_dir: Path, tensors: dict) -> None:
    """Save ``tensors`` as the shard's weights and make its manifest agree (names in file order, size, sha256),
    so that only the check under test can object."""
    save_file(tensors, shard_dir / "model.safetensors", metadata={"format": "pt"})
    manifest = read_manifest(shard_dir).to_dict()
    raw = (shard_dir / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    order = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    by_name = {t["name"]: t for t in manifest["tensors"]}
    manifest["tensors"] = [by_name.get(k, {**manifest["tensors"][0], "name": k}) for k in order]
    manifest["file_sha256"] = sha256_file(shard_dir / "model.safetensors")
    manifest["file_bytes"] = len(raw)
    write_json(shard_dir / "shard.json", manifest)


def test_shards_cut_for_another_plan_are_named(split):
    plan, shards, model = split
    other = Plan.from_dict({**plan.to_dict(), "@plan": {**plan.to_dict()["@plan"], "model_name": "other/model"}})
    assert [a.tensor_names for a in other.assignments] == [a.tensor_names for a in plan.assignments]
    assert other.digest() != plan.digest()

    report = check_shards(shards, other, model)

    assert report.problems == tuple(
        f"node '{a.node_id}': the shard was cut for another plan (plan_sha256 {plan.digest()[:12]}, expected "
        f"{other.digest()[:12]})" for a in plan.assignments)
    assert check_shards(shards, plan, model).ok


def test_a_tensor_of_another_dtype_or_shape_is_named(split):
    plan, shards, model = split
    shard_dir = shards / "stage-1"
    tensors = load_file(shard_dir / "model.safetensors")
    up, down = "model.layers.2.mlp.up_proj.weight", "model.layers.2.mlp.down_proj.weight"
    shape_up, shape_down = list(tensors[up].shape), list(tensors[down].shape)
    tensors[up] = tensors[up].view(torch.int32)  # the same bytes, read as another dtype
    tensors[down] = tensors[down].reshape(-1)  # the same bytes, another shape
    _rewrite_shard(shard_dir, tensors)

    report = check_shards(shards, plan, model)

    assert sorted(report.problems) == sorted((
        f"node 'stage-1': tensor '{up}' is I32 {shape_up} in the shard but F32 {shape_up} in the model",
        f"node 'stage-1': tensor '{down}' is F32 [{shape_down[0] * shape_down[1]}] in the shard but F32 "
        f"{shape_down} in the model"))


def test_a_tensor_beyond_the_plan_is_named(split):
    plan, shards, model = split
    tensors = load_file(shards / "stage-0" / "model.safetensors")
    tensors["model.norm.weight"] = load_file(shards / "stage-2" / "model.safetensors")["model.norm.weight"]
    _rewrite_shard(shards / "stage-0", tensors)

    report = check_shards(shards, plan, model)

    assert report.problems == ("node 'stage-0': tensor 'model.norm.weight' is in the shard but not in the plan",)
    assert [n.ok for n in report.nodes] == [False, True, True]
