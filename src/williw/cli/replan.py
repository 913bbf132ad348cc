"""``williw replan``: the current plan and the changed fleet in, the next plan version and its migration out."""

from __future__ import annotations

import click

from williw.cli import cli
from williw.cli._output import emit, json_option, set_json_mode, table


@cli.command("replan")
@click.argument("metadata", type=click.Path(dir_okay=False))
@click.option("--plan", "plan_file", required=True, type=click.Path(dir_okay=False),
              help="The plan in force (its nodes missing from --nodes have left).")
@click.option("--nodes", "nodes_file", required=True, type=click.Path(dir_okay=False),
              help="The fleet now (JSON or YAML nodes file).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the new plan JSON here.")
@click.option("--migration", "migration_file", type=click.Path(dir_okay=False),
              help="Write the migration schedule JSON here.")
@click.option("--max-slowdown", type=click.FloatRange(min=0.0, max=1e6), default=0.05, show_default=True,
              help="How much slower than the best plan for the new fleet the re-plan may be (0.05 = 5%).")
@click.option("--max-step-bytes", type=int, help="The most bytes one pull step of the migration carries.")
@click.option("--objective", type=click.Choice(["prefill", "decode", "latency"]),
              help="Default: the current plan's. latency bounds the summed decode cost per token, not a stage's.")
@json_option
def replan_cmd(metadata: str, plan_file: str, nodes_file: str, output: str | None, migration_file: str | None,
               max_slowdown: float, max_step_bytes: int | None, objective: str | None, as_json: bool) -> None:
    """Re-plan for a changed fleet, moving the fewest bytes within --max-slowdown of the best bottleneck (of the
    best seconds per token for --objective latency). Batch and context are the current plan's."""
    set_json_mode(as_json)
    from williw.fleet import load_nodes
    from williw.fsutil import write_json
    from williw.metadata import load_metadata
    from williw.planner import check_plan, load_plan, replan, save_plan

    meta = load_metadata(metadata)
    current = load_plan(plan_file)
    # Against the model only: the plan's nodes may have left the fleet, which is why one re-plans.
    check_plan([x.name for x in meta.layers], current, metadata=meta, shown=3)
    result = replan(meta, current, load_nodes(nodes_file, refuse_links="williw replan"), max_slowdown=max_slowdown,
                    objective=objective, max_step_bytes=max_step_bytes)
    if output:
        save_plan(result.plan, output)
    if migration_file:
        write_json(migration_file, result.migration.to_dict())
    summary = {**result.summary(), "output": output, "migration": migration_file}
    if as_json:
        if not output:
            summary["plan"] = result.plan.to_dict()
        if not migration_file:
            summary["migration_schedule"] = result.migration.to_dict()
    emit(as_json, summary, lambda: _human(result, max_slowdown, output, migration_file))


def _human(result, max_slowdown: float, output: str | None, migration_file: str | None) -> str:
    from williw.planner import MODEL_SOURCE
    from williw.units import format_bytes, format_seconds

    pulls = [s for s in result.migration.steps if s.action == "pull"]
    rows = []
    for a in result.plan.assignments:
        mine = [s for s in pulls if s.node_id == a.node_id]
        peer = sum(s.bytes for s in mine if s.source != MODEL_SOURCE)
        time_s = a.stage_time_s if result.plan.objective == "prefill" else a.decode_time_s
        rows.append([a.node_id, str(a.stage), f"[{a.blocks[0]}, {a.blocks[1]})", format_bytes(a.bytes),
                     format_bytes(sum(s.bytes for s in mine)), format_bytes(peer), format_seconds(time_s or 0.0)])
    lines = [table(rows, ["node", "stage", "blocks", "memory", "pulls", "from peers", "time"])]
    if result.bottleneck_before_s is not None:
        before = format_seconds(result.bottleneck_before_s)
    elif result.departed:
        before = f"- ({', '.join(repr(u) for u in result.departed)} left)"
    else:
        before = "- (the current plan does not fit this fleet)"
    figure = "seconds per token" if result.plan.objective == "latency" else "bottleneck"
    lines.append(f"plan v{result.plan.version} ({result.plan.objective}): {figure} before {before}, after "
                 f"{format_seconds(result.bottleneck_after_s)} (best {format_seconds(result.best_bottleneck_s)}, "
                 f"bound +{max_slowdown:.0%} {format_seconds(result.bound_s)})")
    how = "fewest possible" if result.exact else \
        f"heuristic; at least {format_bytes(result.moved_lower_bound)} must move"
    lines.append(f"bytes moved {format_bytes(result.bytes_moved)} ({how}); a fresh plan moves "
                 f"{format_bytes(result.fresh_bytes_moved)}")
    steps = result.migration.steps
    lines.append(f"migration: {len(pulls)} pull steps ({format_bytes(result.migration.peer_bytes)} from peers), "
                 f"switch to v{result.plan.version}, {sum(s.action == 'drop' for s in steps)} drop steps")
    for v in result.migration.nodes:
        if v.over_memory:
            lines.append(f"warning: node '{v.node_id}' holds {format_bytes(v.peak_bytes)} while migrating (old and "
                         f"new tensors until the switch) but has {format_bytes(v.memory_bytes)}")
    lines += [f"wrote {path}" for path in (output, migration_file) if path]
    return "\n".join(lines)
