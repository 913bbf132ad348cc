"""williw pull: a node's shard fetched by HTTP ranges is the split's shard, and only its bytes cross the wire."""
# ruff: noqa: F811

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from conftest import run_williw
from hubserver import FakeHub, fake_hub  # noqa: F401 - the fixture
from test_split_helpers import greedy_plan, pipeline_plan
from williw.errors import CheckpointError, HubError
from williw.planner.plan import save_plan
from williw.pull import pull_shard
from williw.remote import merge_intervals
from williw.shards import read_manifest
from williw.splitter import split_all


def _layout(model_dir: Path) -> dict[str, tuple[int, dict[str, tuple[int, int]]]]:
    """file -> (data start, tensor -> absolute [start, end)), read without williw."""
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        data = f.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        header.pop("__metadata__", None)
        out[f.name] = (8 + n, {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
                               for k, v in header.items()})
    return out


def _expected_sent(model_dir: Path, names: tuple[str, ...], first_range: int) -> dict[str, int]:
    """Bytes each weights file must send: its first range (or whole header) and the node's tensors, once."""
    out = {}
    for file, (data_start, spans) in _layout(model_dir).items():
        size = (model_dir / file).stat().st_size
        prefix = (0, min(size, max(first_range, data_start)))
        merged = merge_intervals([prefix] + [spans[n] for n in names if n in spans])
        out[file] = sum(hi - lo for lo, hi in merged)
    return out


def _same_shard(pulled: Path, split: Path) -> None:
    assert (pulled / "model.safetensors").read_bytes() == (split / "model.safetensors").read_bytes()
    a, b = read_manifest(pulled), read_manifest(split)
    assert a.to_dict() == {**b.to_dict(), "source": a.source}
    assert sorted(p.name for p in pulled.iterdir()) == sorted(p.name for p in split.iterdir())


@pytest.mark.parametrize(("model", "plan_kind"), [("tiny_llama", "pipeline"), ("tiny_llama_sharded", "greedy")])
def test_pulled_shards_equal_the_split_and_only_their_bytes_are_sent(fake_hub: FakeHub, model: str, plan_kind: str,
                                                                      request, tmp_path: Path) -> None:
    model_dir: Path = request.getfixturevalue(model)
    plan = pipeline_plan(model_dir) if plan_kind == "pipeline" else greedy_plan(model_dir)
    fake_hub.add_repo("org/m", model_dir, files={"model.onnx": b"o" * 999})
    split_all(model_dir, plan, tmp_path / "split", model_name="m")
    for a in plan.assignments:
        fake_hub.bytes_sent.clear()
        r = pull_shard("org/m", plan, a.node_id, tmp_path / "pulled", model_name="m")
        _same_shard(tmp_path / "pulled" / a.node_id, tmp_path / "split" / a.node_id)
        expected = _expected_sent(model_dir, a.tensor_names, 100_000)
        assert {f: fake_hub.bytes_sent["org/m", f] for f in expected} == expected
        side = sum(n for (_, f), n in fake_hub.bytes_sent.items() if not f.endswith(".safetensors"))
        assert r.bytes_downloaded == sum(expected.values()) + side
        assert r.shard_bytes == (tmp_path / "split" / a.node_id / "model.safetensors").stat().st_size
    assert fake_hub.bytes_sent["org/m", "model.onnx"] == 0


def test_bytes_sent_are_at_most_the_shard_plus_the_headers(fake_hub: FakeHub, tiny_llama_sharded: Path,
                                                            tmp_path: Path) -> None:
    plan = pipeline_plan(tiny_llama_sharded)
    fake_hub.add_repo("org/m", tiny_llama_sharded)
    headers = sum(start for start, _ in _layout(tiny_llama_sharded).values())
    for a in plan.assignments:
        fake_hub.bytes_sent.clear()
        fake_hub.requests.clear()
        r = pull_shard("org/m", plan, a.node_id, tmp_path, first_range_bytes=64)  # every header: a second range
        weights = fake_hub.sent("org/m", ".safetensors")
        assert weights == r.tensor_bytes + headers == r.header_bytes + r.tensor_bytes
        assert weights <= r.shard_bytes + headers
        # One range per run of adjacent tensors, plus two per file for its header.
        runs = sum(len(merge_intervals([s[n] for n in a.tensor_names if n in s]))
                   for _, s in _layout(tiny_llama_sharded).values())
        assert sum(len(fake_hub.ranges(f"/{f}")) for f in _layout(tiny_llama_sharded)) == runs + 2 * len(
            _layout(tiny_llama_sharded))


def test_failed_ranges_are_retried_and_resumed(fake_hub: FakeHub, tiny_llama: Path, tmp_path: Path) -> None:
    plan = pipeline_plan(tiny_llama)
    node = plan.assignments[1]
    fake_hub.add_repo("org/m", tiny_llama)
    split_all(tiny_llama, plan, tmp_path / "split", node_ids=[node.node_id])
    (lo, hi), = merge_intervals([_layout(tiny_llama)["model.safetensors"][1][n] for n in node.tensor_names])
    fake_hub.fail("/model.safetensors", status=503)  # the header read, once
    fake_hub.fail("/model.safetensors", cut_after=50_000, after=2)  # then the tensors, cut
    fake_hub.fail("/model.safetensors", status=502, after=3)  # and their resumption, once
    pull_shard("org/m", plan, node.node_id, tmp_path / "pulled", backoff_s=0.01)
    _same_shard(tmp_path / "pulled" / node.node_id, tmp_path / "split" / node.node_id)
    assert fake_hub.ranges("/model.safetensors") == ["bytes=0-99999", "bytes=0-99999", f"bytes={lo}-{hi - 1}",
                                                     f"bytes={lo + 50_000}-{hi - 1}", f"bytes={lo + 50_000}-{hi - 1}"]
    assert fake_hub.sent("org/m") - fake_hub.sent("org/m", ".json") == \
        _expected_sent(tiny_llama, node.tensor_names, 100_000)["model.safetensors"]


def test_a_range_that_keeps_failing_gives_up_with_one_line(fake_hub: FakeHub, tiny_llama: Path,
                                                           tmp_path: Path) -> None:
    fake_hub.add_repo("org/m", tiny_llama)
    fake_hub.fail("/model.safetensors", status=503, times=10)
    with pytest.raises(HubError) as exc:
        pull_shard("org/m", pipeline_plan(tiny_llama), "stage-0", tmp_path, backoff_s=0.001)
    url = f"{fake_hub.url}/org/m/resolve/{fake_hub.repos['org/m'].sha}/model.safetensors"
    assert str(exc.value) == f"'{url}': 503 Service Unavailable after 5 retries; try again later"
    assert not (tmp_path / "stage-0").exists()


def test_pull_from_a_plain_model_server(tiny_llama: Path, tmp_path: Path) -> None:
    from williw.serve import ModelServer

    plan = pipeline_plan(tiny_llama)
    split_all(tiny_llama, plan, tmp_path / "split", node_ids=["stage-2"])
    server = ModelServer(tiny_llama).start()
    try:
        r = pull_shard(server.url, plan, "stage-2", tmp_path / "pulled")
    finally:
        server.shutdown()
        server.server_close()
    _same_shard(tmp_path / "pulled" / "stage-2", tmp_path / "split" / "stage-2")
    expected = _expected_sent(tiny_llama, plan.node("stage-2").tensor_names, 100_000)["model.safetensors"]
    assert server.bytes_sent["model.safetensors"] == expected
    assert r.source == server.url and read_manifest(tmp_path / "pulled" / "stage-2").source == server.url


def test_remote_input_is_checked(fake_hub: FakeHub, tiny_llama: Path, tmp_path: Path) -> None:
    plan = pipeline_plan(tiny_llama)
    index = {"weight_map": {"model.embed_tokens.weight": "../../etc/passwd"}}
    fake_hub.add_repo("org/evil", files={"model.safetensors.index.json": json.dumps(index).encode(),
                                         "model.safetensors": b""})
    with pytest.raises(HubError) as exc:
        pull_shard("org/evil", plan, "stage-0", tmp_path)
    assert str(exc.value) == ("'org/evil': model.safetensors.index.json names '../../etc/passwd', which is not a "
                              "file name in the model")
    bad = struct.pack("<Q", 10 ** 12) + b"{}"
    fake_hub.add_repo("org/corrupt", files={"model.safetensors": bad})
    with pytest.raises(CheckpointError) as exc2:
        pull_shard("org/corrupt", plan, "stage-0", tmp_path)
    assert str(exc2.value) == ("Failed to parse safetensors header for 'model.safetensors': header length "
                               "1,000,000,000,000 exceeds the 100,000,000-byte limit (not a safetensors file, or "
                               "corrupt)")
    fake_hub.add_repo("org/onnx-only", files={"model.onnx": b"x", "config.json": b"{}"})
    with pytest.raises(HubError) as exc:
        pull_shard("org/onnx-only", plan, "stage-0", tmp_path)
    assert str(exc.value) == ("'org/onnx-only' has no safetensors weights; williw pull reads only safetensors: run "
                              "williw download, then williw split")
    fake_hub.add_repo("org/gated", tiny_llama, gated=True)
    with pytest.raises(HubError) as exc:
        pull_shard("org/gated", plan, "stage-0", tmp_path)
    assert str(exc.value).startswith("'org/gated' is a gated model: accept its conditions at ")
    assert list(tmp_path.iterdir()) == []


def test_cli_pull_json(fake_hub: FakeHub, tiny_llama_sharded: Path, tmp_path: Path) -> None:
    plan = greedy_plan(tiny_llama_sharded)
    save_plan(plan, tmp_path / "plan.json")
    fake_hub.add_repo("org/m", tiny_llama_sharded, private=True)
    fake_hub.add_token("hf_member")
    split_all(tiny_llama_sharded, plan, tmp_path / "split", node_ids=["node_001"], model_name="m")
    env = {"HF_ENDPOINT": fake_hub.url, "HF_HOME": str(tmp_path / "home"), "HF_TOKEN": "hf_member"}
    proc = run_williw("pull", "org/m", "--plan", str(tmp_path / "plan.json"), "--node", "node_001", "-o",
                      str(tmp_path / "pulled"), "--json", env=env, check=True)
    out = json.loads(proc.stdout)
    _same_shard(tmp_path / "pulled" / "node_001", tmp_path / "split" / "node_001")
    assert out["status"] == "written" and out["bytes_downloaded"] == fake_hub.sent("org/m")
    again = json.loads(run_williw("pull", "org/m", "--plan", str(tmp_path / "plan.json"), "--node", "node_001",
                                  "-o", str(tmp_path / "pulled"), "--json", env=env, check=True).stdout)
    assert again["status"] == "skipped"


def test_pull_reads_the_same_files_as_the_split(fake_hub: FakeHub, tiny_llama: Path, tmp_path: Path) -> None:
    # Mistral's own consolidated copy next to model.safetensors: neither its header nor its bytes are read.
    plan = pipeline_plan(tiny_llama)
    fake_hub.add_repo("org/m", tiny_llama,
                      files={"consolidated.safetensors": (tiny_llama / "model.safetensors").read_bytes()})
    split_all(tiny_llama, plan, tmp_path / "split", model_name="m")
    a = plan.assignments[0]

    pull_shard("org/m", plan, a.node_id, tmp_path / "pulled", model_name="m")

    _same_shard(tmp_path / "pulled" / a.node_id, tmp_path / "split" / a.node_id)
    assert fake_hub.bytes_sent["org/m", "consolidated.safetensors"] == 0
