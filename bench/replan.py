"""Re-planning benchmark: bytes moved by ``replan`` against planning from scratch, on the 1.1B bf16 Llama.

The fleet is bench/planner.py's 8 heterogeneous nodes (A100 to a CPU box, 0.4-4 GB free each). The current plan is
``make_plan``'s optimum for those 8; then one node leaves (each stage in turn) or one joins. For each change, the
reference measured in the same run is a fresh ``make_plan`` for the new fleet: the bytes its nodes would pull given
what they hold now, and its bottleneck (the best, ``T*``). ``replan`` may be at most 5% slower than ``T*``.

Run: ``.venv/bin/python bench/replan.py``
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))

from planner import LLAMA_FLEET, print_table  # noqa: E402
from williw.fleet import Node  # noqa: E402
from williw.metadata import generate_metadata  # noqa: E402
from williw.planner import make_plan, replan, validate_split_plan  # noqa: E402
from williw.units import format_bytes, format_seconds  # noqa: E402

JOINERS = [Node("h100", 989.0, 2.0, 3350.0), Node("l4", 121.0, 1.0, 300.0)]
MAX_SLOWDOWN = 0.05


def main() -> None:
    from _models import llama_1b

    meta = generate_metadata(llama_1b())
    names = [x.name for x in meta.layers]
    current = make_plan(meta, LLAMA_FLEET)
    changes = [(f"- {u}", [v for v in LLAMA_FLEET if v.node_id != u]) for u in current.node_ids]
    changes += [(f"+ {v.node_id}", [*LLAMA_FLEET, v]) for v in JOINERS]
    rows = []
    totals = [0, 0]
    for label, fleet in changes:
        start = time.perf_counter()
        r = replan(meta, current, fleet, MAX_SLOWDOWN, max_step_bytes=256_000_000)
        secs = time.perf_counter() - start
        assert validate_split_plan(names, r.plan, metadata=meta, nodes=fleet) == []
        assert r.bottleneck_after_s <= r.bound_s and r.bytes_moved <= r.fresh_bytes_moved
        totals[0] += r.bytes_moved
        totals[1] += r.fresh_bytes_moved
        before = format_seconds(r.bottleneck_before_s) if r.bottleneck_before_s is not None else "-"
        rows.append((label, format_bytes(r.bytes_moved), format_bytes(r.fresh_bytes_moved),
                     f"{r.bytes_moved / r.fresh_bytes_moved:.2f}x" if r.fresh_bytes_moved else "-",
                     format_bytes(r.moved_lower_bound), before, format_seconds(r.best_bottleneck_s),
                     format_seconds(r.bottleneck_after_s), f"{(r.bottleneck_after_s / r.best_bottleneck_s - 1):+.1%}",
                     "exact" if r.exact else "heuristic", len(r.migration.steps), f"{secs * 1000:.0f} ms"))
    rows.append(("total", format_bytes(totals[0]), format_bytes(totals[1]), f"{totals[0] / totals[1]:.2f}x",
                 "", "", "", "", "", "", "", ""))
    stages = ", ".join(f"{a.node_id} [{a.blocks[0]}, {a.blocks[1]})" for a in current.assignments)
    print_table(f"{meta.model_name}: {meta.total_bytes / 1e9:.2f} GB, {len(meta.blocks)} blocks; current plan "
                f"(bottleneck {format_seconds(current.bottleneck_s)}): {stages}; bound +{MAX_SLOWDOWN:.0%}, "
                f"steps <= 256 MB",
                ["change", "replan moves", "fresh moves", "ratio", "must move", "before", "best (fresh)",
                 "replan after", "vs best", "search", "steps", "replan time"], rows)

    rows = []
    for label, fleet in (changes[1], changes[-2]):
        for slowdown in (0.0, 0.05, 0.2, 0.5):
            r = replan(meta, current, fleet, slowdown)
            rows.append((label, f"{slowdown:.0%}", format_bytes(r.bytes_moved), format_bytes(r.fresh_bytes_moved),
                         format_seconds(r.best_bottleneck_s), format_seconds(r.bottleneck_after_s),
                         f"{(r.bottleneck_after_s / r.best_bottleneck_s - 1):+.1%}"))
    print_table("Bytes moved against the allowed slowdown", ["change", "max slowdown", "replan moves", "fresh moves",
                                                             "best (fresh)", "replan after", "vs best"], rows)


if __name__ == "__main__":
    main()
