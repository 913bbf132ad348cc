"""``williw verify``: run the shards as a pipeline and compare with the full model."""

from __future__ import annotations

import click

from williw.cli import cli
from williw.cli._output import emit, json_option, set_json_mode, table


@cli.command("verify")
@click.argument("model_dir", type=click.Path())
@click.option("--plan", "plan_path", required=True, type=click.Path(dir_okay=False), help="The plan JSON.")
@click.option("--shards", "shards_dir", required=True, type=click.Path(file_okay=False),
              help="Folder of <node_id>/model.safetensors + config.json.")
@click.option("--prompt", help="Input text (default: a pangram); tokenizer if the model has one, else UTF-8 bytes.")
@click.option("--dtype", type=click.Choice(["float32", "float64", "bfloat16", "float16", "auto"]),
              default="float32", show_default=True, help="Compute dtype; auto = the checkpoint's.")
@click.option("--atol", type=click.FloatRange(min=0), help="Absolute tolerance (default: 0 in float32).")
@click.option("--rtol", type=click.FloatRange(min=0), help="Relative tolerance (default: 0 in float32).")
@json_option
def verify_cmd(model_dir: str, plan_path: str, shards_dir: str, prompt: str | None, dtype: str,
               atol: float | None, rtol: float | None, as_json: bool) -> None:
    """Build each stage from its shard alone, run the stages in plan order and compare the output with MODEL_DIR's.

    Exits 0 only when the outputs match (bit-exact in float32), 2 otherwise with the stage that differs.
    """
    set_json_mode(as_json)
    from williw.errors import VerifyError
    from williw.verify import DEFAULT_PROMPT, verify_shards

    report = verify_shards(model_dir, plan_path, shards_dir, prompt=DEFAULT_PROMPT if prompt is None else prompt,
                           dtype=dtype, atol=atol, rtol=rtol)
    emit(as_json, report.to_dict(), lambda: _human(report))
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
