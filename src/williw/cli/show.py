"""``williw show-plan``: draw an existing plan JSON as an SVG picture (`williw.planviz`)."""

from __future__ import annotations

import click

from williw.cli import cli
from williw.cli._output import emit, json_option, set_json_mode


@cli.command("show-plan")
@click.argument("plan_file", metavar="PLAN", type=click.Path(dir_okay=False))
@click.option("--svg", "svg_path", required=True, type=click.Path(dir_okay=False), help="Write the picture here.")
@click.option("--nodes", "nodes_file", type=click.Path(dir_okay=False),
              help="Nodes file, to draw each node's memory use against its capacity.")
@click.option("--metadata", "metadata_file", type=click.Path(dir_okay=False),
              help="The model's metadata JSON, to check the plan against the model before drawing it.")
@click.option("--title", help="Heading of the picture (default: model, strategy, objective, version).")
@json_option
def show_plan_cmd(plan_file: str, svg_path: str, nodes_file: str | None, metadata_file: str | None,
                  title: str | None, as_json: bool) -> None:
    """Draw PLAN (a plan JSON) as an SVG: one bar per pipeline stage, or one load bar per node of a greedy plan.

    With --nodes and/or --metadata the plan is first checked as `williw validate` checks it (exit 2 if it fails).
    """
    set_json_mode(as_json)
    from williw.fleet import load_nodes
    from williw.metadata import load_metadata
    from williw.planner import load_plan
    from williw.planner.validate import check_plan

    plan = load_plan(plan_file)
    nodes = load_nodes(nodes_file) if nodes_file else None
    meta = load_metadata(metadata_file) if metadata_file else None
    if nodes is not None or meta is not None:
        names = [x.name for x in meta.layers] if meta else [n for a in plan.assignments for n in a.layer_names]
        check_plan(names, plan, metadata=meta, nodes=nodes, shown=3)
    result = write_svg(plan, svg_path, nodes, title)
    emit(as_json, result, lambda: f"wrote {svg_path} ({result['parts']} {result['kind']})")


def write_svg(plan, svg_path: str, nodes: list | None, title: str | None = None) -> dict:
    """Draw ``plan`` to ``svg_path`` atomically; shared with ``williw plan --svg``. Returns what was drawn."""
    from williw.fsutil import atomic_writer
    from williw.planviz import plan_svg

    svg = plan_svg(plan, nodes, title=title)
    with atomic_writer(svg_path, "wb") as f:
        f.write(svg.encode("utf-8"))
    pipeline = plan.strategy == "pipeline"
    return {"svg": svg_path, "strategy": plan.strategy, "kind": "stages" if pipeline else "node bars",
            "parts": len(plan.assignments), "excluded": len(plan.excluded), "nodes_known": nodes is not None}
