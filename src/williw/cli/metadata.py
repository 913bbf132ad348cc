"""``williw metadata``: headers in, metadata JSON out."""

from __future__ import annotations

import dataclasses

import click

from williw.cli import cli
from williw.cli._output import emit, json_option, set_json_mode, table


@cli.command("metadata")
@click.argument("model")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the metadata JSON here.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--sequence-length", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--model-name", help="Name recorded in the JSON (default: the folder name, or the repo id).")
@click.option("--revision", help="Hub branch, tag or commit (default: main); the JSON records the commit.")
@click.option("--token", help="Hub token (default: HF_TOKEN, then the saved login).")
@click.option("--download", is_flag=True,
              help="Download the weights first (a repo with only .bin/.pth weights: their layout is in the files).")
@json_option
def metadata_cmd(model: str, output: str | None, batch_size: int, sequence_length: int, model_name: str | None,
                 revision: str | None, token: str | None, download: bool, as_json: bool) -> None:
    """Read MODEL's checkpoint headers and write per-tensor metadata (shapes, bytes, blocks, GFLOPs).

    MODEL is a model folder, a Hub repo id (ORG/NAME: config.json and every safetensors header are read by HTTP
    range, no weight is downloaded) or the URL of williw serve-model.
    """
    set_json_mode(as_json)
    from williw.metadata import generate_metadata, save_metadata
    from williw.remote_checkpoint import is_remote_model

    fetched = None
    source: object = model
    if is_remote_model(model) and download:
        from williw.hub import DownloadConfig, ModelDownloader

        got = ModelDownloader(token).download_model(DownloadConfig(model, revision=revision))
        from williw.checkpoint import open_checkpoint

        source = open_checkpoint(got.local_path)
        source = dataclasses.replace(source, location=model, commit=got.commit)  # type: ignore[arg-type]
    elif is_remote_model(model):
        from williw.remote_checkpoint import open_remote_checkpoint

        fetched = open_remote_checkpoint(model, revision=revision, token=token)
        source = fetched.checkpoint
    meta = generate_metadata(source, model_name=model_name,  # type: ignore[arg-type]
                             batch_size=batch_size, sequence_length=sequence_length)
    if output:
        save_metadata(meta, output)
    summary = {
        "model_name": meta.model_name, "architecture": meta.architecture, "format": meta.checkpoint_format,
        "tensors": meta.total_layers, "blocks": len(meta.blocks), "total_params": meta.total_params,
        "total_bytes": meta.total_bytes, "total_compute_gflops": meta.total_compute, "output": output,
        "stacks": list(meta.stacks), "ignored_files": list(meta.ignored_files), "commit": meta.commit,
    }
    if fetched is not None:
        summary.update(header_bytes=fetched.header_bytes, bytes_downloaded=fetched.bytes_received,
                       requests=fetched.requests)
    emit(as_json, meta.to_dict() if as_json and not output else summary, lambda: _human(meta, output, fetched))


def _human(meta, output: str | None, fetched=None) -> str:
    from williw.units import format_bytes, format_gflops

    by_type: dict[str, list[float]] = {}
    for x in meta.layers:
        acc = by_type.setdefault(x.layer_type, [0, 0, 0, 0.0])
        acc[0] += 1
        acc[1] += x.num_params
        acc[2] += x.bytes
        acc[3] += x.compute_required
    rows = [[k, str(v[0]), f"{v[1]:,}", format_bytes(v[2]), format_gflops(v[3])] for k, v in sorted(by_type.items())]
    lines = [
        f"{meta.model_name} ({meta.architecture or meta.model_type}, {meta.checkpoint_format}): "
        f"{meta.total_layers} tensors, {len(meta.blocks)} blocks, {meta.total_params:,} params, "
        f"{format_bytes(meta.total_bytes)}, {format_gflops(meta.total_compute)} for "
        f"batch {meta.batch_size} x {meta.sequence_length} tokens",
        table(rows, ["layer type", "tensors", "params", "bytes", "compute"]),
    ]
    if len(meta.stacks) > 1:
        lines.append("stacks in execution order: " + " -> ".join(
            f"{s['part']} '{s['prefix']}' blocks [{s['start']}, {s['start'] + s['layers']})" for s in meta.stacks))
    mtp = sorted({x.stack_index for x in meta.layers if x.role == "mtp"})
    if mtp:
        lines.append(f"not in the forward pass: multi-token-prediction layer(s) {', '.join(map(str, mtp))}, "
                     "held by the last stage")
    if meta.ignored_files:
        lines.append(f"ignored (not the checkpoint): {', '.join(meta.ignored_files)}")
    if meta.tied_lm_head:
        head = meta.tied_lm_head
        lines.append(f"tied LM head on '{head.tensor}': {format_gflops(head.compute_required)} on the last stage")
    if fetched is not None:
        lines.append(f"read at commit {meta.commit or '-'}: {len(fetched.checkpoint.files)} header(s), "
                     f"{format_bytes(fetched.bytes_received)} downloaded in {fetched.requests} request(s), "
                     "no weights")
    if output:
        lines.append(f"wrote {output}")
    return "\n".join(lines)
