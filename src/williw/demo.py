"""``make demo``: the main job on a small model built here (no Hub needed), with every part a real process.

It builds a tiny Llama (8 blocks), starts a worker (``williw worker``, SQLite) and three node agents
(``williw node``) with different compute and memory on loopback, then runs the user node's complete workflow
in this process: it serves the model folder over HTTP with ranges, the worker plans a pipeline on the three
nodes, each node pulls only its own tensors' bytes and reports its shard ready. It ends with the plan table,
where each shard lives, and ``williw verify`` on the three nodes' shards. Every process it started is stopped
on the way out, also on Ctrl-C or an error.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from williw.cli import cli

# Memory is what forces a three-stage pipeline: the model is ~3.5 MB, so no node can hold it alone.
NODES = (("node-a", 8.0, 0.0016), ("node-b", 4.0, 0.0016), ("node-c", 2.0, 0.0016))
MODEL_NAME = "demo/tiny-llama"


def _williw() -> list[str]:
    return [str(Path(sys.executable).parent / "williw")]


def _start_worker(out: Path, procs: list[subprocess.Popen]) -> str:
    log = open(out / "worker.log", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([*_williw(), "worker", "--json", "--port", "0", "--db", str(out / "worker.db"),
                             "--node-ttl", "5"], stdout=subprocess.PIPE, stderr=log, text=True)
    procs.append(proc)
    line = proc.stdout.readline() if proc.stdout else ""
    try:
        return json.loads(line)["url"]
    except (ValueError, KeyError):
        raise RuntimeError(f"the worker did not start (exit code {proc.poll()}); see {out / 'worker.log'}") from None


def _start_nodes(url: str, out: Path, procs: list[subprocess.Popen]) -> None:
    from williw.client import WorkerClient

    for node_id, tflops, memory_gb in NODES:
        log = open(out / f"{node_id}.log", "w")  # noqa: SIM115
        procs.append(subprocess.Popen([*_williw(), "node", "--worker", url, "--node-id", node_id,
                                       "--compute-tflops", str(tflops), "--memory-gb", str(memory_gb),
                                       "--data-dir", str(out / "nodes" / node_id), "--heartbeat-s", "1",
                                       "--poll-s", "0.2"], stdout=log, stderr=subprocess.STDOUT))
    with WorkerClient(url) as client:
        deadline = time.monotonic() + 30
        while len(client.list_nodes(online=True)) < len(NODES):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the node agents did not register within 30 s; see {out}/node-*.log")
            time.sleep(0.1)


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if proc.stdout:
            proc.stdout.close()


def main(out: Path = Path("demo-out")) -> int:
    from williw import tinymodels
    from williw.cli.run import _print_step, summary
    from williw.workflow import NodeClient

    started = time.monotonic()
    model = out / "model"
    if not (model / "config.json").exists():
        shutil.rmtree(model, ignore_errors=True)
        tinymodels.build_causal_lm(model, "llama", layers=8, shard_bytes=400_000)
    for old in ("worker.db", "worker.db-wal", "worker.db-shm", "nodes", "run", "shards"):
        path = out / old
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    procs: list[subprocess.Popen] = []
    try:
        url = _start_worker(out, procs)
        _start_nodes(url, out, procs)
        print(f"worker at {url}; nodes: " + ", ".join(f"{n} ({t:g} TFLOPS, {m * 1000:g} MB)" for n, t, m in NODES))
        result = NodeClient(url, node_id="user-node", work_dir=out / "run", model_label=MODEL_NAME, timeout_s=90,
                            reporter=_print_step).execute_complete_workflow(str(model), 1, 64)
        print(summary(result))
        shards = out / "shards"  # verify reads <shards>/<node_id>/: link each node's own shard folder there
        shards.mkdir()
        for node_id, shard in result.shards.items():
            (shards / node_id).symlink_to(Path(shard["shard_path"]).resolve(), target_is_directory=True)
        code = cli.main(["verify", str(model), "--plan", str(out / "run" / "plan.json"), "--shards", str(shards)],
                        standalone_mode=False)
        print(f"demo finished in {time.monotonic() - started:.1f} s")
        return code or 0
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the demo reports and exits like the CLI
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        _stop(procs)


if __name__ == "__main__":
    sys.exit(main())
