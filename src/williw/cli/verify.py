"""``williw verify``: run the shards as a pipeline and compare with the full model."""

from __future__ import annotations

import click

from williw.cli import cli
from williw.cli._output import emit, json_option, set_json_mode, table
from williw.jsonio import INT64_MAX


@cli.command("verify")
@click.argument("model_dir", type=click.Path())
@click.option("--plan", "plan_path", required=True, type=click.Path(dir_okay=False), help="The plan JSON.")
@click.option("--shards", "shards_dir", required=True, type=click.Path(file_okay=False),
              help="Folder of <node_id>/model.safetensors + config.json.")
@click.option("--prompt", help="Input text (default: a pangram); tokenizer if the model has one, else UTF-8 bytes.")
@click.option("--dtype", type=click.Choice(["float32", "float64", "bfloat16", "float16", "auto"]),
              default="float32", show_default=True, help="Compute dtype; auto = the checkpoint's.")
@click.option("--weights", type=click.Choice(["as-stored", "int8", "int4"]), default="as-stored", show_default=True,
              help="The blocks' linear weights, in the stages and the whole model alike: int8 per channel, int4 "
                   "group-wise (weight-only; bit-exact on the CPU).")
@click.option("--device", default="cpu", show_default=True,
              help="auto, cpu, cuda[:N] or mps, for the stages and the whole model alike.")
@click.option("--atol", type=click.FloatRange(min=0), help="Absolute tolerance (default: 0 in float32).")
@click.option("--rtol", type=click.FloatRange(min=0), help="Relative tolerance (default: 0 in float32).")
@click.option("--batch-size", type=click.IntRange(min=1, max=INT64_MAX),
              help="Also run each stage on this many sequences with its KV cache filled to --context-length, and "
                   "report its measured peak memory next to the planner's prediction (default 1 with a context).")
@click.option("--context-length", type=click.IntRange(min=1, max=INT64_MAX),
              help="Tokens of KV cache per sequence for the memory check (default 512 with a batch size).")
@json_option
def verify_cmd(model_dir: str, plan_path: str, shards_dir: str, prompt: str | None, dtype: str, weights: str,
               device: str, atol: float | None, rtol: float | None, batch_size: int | None, context_length: int | None,
               as_json: bool) -> None:
    """Build each stage from its shard alone, run the stages in plan order and compare the output with MODEL_DIR's.

    Exits 0 only when the outputs match (bit-exact in float32), 2 otherwise with the stage that differs.
    """
    set_json_mode(as_json)
    from williw.devices import resolve_device
    from williw.errors import VerifyError
    from williw.verify import DEFAULT_PROMPT, verify_shards

    report = verify_shards(model_dir, plan_path, shards_dir, prompt=DEFAULT_PROMPT if prompt is None else prompt,
                           dtype=dtype, atol=atol, rtol=rtol, weights=weights, device=resolve_device(device))
    memory = None
    if batch_size is not None or context_length is not None:
        from williw.verify_memory import measure_stages

        memory = measure_stages(model_dir, plan_path, shards_dir, batch_size=batch_size or 1,
                                context_length=context_length or 512,
                                dtype="float32" if dtype == "auto" else dtype, weights=weights)
    data = report.to_dict()
    if memory is not None:
        data["memory"] = [{"stage": m.stage, "node_id": m.node_id, "blocks": list(m.blocks),
                           "predicted_bytes": m.predicted_bytes, "kv_bytes": m.kv_bytes,
                           "measured_bytes": m.measured_bytes, "measured_over_predicted": m.ratio} for m in memory]
        data["memory_workload"] = {"batch_size": batch_size or 1, "context_length": context_length or 512}
    emit(as_json, data, lambda: _human(report) + (_memory(memory, batch_size or 1, context_length or 512)
                                                   if memory is not None else ""))
    if not report.ok:
        raise VerifyError(report.failure)


def _human(report) -> str:
    from williw.units import format_bytes, format_seconds

    def row(s, label: str) -> list[str]:
        diff = "-" if s.max_abs_diff is None else f"{s.max_abs_diff:.3g}"
        return [label, s.node_id, f"[{s.blocks[0]}, {s.blocks[1]})", f"{s.parameters:,}", format_seconds(s.load_s),
                format_seconds(s.run_s), format_bytes(s.peak_rss_bytes), format_bytes(s.rss_delta_bytes), diff]

    rows = [row(report.reference, "ref")] + [row(s, str(s.stage)) for s in report.stages]
    tol = "exact" if report.atol == 0 and report.rtol == 0 else f"atol {report.atol:g}, rtol {report.rtol:g}"
    lines = [f"{report.model_dir} ({report.architecture}, {report.dtype}): {report.note}; "
             f"{report.tokens} tokens from {report.token_source}",
             table(rows, ["stage", "node", "blocks", "params", "load", "run", "peak RSS", "RSS delta",
                          "max abs diff"]),
             f"memory: {report.memory_method}"]
    for o in report.outputs:
        top1 = {None: "", True: ", top-1 agrees at every position", False: ", top-1 DIFFERS"}[o.top1_agree]
        lines.append(f"{o.name} {list(o.shape)}: max abs diff {o.max_abs_diff:.3g}, max rel diff "
                     f"{o.max_rel_diff:.3g}{top1} (tolerance {tol}): {'match' if o.match else 'MISMATCH'}")
    lines.append("OK: the shards compute the model" if report.ok else f"FAILED: {report.failure}")
    return "\n".join(lines)


def _memory(rows, batch: int, context: int) -> str:
    from williw.units import format_bytes

    body = [[str(m.stage), m.node_id, f"[{m.blocks[0]}, {m.blocks[1]})", format_bytes(m.predicted_bytes),
             format_bytes(m.kv_bytes), format_bytes(m.measured_bytes), f"{m.ratio:.2f}"] for m in rows]
    return (f"\nmemory at batch {batch} x context {context:,} (KV cache filled; measured = weights + peak RSS "
            f"growth while the stage runs):\n"
            + table(body, ["stage", "node", "blocks", "predicted", "of it KV", "measured", "measured/predicted"]))
