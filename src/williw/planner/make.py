"""`make_plan`: node selection, the pipeline search, and the messages when no plan fits.

Pipeline node selection, in order (each left-out node gets its reason in the plan's ``excluded``):
  1. for ``--objective decode``, nodes without ``memory_bandwidth_gbps`` (their decode time is unknown);
  2. nodes that cannot hold the smallest block;
  3. nodes that ``n`` others weakly dominate (``n`` = blocks; see `pipeline.dominated`); with a link table only
     nodes in no link count, as dominated or dominating (a listed pair's hop may make a weaker node the better);
  4. nodes the best plan does not use: adding them does not lower the bottleneck.

``compute_utilization`` of a pipeline stage is its time under the plan's objective divided by the bottleneck:
the fraction of each pipeline period the node is busy (1.0 on the slowest stage).

With a link table (``links``) that lists a pair of candidates, the search is `links.search_links`: exact up to
`links.exact_limit` candidates; beyond, a fixed-order search seeded by the link-free plan (the usual search and
branch and bound), ``exact`` False with the transfer-free bound. The plan's ``transfers_s`` gives each stage's
receive and send seconds. Without a table nothing changes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from williw.errors import InfeasiblePlan, PlanError
from williw.fleet import Link, Node, link_table
from williw.jsonio import INT64_MAX
from williw.metadata import ModelMetadata
from williw.planner.branch import any_plan, certify
from williw.planner.capacity import capacity, context_tail, short, why_infeasible
from williw.planner.costs import OBJECTIVES, PipelineModel, pipeline_model, stage_times, stage_transfers, usable_bytes
from williw.planner.dominance import dominated
from williw.planner.formats import choose, node_device, node_models, precisions, search_precision
from williw.planner.greedy import _tokens_per_s, greedy_plan
from williw.planner.latency import EXACT_MAX_NODES as LATENCY_EXACT_MAX_NODES
from williw.planner.latency import search_latency
from williw.planner.links import exact_limit as links_exact_limit
from williw.planner.links import search_links
from williw.planner.pipeline import EXACT_MAX_NODES, Stage, _Costs, lower_bound, search
from williw.planner.plan import STRATEGIES, ExcludedNode, NodeAssignment, Plan
from williw.units import format_bytes, format_seconds

# Seconds the exact search may take beyond the subset DP's reach before it settles for a certified gap.
DEFAULT_TIME_LIMIT_S = 5.0
HEURISTIC_SHARE = 0.1  # of the time limit: the fixed-order heuristic's first refinement, before `certify`
# Seconds past the limit (or that share of it, if more) for the fixed orders' refinement below the final plan.
REFINE_GRACE_S = 0.5


def make_plan(metadata: ModelMetadata, nodes: Sequence[Node], strategy: str = "pipeline",
              objective: str = "prefill", time_limit_s: float = DEFAULT_TIME_LIMIT_S, *,
              batch_size: int | None = None, context_length: int | None = None,
              links: Sequence[Link] = ()) -> Plan:
    """Plan which node holds which tensors.

    Args:
        metadata: the model (tensors, blocks, compute).
        nodes: the fleet; node ids must be unique.
        strategy: ``pipeline`` (contiguous blocks, minimal bottleneck) or ``greedy`` (the seed's algorithm).
        objective: ``prefill`` (slowest stage's GFLOPs / TFLOPS), ``decode`` (slowest stage's bytes / memory
            bandwidth) or ``latency`` (the sum of the stages' decode costs); transfers included
            (`williw.planner.costs`).
        time_limit_s: wall-clock seconds for the exact search over more than `EXACT_MAX_NODES` candidates (the
            heuristic's start plan, the certified bound, best-fit packing and the branch and bound share it; one
            plan and one bound are always computed); when it runs out the plan is the best found (never worse than
            the heuristic's: its fixed orders are checked once more below the plan, and refined only if they beat
            it), ``exact`` is False and ``lower_bound_s`` is a certified bound. The plan then depends on the
            machine's speed.
        batch_size, context_length: the workload the memory must hold (default: the metadata's batch size and
            sequence length): every stage fits weights, KV cache for ``B × C`` tokens, activations and reserve.
        links: the fleet's link table (`williw.fleet.Fleet.links`): hops between listed pairs are priced on the
            pair's link (`williw.planner.costs`); ignored by ``greedy``.

    Returns:
        The plan; for ``pipeline`` its assignments are in stage order.

    Raises:
        PlanError: unknown strategy or objective, no nodes, duplicate node ids, a link naming a node not in the
            fleet, or a time limit not > 0.
        InfeasiblePlan: no plan fits; the message names the constraint and the shortfall.
    """
    if strategy not in STRATEGIES:
        raise PlanError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if objective not in OBJECTIVES:
        raise PlanError(f"unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")
    if not nodes:
        raise PlanError("no nodes to plan over")
    if not time_limit_s > 0:
        raise PlanError(f"the time limit must be a number of seconds > 0, got {time_limit_s!r}")
    for name, value in (("batch size", batch_size), ("context length", context_length)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or not 1 <= value <= INT64_MAX):
            raise PlanError(f"the {name} must be an integer in [1, {INT64_MAX}], got {value!r}")
    ids = [v.node_id for v in nodes]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise PlanError(f"node '{dup}' appears more than once in the fleet")
    for x in links:
        missing = [i for i in x.between if i not in ids]
        if missing:
            raise PlanError(f"the link between '{x.between[0]}' and '{x.between[1]}' names node '{missing[0]}', "
                            f"which is not in the fleet")
    if strategy == "greedy":
        return greedy_plan(metadata, nodes, "decode" if objective == "latency" else objective)
    model = pipeline_model(metadata, batch_size, context_length)
    return _pipeline(metadata, model, list(nodes), objective, time_limit_s, link_table(links))


def _pipeline(meta: ModelMetadata, model: PipelineModel, nodes: list[Node], objective: str,
              time_limit_s: float, table: dict[tuple[str, str], Link]) -> Plan:
    excluded: list[ExcludedNode] = []
    if objective != "prefill":
        excluded += [ExcludedNode(v.node_id, f"no memory_bandwidth_gbps, needed by --objective {objective}")
                     for v in nodes if v.memory_bandwidth_gbps is None]
        nodes = [v for v in nodes if v.memory_bandwidth_gbps is not None]
        if not nodes:
            raise InfeasiblePlan(f"--objective {objective} needs memory_bandwidth_gbps, and no node gives it")
    # The smallest block at any precision the node accepts: its search precision has the fewest bytes in all, not
    # block by block (int4 keeps a linear int8 would take), and a node left out here is never planned (found by a
    # hypothesis example: a node that held one block in int4 was excluded by its int8 bytes, the plan said exact).
    need = {}
    for v in nodes:
        need[v.node_id] = min((m.prefix_mem[i + 1] - m.prefix_mem[i] + m.block_act[i]
                               for m in (model.at(p) for p in precisions(v)) for i in range(m.n)), default=0)
    small = [v for v in nodes if usable_bytes(v) < need[v.node_id]]
    excluded += [ExcludedNode(v.node_id, f"cannot hold a single block: the smallest needs "
                                         f"{format_bytes(need[v.node_id])}, it has {format_bytes(usable_bytes(v))}")
                 for v in small]
    usable = [v for v in nodes if usable_bytes(v) >= need[v.node_id]]
    if not usable:
        at = f" at batch {model.batch_size} and context {model.context_length:,}" if any(model.block_kv) else ""
        smallest = need[max(nodes, key=usable_bytes).node_id]
        raise InfeasiblePlan("no node can hold a single block: " + short("the smallest block", smallest, nodes, at)
                             + context_tail(model, nodes))
    if model.n == 0:
        return _single(meta, model, usable, objective, excluded)
    linked = {a for a, _ in table}
    free = [i for i, v in enumerate(usable) if v.node_id not in linked]
    drop = {free[i] for i in dominated([usable[i] for i in free], model.n, objective, key=precisions)}
    excluded += [ExcludedNode(usable[i].node_id, f"at least {model.n} other nodes are as fast with as much "
                                                 f"memory, and the model has only {model.n} blocks")
                 for i in sorted(drop)]
    candidates = [v for i, v in enumerate(usable) if i not in drop]
    ids = {v.node_id for v in candidates}
    table = {pair: x for pair, x in table.items() if pair[0] in ids and pair[1] in ids}
    exact_links = bool(table) and len(candidates) <= links_exact_limit(objective)
    start = time.monotonic()
    # Beyond the link search's exact limit the link-free plan seeds it. It is made over the candidates a call without
    # links keeps (linked nodes escape pruning only for the link search), so the seed is that call's plan, ties
    # broken alike, and the result is never worse than it priced with the links.
    pool = candidates
    if table and not exact_links:
        plain = set(dominated(usable, model.n, objective, key=precisions))
        pool = [v for i, v in enumerate(usable) if i not in plain]
    if exact_links:
        found = search_links(model, candidates, objective, table)
    else:
        found = search_latency(model, pool, start + time_limit_s) if objective == "latency" else \
            search(model, pool, objective, deadline=start + time_limit_s * HEURISTIC_SHARE)
    lower = lower_bound(model, pool, objective)
    # Exact over every choice of formats only when each node's search format has the fewest bytes block by block.
    formats_exact = node_models(model, candidates).exact
    exact = found is not None and found.exact
    stages = found.stages if found is not None else None
    if stages is None and objective == "latency" and len(pool) > LATENCY_EXACT_MAX_NODES and not exact_links:
        # Beyond the exact limit the latency search follows fixed orders and may miss the only splits that fit
        # (found by the session's breaker: 13 nodes, "the blocks do not pack" where decode found a plan). The
        # branch and bound's search at no threshold finds one whenever memory allows (or proves there is none).
        stages = any_plan(_Costs(model, pool, "decode"), start + time_limit_s)
    if len(pool) > EXACT_MAX_NODES and objective != "latency" and not exact_links:
        c = _Costs(model, pool, objective)
        certified = certify(c, stages, lower, max(start + time_limit_s - time.monotonic(), 1e-3))
        stages, exact = (certified.stages, certified.exact) if certified else (None, False)
        lower = certified.lower_s if certified else lower
        if stages is not None and not exact:  # never worse than the unhurried heuristic: cheap when packing won
            # ... but not always cheap: its orders' refinement, unbounded, took 3.5-15 s after a 0.1-1 s limit on
            # 10,000 nodes x 1,000 identical blocks. Each order's first plan below this one is always kept.
            grace = max(REFINE_GRACE_S, time_limit_s * HEURISTIC_SHARE)
            rest = search(model, pool, objective, deadline=time.monotonic() + grace, below=c.bottleneck(stages))
            stages = rest.stages if rest is not None else stages
    if table and not exact_links and stages is not None:
        # Beyond the link search's exact limit: the link-free plan's order seeds its fixed-order search; the bound
        # is the one without transfers (a pair's link may be faster than the own links the certified bound priced).
        index = {v.node_id: i for i, v in enumerate(candidates)}
        seed = tuple(Stage(index[pool[x.node].node_id], x.start, x.end) for x in stages)
        seeded = search_links(model, candidates, objective, table, seed=seed, deadline=start + time_limit_s)
        stages, exact, lower = seeded.stages if seeded else seed, False, lower_bound(model, candidates, objective)
    if stages is None:
        raise InfeasiblePlan(why_infeasible(model, candidates))
    exact = exact and formats_exact
    plan_nodes = [candidates[s.node] for s in stages]
    plan = _assemble(meta, model, stages, plan_nodes, objective, exact, lower, excluded, table)
    if exact:  # the optimum is the tightest lower bound there is
        plan = Plan(**{**plan.__dict__, "lower_bound_s": plan.bottleneck_s,
                       "extra": {**plan.extra, "gap_to_lower_bound": 0.0}})
    in_plan = set(plan.node_ids)
    why = "not chosen by the search, which ran out of time (--time-limit) before proving the plan optimal"
    if objective == "latency" and not table:
        why = (f"not chosen by the latency search, which beyond {LATENCY_EXACT_MAX_NODES} candidates (or past "
               f"--time-limit) searches fixed node orders only")
    elif table:
        why = (f"not chosen by the link search, which beyond {links_exact_limit(objective)} candidates searches "
               f"fixed node orders only")
    unused = [ExcludedNode(v.node_id, f"not needed: adding it does not lower the bottleneck "
                                      f"({format_seconds(plan.bottleneck_s or 0.0)})" if exact else why)
              for v in candidates if v.node_id not in in_plan]
    return Plan(**{**plan.__dict__, "excluded": tuple(excluded + unused)})


def _assemble(meta: ModelMetadata, model: PipelineModel, stages: Sequence[Stage], plan_nodes: list[Node],
              objective: str, exact: bool | None, lower: float, excluded: list[ExcludedNode],
              table: dict[tuple[str, str], Link] | None = None) -> Plan:
    hops = [(table.get((plan_nodes[j - 1].node_id, v.node_id)) if table and j > 0 else None,
             table.get((v.node_id, plan_nodes[j + 1].node_id)) if table and j + 1 < len(stages) else None)
            for j, v in enumerate(plan_nodes)]
    # Each stage at the highest precision its node accepts that keeps the searched plan's figures (`formats`).
    searched = [stage_times(model.at(search_precision(model, v)), s.start, s.end, v, *hops[j])
                for j, (s, v) in enumerate(zip(stages, plan_nodes, strict=True))]
    own = [pre if objective == "prefill" else dec for pre, dec in searched]
    limit = max(own) if objective != "latency" else 0.0  # type: ignore[type-var]
    chosen = [choose(model, v, s.start, s.end, objective, own[j] if objective == "latency" else limit, hops[j])
              for j, (s, v) in enumerate(zip(stages, plan_nodes, strict=True))]
    models = [m for _, m in chosen]
    rows = []
    transfers = []
    for j, (s, v) in enumerate(zip(stages, plan_nodes, strict=True)):
        m = models[j]
        names, shared = m.stage_names(s.start, s.end)
        gflops = m.stage_compute(s.start, s.end)
        nbytes = m.stage_bytes(s.start, s.end)
        blocks = (m.block_index[s.start], m.block_index[s.end - 1] + 1) if s.end > s.start else (0, 0)
        rows.append((v, names, shared, gflops, nbytes, blocks, *stage_times(m, s.start, s.end, v, *hops[j])))
        pre, dec = stage_transfers(m, s.start, s.end, v, *hops[j])
        transfers.append({"node_id": v.node_id, "prefill": list(pre), "decode": list(dec)})
    prefill = max(r[6] for r in rows)
    decodes = [r[7] for r in rows]
    decode = max(decodes) if all(d is not None for d in decodes) else None  # type: ignore[type-var]
    summed = math.fsum(decodes) if decode is not None else None  # type: ignore[arg-type]
    bottleneck = {"prefill": prefill, "decode": decode, "latency": summed}[objective]
    assignments = []
    for j, (v, names, shared, gflops, nbytes, blocks, t_pre, t_dec) in enumerate(rows):
        t = t_pre if objective == "prefill" else t_dec
        s, m, precision = stages[j], models[j], chosen[j][0]
        kv, act = m.stage_kv(s.start, s.end), m.stage_activation(s.start, s.end)
        assignments.append(NodeAssignment(
            node_id=v.node_id, layer_names=names, total_compute=gflops,
            compute_utilization=(t / bottleneck) if bottleneck else 1.0, bytes=nbytes, stage=j, blocks=blocks,
            stage_time_s=t_pre, decode_time_s=t_dec, shared_tensors=shared, kv_bytes=kv, activation_bytes=act,
            headroom_bytes=usable_bytes(v) - nbytes - kv - act, dtype=precision.dtype, weights=precision.weights,
            device=node_device(v)))
    gap = (bottleneck / lower - 1.0) if bottleneck and lower else None
    room = capacity(models, stages, plan_nodes)
    return Plan(strategy="pipeline", assignments=tuple(assignments), model_name=meta.model_name,
                objective=objective, bottleneck_s=bottleneck, prefill_bottleneck_s=prefill,
                decode_bottleneck_s=decode, latency_s=math.fsum(r[6] for r in rows),
                tokens_per_s=_tokens_per_s(objective, prefill, decode if objective == "decode" else summed,
                                           model.tokens),
                lower_bound_s=lower, exact=exact, excluded=tuple(excluded),
                extra={"gap_to_lower_bound": gap, "decode_latency_s": summed, **room,
                       **({"transfers_s": transfers} if table else {})})


def _single(meta: ModelMetadata, model: PipelineModel, usable: list[Node], objective: str,
            excluded: list[ExcludedNode]) -> Plan:
    """A model without blocks: one node holds everything; the fastest that fits."""
    need = {v.node_id: model.at(search_precision(model, v)).stage_memory(0, 0) for v in usable}
    fit = [v for v in usable if usable_bytes(v) >= need[v.node_id]]
    if not fit:
        big = max(usable, key=usable_bytes)
        raise InfeasiblePlan(short("the model", need[big.node_id], usable, " on one node (it has no blocks to split)"))

    def key(v: Node) -> float:
        pre, dec = stage_times(model.at(search_precision(model, v)), 0, 0, v)
        return pre if objective == "prefill" else dec  # type: ignore[return-value]

    best = min(fit, key=key)
    plan = _assemble(meta, model, [Stage(0, 0, 0)], [best], objective, True, 0.0, excluded)
    rest = [ExcludedNode(v.node_id, "not needed: the model has no blocks, one node holds it") for v in usable
            if v is not best]
    return Plan(**{**plan.__dict__, "excluded": tuple(excluded + rest)})
