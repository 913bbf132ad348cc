"""Planner benchmarks, one table each.

0. Certified plans: fleets of 12, 24, 48, 96 and 1,000 nodes on the 1.1B Llama and the 1,000-block model (with
   the candidates left after dominance pruning: few for Llama's 22 blocks), and 1,000 blocks over 10,000 nodes:
   plan time, bottleneck, certified gap, and the heuristic's bottleneck of the same run beside it
   (``--time-limit`` 10 s, also 30 s for 1,000 blocks over 1,000 nodes; 0.5 s for 10,000 nodes). Then the window
   and LP bounds against proven optima on 40 blocks over 40 nodes.
1. Scale: 1,000 blocks over 10,000 heterogeneous nodes (target: under 1 s), plus the exact search at its limit
   (12 candidate nodes), each against the reference of the same run: the lower bound ``total / Σ rate``.
2. Quality on the 1.1B bf16 Llama's metadata (``generate_metadata(llama_1b())``, batch 1 x 512 tokens) with 8
   heterogeneous nodes: the bottleneck of ``pipeline`` against the seed's ``greedy`` and against the lower bound
   ``total GFLOPs / sum of TFLOPS``.

3-5. Run-time memory and the network: a prima.cpp-shaped home cluster, a Helix-shaped 24-node cluster, and exact
   planning with network costs at 12 nodes (`bench/planner_runtime.py`, which also runs alone).

Run: ``.venv/bin/python bench/planner.py`` (``bench/planner.py certified`` for table 0 alone)
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))

from williw.fleet import Node  # noqa: E402
from williw.metadata import BlockMeta, LayerMeta, ModelMetadata, generate_metadata  # noqa: E402
from williw.planner import make_plan, validate_split_plan  # noqa: E402


def synthetic(n_blocks: int, rng: random.Random) -> ModelMetadata:
    """A model of ``n_blocks`` uneven blocks (40-60 GFLOPs, 80-120 MB), one tensor each."""
    layers = [LayerMeta("embed", (1,), "BF16", 1, 200_000_000, 0.0, "embedding", None, "first", "")]
    blocks = []
    for i in range(n_blocks):
        c, b = rng.uniform(40, 60), rng.randint(80_000_000, 120_000_000)
        layers.append(LayerMeta(f"layers.{i}.w", (1,), "BF16", 1, b, c, "mlp", i, "block", ""))
        blocks.append(BlockMeta(i, 1, 1, b, c, 0.0))
    layers.append(LayerMeta("lm_head", (1,), "BF16", 1, 200_000_000, 30.0, "lm_head", None, "last", ""))
    total = sum(x.compute_required for x in layers)
    return ModelMetadata(1, f"synthetic-{n_blocks}", "synthetic", None, "safetensors", 1, 512, None, tuple(layers),
                         tuple(blocks), None, total, len(layers), sum(x.bytes for x in layers), len(layers))


def fleet(n: int, rng: random.Random) -> list[Node]:
    """Nodes from a laptop CPU to an H100: 1-1000 TFLOPS (log-uniform), 0.5-80 GB, 50-3000 GB/s."""
    return [Node(f"n{i}", round(10 ** rng.uniform(0, 3), 3), round(rng.uniform(0.5, 80), 2),
                 round(rng.uniform(50, 3000), 1)) for i in range(n)]


def candidates(nodes: list[Node], n_blocks: int) -> list[Node]:
    """The search's candidates, as make_plan prunes them: nodes that ``n_blocks`` others dominate are left out."""
    from williw.planner.dominance import dominated

    drop = set(dominated(nodes, n_blocks, "prefill"))
    return [v for i, v in enumerate(nodes) if i not in drop]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def scale() -> None:
    rng = random.Random(0)
    rows = []
    for n_blocks, n_nodes in ((1000, 10_000), (200, 12), (1000, 12)):
        meta = synthetic(n_blocks, rng)
        nodes = fleet(n_nodes, rng)
        plan, secs = timed(lambda m=meta, v=nodes: make_plan(m, v, time_limit_s=0.5))
        assert validate_split_plan([x.name for x in meta.layers], plan, metadata=meta, nodes=nodes) == []
        rows.append((f"{n_blocks} blocks / {n_nodes:,} nodes", "exact" if plan.exact else "heuristic",
                     f"{secs * 1000:.0f} ms", len(plan.assignments), f"{plan.bottleneck_s * 1000:.3f} ms",
                     f"{plan.lower_bound_s * 1000:.3f} ms",
                     f"{(plan.bottleneck_s / plan.lower_bound_s - 1) * 100:.1f}%"))
    print_table("Scale (prefill objective)", ["instance", "search", "plan time", "stages", "bottleneck",
                                              "lower bound", "gap"], rows)


# 8 nodes, dense bf16 TFLOPS and memory from public spec sheets (rounded); memory_gb is what is free for weights.
LLAMA_FLEET = [
    Node("a100", 312.0, 2.0, 2039.0),
    Node("rtx4090", 165.0, 1.0, 1008.0),
    Node("rtx3090", 71.0, 0.8, 936.0),
    Node("t4", 65.0, 0.5, 320.0),
    Node("m2max", 27.0, 1.5, 400.0),
    Node("rtx3060", 25.0, 0.6, 360.0),
    Node("orin", 10.0, 0.4, 102.0),
    Node("cpu", 1.5, 4.0, 50.0),
]


def llama() -> None:
    from _models import llama_1b

    meta = generate_metadata(llama_1b())
    names = [x.name for x in meta.layers]
    rows = []
    for label, nodes in (("tight memory (0.4-4 GB free)", LLAMA_FLEET),
                         ("roomy fleet (x10 memory)", [Node(v.node_id, v.compute_tflops, v.memory_gb * 10,
                                                            v.memory_bandwidth_gbps) for v in LLAMA_FLEET])):
        lower = meta.total_compute / (sum(v.compute_tflops for v in nodes) * 1000)
        for strategy in ("pipeline", "greedy"):
            try:
                plan, secs = timed(lambda s=strategy, v=nodes: make_plan(meta, v, strategy=s))
            except Exception as exc:  # greedy ignores memory and may not fit: show why
                rows.append((label, strategy, "-", "-", "-", f"{lower * 1000:.3f} ms", str(exc)[:70]))
                continue
            assert validate_split_plan(names, plan, metadata=meta, nodes=nodes) == []
            rows.append((label, strategy, f"{secs * 1000:.0f} ms", len(plan.assignments),
                         f"{plan.prefill_bottleneck_s * 1000:.3f} ms", f"{lower * 1000:.3f} ms",
                         f"{plan.prefill_bottleneck_s / lower:.2f}x lower bound"))
    print_table(f"{meta.model_name}: {meta.total_compute:,.0f} GFLOPs, {meta.total_bytes / 1e9:.2f} GB, "
                f"{len(meta.blocks)} blocks, batch {meta.batch_size} x {meta.sequence_length} tokens",
                ["fleet", "strategy", "plan time", "nodes", "prefill bottleneck", "total/ΣTFLOPS", "vs bound"], rows)


def certified() -> None:
    from _models import llama_1b
    from williw.planner.costs import pipeline_model
    from williw.planner.pipeline import _Costs, search

    rows = []
    models = (("llama-1.1B", generate_metadata(llama_1b())), ("1,000 blocks", synthetic(1000, random.Random(0))))
    for label, meta in models:
        model = pipeline_model(meta)
        for size, limit in ((12, 10.0), (24, 10.0), (48, 10.0), (96, 10.0), (1000, 10.0), (1000, 30.0),
                            (10_000, 0.5)):
            if (size == 10_000 or limit == 30.0) and label != "1,000 blocks":
                continue
            nodes = candidates(fleet(size, random.Random(size)), model.n)
            plan, secs = timed(lambda m=meta, v=nodes, t=limit: make_plan(m, v, time_limit_s=t))
            heuristic = search(model, nodes, "prefill")
            h = _Costs(model, nodes, "prefill").bottleneck(heuristic.stages)
            status = "proven optimal" if plan.exact else "time limit"
            rows.append((label, f"{size:,}", f"{len(nodes):,}", f"{limit:g} s", f"{secs:.2f} s", status,
                         f"{plan.bottleneck_s * 1000:.4f} ms", f"{plan.extra['gap_to_lower_bound'] * 100:.3f}%",
                         f"{h * 1000:.4f} ms" + (" (exact DP)" if heuristic.exact else
                                                 f" ({max(0.0, h / plan.lower_bound_s - 1) * 100:.1f}%)")))
    print_table("Certified plans (prefill objective; heuristic = today's fixed node orders without a time limit, "
                f"its gap to the same certified bound; load average {os.getloadavg()[0]:.2f} at the end)",
                ["model", "fleet", "candidates", "limit", "plan time", "status", "bottleneck", "certified gap",
                 "heuristic"], rows)


def shaped(name: str, kinds: list[tuple[float, int]], head_gflops: float = 1100.0) -> ModelMetadata:
    """A model of blocks of (GFLOPs, bytes) in order, a 2 GB embedding and a 2 GB head of ``head_gflops``."""
    layers = [LayerMeta("embed", (1,), "BF16", 1, 2_000_000_000, 0.0, "embedding", None, "first", "")]
    blocks = []
    for i, (c, b) in enumerate(kinds):
        layers.append(LayerMeta(f"layers.{i}.w", (1,), "BF16", 1, b, c, "mlp", i, "block", ""))
        blocks.append(BlockMeta(i, 1, 1, b, c, 0.0))
    layers.append(LayerMeta("lm_head", (1,), "BF16", 1, 2_000_000_000, head_gflops, "lm_head", None, "last", ""))
    total = sum(x.compute_required for x in layers)
    return ModelMetadata(1, name, "synthetic", None, "safetensors", 1, 512, None, tuple(layers), tuple(blocks), None,
                         total, len(layers), sum(x.bytes for x in layers), len(layers))


def families() -> None:
    """The shapes people bring, over bench's random fleets: identical blocks (Llama-3-70B), a mixture of experts'
    dense first blocks (DeepSeek-V3's 3 dense + 58 expert layers, scaled), alternating attention (Gemma's 5 local :
    1 global) and a hybrid (Jamba's 1 attention : 7 Mamba). Three fleets per size, a 10 s limit each."""
    from planner_runtime import llama_70b
    from williw.planner.bound import Windows, certified_lower_bound
    from williw.planner.costs import pipeline_model
    from williw.planner.pipeline import _Costs, lower_bound, search

    models = (("Llama-3-70B shape", llama_70b(16)),
              ("MoE: 3 dense + 58 expert", shaped("moe", [(900.0, 1_700_000_000)] * 3
                                                  + [(400.0, 11_000_000_000)] * 58)),
              ("5 local : 1 global x 62", shaped("gemma", [(880.0 if i % 6 else 960.0, 1_700_000_000)
                                                           for i in range(62)])),
              ("hybrid 1 : 7 x 72", shaped("hybrid", [(1000.0, 1_900_000_000) if i % 8 == 0 else
                                                      (700.0, 1_500_000_000) for i in range(72)])))
    rows = []
    for label, meta in models:
        model = pipeline_model(meta)
        for objective in ("prefill", "decode"):
            for size in (64, 256, 1000, 10_000):
                proven, times, gaps, heuristic = 0, [], [], []
                for seed in range(3):
                    nodes = fleet(size, random.Random(7000 * size + seed))
                    plan, secs = timed(lambda m=meta, v=nodes, o=objective: make_plan(m, v, objective=o,
                                                                                      time_limit_s=10.0))
                    assert validate_split_plan([x.name for x in meta.layers], plan, metadata=meta, nodes=nodes) == []
                    proven += plan.exact
                    times.append(secs)
                    gaps.append(plan.extra["gap_to_lower_bound"])
                    kept = candidates(nodes, model.n) if objective == "prefill" else nodes
                    found = search(model, kept, objective)
                    c = _Costs(model, kept, objective)
                    h = c.bottleneck(found.stages)
                    bound = max(plan.lower_bound_s, certified_lower_bound(
                        Windows(c), lower_bound(model, kept, objective) * (1 - 1e-9), h))
                    heuristic.append(h / bound - 1)
                rows.append((label, objective, f"{size:,}", f"{proven}/3", f"{max(times):.2f} s",
                             f"{max(gaps) * 100:.3f}%", f"{max(0.0, max(heuristic)) * 100:.2f}%"))
    print_table("Model shapes people bring (10 s limit, three fleets each; heuristic = the fixed node orders, its "
                "largest gap to the plan's certified bound)",
                ["model", "objective", "fleet", "proven optimal", "largest plan time", "largest certified gap",
                 "heuristic"], rows)


def relaxation() -> None:
    """The bounds against proven optima where nodes hold a few blocks each: 40 blocks over 40 nodes (the shapes of
    `synthetic` and `fleet`), six seeds."""
    import math

    from williw.planner.bound import Windows, certified_lower_bound
    from williw.planner.branch import certify
    from williw.planner.costs import pipeline_model
    from williw.planner.pipeline import _Costs, lower_bound
    from williw.planner.relaxation import available, lp_lower_bound

    if not available():
        print("\nLP bound: highspy is not installed (pip install -e '.[solver]')")
        return
    rows = []
    for seed in range(6):
        meta = synthetic(40, random.Random(seed))
        model = pipeline_model(meta)
        nodes = candidates(fleet(40, random.Random(100 + seed)), model.n)
        c = _Costs(model, nodes, "prefill")
        lower = lower_bound(model, nodes, "prefill")
        found, secs = timed(lambda c=c, lower=lower: certify(c, None, lower, 60.0))
        best = c.bottleneck(found.stages)
        window = certified_lower_bound(Windows(c), lower * (1 - 1e-9), best)
        lp, lp_secs = timed(lambda c=c, w=window, b=best: lp_lower_bound(c, w, b, math.inf))
        rows.append((seed, len(nodes), "proven optimal" if found.exact else "time limit", f"{secs:.2f} s",
                     f"{best * 1000:.4f} ms", f"{(1 - window / best) * 100:.3f}%", f"{(1 - lp / best) * 100:.4f}%",
                     f"{lp_secs:.2f} s"))
    print_table("Bounds against the optimum, 40 blocks over 40 nodes (how far each bound is below the plan)",
                ["seed", "candidates", "status", "plan time", "bottleneck", "window bound", "LP bound",
                 "LP time"], rows)


def print_table(title: str, headers: list[str], rows: list[tuple]) -> None:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    print(f"\n{title}")
    for j, r in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    if sys.argv[1:] == ["families"]:  # the model-shapes table alone
        families()
        sys.exit(0)
    certified()
    families()
    relaxation()
    if sys.argv[1:] == ["certified"]:  # the certified-plan tables alone
        sys.exit(0)
    scale()
    llama()
    import planner_runtime  # run-time memory and the network (issue 17): its three tables

    planner_runtime.home()
    planner_runtime.helix()
    planner_runtime.exact_with_network()
