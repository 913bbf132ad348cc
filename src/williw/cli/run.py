"""``williw serve-model``, ``williw node`` (the node agent) and ``williw run`` (the complete workflow)."""

from __future__ import annotations

import click

from williw.cli import cli
from williw.cli._output import emit, json_option, set_json_mode
from williw.fleet import check_number


def _node_number(field: str):
    """A node field checked as in a nodes file (`check_number`): click's float takes "nan" and "1e400" (inf),
    which reached the registration's JSON encoder as a traceback."""
    def check(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
        if value is None:
            return None
        try:
            return check_number(field, value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx, param) from None
    return check


def _spec(check):
    """A click callback: ``check(value)``'s ValueError (`williw.devices.check_device_spec`,
    `williw.precision.parse_weights`) as click's one-line usage error."""
    def callback(ctx: click.Context, param: click.Parameter, value: str) -> str:
        try:
            check(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx, param) from None
        return value
    return callback


def _check_device_spec(value: str) -> None:
    from williw.devices import check_device_spec

    check_device_spec(value)


def _check_weights(value: str) -> None:
    from williw.precision import parse_weights

    parse_weights(value)


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


@cli.command("node")
@click.option("--worker", "worker_url", envvar="WORKER_URL", required=True, help="The worker's URL (WORKER_URL).")
@click.option("--node-id", required=True, envvar="NODE_ID", help="This node's id (NODE_ID).")
@click.option("--compute-tflops", type=click.FloatRange(min=0, min_open=True), required=True,
              callback=_node_number("compute_tflops"))
@click.option("--memory-gb", type=click.FloatRange(min=0, min_open=True), required=True,
              callback=_node_number("memory_gb"))
@click.option("--memory-bandwidth-gbps", type=click.FloatRange(min=0, min_open=True),
              callback=_node_number("memory_bandwidth_gbps"))
@click.option("--network-gbps", type=float, callback=_node_number("network_gbps"),
              help="Link speed, GB/s (1e9 bytes/s).")
@click.option("--latency-ms", type=float, callback=_node_number("latency_ms"),
              help="One-way network latency, milliseconds.")
@click.option("--memory-reserve-gb", type=float, callback=_node_number("memory_reserve_gb"),
              help="Memory kept free for the runtime (CUDA context, allocator slack), GB.")
@click.option("--data-dir", type=click.Path(file_okay=False), required=True,
              help="Where the node keeps its token (node.json) and its shards (<request_id>/v<version>/<node_id>/).")
@click.option("--token", envvar="WILLIW_TOKEN", help="The worker's admin token, for the first registration.")
@click.option("--heartbeat-s", type=click.FloatRange(min=0.05), default=5.0, show_default=True)
@click.option("--poll-s", type=click.FloatRange(min=0.05), default=1.0, show_default=True)
@click.option("--serve-host", default="127.0.0.1", show_default=True,
              help="Where this node serves its shards to peers during a re-plan ('none': it does not).")
@click.option("--serve-port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Port of the shard server (0: any free port).")
@click.option("--serve-url", help="The URL peers reach the shard server at (default http://HOST:PORT).")
@click.option("--device", default="auto", show_default=True, callback=_spec(_check_device_spec),
              help="Where stages run: auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:N or mps.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Compute dtype (auto: bfloat16 on CUDA, float16 on MPS, float32 on the CPU, "
                                      "bfloat16 there for int8/int4 weights).")
@click.option("--weights", default="as-stored", show_default=True, callback=_spec(_check_weights),
              help="Weight formats this node accepts: as-stored, int8, int4, a comma-separated list, or auto.")
@json_option
def node_cmd(worker_url: str, node_id: str, compute_tflops: float, memory_gb: float,
             memory_bandwidth_gbps: float | None, network_gbps: float | None, latency_ms: float | None,
             memory_reserve_gb: float | None, data_dir: str, token: str | None, heartbeat_s: float,
             poll_s: float, serve_host: str, serve_port: int, serve_url: str | None, device: str, dtype: str,
             weights: str, as_json: bool) -> None:
    """Run a node agent: register, heartbeat, pull each assigned shard, check it and report it ready."""
    import os
    import signal
    import sys

    set_json_mode(as_json)
    from williw.agent import AgentConfig, NodeAgent
    from williw.devices import resolve_node

    runs = resolve_node(device, dtype, weights)  # a device this machine lacks: one line, exit 2, not registered
    agent = NodeAgent(AgentConfig(worker_url, node_id, compute_tflops, memory_gb, data_dir, token=token,
                                  memory_bandwidth_gbps=memory_bandwidth_gbps, heartbeat_s=heartbeat_s,
                                  poll_s=poll_s, hf_token=os.environ.get("HF_TOKEN"),
                                  serve_host=None if serve_host == "none" else serve_host, serve_port=serve_port,
                                  serve_url=serve_url, network_gbps=network_gbps, latency_ms=latency_ms,
                                  memory_reserve_gb=memory_reserve_gb, device=runs.device, dtype=runs.dtype,
                                  weights=runs.weights, device_name=runs.name,
                                  device_memory_bytes=runs.memory_bytes))

    def _stop(*_: object) -> None:
        # Leave at once, even mid-pull: shard files are written atomically, so an interrupted pull leaves no
        # shard that looks complete, and a restarted agent resumes it.
        agent.stop()
        # A pull's reader threads may sit in a network retry; give them 3 s, then leave without them.
        import threading

        threading.Timer(3.0, os._exit, args=(0,)).start()
        raise SystemExit(0)

    def _event(event: str, fields: dict) -> None:
        where = f"request {fields['request_id']} plan version {fields['plan_version']}"
        human = {"pulling": f"pulling {where}",
                 "ready": f"ready: {where} at {fields.get('shard_path')} in {fields.get('seconds')} s",
                 "failed": f"failed: {where}: {fields.get('error')}"}[event]
        emit(as_json, {"node_id": node_id, "event": event, **fields}, f"node {node_id} {human}")
        sys.stdout.flush()

    agent.on_event = _event
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    agent.register()
    emit(as_json, {"node_id": node_id, "worker": worker_url, "data_dir": data_dir, "status": "running",
                   **runs.registration(), "device": runs.device},
         f"node {node_id} registered with {worker_url}; shards go to {data_dir} (Ctrl-C to stop)")
    sys.stdout.flush()
    try:
        agent.run()
    finally:  # also when SIGTERM/SIGINT end run() with SystemExit
        emit(as_json, {"node_id": node_id, "status": "stopped", "ready": agent.ready, "failed": sorted(agent.failed)},
             f"node {node_id} stopped ({len(agent.ready)} shard(s) ready, {len(agent.failed)} failed)")
        sys.stdout.flush()


@cli.command("run")
@click.argument("model")
@click.option("--worker", "worker_url", envvar="WORKER_URL",
              help="The worker's URL (WORKER_URL); without it a worker runs in this process.")
@click.option("--metadata-repo", envvar="METADATA_REPO", help="Hub repo for the metadata; without it, sent inline.")
@click.option("--node-id", envvar="NODE_ID", help="This user node's id (NODE_ID).")
@click.option("--token", envvar="WILLIW_TOKEN", help="The worker's admin token.")
@click.option("--hf-token", envvar="HF_TOKEN", help="Hub token (HF_TOKEN).")
@click.option("--model-name", help="The name the worker records for a local folder (default local/<folder>).")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--sequence-length", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--pull-from", type=click.Choice(["serve", "hub"]),
              help="hub (default for a repo id): metadata from the repo's headers, nodes pull their ranges from the "
                   "Hub, nothing downloaded here; serve (default for a folder): nodes pull from this node's model "
                   "folder served over HTTP (a repo is downloaded first).")
@click.option("--revision", help="Hub branch, tag or commit (default: main), pinned to its commit for every read.")
@click.option("--local-nodes", type=click.Path(dir_okay=False),
              help="Nodes file; with no --worker, runs these nodes' agents in this process.")
@click.option("--work-dir", type=click.Path(file_okay=False), default="williw-run", show_default=True)
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=600.0, show_default=True,
              help="Seconds distribution may take.")
@click.option("--auto-replan", is_flag=True,
              help="Let the worker re-plan when nodes leave or join (pair with --pull-from hub: this run's own "
                   "model server stops when the run ends).")
@json_option
def run_cmd(model: str, worker_url: str | None, metadata_repo: str | None, node_id: str | None, token: str | None,
            hf_token: str | None, model_name: str | None, batch_size: int, sequence_length: int,
            pull_from: str | None, revision: str | None, local_nodes: str | None, work_dir: str, timeout_s: float,
            auto_replan: bool, as_json: bool) -> None:
    """Run the complete workflow for MODEL (a Hub repo id or a local folder) and wait for every node's shard."""
    from pathlib import Path

    set_json_mode(as_json)
    from williw.workflow import NodeClient

    embedded = None
    if worker_url is None:
        from williw.workflow.embedded import EmbeddedWorker

        Path(work_dir).mkdir(parents=True, exist_ok=True)
        embedded = EmbeddedWorker(Path(work_dir) / "worker.db").start()
        worker_url = embedded.url
        if local_nodes:
            from williw.fleet import load_nodes

            nodes = [n.to_dict() for n in load_nodes(local_nodes, refuse_links="the worker")]
            embedded.start_local_nodes(nodes, Path(work_dir) / "nodes")
    try:
        client = NodeClient(worker_url, hf_token, metadata_repo, node_id, token=token, work_dir=work_dir,
                            pull_from=pull_from, timeout_s=timeout_s, model_label=model_name, auto_replan=auto_replan,
                            reporter=None if as_json else _print_step, revision=revision)
        result = client.execute_complete_workflow(model, batch_size, sequence_length)
    finally:
        if embedded is not None:
            embedded.stop()
    emit(as_json, result.to_dict(), lambda: summary(result))


def _print_step(step: str, result) -> None:
    """One line per step: on a terminal "[step] ..." while it runs, then overwritten by its result; elsewhere (a
    log file, a pipe) only the result line."""
    import sys

    terminal = sys.stdout.isatty()
    if result is None:
        if terminal:
            click.echo(f"[{step}] ...", nl=False)
        return
    line = f"[{step}] {result.status} in {result.seconds:.2f} s: {result.detail}"
    click.echo(("\r\033[K" if terminal else "") + line)


def summary(result) -> str:
    """The plan table and where each node's shard lives (``williw run``'s and the demo's last lines)."""
    from williw.cli.plan import plan_table
    from williw.planner.plan import Plan

    plan = Plan.from_dict(result.plan)
    lines = [plan_table(plan, len(plan.assignments), None), "",
             f"request {result.request_id}, plan version {result.plan_version}: every node holds its shard"]
    lines += [f"  {node}: {s['shard_path']} (sha256 {s['sha256'][:12]})" for node, s in sorted(result.shards.items())]
    total = sum(s.seconds for s in result.steps)
    lines.append("steps: " + ", ".join(f"{s.step} {s.status} {s.seconds:.2f} s" for s in result.steps)
                 + f"; total {total:.2f} s")
    return "\n".join(lines)
