"""A node's shard of a new plan version, gathered from its own old shard, a peer's shard server and the model:
byte-identical to a fresh split, and each source sends exactly the bytes it is asked for (its server counts)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from williw.errors import PlanError
from williw.fleet import Node
from williw.gather import gather_shard
from williw.metadata import generate_metadata
from williw.planner import MODEL_SOURCE, migration_schedule, pipeline_from_cuts
from williw.serve import ModelServer
from williw.shards import read_manifest
from williw.splitter import split_all

NODES = [Node("a", 10.0, 1.0), Node("b", 10.0, 1.0), Node("c", 10.0, 1.0)]


@pytest.fixture
def setup(tiny_llama_sharded: Path, tmp_path: Path):
    meta = generate_metadata(tiny_llama_sharded)
    v1 = pipeline_from_cuts(meta, [1, 3], ["a", "b", "c"])  # a: 0, b: 1-2, c: 3 (+ norm, head)
    v2 = dataclasses.replace(pipeline_from_cuts(meta, [2], ["a", "b"]), version=2)  # c left: a 0-1, b 2-3
    split_all(tiny_llama_sharded, v1, tmp_path / "v1")
    fresh = {r.node_id: Path(r.shard_path).read_bytes() for r in split_all(tiny_llama_sharded, v2, tmp_path / "ref")}
    model = ModelServer(tiny_llama_sharded).start()
    peers = ModelServer(tmp_path / "v1").start()  # serves <node>/model.safetensors, as an agent's shard server
    yield meta, v1, v2, fresh, model, peers
    model.shutdown()
    peers.shutdown()


def _peer_map(schedule, node_id: str, url: str) -> dict[str, str]:
    return {t: f"{url}/{s.source}" for s in schedule.steps if s.action == "pull" and s.node_id == node_id
            and s.source != MODEL_SOURCE for t in s.tensors}


def test_gathered_shards_equal_a_fresh_split_and_each_source_sends_only_its_part(setup, tmp_path: Path) -> None:
    meta, v1, v2, fresh, model, peers = setup
    live = [n for n in NODES if n.node_id != "c"]
    schedule = migration_schedule(meta, v1, v2, live)
    size = {x.name: x.bytes for x in meta.layers}
    for node_id in ("a", "b"):
        model.bytes_sent.clear()
        peers.bytes_sent.clear()
        r = gather_shard(model.url, v2, node_id, tmp_path / "v2", local=[tmp_path / "v1" / node_id],
                         peers=_peer_map(schedule, node_id, peers.url), first_range_bytes=64)
        assert Path(r.shard_dir, "model.safetensors").read_bytes() == fresh[node_id]
        pulls = [s for s in schedule.steps if s.action == "pull" and s.node_id == node_id]
        from_model = {t for s in pulls if s.source == MODEL_SOURCE for t in s.tensors}
        from_peers = {t for s in pulls if s.source != MODEL_SOURCE for t in s.tensors}
        kept = set(v2.node(node_id).tensor_names) - from_model - from_peers
        assert r.local_bytes == sum(size[t] for t in kept) > 0
        assert r.model_bytes == sum(size[t] for t in from_model)
        assert sum(r.peer_bytes.values()) == sum(size[t] for t in from_peers)
        assert r.peer_failures == ()
        # The servers' own counts: tensor bytes plus the headers (exactly, with a 64-byte first range).
        sent_model = sum(v for f, v in model.bytes_sent.items() if f.endswith(".safetensors"))
        sent_peers = sum(v for f, v in peers.bytes_sent.items() if f.endswith(".safetensors"))
        assert sent_model - r.model_bytes < 4096 and sent_model >= r.model_bytes
        assert sent_peers - sum(r.peer_bytes.values()) < 4096 and sent_peers >= sum(r.peer_bytes.values())
    # a takes block 1 from b (a peer), b takes block 3 and the head from the model (c, which held them, left)
    assert {(s.node_id, s.source) for s in schedule.steps if s.action == "pull"} == {("a", "b"), ("b", MODEL_SOURCE)}


def test_an_unreachable_peer_falls_back_to_the_model(setup, tmp_path: Path) -> None:
    meta, v1, v2, fresh, model, peers = setup
    schedule = migration_schedule(meta, v1, v2, NODES[:2])
    dead = {t: "http://127.0.0.1:9/b" for t in _peer_map(schedule, "a", peers.url)}
    r = gather_shard(model.url, v2, "a", tmp_path / "v2", local=[tmp_path / "v1" / "a"], peers=dead,
                     backoff_s=0.01)
    assert Path(r.shard_dir, "model.safetensors").read_bytes() == fresh["a"]
    assert r.peer_failures == ("http://127.0.0.1:9/b",)
    assert r.peer_bytes == {} and r.model_bytes > 0


def test_without_local_shards_or_peers_it_is_a_plain_pull(setup, tmp_path: Path) -> None:
    meta, v1, v2, fresh, model, peers = setup
    r = gather_shard(model.url, v2, "b", tmp_path / "v2", local=[tmp_path / "missing"])
    assert Path(r.shard_dir, "model.safetensors").read_bytes() == fresh["b"]
    assert (r.local_bytes, r.peer_bytes) == (0, {})
    assert Path(r.shard_dir, "config.json").read_bytes() == Path(model.root, "config.json").read_bytes()


def test_an_unknown_node_is_refused_before_any_request(setup, tmp_path: Path) -> None:
    meta, v1, v2, fresh, model, peers = setup
    with pytest.raises(PlanError, match=r"^node 'zz' is not in the plan \(nodes: a, b\)$"):
        gather_shard(model.url, v2, "zz", tmp_path / "v2")
    assert not model.bytes_sent


def test_a_node_whose_tensors_did_not_change_gets_a_hard_link_and_a_new_manifest(setup, tmp_path: Path,
                                                                               tiny_llama_sharded: Path) -> None:
    meta, v1, _v2, _fresh, model, _peers = setup
    v2 = dataclasses.replace(pipeline_from_cuts(meta, [1], ["a", "b"]), version=2)  # a keeps block 0
    want = Path(split_all(tiny_llama_sharded, v2, tmp_path / "ref2", node_ids=["a"])[0].shard_path).read_bytes()
    old = tmp_path / "v1" / "a" / "model.safetensors"
    r = gather_shard(model.url, v2, "a", tmp_path / "v2", local=[tmp_path / "v1" / "a"])
    new = Path(r.shard_dir, "model.safetensors")
    assert (r.linked, r.skipped, r.model_bytes, r.bytes_downloaded) == (True, False, 0, 0)
    assert new.stat().st_ino == old.stat().st_ino and new.read_bytes() == want
    assert read_manifest(r.shard_dir).plan_sha256 == v2.digest()
    # the manifest a fresh split writes, but for the source named
    assert read_manifest(r.shard_dir) == dataclasses.replace(read_manifest(tmp_path / "ref2" / "a"), source=model.url)
    assert not model.bytes_sent
    again = gather_shard(model.url, v2, "a", tmp_path / "v2", local=[tmp_path / "v1" / "a"])
    assert (again.linked, again.skipped) == (True, True)


def test_a_new_node_gathers_everything_from_peers_and_never_asks_the_model(setup, tmp_path: Path) -> None:
    meta, v1, v2, fresh, model, peers = setup
    holder = {t: a.node_id for a in v1.assignments for t in a.tensor_names}
    mapping = {t: f"{peers.url}/{holder[t]}" for t in v2.node("b").tensor_names}
    r = gather_shard(model.url, v2, "b", tmp_path / "v2", peers=mapping)  # b as a newcomer: nothing local
    assert Path(r.shard_dir, "model.safetensors").read_bytes() == fresh["b"]
    assert (r.local_bytes, r.model_bytes) == (0, 0)
    assert dict(model.bytes_sent) == {}  # not even config.json: it came from a peer's shard folder
    assert Path(r.shard_dir, "config.json").read_bytes() == Path(model.root, "config.json").read_bytes()


def test_tensors_from_several_places_are_laid_out_in_the_models_order(tiny_llama_sharded: Path,
                                                                      tmp_path: Path) -> None:
    """b keeps block 2 and takes blocks 0-1 (and the embeddings) from a peer: the shard is still in model order,
    byte-identical to a fresh split, not grouped by where the bytes came from."""
    meta = generate_metadata(tiny_llama_sharded)
    v1 = pipeline_from_cuts(meta, [2], ["a", "b"])
    v2 = dataclasses.replace(pipeline_from_cuts(meta, [3], ["b", "a"]), version=2)  # b: [0, 3), a: [3, 4)
    split_all(tiny_llama_sharded, v1, tmp_path / "v1")
    fresh = Path(split_all(tiny_llama_sharded, v2, tmp_path / "ref", node_ids=["b"])[0].shard_path).read_bytes()
    model = ModelServer(tiny_llama_sharded).start()
    peers = ModelServer(tmp_path / "v1").start()
    try:
        mapping = {t: f"{peers.url}/a" for t in v1.node("a").tensor_names}
        r = gather_shard(model.url, v2, "b", tmp_path / "v2", local=[tmp_path / "v1" / "b"], peers=mapping)
        assert r.local_bytes > 0 and sum(r.peer_bytes.values()) > 0 and r.model_bytes == 0
        assert Path(r.shard_dir, "model.safetensors").read_bytes() == fresh
        assert not any(f.endswith(".safetensors") for f in model.bytes_sent)  # the order came from manifests
    finally:
        model.shutdown()
        peers.shutdown()
