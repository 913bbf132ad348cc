"""The pipeline plan is the exhaustive optimum over node subsets and orders, on random small instances."""

from __future__ import annotations

import itertools
from functools import lru_cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from williw.errors import InfeasiblePlan, PlanError
from williw.fleet import Node
from williw.metadata import BlockMeta, LayerMeta, ModelMetadata, TiedHead, generate_metadata
from williw.planner import make_plan, validate_split_plan


def build_meta(blocks: list[tuple[int, int]], first: tuple[int, int] = (0, 1), last: tuple[int, int] = (1, 1),
               tied: tuple[int, int] | None = None) -> ModelMetadata:
    """Blocks of (GFLOPs, bytes) with one tensor each; first/last groups as (GFLOPs, bytes); a tied head as
    (GFLOPs, bytes of the embedding it reuses)."""
    emb_bytes = tied[1] if tied else first[1]
    layers = [LayerMeta("emb", (1,), "F32", 1, emb_bytes, float(first[0]), "embedding", None, "first", "")]
    metas = []
    for i, (c, b) in enumerate(blocks):
        layers.append(LayerMeta(f"h.{i}.w", (1,), "F32", 1, b, float(c), "mlp", i, "block", ""))
        metas.append(BlockMeta(i, 1, 1, b, float(c), 0.0))
    layers.append(LayerMeta("head", (1,), "F32", 1, last[1], float(last[0]), "lm_head", None, "last", ""))
    head = TiedHead("emb", float(tied[0]), tied[1]) if tied else None
    total = sum(x.compute_required for x in layers) + (head.compute_required if head else 0)
    return ModelMetadata(1, "toy", "toy", None, "safetensors", 1, 8, None, tuple(layers), tuple(metas), head,
                         total, len(layers), sum(x.bytes for x in layers), len(layers))


def stage_cost(meta: ModelMetadata, node: Node, p: int, e: int, objective: str, batch: int | None = None,
               context: int | None = None) -> tuple[float, int]:
    """(objective time, memory bytes) of blocks [p, e) on node, written from the issues' definitions: weights +
    KV cache for B sequences of C tokens (capped at windows, plus states) + the largest block transient at B·S
    (and the logits B·S·vocab·e on the last stage, when the metadata knows run-time memory); time = amount / rate
    plus receiving and sending on the node's own link (latency + bytes / bandwidth)."""
    n = len(meta.blocks)
    b_, c_, s_ = batch or meta.batch_size, context or meta.sequence_length, meta.sequence_length
    compute = sum(b.compute for b in meta.blocks[p:e])
    nbytes = sum(b.bytes for b in meta.blocks[p:e])
    kv = sum(b_ * (b.kv_bytes_per_token * (min(c_, b.kv_window) if b.kv_window else c_) + b.state_bytes)
             for b in meta.blocks[p:e])
    act = max((b_ * s_ * b.activation_bytes_per_token for b in meta.blocks[p:e]), default=0)
    if p == 0:
        compute += sum(x.compute_required for x in meta.layers if x.placement == "first")
        nbytes += sum(x.bytes for x in meta.layers if x.placement == "first")
    if e == n:
        compute += sum(x.compute_required for x in meta.layers if x.placement == "last")
        nbytes += sum(x.bytes for x in meta.layers if x.placement == "last")
        if meta.tied_lm_head:
            compute += meta.tied_lm_head.compute_required
            if p > 0:
                nbytes += meta.tied_lm_head.bytes
    if e == n and any(b.activation_bytes_per_token for b in meta.blocks):
        heads = [x for x in meta.layers if x.layer_type == "lm_head" or meta.tied_lm_head
                 and x.name == meta.tied_lm_head.tensor]
        vocab = max((x.shape[0] for x in heads), default=0)
        act = max(act, b_ * s_ * vocab * meta.element_bytes)

    def link(nb: int) -> float:
        return (node.latency_ms or 0) / 1000 + (nb / (node.network_gbps * 1e9) if node.network_gbps else 0.0)

    hidden = (meta.hidden_size or 0) * meta.element_bytes
    tokens = s_ if objective == "prefill" else 1
    sent = [b_ * tokens * (8 if edge else hidden) for edge in (p == 0, e == n)]
    memory = nbytes + kv + act
    if objective == "prefill":
        return compute / (node.compute_tflops * 1000) + link(sent[0]) + link(sent[1]), memory
    return (nbytes + kv) / (node.memory_bandwidth_gbps * 1e9) + link(sent[0]) + link(sent[1]), memory


def brute_force(meta: ModelMetadata, nodes: list[Node], objective: str, batch: int | None = None,
                context: int | None = None) -> float | None:
    """min over ordered node subsets and cuts of the max stage time (the sum of decode times for ``latency``);
    memoised on (next block, nodes used)."""
    n = len(meta.blocks)
    usable = [v for v in nodes if objective == "prefill" or v.memory_bandwidth_gbps is not None]
    combine = (lambda a, b: a + b) if objective == "latency" else max
    priced = "decode" if objective == "latency" else objective

    @lru_cache(maxsize=None)
    def best(p: int, used: frozenset[str]) -> float | None:
        out = None
        for v in usable:
            if v.node_id in used:
                continue
            for e in range(p + 1, n + 1):
                t, b = stage_cost(meta, v, p, e, priced, batch, context)
                if b > v.memory_bytes - v.reserve_bytes:
                    continue
                rest = 0.0 if e == n else best(e, used | {v.node_id})
                if rest is None:
                    continue
                cand = combine(t, rest)
                out = cand if out is None else min(out, cand)
        return out

    return best(0, frozenset())


def literal_brute_force(meta: ModelMetadata, nodes: list[Node], objective: str) -> float | None:
    """Every ordered subset of nodes times every composition of the blocks, spelled out."""
    n = len(meta.blocks)
    out = None
    for k in range(1, min(n, len(nodes)) + 1):
        for order in itertools.permutations(nodes, k):
            for cuts in itertools.combinations(range(1, n), k - 1):
                bounds = (0, *cuts, n)
                costs = [stage_cost(meta, v, bounds[j], bounds[j + 1], objective) for j, v in enumerate(order)]
                if all(b <= v.memory_bytes - v.reserve_bytes for (_, b), v in zip(costs, order, strict=True)):
                    worst = max(t for t, _ in costs)
                    out = worst if out is None else min(out, worst)
    return out


@st.composite
def instances(draw, max_nodes: int = 6, max_blocks: int = 12):
    n = draw(st.integers(1, max_blocks))
    blocks = draw(st.lists(st.tuples(st.integers(0, 20), st.integers(1, 9)), min_size=n, max_size=n))
    first = draw(st.tuples(st.integers(0, 3), st.integers(0, 6)))
    last = draw(st.tuples(st.integers(0, 6), st.integers(0, 6)))
    tied = draw(st.none() | st.tuples(st.integers(0, 6), st.integers(1, 6)))
    k = draw(st.integers(1, max_nodes))
    nodes = [Node(f"n{i}", float(draw(st.integers(1, 8))), draw(st.integers(1, 45)) / 1e9,
                  float(draw(st.integers(1, 8))))
             for i in range(k)]
    return build_meta(blocks, first, last, tied), nodes


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(max_nodes=4, max_blocks=6))
def test_memoised_reference_matches_the_literal_enumeration(case) -> None:
    meta, nodes = case
    for objective in ("prefill", "decode"):
        assert brute_force(meta, nodes, objective) == literal_brute_force(meta, nodes, objective)


@pytest.mark.parametrize("objective", ["prefill", "decode"])
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=instances())
def test_bottleneck_is_the_exhaustive_optimum(objective: str, case) -> None:
    meta, nodes = case
    expected = brute_force(meta, nodes, objective)
    if expected is None:
        with pytest.raises(InfeasiblePlan):
            make_plan(meta, nodes, objective=objective)
        return
    plan = make_plan(meta, nodes, objective=objective)
    assert plan.bottleneck_s == expected
    assert plan.exact is True
    assert validate_split_plan([x.name for x in meta.layers], plan, metadata=meta, nodes=nodes) == []
    # Every node is either a stage or excluded with a reason; stages tile the blocks in order.
    assert sorted(plan.node_ids + tuple(e.node_id for e in plan.excluded)) == sorted(v.node_id for v in nodes)
    assert [a.blocks for a in plan.assignments] == list(zip([0] + [a.blocks[1] for a in plan.assignments[:-1]],
                                                            [a.blocks[1] for a in plan.assignments], strict=True))
    assert plan.assignments[-1].blocks[1] == len(meta.blocks)
    assert max(a.compute_utilization for a in plan.assignments) == 1.0
    assert plan.lower_bound_s <= plan.bottleneck_s


@st.composite
def antichain_fleets(draw, k: int):
    """k nodes none of which dominates another (faster means less memory), all able to hold any block: after
    the planner drops dominated and too-small nodes, all k remain candidates."""
    n = draw(st.integers(1, 5))
    blocks = draw(st.lists(st.tuples(st.integers(0, 20), st.integers(1, 9)), min_size=n, max_size=n))
    rates = sorted(draw(st.lists(st.integers(1, 60), min_size=k, max_size=k, unique=True)))
    mems = sorted(draw(st.lists(st.integers(9, 80), min_size=k, max_size=k, unique=True)), reverse=True)
    nodes = [Node(f"n{i:02d}", float(rates[i]), mems[i] / 1e9, float(rates[i])) for i in range(k)]
    return build_meta(blocks, (1, 2), (1, 2)), nodes


def _candidates(plan, nodes) -> int:
    """How many nodes reached the search (the others were dropped before it, with a reason saying why)."""
    before = [e for e in plan.excluded if e.reason.startswith(("cannot hold", "at least"))]
    return len(nodes) - len(before)


@pytest.mark.parametrize("objective", ["prefill", "decode"])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=antichain_fleets(12))
def test_twelve_candidates_get_the_exhaustive_optimum(objective: str, case) -> None:
    meta, nodes = case
    plan = make_plan(meta, nodes, objective=objective)
    assert _candidates(plan, nodes) == 12
    assert (plan.exact, plan.bottleneck_s) == (True, brute_force(meta, nodes, objective))


def test_branch_and_bound_takes_over_at_thirteen_candidates() -> None:
    # Found by a random search: the heuristic's two fixed node orders miss the optimum of this fleet by 7.7 %; past
    # 12 candidates the branch and bound starts from the heuristic's plan and proves the optimum.
    meta = build_meta([(19, 2), (9, 2), (16, 8)], (1, 2), (1, 2))
    rates = [1, 2, 7, 14, 25, 28, 31, 32, 39, 42, 45, 51, 57]
    mems = [78, 74, 66, 65, 50, 49, 43, 38, 33, 22, 12, 11, 9]
    nodes = [Node(f"n{i:02d}", float(r), m / 1e9) for i, (r, m) in enumerate(zip(rates, mems, strict=True))]

    thirteen = make_plan(meta, nodes)
    best = brute_force(meta, nodes, "prefill")
    assert _candidates(thirteen, nodes) == 13
    assert (thirteen.exact, thirteen.bottleneck_s) == (True, pytest.approx(best, rel=1e-12))
    assert thirteen.extra["gap_to_lower_bound"] == 0.0

    # Without the slowest node (in no optimal pipeline), 12 candidates: the exact search finds the optimum.
    twelve = make_plan(meta, nodes[1:])
    assert _candidates(twelve, nodes[1:]) == 12
    assert (twelve.exact, twelve.bottleneck_s) == (True, best)


def test_slow_node_is_left_out_with_a_reason() -> None:
    meta = build_meta([(10, 1)] * 4)
    nodes = [Node("fast", 10.0, 1e-6), Node("slow", 0.001, 1e-6)]
    plan = make_plan(meta, nodes)
    assert plan.node_ids == ("fast",)
    assert plan.bottleneck_s == 41 / 10_000
    assert [(e.node_id, e.reason) for e in plan.excluded] == [
        ("slow", "not needed: adding it does not lower the bottleneck (4.1 ms)")]


def test_tied_head_replica_is_on_the_last_stage() -> None:
    meta = build_meta([(1, 4), (1, 4)], first=(0, 5), last=(0, 1), tied=(3, 5))
    nodes = [Node("a", 1.0, 9e-9), Node("b", 1.0, 10e-9)]
    plan = make_plan(meta, nodes)
    assert [(a.node_id, a.layer_names, a.shared_tensors, a.bytes, a.total_compute) for a in plan.assignments] == [
        ("a", ("emb", "h.0.w"), (), 9, 1.0), ("b", ("h.1.w", "head"), ("emb",), 10, 4.0)]


def test_infeasible_messages_name_the_constraint_and_the_shortfall() -> None:
    meta = build_meta([(1, 400_000_000), (1, 3_000_000_000)], first=(0, 1), last=(0, 1))
    nodes = [Node("a", 1.0, 2.5), Node("b", 1.0, 1.0)]
    with pytest.raises(InfeasiblePlan) as exc:
        make_plan(meta, nodes)
    assert str(exc.value) == "block 1 needs 3.00 GB but the largest node 'a' has 2.50 GB (short by 0.50 GB)"

    meta = build_meta([(1, 2_000_000_000)] * 3, first=(0, 1), last=(0, 1))
    with pytest.raises(InfeasiblePlan) as exc:
        make_plan(meta, [Node("a", 1.0, 2.5), Node("b", 1.0, 2.1)])
    assert str(exc.value) == ("the model needs 6.00 GB but the 2 usable nodes have 4.60 GB in total "
                              "(short by 1.40 GB)")

    with pytest.raises(InfeasiblePlan) as exc:
        make_plan(meta, [Node("a", 1.0, 1.5)])
    assert str(exc.value) == ("no node can hold a single block: the smallest block needs 2.00 GB but the largest "
                              "node 'a' has 1.50 GB (short by 0.50 GB)")

    meta = build_meta([(1, 300), (1, 300), (1, 300)], first=(0, 0), last=(0, 0))
    with pytest.raises(InfeasiblePlan) as exc:
        make_plan(meta, [Node("a", 1.0, 500e-9), Node("b", 1.0, 500e-9)])  # 1,000 bytes for 900, but in 300s
    assert str(exc.value) == ("the blocks do not pack into contiguous runs on these 2 nodes: the best split holds "
                              "blocks [0, 2) and leaves 300 bytes (blocks from 2 on, with the final norm and head) "
                              "without a node with room")


def test_decode_leaves_out_nodes_without_bandwidth() -> None:
    meta = build_meta([(1, 4)] * 3)
    plan = make_plan(meta, [Node("a", 1.0, 1e-6), Node("bw", 1.0, 1e-6, memory_bandwidth_gbps=2.0)],
                     objective="decode")
    assert plan.node_ids == ("bw",)
    assert plan.excluded[0].reason == "no memory_bandwidth_gbps, needed by --objective decode"
    assert plan.decode_bottleneck_s == plan.bottleneck_s == 14 / 2e9
    assert plan.tokens_per_s == 2e9 / 14


def test_bad_arguments() -> None:
    meta = build_meta([(1, 4)])
    with pytest.raises(PlanError, match="^unknown strategy 'tensor'; expected one of pipeline, greedy$"):
        make_plan(meta, [Node("a", 1.0, 1.0)], strategy="tensor")
    with pytest.raises(PlanError, match="^node 'a' appears more than once in the fleet$"):
        make_plan(meta, [Node("a", 1.0, 1.0), Node("a", 2.0, 1.0)])


def test_large_fleet_is_proven_optimal_by_the_branch_and_bound() -> None:
    meta = build_meta([(10 + i % 7, 5 + i % 3) for i in range(40)])
    nodes = [Node(f"n{i}", float(1 + i % 5), (20 + 7 * (i % 4)) / 1e9) for i in range(30)]
    plan = make_plan(meta, nodes, time_limit_s=60)
    assert plan.exact is True
    assert plan.lower_bound_s == plan.bottleneck_s
    assert plan.extra["gap_to_lower_bound"] == 0.0
    assert validate_split_plan([x.name for x in meta.layers], plan, metadata=meta, nodes=nodes) == []


def test_tiny_llama_blocks_stay_whole(tiny_llama) -> None:
    meta = generate_metadata(tiny_llama)
    block_bytes = max(b.bytes for b in meta.blocks)
    nodes = [Node("a", 2.0, 2.2 * block_bytes / 1e9), Node("b", 1.0, 1.5 * block_bytes / 1e9),
             Node("c", 3.0, 1.0), Node("d", 0.5, 1.5 * block_bytes / 1e9)]
    plan = make_plan(meta, nodes)
    owner = {n: a.node_id for a in plan.assignments for n in a.layer_names}
    for block in meta.blocks:
        assert len({owner[x.name] for x in meta.layers if x.block == block.index}) == 1
    assert plan.bottleneck_s == pytest.approx(brute_force(meta, nodes, "prefill"), rel=1e-12)
    assert validate_split_plan([x.name for x in meta.layers], plan, metadata=meta, nodes=nodes) == []


def test_a_model_without_blocks_must_fit_one_node() -> None:
    meta = build_meta([], first=(1, 2_000_000_000), last=(1, 1_000_000_000))
    with pytest.raises(InfeasiblePlan) as exc:
        make_plan(meta, [Node("a", 1.0, 2.5), Node("b", 9.0, 1.0)])
    assert str(exc.value) == ("the model needs 3.00 GB on one node (it has no blocks to split) but the largest "
                              "node 'a' has 2.50 GB (short by 0.50 GB)")

    plan = make_plan(meta, [Node("a", 1.0, 3.5), Node("b", 9.0, 3.0)])
    assert [(a.node_id, a.layer_names) for a in plan.assignments] == [("b", ("emb", "head"))]
