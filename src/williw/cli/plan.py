"""``williw plan`` (metadata + nodes in, plan JSON out) and ``williw validate`` (is a plan complete and fitting)."""

from __future__ import annotations

import sys

import click

from williw.cli import cli
from williw.cli._output import EXIT_USER_ERROR, emit, json_option, set_json_mode, table
from williw.jsonio import INT64_MAX


@cli.command("plan")
@click.argument("metadata", type=click.Path(dir_okay=False))
@click.option("--nodes", "nodes_file", required=True, type=click.Path(dir_okay=False),
              help="Nodes file (JSON or YAML list of node_id, compute_tflops, memory_gb, ...; or {\"nodes\": [...], "
                   "\"links\": [...]} with a table of pair links).")
@click.option("--strategy", type=click.Choice(["pipeline", "greedy"]), default="pipeline", show_default=True,
              help="pipeline: contiguous blocks, minimal bottleneck; greedy: the seed's algorithm.")
@click.option("--objective", type=click.Choice(["prefill", "decode", "latency"]), default="prefill",
              show_default=True, help="What the plan minimises: the slowest stage's GFLOPs / TFLOPS (prefill) or "
                                      "bytes / memory bandwidth (decode), or the sum of the stages' decode times "
                                      "(latency of one request); transfers included.")
@click.option("--batch-size", type=click.IntRange(min=1, max=INT64_MAX),
              help="Sequences served at once (default: the metadata's).")
@click.option("--context-length", type=click.IntRange(min=1, max=INT64_MAX),
              help="Tokens of KV cache per sequence each stage must hold (default: the metadata's sequence length).")
@click.option("--time-limit", "time_limit", type=click.FloatRange(min=0.0, min_open=True, max=86_400.0), default=5.0,
              show_default=True, help="Seconds for the exact search over more than 12 candidate nodes; when they run "
                                      "out, the best plan found with a certified gap to the lower bound.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the plan JSON here.")
@click.option("--svg", "svg_path", type=click.Path(dir_okay=False), help="Also draw the plan as an SVG picture here.")
@json_option
def plan_cmd(metadata: str, nodes_file: str, strategy: str, objective: str, batch_size: int | None,
             context_length: int | None, time_limit: float, output: str | None, svg_path: str | None,
             as_json: bool) -> None:
    """Plan which node holds which tensors of the model described by METADATA."""
    set_json_mode(as_json)
    from williw.fleet import load_fleet
    from williw.metadata import load_metadata
    from williw.planner import make_plan, save_plan

    meta = load_metadata(metadata)
    for note in meta.notes:
        click.echo(f"note: {note}", err=True)
    fleet = load_fleet(nodes_file)
    nodes = list(fleet.nodes)
    plan = make_plan(meta, nodes, strategy=strategy, objective=objective, time_limit_s=time_limit,
                     batch_size=batch_size, context_length=context_length, links=fleet.links)
    if output:
        save_plan(plan, output)
    if svg_path:
        from williw.cli.show import write_svg

        write_svg(plan, svg_path, nodes)
    if as_json and not output:
        emit(True, plan.to_dict(), "")
        return
    summary = {k: v for k, v in plan.to_dict()["@plan"].items()}
    summary.update(nodes_used=len(plan.assignments), nodes_given=len(nodes), output=output, svg=svg_path)
    emit(as_json, summary, lambda: plan_table(plan, len(nodes), output) + (f"\nwrote {svg_path}" if svg_path else ""))


def plan_table(plan, given: int, output: str | None) -> str:
    """The per-node table and one-line summary that `williw plan` prints (also used by `williw run`)."""
    from williw.units import format_bytes, format_gflops, format_seconds

    def secs(x: float | None) -> str:
        return format_seconds(x) if x is not None else "-"

    def size(x: int | None) -> str:
        return "-" if x is None else format_bytes(x) if x >= 0 else f"-{format_bytes(-x)}"

    # With a link table the plan gives each stage's transfers; the table shows those of the plan's objective.
    transfers = {t["node_id"]: t["prefill" if plan.objective == "prefill" else "decode"]
                 for t in plan.extra.get("transfers_s", [])}
    # What each stage runs in (device, compute dtype, weight format): shown once any stage is not float32 weights
    # as stored on the CPU, the reading of a plan that records none.
    runs = any((a.run_device, a.precision.dtype, a.precision.weights) != ("cpu", "float32", "as-stored")
               for a in plan.assignments)
    rows = []
    for a in plan.assignments:
        hops = [secs(x) for x in transfers[a.node_id]] if a.node_id in transfers else []
        where = [a.run_device, a.precision.dtype, a.precision.weights] if runs else []
        rows.append([a.node_id, "-" if a.stage is None else str(a.stage),
                     "-" if a.blocks is None else f"[{a.blocks[0]}, {a.blocks[1]})", *where, str(len(a.layer_names)),
                     format_gflops(a.total_compute), format_bytes(a.bytes), size(a.kv_bytes),
                     size(a.activation_bytes), size(a.headroom_bytes), secs(a.stage_time_s),
                     secs(a.decode_time_s), *hops, f"{a.compute_utilization * 100:.1f}%"])
    lines = [table(rows, ["node", "stage", "blocks", *(["device", "dtype", "format"] if runs else []), "tensors",
                          "compute", "weights", "kv", "activations", "headroom", "prefill", "decode",
                          *(["receive", "send"] if transfers else []), "util"])]
    parts = [f"{plan.strategy} ({plan.objective}): {len(plan.assignments)} of {given} nodes",
             f"bottleneck {secs(plan.bottleneck_s)}"]
    if plan.lower_bound_s:
        gap = plan.extra.get("gap_to_lower_bound")
        exact = {True: "exact", False: f"certified gap {gap * 100:.2f}%" if gap is not None else "heuristic",
                 None: ""}[plan.exact]
        parts[-1] += f" (lower bound {secs(plan.lower_bound_s)}{', ' + exact if exact else ''})"
    parts += [f"prefill {secs(plan.prefill_bottleneck_s)}", f"decode {secs(plan.decode_bottleneck_s)}",
              f"latency {secs(plan.latency_s)}"]
    if plan.tokens_per_s:
        # From the nodes' declared TFLOPS and bandwidth: what the fleet file promises, not a measurement.
        parts.append(f"{plan.tokens_per_s:,.1f} tokens/s predicted")
    lines.append(", ".join(parts))
    if "context_length" in plan.extra:
        lines.append(capacity_line(plan.extra))
    lines += [f"excluded {e.node_id}: {e.reason}" for e in plan.excluded]
    if output:
        lines.append(f"wrote {output}")
    return "\n".join(lines)


def capacity_line(extra: dict) -> str:
    """``holds batch B x context C; at most context X at batch B, batch Y at context C``."""
    b, c = extra["batch_size"], extra["context_length"]
    most_c = "any context" if extra.get("max_context_length") is None else f"context {extra['max_context_length']:,}"
    most_b = "any batch" if extra.get("max_batch_size") is None else f"batch {extra['max_batch_size']:,}"
    return f"holds batch {b} x context {c:,}; at most {most_c} at batch {b}, {most_b} at context {c:,}"


@cli.command("validate")
@click.argument("metadata", type=click.Path(dir_okay=False))
@click.argument("plan_file", metavar="PLAN", type=click.Path(dir_okay=False))
@click.option("--nodes", "nodes_file", type=click.Path(dir_okay=False), help="Also check each node's memory.")
@json_option
def validate_cmd(metadata: str, plan_file: str, nodes_file: str | None, as_json: bool) -> None:
    """Check that PLAN assigns every tensor of METADATA exactly once (and fits the nodes). Exit 2 if not."""
    set_json_mode(as_json)
    from williw.fleet import load_nodes
    from williw.metadata import load_metadata
    from williw.planner import check_plan, load_plan, validate_split_plan

    meta = load_metadata(metadata)
    for note in meta.notes:
        click.echo(f"note: {note}", err=True)
    plan = load_plan(plan_file)
    nodes = load_nodes(nodes_file) if nodes_file else None
    names = [x.name for x in meta.layers]
    if not as_json:
        check_plan(names, plan, metadata=meta, nodes=nodes)
        click.echo(f"{plan_file}: valid {plan.strategy} plan, {len(plan.assignments)} nodes, {len(names)} tensors")
        return
    problems = validate_split_plan(names, plan, metadata=meta, nodes=nodes)
    emit(True, {"valid": not problems, "problems": problems, "plan": plan_file}, "")
    if problems:
        # sys.exit, not click's Exit: run_main calls click with standalone_mode=False, which turns Exit(2) into
        # a return value that run_main drops (exit 0).
        sys.exit(EXIT_USER_ERROR)
