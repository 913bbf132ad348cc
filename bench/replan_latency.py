"""Re-planning for the latency objective: time and bytes moved of ``replan`` against a fresh ``make_plan``.

Synthetic models of n blocks (5-7 bytes each, so that moved bytes are easy to read) on fleets of k nodes with
memory bandwidths 1-5 GB/s, planned for ``latency``; then one change: a node of the plan leaves (the survivors hold
the rest), an empty fast node joins, or the whole fleet is replaced (every plan pulls everything). The reference,
measured in the same run, is a fresh ``make_plan`` for the new fleet: its time and the bytes its nodes would pull.
``work`` is the exact search's size measure, ``2^k · k · (n + 1)^2``; beyond ``EXACT_MAX_WORK`` the orders'
heuristic answers.

Run: ``.venv/bin/python bench/replan_latency.py``
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))

from planner import print_table  # noqa: E402
from williw.fleet import Node  # noqa: E402
from williw.metadata import BlockMeta, LayerMeta, ModelMetadata  # noqa: E402
from williw.planner import make_plan, replan  # noqa: E402
from williw.planner.replan_latency import EXACT_MAX_WORK  # noqa: E402

SHAPES = [(7, 12), (15, 8), (31, 8), (31, 10), (63, 9)]  # (blocks, nodes)


def toy_model(n: int) -> ModelMetadata:
    """n blocks of one tensor each (5-7 bytes), a 1-byte embedding and head."""
    layers = [LayerMeta("emb", (1,), "F32", 1, 1, 0.0, "embedding", None, "first", "")]
    blocks = []
    for i in range(n):
        b = 5 + i % 3
        layers.append(LayerMeta(f"h.{i}.w", (1,), "F32", 1, b, 10.0, "mlp", i, "block", ""))
        blocks.append(BlockMeta(i, 1, 1, b, 10.0, 0.0))
    layers.append(LayerMeta("head", (1,), "F32", 1, 1, 1.0, "lm_head", None, "last", ""))
    return ModelMetadata(1, "toy", "toy", None, "safetensors", 1, 8, None, tuple(layers), tuple(blocks), None,
                         sum(x.compute_required for x in layers), len(layers), sum(x.bytes for x in layers),
                         len(layers))


def fleet(prefix: str, k: int, n: int) -> list[Node]:
    return [Node(f"{prefix}{i}", 1.0, (8 * n / k + 7 * (i % 4)) / 1e9, float(1 + i % 5)) for i in range(k)]


def main() -> None:
    rows = []
    for n, k in SHAPES:
        meta = toy_model(n)
        nodes = fleet("n", k, n)
        current = make_plan(meta, nodes, objective="latency")
        changes = [(f"- {current.node_ids[0]}", [v for v in nodes if v.node_id != current.node_ids[0]]),
                   ("+ empty fast node", [*nodes, Node("new", 1.0, 4 * n / 1e9, 9.0)]),
                   ("whole fleet new", fleet("m", k, n))]
        for label, after in changes:
            for slowdown in (0.05, 1.0):
                start = time.perf_counter()
                fresh = make_plan(meta, after, objective="latency")
                fresh_s = time.perf_counter() - start
                start = time.perf_counter()
                r = replan(meta, current, after, slowdown)
                secs = time.perf_counter() - start
                assert r.bytes_moved <= r.fresh_bytes_moved and fresh.digest() == r.fresh_plan.digest()
                m = len(after)
                rows.append((f"{n} x {m}", label, f"{slowdown:.0%}", f"2^{math.log2((1 << m) * m * (n + 1) ** 2):.1f}",
                             "exact" if r.exact else "heuristic", f"{secs:.2f} s", f"{fresh_s:.2f} s",
                             r.bytes_moved, r.fresh_bytes_moved, r.moved_lower_bound,
                             f"{r.bottleneck_after_s / r.best_bottleneck_s - 1:+.1%}"))
    print_table(f"Latency re-plans (exact while work <= 2^{math.log2(EXACT_MAX_WORK):.0f})",
                ["blocks x nodes", "change", "max slowdown", "work", "search", "replan time", "fresh plan time",
                 "replan moves", "fresh moves", "must move", "vs best"], rows)


if __name__ == "__main__":
    main()
