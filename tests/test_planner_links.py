"""A link table for pairs of nodes: the file format, the pricing of a hop on the pair's link, and plans that are
the exhaustive optimum over every node order and cut with the links priced (written here from the definitions)."""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_planner_pipeline import stage_cost
from test_planner_runtime import draw_runtime_meta, runtime_meta
from williw.cli import cli
from williw.errors import InfeasiblePlan, NodesError, PlanError
from williw.fleet import Fleet, Link, Node, load_fleet, load_nodes, parse_fleet, parse_nodes
from williw.metadata import ModelMetadata, save_metadata
from williw.planner import make_plan
from williw.planner.costs import transfer_time
from williw.planner.plan import Plan

NODES = [{"node_id": "a", "compute_tflops": 1, "memory_gb": 1}, {"node_id": "b", "compute_tflops": 1, "memory_gb": 1},
         {"node_id": "c", "compute_tflops": 1, "memory_gb": 1}]


def test_a_fleet_file_with_links(tmp_path) -> None:
    links = [{"between": ["a", "b"], "network_gbps": 0.1, "latency_ms": 20}, {"between": ["c", "a"], "latency_ms": 0}]
    (tmp_path / "f.json").write_text(json.dumps({"nodes": NODES, "links": links}))
    (tmp_path / "f.yaml").write_text(f"nodes: {json.dumps(NODES)}\nlinks: {json.dumps(links)}\n")
    nodes = tuple(Node(x["node_id"], 1.0, 1.0) for x in NODES)
    expected = Fleet(nodes, (Link(("a", "b"), 0.1, 20.0), Link(("c", "a"), None, 0.0)))
    assert load_fleet(tmp_path / "f.json") == load_fleet(tmp_path / "f.yaml") == expected
    assert load_nodes(tmp_path / "f.json") == list(nodes)  # for the callers that plan without links
    assert expected.to_dict() == {"nodes": NODES, "links": links}
    assert parse_fleet(NODES, "f") == Fleet(nodes, ())


@pytest.mark.parametrize(("links", "message"), [
    ({"between": ["a", "b"]}, "'f': field 'links' must be a list of {\"between\": [node_id, node_id], "
                              "\"network_gbps\": ..., \"latency_ms\": ...}, got {'between': ['a', 'b']}"),
    ([5], "'f': link 0: expected an object with between and network_gbps or latency_ms, got 5"),
    ([{"between": ["a", "b"], "latency": 1}],
     "'f': link 0: unknown field 'latency' (fields: between, network_gbps, latency_ms)"),
    ([{"between": "a-b", "latency_ms": 1}], "'f': link 0: field 'between' must be a list of two node ids, got 'a-b'"),
    ([{"between": ["a", "b", "c"], "latency_ms": 1}],
     "'f': link 0: field 'between' must be a list of two node ids, got ['a', 'b', 'c']"),
    ([{"between": ["a", "b"], "latency_ms": 1}, {"between": ["a", "x"], "latency_ms": 1}],
     "'f': link 1: field 'between' names 'x', which is not a node of the file"),
    ([{"between": ["b", "b"], "latency_ms": 1}], "'f': link 0: field 'between' links node 'b' to itself"),
    ([{"between": ["a", "b"], "latency_ms": 1}, {"between": ["c", "a"], "latency_ms": 1},
      {"between": ["b", "a"], "network_gbps": 1}], "'f': link 2 ('b'-'a'): the pair is already listed by link 0"),
    ([{"between": ["a", "b"]}], "'f': link 0 ('a'-'b'): give network_gbps, latency_ms or both"),
    ([{"between": ["a", "b"], "network_gbps": 0}],
     "'f': link 0 ('a'-'b'): field 'network_gbps' must be a finite number in [1e-6, 1e9], got 0"),
    ([{"between": ["a", "b"], "latency_ms": -1}],
     "'f': link 0 ('a'-'b'): field 'latency_ms' must be a finite number in [0, 1e9], got -1"),
    ([{"between": ["a", "b"], "latency_ms": True}],
     "'f': link 0 ('a'-'b'): field 'latency_ms' must be a finite number in [0, 1e9], got True"),
])
def test_bad_links_name_the_link_and_field(links, message) -> None:
    for parse in (parse_fleet, parse_nodes):
        with pytest.raises(NodesError) as exc:
            parse({"nodes": NODES, "links": links}, "f")
        assert str(exc.value) == message


def test_unknown_top_level_field() -> None:
    with pytest.raises(NodesError) as exc:
        parse_fleet({"nodes": NODES, "link": []}, "f")
    assert str(exc.value) == "'f': unknown field 'link' (fields: nodes, links)"


def test_a_link_prices_both_ends_and_a_missing_field_falls_back_to_each_end() -> None:
    a = Node("a", 1.0, 1.0, network_gbps=2.0, latency_ms=1.0)
    b = Node("b", 1.0, 1.0)
    assert transfer_time(4e9, a) == 0.001 + 2.0
    assert transfer_time(4e9, a, Link(("a", "b"), 1.0, 20.0)) == transfer_time(4e9, b, Link(("a", "b"), 1.0, 20.0)) \
        == 0.02 + 4.0
    only_latency = Link(("a", "b"), None, 20.0)
    assert (transfer_time(4e9, a, only_latency), transfer_time(4e9, b, only_latency)) == (0.02 + 2.0, 0.02)
    only_speed = Link(("a", "b"), 8.0, None)
    assert (transfer_time(4e9, a, only_speed), transfer_time(4e9, b, only_speed)) == (0.001 + 0.5, 0.5)


def test_make_plan_refuses_a_link_to_a_node_not_in_the_fleet() -> None:
    meta = runtime_meta([(10, 5, 0, 0, 0, 0)] * 2)
    with pytest.raises(PlanError, match="^the link between 'a' and 'z' names node 'z', which is not in the fleet$"):
        make_plan(meta, [Node("a", 1.0, 1.0)], links=[Link(("a", "z"), 1.0)])


def _three(link_ms: float) -> tuple[ModelMetadata, list[Node], list[Link]]:
    # Two blocks of 10 GFLOPs and 5 bytes; the first group 1 byte, the last group 1 GFLOP and 3 bytes: a first
    # stage needs 6 bytes, a last one 8, both blocks together 14. c (6 bytes) can only be first; no node holds
    # both blocks. No hidden size and no own links: a hop costs only what a pair link says.
    meta = runtime_meta([(10, 5, 0, 0, 0, 0)] * 2, first=(0, 1), last=(1, 3))
    nodes = [Node("a", 2.0, 8e-9), Node("b", 1.0, 8e-9), Node("c", 1.25, 6e-9)]
    return meta, nodes, [Link(("a", "c"), None, link_ms)]


def test_a_slow_pair_link_changes_the_plan() -> None:
    # Seconds (first stage 10 GFLOPs, last 11): a 0.005 / 0.0055, b 0.01 / 0.011, c 0.008 first only.
    # Without links: (c, a) max(0.008, 0.0055) = 0.008 beats (b, a) 0.01, (a, b) 0.011 and (c, b) 0.011.
    meta, nodes, links = _three(5.0)
    free = make_plan(meta, nodes)
    assert free.node_ids == ("c", "a") and free.bottleneck_s == 0.008 and free.exact is True
    assert "transfers_s" not in free.extra
    # A 5 ms link between a and c: both ends pay it, (c, a) becomes max(0.013, 0.0105) = 0.013, and (b, a) at
    # 0.01 wins (b and a are not a listed pair: their own links, free here).
    slow = make_plan(meta, nodes, links=links)
    assert slow.node_ids == ("b", "a") and slow.bottleneck_s == 0.01 and slow.exact is True
    assert [a.stage_time_s for a in slow.assignments] == [0.01, 0.0055]
    # A 1 ms link: (c, a) at max(0.009, 0.0065) still wins, and the plan shows the hop on both ends.
    fast = make_plan(meta, nodes, links=[dataclasses.replace(links[0], latency_ms=1.0)])
    assert fast.node_ids == ("c", "a") and fast.bottleneck_s == 0.008 + 0.001
    assert [a.stage_time_s for a in fast.assignments] == [0.008 + 0.001, 0.0055 + 0.001]
    assert fast.extra["transfers_s"] == [{"node_id": "c", "prefill": [0.0, 0.001], "decode": [0.0, 0.001]},
                                         {"node_id": "a", "prefill": [0.001, 0.0], "decode": [0.001, 0.0]}]


def test_a_node_between_a_slow_pair_needs_a_shorter_run_before_it() -> None:
    # Blocks of 1, 10 and 1 GFLOPs (1 byte each); the first group 11 bytes, the last 10. Only u (10 TFLOPS, 13
    # bytes) holds the first group, so u is first; w (1 TFLOPS, 5 bytes) holds one block and no group; z (1
    # TFLOPS, 11 bytes) holds the last group with one block. Without links: (u, z), u [0, 2) in 0.0011 s.
    meta = runtime_meta([(1, 1, 0, 0, 0, 0), (10, 1, 0, 0, 0, 0), (1, 1, 0, 0, 0, 0)], first=(0, 11), last=(0, 10))
    nodes = [Node("u", 10.0, 13e-9), Node("w", 1.0, 5e-9), Node("z", 1.0, 11e-9)]
    assert make_plan(meta, nodes).node_ids == ("u", "z")
    # A 10 ms link between u and z: (u, z) costs 0.0011 + 0.01 on u. Going through w avoids the link, but w cannot
    # take block 2 (z needs it with the last group) and holds block 1 in 0.01 s: u must stop after block 0, not
    # run as far as it can (the longest run, [0, 2), leaves w nothing).
    plan = make_plan(meta, nodes, links=[Link(("z", "u"), None, 10.0)])
    assert plan.node_ids == ("u", "w", "z")
    assert [a.blocks for a in plan.assignments] == [(0, 1), (1, 2), (2, 3)]
    assert plan.bottleneck_s == 0.01 and plan.exact is True


def test_williw_plan_reads_the_links(tmp_path, williw) -> None:
    meta, nodes, links = _three(5.0)
    save_metadata(meta, tmp_path / "meta.json")
    fleet = Fleet(tuple(nodes), tuple(links)).to_dict()
    (tmp_path / "fleet.json").write_text(json.dumps(fleet))
    result = CliRunner().invoke(cli, ["plan", str(tmp_path / "meta.json"), "--nodes", str(tmp_path / "fleet.json"),
                                      "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["@plan"]["stages"] == ["b", "a"] and plan["@plan"]["bottleneck_s"] == 0.01
    text = CliRunner().invoke(cli, ["plan", str(tmp_path / "meta.json"), "--nodes", str(tmp_path / "fleet.json")])
    assert text.exit_code == 0, text.output
    assert text.output.splitlines()[0].split()[-4:] == ["decode", "receive", "send", "util"]
    fleet["links"].append({"between": ["c", "a"], "latency_ms": 1})
    (tmp_path / "fleet.json").write_text(json.dumps(fleet))
    bad = williw("plan", str(tmp_path / "meta.json"), "--nodes", str(tmp_path / "fleet.json"))
    assert (bad.returncode, bad.stdout) == (2, "")
    assert bad.stderr == f"error: '{tmp_path / 'fleet.json'}': link 1 ('c'-'a'): the pair is already listed by " \
                         f"link 0\n"


def linked_cost(meta: ModelMetadata, node: Node, p: int, e: int, objective: str, batch: int, context: int,
                receive: Link | None, send: Link | None) -> tuple[float, int]:
    """(objective time, memory) of blocks [p, e) on node: amount / rate from `stage_cost` on the node without its
    own link, plus receiving and sending, each on the pair's link when listed (a field it leaves out from the
    node's own link), else on the node's own link."""
    bare = dataclasses.replace(node, network_gbps=None, latency_ms=None)
    t, memory = stage_cost(meta, bare, p, e, objective, batch, context)

    def side(nbytes: int, link: Link | None) -> float:
        latency = link.latency_ms if link and link.latency_ms is not None else node.latency_ms
        gbps = link.network_gbps if link and link.network_gbps is not None else node.network_gbps
        return (latency or 0) / 1000 + (nbytes / (gbps * 1e9) if gbps else 0.0)

    tokens = meta.sequence_length if objective == "prefill" else 1
    hidden = (meta.hidden_size or 0) * meta.element_bytes
    moved = [batch * tokens * (8 if edge else hidden) for edge in (p == 0, e == len(meta.blocks))]
    return t + side(moved[0], receive) + side(moved[1], send), memory


def brute_force_links(meta: ModelMetadata, nodes: list[Node], links: list[Link], objective: str, batch: int,
                      context: int) -> float | None:
    """min over every sequence of distinct nodes and every cut of the max (sum for ``latency``) stage time, each
    stage priced with its two neighbours; memoised on (next block, nodes used, previous node, this node)."""
    n = len(meta.blocks)
    usable = [v for v in nodes if objective == "prefill" or v.memory_bandwidth_gbps is not None]
    pair = {frozenset(x.between): x for x in links}
    combine = (lambda a, b: a + b) if objective == "latency" else max
    priced = "decode" if objective == "latency" else objective

    @lru_cache(maxsize=None)
    def best(p: int, used: frozenset[str], prev: str | None, v: Node) -> float | None:
        receive = pair.get(frozenset((prev, v.node_id))) if prev else None
        out = None
        for e in range(p + 1, n + 1):
            for x in ([None] if e == n else [x for x in usable if x.node_id not in used and x is not v]):
                t, memory = linked_cost(meta, v, p, e, priced, batch, context, receive,
                                        pair.get(frozenset((v.node_id, x.node_id))) if x else None)
                if memory > v.memory_bytes - v.reserve_bytes:
                    continue
                rest = 0.0 if x is None else best(e, used | {v.node_id}, v.node_id, x)
                if rest is not None:
                    cand = combine(t, rest)
                    out = cand if out is None else min(out, cand)
        return out

    found = [t for v in usable if (t := best(0, frozenset(), None, v)) is not None]
    return min(found) if found else None


@st.composite
def linked_instances(draw, max_nodes: int = 6, max_blocks: int = 6, min_nodes: int = 1):
    meta = draw_runtime_meta(draw, max_blocks)
    k = draw(st.integers(min_nodes, max_nodes))
    speeds = st.none() | st.sampled_from([1e-9, 4e-9, 1e-8, 1e-6])
    latencies = st.none() | st.sampled_from([0.0, 1e-6, 0.01])
    nodes = [Node(f"n{i}", float(draw(st.integers(1, 8))), draw(st.integers(1, 90)) / 1e9,
                  draw(st.none() | st.integers(1, 8).map(float)), network_gbps=draw(speeds),
                  latency_ms=draw(latencies),
                  memory_reserve_gb=draw(st.none() | st.integers(0, 10).map(lambda x: x / 1e9)))
             for i in range(k)]
    links = []
    for i in range(k):
        for j in range(i + 1, k):
            if draw(st.booleans()):
                speed, latency = draw(speeds), draw(latencies)
                if speed is None and latency is None:
                    latency = 0.02
                links.append(Link((f"n{j}", f"n{i}") if draw(st.booleans()) else (f"n{i}", f"n{j}"), speed, latency))
    return meta, nodes, links, draw(st.integers(1, 3)), draw(st.integers(1, 12))


def _exact_optimum(objective: str, expected: float | None, plan_with_links) -> Plan | None:
    """``plan_with_links()`` is exact at ``expected`` (bit-equal; the latency sums to 1e-12), or infeasible when it
    is None; returns the plan."""
    if expected is None:
        with pytest.raises(InfeasiblePlan):
            plan_with_links()
        return None
    plan = plan_with_links()
    assert plan.exact is True
    if objective == "latency":
        assert plan.bottleneck_s == pytest.approx(expected, rel=1e-12, abs=1e-300)
    else:
        assert plan.bottleneck_s == expected
    return plan


@pytest.mark.parametrize("objective", ["prefill", "decode", "latency"])
@settings(max_examples=70, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=linked_instances())
def test_plans_with_links_are_the_exhaustive_optimum(objective: str, case) -> None:
    meta, nodes, links, batch, context = case
    expected = brute_force_links(meta, nodes, links, objective, batch, context)
    plan = _exact_optimum(objective, expected, lambda: make_plan(
        meta, nodes, objective=objective, batch_size=batch, context_length=context, links=links))
    if plan is None:
        return
    if objective != "latency":
        assert plan.lower_bound_s == plan.bottleneck_s
    # The reported stage times are those of the definitions, with each stage's neighbours.
    assert [a.stage_time_s for a in plan.assignments] == priced(meta, plan, nodes, links, "prefill", batch, context)


def priced(meta: ModelMetadata, plan, nodes: list[Node], links: list[Link], objective: str, batch: int,
           context: int) -> list[float]:
    """Each stage's time under ``objective`` (``latency`` as decode) from the definitions, with its neighbours."""
    pair = {frozenset(x.between): x for x in links}
    by_id = {v.node_id: v for v in nodes}
    ids = plan.node_ids
    out = []
    for j, a in enumerate(plan.assignments):
        hops = [pair.get(frozenset(ids[j - 1:j + 1])) if j > 0 else None,
                pair.get(frozenset(ids[j:j + 2])) if j + 1 < len(ids) else None]
        out.append(linked_cost(meta, by_id[a.node_id], *a.blocks, "prefill" if objective == "prefill" else "decode",
                               batch, context, *hops)[0])
    return out


@pytest.mark.parametrize("objective", ["prefill", "decode", "latency"])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=linked_instances(min_nodes=9, max_nodes=10))
def test_beyond_the_exact_limit_the_plan_is_never_worse_than_the_link_free_one(objective: str, case) -> None:
    # More candidates than `links.EXACT_MAX_NODES`: the fixed-order search seeded by the link-free plan. Its plan
    # is priced with its neighbours, lies above the transfer-free bound, and is at most the link-free plan's cost
    # with the links priced.
    meta, nodes, links, batch, context = case
    kw = {"objective": objective, "batch_size": batch, "context_length": context}
    try:
        free = make_plan(meta, nodes, **kw)
    except InfeasiblePlan:
        with pytest.raises(InfeasiblePlan):
            make_plan(meta, nodes, links=links, **kw)
        return
    plan = make_plan(meta, nodes, links=links, **kw)
    combine = sum if objective == "latency" else max
    cost = combine(priced(meta, plan, nodes, links, objective, batch, context))
    assert plan.bottleneck_s == pytest.approx(cost, rel=1e-12, abs=1e-300)
    assert plan.bottleneck_s <= combine(priced(meta, free, nodes, links, objective, batch, context)) * (1 + 1e-12)
    assert plan.lower_bound_s <= plan.bottleneck_s


@pytest.mark.parametrize("objective", ["prefill", "decode", "latency"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=linked_instances(max_blocks=8), speed=st.sampled_from([None, 4e-9, 1e-6]),
       latency=st.sampled_from([None, 0.0, 0.01]))
def test_links_that_price_like_the_own_links_give_the_link_free_optimum(objective: str, case, speed,
                                                                        latency) -> None:
    # Every node on the same own link and every listed pair on that same link: the link search (another code
    # path: its own programs, no dominance pruning among linked nodes) must find the link-free search's optimum.
    meta, nodes, links, batch, context = case
    nodes = [dataclasses.replace(v, network_gbps=speed, latency_ms=latency) for v in nodes]
    links = [Link(x.between, speed, latency if speed is None else None) for x in links]
    try:
        today = make_plan(meta, nodes, objective=objective, batch_size=batch, context_length=context).bottleneck_s
    except InfeasiblePlan:  # the message may differ: it names the candidates, which dominance changes
        today = None
    _exact_optimum(objective, today, lambda: make_plan(
        meta, nodes, objective=objective, batch_size=batch, context_length=context, links=links))


@pytest.mark.parametrize("objective", ["prefill", "latency"])
def test_the_link_search_keeps_to_the_time_limit_on_a_large_fleet(objective: str) -> None:
    # 2,000 nodes and 400 blocks with a chain of listed pairs: the fixed-order link search alone takes many
    # seconds; past --time-limit it ends with the best plan so far (at worst the link-free plan), not proven.
    import time

    meta = runtime_meta([(10, 100, 0, 0, 0, 0)] * 400, hidden=4, first=(0, 0), last=(0, 0))
    nodes = [Node(f"n{i}", 1.0 + i % 97, (300 + i % 89) * 100 / 1e9, 1.0 + i % 83, network_gbps=1e-6,
                  latency_ms=0.01 * (i % 7)) for i in range(2000)]
    links = tuple(Link((f"n{i}", f"n{i + 1}"), network_gbps=1e-7, latency_ms=1.0) for i in range(0, 400, 2))
    t = time.monotonic()
    plan = make_plan(meta, nodes, objective=objective, time_limit_s=0.5, links=links)
    assert time.monotonic() - t < 5  # the limit, plus pruning, the bound and the model (8-12 s before)
    assert plan.exact is False
    assert plan.assignments[0].blocks[0] == 0 and plan.assignments[-1].blocks[1] == 400
