"""``williw worker``: the worker service (requests, node registry, plans) over HTTP."""

from __future__ import annotations

import click

from williw.cli import cli
from williw.cli._output import json_option, set_json_mode


@cli.command("worker")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on (0: any free port, printed at start).")
@click.option("--db", "db_url", default="williw-worker.db", show_default=True,
              help="SQLite file, or a URL: sqlite:///FILE, postgresql+psycopg://USER@HOST/DB.")
@click.option("--token", envvar="WILLIW_TOKEN", default=None, show_envvar=True,
              help="Admin token; when set, every mutating endpoint needs 'Authorization: Bearer <token>'.")
@click.option("--node-ttl", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              help="Seconds after its last heartbeat that a node counts as offline.")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=16 * 1024 * 1024, show_default=True,
              help="Larger request bodies get 413.")
@click.option("--hub-endpoint", envvar="HF_ENDPOINT", default=None, help="Hub to read metadata_repo from.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              default="warning", show_default=True)
@click.option("--access-log", is_flag=True, help="Log every request.")
@json_option
def worker_cmd(host: str, port: int, db_url: str, token: str | None, node_ttl: float, max_body_bytes: int,
               hub_endpoint: str | None, log_level: str, access_log: bool, as_json: bool) -> None:
    """Serve the worker API: POST /api/request, /api/process, /api/get-plan, the node registry, /healthz."""
    set_json_mode(as_json)
    import json

    from williw.worker.server import serve
    from williw.worker.service import WorkerSettings
    from williw.worker.store import normalize_url

    configure_logging(log_level)
    settings = WorkerSettings(db_url=db_url, token=token or None, node_ttl_s=node_ttl, max_body_bytes=max_body_bytes,
                              hub_endpoint=hub_endpoint)
    shown_db = _hide_password(normalize_url(db_url))

    def announce(url: str) -> None:
        info = {"event": "listening", "url": url, "db": shown_db, "auth": "token" if token else "open",
                "node_ttl_s": node_ttl, "max_body_bytes": max_body_bytes}
        if as_json:
            click.echo(json.dumps(info))
        else:
            click.echo(f"williw worker listening on {url} (db {shown_db}, auth {info['auth']}, "
                       f"node TTL {node_ttl:g} s); Ctrl-C stops it")

    serve(settings, host, port, log_level=log_level, access_log=access_log, on_listening=announce)


def _hide_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def configure_logging(level: str) -> None:
    """One handler, on the root logger, for the worker's log. huggingface_hub gives its loggers a handler of their
    own and lets records propagate as well, so without this each of its lines (its retries, say) appears twice."""
    import logging

    from huggingface_hub.utils import logging as hf_logging

    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    library = hf_logging.get_logger()  # creates the library's logger and its handler if not done yet
    for handler in list(library.handlers):
        library.removeHandler(handler)
    library.propagate = True
