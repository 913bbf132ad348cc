"""Migration benchmark: what the nodes of a re-plan pay to take it up, on the 1.1B bf16 Llama.

The fleet is bench/planner.py's 8 heterogeneous nodes; version 1 is ``make_plan``'s optimum for them, its shards
written with ``split_all``. Then one node leaves (each stage in turn, as in bench/replan.py) or one joins (an
H100), and ``replan`` (bound +5%) makes version 2. Each node of version 2 builds its shard with ``gather_shard``:
from its own version-1 shard (a local copy, or a hard link when its tensors did not change), from the peers its
migration steps name (one ``ModelServer`` over the version-1 shards plays every peer's shard server) and only for
the rest from the model's source (another ``ModelServer`` over the model folder), all by HTTP ranges on localhost.

The reference, measured in the same run on the same version 2: what many systems do after a rebalance, every node
re-pulls its whole new shard from the model's source (``pull_shard``). Per node and method: wall time, the body
bytes each server sent (``bytes_sent``, reset before each run) and the shard's sha256 (manifests), which must match
between the two methods: the bench prints its figures, then fails (exit 1) naming each node whose files differ and
whether only the tensors' layout differs or their bytes. Before each run the page cache is dropped (``echo 3 >
/proc/sys/vm/drop_caches``, needs root) when possible, else left warm, and the title says which. Times are summed
over nodes, which ran one after the other; on a real fleet they run at once over real links, so the bytes are the
figure that carries over, the seconds only show the local work is not the price.

Run: ``.venv/bin/python bench/migrate.py [--json]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WILLIW_NO_PROGRESS", "1")

from _models import CACHE, llama_1b  # noqa: E402
from planner import LLAMA_FLEET, print_table  # noqa: E402
from williw.fleet import Node  # noqa: E402
from williw.gather import gather_shard  # noqa: E402
from williw.metadata import generate_metadata  # noqa: E402
from williw.planner import MODEL_SOURCE, make_plan, replan  # noqa: E402
from williw.pull import pull_shard  # noqa: E402
from williw.serve import ModelServer  # noqa: E402
from williw.shards import read_manifest  # noqa: E402
from williw.splitter import split_all  # noqa: E402
from williw.units import format_bytes  # noqa: E402

JOINER = Node("h100", 989.0, 2.0, 3350.0)
MAX_SLOWDOWN = 0.05


def drop_cache() -> bool:
    """Flush dirty pages, then drop the page cache; False when not permitted (not root, or /proc read-only)."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed_run(fn, servers: dict[str, ModelServer], drop: bool) -> tuple[object, float, dict[str, int]]:
    """``fn()``'s result, its wall seconds and the body bytes each server sent while it ran."""
    if drop:
        drop_cache()
    for s in servers.values():
        s.bytes_sent.clear()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    return result, seconds, {k: sum(s.bytes_sent.values()) for k, s in servers.items()}


def tensor_diff(a: Path, b: Path) -> str:
    """Why two safetensors files differ: ``reordered`` (same tensors, same bytes, another layout) or ``content``."""

    def tensors(path: Path) -> dict[str, tuple[str, list[int], str]]:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            out = {}
            for name, t in header.items():
                if name != "__metadata__":
                    f.seek(8 + n + t["data_offsets"][0])
                    data = f.read(t["data_offsets"][1] - t["data_offsets"][0])
                    out[name] = (t["dtype"], t["shape"], hashlib.sha256(data).hexdigest())
            return out

    return "reordered" if tensors(a) == tensors(b) else "content"


def scenario(label: str, meta, current, fleet: list[Node], v1: Path, work: Path,
             servers: dict[str, ModelServer], drop: bool) -> dict:
    """Run gather and the full re-pull for every node of the re-plan of ``current`` on ``fleet``."""
    r = replan(meta, current, fleet, MAX_SLOWDOWN)
    model_url, peer_url = servers["model"].url, servers["peers"].url
    nodes = []
    for node_id in r.plan.node_ids:
        steps = [s for s in r.migration.steps if s.action == "pull" and s.node_id == node_id]
        peers = {t: f"{peer_url}/{s.source}" for s in steps if s.source != MODEL_SOURCE for t in s.tensors}
        local = [v1 / node_id] if node_id in current.node_ids else []
        g_out, p_out = work / "gather", work / "pull"
        g, g_s, g_sent = timed_run(lambda n=node_id, p=peers, loc=local, o=g_out: gather_shard(
            model_url, r.plan, n, o, local=loc, peers=p), servers, drop)
        p, p_s, p_sent = timed_run(lambda n=node_id, o=p_out: pull_shard(model_url, r.plan, n, o), servers, drop)
        gm, pm = read_manifest(g_out / node_id), read_manifest(p_out / node_id)
        g_sha, p_sha = gm.file_sha256, pm.file_sha256
        if not (g_sha == g.file_sha256 and p_sha == p.file_sha256):
            raise SystemExit(f"{label}: node {node_id}: a manifest's sha256 differs from the result's")
        same = "identical" if g_sha == p_sha else tensor_diff(g_out / node_id / gm.file, p_out / node_id / pm.file)
        want_model = sum(s.bytes for s in steps if s.source == MODEL_SOURCE)
        want_peers = sum(s.bytes for s in steps if s.source != MODEL_SOURCE)
        if (g.model_bytes, sum(g.peer_bytes.values())) != (want_model, want_peers) or g.peer_failures:
            raise SystemExit(f"{label}: node {node_id} gathered {g.model_bytes:,} bytes from the model and "
                             f"{sum(g.peer_bytes.values()):,} from peers (failed: {list(g.peer_failures)}), but its "
                             f"migration steps say {want_model:,} and {want_peers:,}")
        nodes.append({"node_id": node_id, "linked": g.linked, "local_bytes": g.local_bytes,
                      "gather": {"seconds": g_s, "model_sent": g_sent["model"], "peers_sent": g_sent["peers"],
                                 "model_bytes": g.model_bytes, "peer_bytes": sum(g.peer_bytes.values())},
                      "pull": {"seconds": p_s, "model_sent": p_sent["model"], "peers_sent": p_sent["peers"],
                               "shard_bytes": p.shard_bytes},
                      "gather_sha256": g_sha, "pull_sha256": p_sha, "files": same})
        shutil.rmtree(g_out)
        shutil.rmtree(p_out)
    return {"change": label, "to_version": r.plan.version, "bytes_moved": r.bytes_moved,
            "stages": [[a.node_id, *a.blocks] for a in r.plan.assignments], "nodes": nodes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    args = parser.parse_args()
    model_dir = llama_1b()
    meta = generate_metadata(model_dir)
    current = make_plan(meta, LLAMA_FLEET)
    changes = [(f"- {u}", [v for v in LLAMA_FLEET if v.node_id != u]) for u in current.node_ids]
    changes.append((f"+ {JOINER.node_id}", [*LLAMA_FLEET, JOINER]))
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="williw-bench-migrate-", dir=CACHE))  # beside the model: one filesystem
    servers: dict[str, ModelServer] = {}
    try:
        v1 = work / "v1"
        split_all(model_dir, current, v1)
        servers = {"model": ModelServer(model_dir).start(), "peers": ModelServer(v1).start()}
        drop = drop_cache()
        start = time.perf_counter()
        results = [scenario(label, meta, current, fleet, v1, work, servers, drop)
                   for label, fleet in changes]
        total_s = time.perf_counter() - start
    finally:
        for s in servers.values():
            s.shutdown()
            s.server_close()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps({"model": meta.model_name, "total_bytes": meta.total_bytes, "page_cache":
                          "dropped" if drop else "warm", "max_slowdown": MAX_SLOWDOWN,
                          "v1_stages": [[a.node_id, *a.blocks] for a in current.assignments],
                          "seconds": total_s, "scenarios": results}, indent=2))
        fail(results)
        return
    rows = []
    for res in results:
        ns = res["nodes"]
        g_model, g_peers = sum(n["gather"]["model_sent"] for n in ns), sum(n["gather"]["peers_sent"] for n in ns)
        p_net = sum(n["pull"]["model_sent"] + n["pull"]["peers_sent"] for n in ns)
        g_s, p_s = sum(n["gather"]["seconds"] for n in ns), sum(n["pull"]["seconds"] for n in ns)
        rows.append((res["change"], len(ns), sum(n["linked"] for n in ns),
                     format_bytes(sum(n["local_bytes"] for n in ns)), format_bytes(g_model), format_bytes(g_peers),
                     format_bytes(g_model + g_peers), format_bytes(p_net), f"{(g_model + g_peers) / p_net:.3f}x",
                     f"{g_s:.2f} s", f"{p_s:.2f} s", f"{g_s / p_s:.2f}x",
                     f"{sum(n['files'] == 'identical' for n in ns)}/{len(ns)}"))
    stages = ", ".join(f"{a.node_id} [{a.blocks[0]}, {a.blocks[1]})" for a in current.assignments)
    print_table(f"{meta.model_name}: {meta.total_bytes / 1e9:.2f} GB; version 1: {stages}; re-plan bound "
                f"+{MAX_SLOWDOWN:.0%}; page cache {'dropped' if drop else 'warm (could not drop)'} before each run; "
                f"{os.cpu_count()} CPUs; {total_s:.0f} s",
                ["change", "nodes", "linked", "local copy", "gather: model", "gather: peers", "gather net",
                 "re-pull net", "net ratio", "gather time", "re-pull time", "time ratio", "same sha256"], rows)
    fail(results)


def fail(results: list[dict]) -> None:
    """Exit 1 naming every node whose gathered shard is not byte-identical to its re-pulled one."""
    bad = [f"{r['change']}: {n['node_id']} ({n['files']})" for r in results for n in r["nodes"]
           if n["files"] != "identical"]
    if bad:
        raise SystemExit(f"{len(bad)} gathered shards are not byte-identical to the re-pulled ones (reordered: same "
                         f"tensors and bytes in another layout; content: different bytes): {', '.join(bad)}")


if __name__ == "__main__":
    main()
