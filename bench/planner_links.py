"""Planner benchmarks for fleets with a link table (issue 17), one table each.

1. Exact search with every pair of nodes listed (random pair links, 10 MB/s-2 GB/s and 0.2-50 ms), over 6, 7 and
   8 candidates (`links.EXACT_MAX_NODES`), a 70B-shaped Llama in 4-bit (80 blocks) at context 2,048: plan time
   per objective, against the same nodes without the table (the link-free search) in the same run.
2. Two sites (11 nodes, beyond the exact limit: the link search runs over fixed node orders seeded by the
   link-free plan, ``exact`` false) whose cross-site pairs are listed as slow: the plan with the table against
   the plan made without it (the reference), both priced with the links.

Run: ``.venv/bin/python bench/planner_links.py``
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))

from planner import print_table  # noqa: E402 - bench/planner.py's table, run from this folder
from planner_runtime import fleet, llama_70b, timed  # noqa: E402
from williw.fleet import Link, Node, link_table  # noqa: E402
from williw.planner import make_plan  # noqa: E402
from williw.planner.costs import pipeline_model, stage_times  # noqa: E402


def exact_with_links() -> None:
    rng = random.Random(0)
    meta = llama_70b(4)
    rows = []
    for k in (6, 7, 8):
        nodes = [Node(f"n{i}", round(10 ** rng.uniform(0, 2.5), 2), round(rng.uniform(4, 24), 1),
                      round(rng.uniform(50, 1000)), network_gbps=round(rng.uniform(0.01, 2), 3),
                      latency_ms=round(rng.uniform(0.2, 20), 1)) for i in range(k)]
        links = [Link((a.node_id, b.node_id), round(rng.uniform(0.01, 2), 3), round(rng.uniform(0.2, 50), 1))
                 for j, a in enumerate(nodes) for b in nodes[j + 1:]]
        for objective in ("prefill", "decode", "latency"):
            for table in (links, []):
                plan, secs = timed(lambda o=objective, t=table, v=nodes: make_plan(meta, v, objective=o,
                                                                        context_length=2048, links=t))
                rows.append((k, objective, f"{len(table)} pairs" if table else "none (reference)",
                             len(plan.assignments), plan.exact, f"{plan.bottleneck_s * 1e3:.2f} ms", f"{secs:.3f} s"))
    print_table(f"Exact search with a full link table, {meta.model_name} (80 blocks), context 2,048",
                ["nodes", "objective", "link table", "stages", "exact", "cost", "plan time"], rows)


def two_sites() -> None:
    """Two sites: an A100 and two L4 at one, eight T4 at the other; 10 Gb/s and 0.5 ms on every node's own link,
    and the 24 pairs across the sites listed at 50 MB/s and 30 ms. Neither site holds the model alone."""
    meta = llama_70b(16)
    rows = [("a100-0", 312.0, 80, 2039, 1.25, 0.5)] + [(f"l4-{i}", 121.0, 24, 300, 1.25, 0.5) for i in range(2)]
    rows += [(f"t4-{i}", 65.0, 16, 320, 1.25, 0.5) for i in range(8)]
    nodes = fleet(rows, reserve_gb=1.0)
    links = [Link((x.node_id, y.node_id), 0.05, 30.0) for x in nodes[:3] for y in nodes[3:]]
    out = []
    for objective in ("prefill", "decode", "latency"):
        for table in (links, []):
            plan, secs = timed(lambda o=objective, t=table: make_plan(meta, nodes, objective=o, context_length=4096,
                                                                    links=t))
            priced = with_links(meta, plan, nodes, links, objective, 4096)
            out.append((objective, f"{len(table)} pairs" if table else "none (reference)", len(plan.assignments),
                        f"{plan.bottleneck_s * 1e3:.2f} ms", f"{priced * 1e3:.2f} ms", plan.exact, f"{secs:.2f} s",
                        " ".join(plan.node_ids)))
    print_table(f"Two sites, 11 nodes, the 24 pairs across listed (50 MB/s, 30 ms), {meta.model_name} at context "
                f"4,096", ["objective", "link table", "stages", "plan's cost", "cost with the links", "exact",
                           "plan time", "stages"], out)


def with_links(meta, plan, nodes: list[Node], links: list[Link], objective: str, context: int) -> float:
    """The plan's objective with every hop priced by the link table (the reference plan was made without it)."""
    model = pipeline_model(meta, 1, context)
    table, by_id, ids = link_table(links), {v.node_id: v for v in nodes}, plan.node_ids
    times = []
    for j, a in enumerate(plan.assignments):
        hops = (table.get((ids[j - 1], ids[j])) if j else None,
                table.get((ids[j], ids[j + 1])) if j + 1 < len(ids) else None)
        pre, dec = stage_times(model, a.blocks[0], a.blocks[1], by_id[a.node_id], *hops)
        times.append(pre if objective == "prefill" else dec)
    return sum(times) if objective == "latency" else max(times)


if __name__ == "__main__":
    exact_with_links()
    two_sites()
