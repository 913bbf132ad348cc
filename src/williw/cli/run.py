"""``williw serve-model`` (and, with the workflow, ``williw run`` and ``williw node``)."""

from __future__ import annotations

import click

from williw.cli import cli
from williw.cli._output import emit, json_option, set_json_mode


@cli.command("serve-model")
@click.argument("model_dir", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8001, show_default=True)
@json_option
def serve_model_cmd(model_dir: str, host: str, port: int, as_json: bool) -> None:
    """Serve MODEL_DIR over HTTP with range support, so nodes pull only their own tensors' bytes."""
    set_json_mode(as_json)
    from williw.serve import ModelServer

    server = ModelServer(model_dir, host, port)
    emit(as_json, {"url": server.url, "files": sorted(server.files)},
         f"serving {len(server.files)} files of {model_dir} at {server.url} (Ctrl-C to stop)")
    try:
        server.serve_forever()
    finally:
        server.server_close()
