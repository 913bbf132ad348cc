"""``williw split`` and ``williw check-shards``: a model and a plan in, per-node shard folders out."""

from __future__ import annotations

import sys

import click

from williw.cli import cli
from williw.cli._output import emit, json_option, set_json_mode, table


@cli.command("split")
@click.argument("model_dir", type=click.Path())
@click.option("--plan", "plan_path", required=True, type=click.Path(dir_okay=False), help="The plan JSON.")
@click.option("--node", "node_ids", multiple=True, help="Write this node's shard (repeatable).")
@click.option("--all", "all_nodes", is_flag=True, help="Write every node's shard in one pass over the model.")
@click.option("-o", "--output", default="shards", show_default=True, type=click.Path(file_okay=False),
              help="Shards folder; each node gets OUTPUT/<node_id>/.")
@click.option("--format", "fmt", type=click.Choice(["safetensors", "pth"]), default="safetensors",
              show_default=True, help="pth is the seed's torch.save file (needs torch).")
@click.option("--model-name", help="Name recorded in the manifests (default: the plan's, else the folder name).")
@json_option
def split_cmd(model_dir: str, plan_path: str, node_ids: tuple[str, ...], all_nodes: bool, output: str, fmt: str,
              model_name: str | None, as_json: bool) -> None:
    """Cut MODEL_DIR into per-node shards by the plan. Re-running skips shards that are already complete."""
    set_json_mode(as_json)
    if bool(node_ids) == all_nodes:
        raise click.UsageError("give either --node ID (repeatable) or --all")
    from williw.planner.plan import load_plan
    from williw.splitter import split_all

    results = split_all(model_dir, load_plan(plan_path), output, node_ids=list(node_ids) or None, fmt=fmt,
                        model_name=model_name)
    rows = [{"node_id": r.node_id, "shard_path": r.shard_path, "tensors": len(r.layer_names) + len(r.shared_tensors),
             "total_params": r.total_params, "shard_size_mb": round(r.shard_size_mb, 3), "sha256": r.file_sha256,
             "status": "skipped" if r.skipped else "written"} for r in results]

    def human() -> str:
        from williw.units import format_bytes

        # shard_size_mb keeps the seed's MiB in the JSON; people read the decimal units of every other table.
        return table([[r["node_id"], str(r["tensors"]), f"{r['total_params']:,}",
                       format_bytes(r["shard_size_mb"] * 2**20),
                       r["status"], r["shard_path"]] for r in rows],
                     ["node", "tensors", "params", "size", "status", "path"])

    emit(as_json, {"output": output, "format": fmt, "shards": rows}, human)


@cli.command("check-shards")
@click.argument("shards_dir", type=click.Path(file_okay=False))
@click.option("--plan", "plan_path", required=True, type=click.Path(dir_okay=False), help="The plan JSON.")
@click.option("--model", "model_dir", required=True, type=click.Path(), help="The source model folder.")
@json_option
def check_shards_cmd(shards_dir: str, plan_path: str, model_dir: str, as_json: bool) -> None:
    """Check that each shard holds exactly its node's tensors, byte-equal to the model's. Exits 1 on a problem."""
    set_json_mode(as_json)
    from williw.planner.plan import load_plan
    from williw.splitter import check_shards

    report = check_shards(shards_dir, load_plan(plan_path), model_dir)
    result = {"ok": report.ok, "problems": list(report.problems),
              "nodes": [{"node_id": n.node_id, "ok": n.ok, "tensors": n.tensors, "bytes": n.bytes,
                         "problems": list(n.problems)} for n in report.nodes]}

    def human() -> str:
        from williw.units import format_bytes

        rows = [[n.node_id, str(n.tensors), format_bytes(n.bytes), "ok" if n.ok else f"{len(n.problems)} problem(s)"]
                for n in report.nodes]
        lines = [table(rows, ["node", "tensors", "size", "status"]), *report.problems]
        lines.append("all shards match the model" if report.ok else f"{len(report.problems)} problem(s)")
        return "\n".join(lines)

    emit(as_json, result, human)
    if not report.ok:
        sys.exit(1)
