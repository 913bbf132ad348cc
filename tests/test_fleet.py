"""Nodes files: JSON or YAML, every bad entry named with its field."""

from __future__ import annotations

import json

import pytest

from williw.errors import NodesError
from williw.fleet import Node, check_node_id, load_nodes, parse_nodes


def test_json_yaml_and_wrapped_lists(tmp_path) -> None:
    entries = [{"node_id": "gpu-a", "compute_tflops": 312, "memory_gb": 80, "memory_bandwidth_gbps": 2039,
                "labels": ["a100"]},
               {"node_id": "cpu.1", "compute_tflops": 1.5, "memory_gb": 0.29, "network_gbps": 1.25}]
    (tmp_path / "n.json").write_text(json.dumps(entries))
    (tmp_path / "n.yaml").write_text("nodes:\n" + "".join(
        f"  - {json.dumps(e)}\n" for e in entries))
    expected = [Node("gpu-a", 312.0, 80.0, 2039.0, None, ("a100",)), Node("cpu.1", 1.5, 0.29, None, 1.25)]
    assert load_nodes(tmp_path / "n.json") == expected
    assert load_nodes(tmp_path / "n.yaml") == expected
    assert expected[1].memory_bytes == 290_000_000
    assert [n.to_dict() for n in expected] == entries


@pytest.mark.parametrize(("entries", "message"), [
    ([], "'f': expected a non-empty list of nodes (or {\"nodes\": [...]}), got []"),
    ({"x": 1}, "'f': expected a non-empty list of nodes (or {\"nodes\": [...]}), got dict"),
    ([5], "'f': entry 0: expected an object with node_id, compute_tflops, memory_gb, got 5"),
    ([{"node_id": "a/b", "compute_tflops": 1, "memory_gb": 1}],
     "'f': entry 0: node_id must be 1-64 characters from A-Z a-z 0-9 . _ - (and not '.' or '..'), got 'a/b'"),
    ([{"compute_tflops": 1, "memory_gb": 1}],
     "'f': entry 0: node_id must be 1-64 characters from A-Z a-z 0-9 . _ - (and not '.' or '..'), got None"),
    ([{"node_id": "a", "compute_tflops": 1, "memory_gb": 1}, {"node_id": "b", "compute_tflops": 1}],
     "'f': entry 1 (node 'b'): missing field 'memory_gb'"),
    ([{"node_id": "a", "compute_tflops": -1, "memory_gb": 1}],
     "'f': entry 0 (node 'a'): field 'compute_tflops' must be a finite number in [1e-6, 1e9], got -1"),
    ([{"node_id": "a", "compute_tflops": 1, "memory_gb": float("inf")}],
     "'f': entry 0 (node 'a'): field 'memory_gb' must be a finite number in [1e-9, 1e9], got inf"),
    ([{"node_id": "a", "compute_tflops": True, "memory_gb": 1}],
     "'f': entry 0 (node 'a'): field 'compute_tflops' must be a finite number in [1e-6, 1e9], got True"),
    ([{"node_id": "a", "compute_tflops": 1, "memory_gb": 1, "memory_bandwidth_gbps": 0}],
     "'f': entry 0 (node 'a'): field 'memory_bandwidth_gbps' must be a finite number in [1e-6, 1e9], got 0"),
    ([{"node_id": "a", "compute_tflops": 5e-324, "memory_gb": 1}],
     "'f': entry 0 (node 'a'): field 'compute_tflops' must be a finite number in [1e-6, 1e9], got 5e-324"),
    ([{"node_id": "a", "compute_tflops": 1, "memory_gb": 1e308}],
     "'f': entry 0 (node 'a'): field 'memory_gb' must be a finite number in [1e-9, 1e9], got 1e+308"),
    ([{"node_id": "a", "compute_tflops": 10**400, "memory_gb": 1}],
     "'f': entry 0 (node 'a'): field 'compute_tflops' must be a finite number in [1e-6, 1e9], got "
     "10000000000000000000...(401 characters)"),
    ([{"node_id": "a", "compute_tflops": 1, "memory_gb": 1, "memroy_gb": 2}],
     "'f': entry 0 (node 'a'): unknown field 'memroy_gb' (fields: node_id, compute_tflops, memory_gb, "
     "memory_bandwidth_gbps, network_gbps, latency_ms, memory_reserve_gb, labels, device, dtype, weights)"),
    ([{"node_id": "a", "compute_tflops": 1, "memory_gb": 1, "labels": "x"}],
     "'f': entry 0 (node 'a'): field 'labels' must be a list of strings, got 'x'"),
    ([{"node_id": "a", "compute_tflops": 1, "memory_gb": 1}, {"node_id": "a", "compute_tflops": 2, "memory_gb": 1}],
     "'f': entry 1 (node 'a'): duplicate node_id, already used by entry 0"),
])
def test_bad_entries_name_the_entry_and_field(entries, message) -> None:
    with pytest.raises(NodesError) as exc:
        parse_nodes(entries, "f")
    assert str(exc.value) == message


@pytest.mark.parametrize("node_id", [".", "..", "", "a" * 65, "a b", "x@y", 7])
def test_node_ids_that_cannot_be_folders(node_id) -> None:
    with pytest.raises(NodesError, match="^here: node_id must be"):
        check_node_id(node_id, "here")


@pytest.mark.parametrize("node_id", ["a", "...", ".a", "node_001", "A-9.b_c", "a" * 64])
def test_node_ids_that_can(node_id) -> None:
    assert check_node_id(node_id, "here") == node_id


def test_unreadable_files(tmp_path) -> None:
    with pytest.raises(NodesError, match=r"^'.*nope\.json': no such nodes file$"):
        load_nodes(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(NodesError, match=r"^'.*bad\.json': not valid JSON \(Expecting"):
        load_nodes(tmp_path / "bad.json")
    (tmp_path / "bad.yml").write_text("- [")
    with pytest.raises(NodesError, match=r"^'.*bad\.yml': not valid YAML \("):
        load_nodes(tmp_path / "bad.yml")


def test_yaml_that_python_cannot_walk(tmp_path) -> None:
    # Integer keys (1 < "x" raised TypeError), nesting past PyYAML's recursion (RecursionError) and an alias bomb
    # (9^8 items from 400 bytes: its full repr took 8 s and 500 MB) are each one line.
    (tmp_path / "keys.yaml").write_text("- {node_id: a, compute_tflops: 1, memory_gb: 1, 1: 2, x: 3}\n")
    with pytest.raises(NodesError) as exc:
        load_nodes(tmp_path / "keys.yaml")
    assert str(exc.value) == (f"'{tmp_path / 'keys.yaml'}': entry 0 (node 'a'): unknown field '1' (fields: node_id, "
                              "compute_tflops, memory_gb, memory_bandwidth_gbps, network_gbps, latency_ms, "
                              "memory_reserve_gb, labels, device, dtype, weights)")
    for depth in (65, 5000):
        (tmp_path / "deep.yaml").write_text("nodes: " + "[" * depth + "]" * depth + "\n")
        with pytest.raises(NodesError) as exc:
            load_nodes(tmp_path / "deep.yaml")
        assert str(exc.value) == (f"'{tmp_path / 'deep.yaml'}': not valid YAML for a nodes file (nested deeper "
                                  "than 64 levels)")
    lines = ["- node_id: a", "  memory_gb: 1", "  compute_tflops:", "  - &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"  - &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 8)]
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    with pytest.raises(NodesError) as exc:
        load_nodes(tmp_path / "bomb.yaml")
    assert str(exc.value) == (f"'{tmp_path / 'bomb.yaml'}': entry 0 (node 'a'): field 'compute_tflops' must be a "
                              "finite number in [1e-6, 1e9], got [['x', 'x', 'x', 'x', ...], [[...], [...], [...], "
                              "[...], ...], [[...], [...], [...], [...], ...], [[...], [...], [...], [...], ...], "
                              "...]")
