"""Load on one worker over loopback: 200 simulated nodes heartbeating and 50 users running
request → process → get-plan, on SQLite and on PostgreSQL.

Reference, measured in the same run: the same nodes heartbeating, at the same rate and through the same client,
against a bare ASGI app under the same uvicorn (one route answering ``{}``): the cost of HTTP on this machine,
which the worker's figures include. Afterwards every answered change is checked in the worker (nodes' last
heartbeat equals the last acknowledged one; every request is planned and its plan readable): "lost" counts
those that are not, "failed" counts error statuses and transport errors.

Each node heartbeats every ``--interval`` seconds from a random phase (fixed rate, 200 / 0.2 s = 1,000/s
offered); latency is from sending to the answer. Users run back to back (closed loop) unless ``--think`` is set.
With ``--workers N`` the PostgreSQL target is N worker processes on one database (issue 19's several workers
sharing one database): node i and user j talk to worker ``i % N`` and ``j % N``, and the losses are checked
through one of them (they share the state).

    .venv/bin/python bench/worker.py [--duration 30] [--nodes 200] [--users 50] [--interval 0.2]
                                     [--backends sqlite,postgres] [--workers 1] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

import httpx  # noqa: E402

from workerproc import WorkerProcess, postgres_schema  # noqa: E402

TOKEN = "bench-admin"
BARE_APP = """
import sys, uvicorn
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    headers = [(b"content-type", b"application/json"), (b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"{}"})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""


class Conn:
    """One keep-alive HTTP/1.1 connection, as a node agent holds one. httpx's async pool spends milliseconds per
    request at 250 concurrent connections, so the load generator would measure itself; this spends ~50 µs."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
        if body:
            head += "Content-Type: application/json\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        try:
            self.writer.write(head.encode() + body)
            status_line = await self.reader.readline()
            status = int(status_line.split()[1])
            length = 0
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            data = await self.reader.readexactly(length)
        except (OSError, IndexError, ValueError, asyncio.IncompleteReadError):
            self.close()
            raise
        return status, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


class Stats:
    def __init__(self) -> None:
        self.lat: dict[str, list[float]] = {}
        self.failed: dict[str, int] = {}
        self.errors: list[str] = []

    def ok(self, op: str, seconds: float) -> None:
        self.lat.setdefault(op, []).append(seconds)

    def fail(self, op: str, why: str) -> None:
        self.failed[op] = self.failed.get(op, 0) + 1
        if len(self.errors) < 5:
            self.errors.append(f"{op}: {why}")


async def heartbeats(urls: list[str], nodes: dict[str, str], interval: float, until: float,
                     stats: Stats, last_ack: dict[str, float], path: str = "/api/nodes/{}/heartbeat") -> None:
    async def one(node_id: str, token: str, url: str) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        conn = Conn(url)
        due = time.monotonic() + random.uniform(0, interval)
        while True:
            await asyncio.sleep(max(0.0, min(due, until) - time.monotonic()))  # a long --interval ends on time
            if time.monotonic() >= until:
                conn.close()
                return
            t0 = time.perf_counter()
            try:
                status, data = await conn.request("POST", path.format(node_id), headers)
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as exc:
                stats.fail("heartbeat", f"{type(exc).__name__} {exc}")
            else:
                if status == 200:
                    stats.ok("heartbeat", time.perf_counter() - t0)
                    last_ack[node_id] = json.loads(data).get("last_heartbeat", 0.0)
                else:
                    stats.fail("heartbeat", f"{status} {data[:200]!r}")
            due += interval

    await asyncio.gather(*(one(n, t, urls[i % len(urls)]) for i, (n, t) in enumerate(nodes.items())))


async def users(urls: list[str], count: int, meta: dict, think: float, until: float,
                stats: Stats, planned: list[str]) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}

    async def step(conn: Conn, op: str, path: str, body: dict) -> dict | None:
        t0 = time.perf_counter()
        try:
            status, data = await conn.request("POST", path, headers, json.dumps(body).encode())
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as exc:
            stats.fail(op, f"{type(exc).__name__} {exc}")
            return None
        if status >= 400:
            stats.fail(op, f"{status} {data[:200]!r}")
            return None
        stats.ok(op, time.perf_counter() - t0)
        return json.loads(data)

    async def one(url: str) -> None:
        conn = Conn(url)
        step_ = step
        while time.monotonic() < until:
            created = await step_(conn, "request", "/api/request", {"model_name": "bench/tiny-llama", "batch_size": 1,
                                                             "sequence_length": 512})
            if created is None:
                continue
            rid = created["request_id"]
            done = await step_(conn, "process", "/api/process", {"request_id": rid, "metadata": meta})
            if done is None:
                continue
            plan = await step_(conn, "get-plan", "/api/get-plan", {"request_id": rid})
            if plan is not None:
                planned.append(rid)
            if think:
                await asyncio.sleep(think)
        conn.close()

    await asyncio.gather(*(one(urls[j % len(urls)]) for j in range(count)))


def run_load(urls: list[str], nodes: dict[str, str], n_users: int, meta: dict | None, args: argparse.Namespace,
             path: str = "/api/nodes/{}/heartbeat") -> tuple[Stats, dict[str, float], list[str], float]:
    stats, last_ack, planned = Stats(), {}, []

    async def main() -> float:
        start = time.monotonic()
        until = start + args.duration
        tasks = [heartbeats(urls, nodes, args.interval, until, stats, last_ack, path)]
        if n_users and meta is not None:
            tasks.append(users(urls, n_users, meta, args.think, until, stats, planned))
        await asyncio.gather(*tasks)
        return time.monotonic() - start

    elapsed = asyncio.run(main())
    return stats, last_ack, planned, elapsed


def check_lost(url: str, last_ack: dict[str, float], planned: list[str]) -> int:
    lost = 0
    with httpx.Client(base_url=url, timeout=60) as http:
        stored = {n["node_id"]: n["last_heartbeat"] for n in http.get("/api/nodes").json()["nodes"]}
        lost += sum(1 for n, t in last_ack.items() if stored.get(n, -1) < t)
        for rid in planned:
            r = http.get(f"/api/requests/{rid}")
            if r.status_code != 200 or r.json()["status"] != "planned":
                lost += 1
    return lost


def summary_for(label: str, stats: Stats, elapsed: float, planned: list[str], lost: int,
                cpu_s: float | None) -> dict:
    """The closing table's row: heartbeats, user cycles (request → process → get-plan, all answered), losses."""
    lat = stats.lat.get("heartbeat", [])
    return {"target": label, "heartbeats_per_s": len(lat) / elapsed, "p50_ms": pct(lat, 50) * 1000,
            "p99_ms": pct(lat, 99) * 1000, "max_ms": max(lat) * 1000 if lat else float("nan"),
            "cycles_per_s": len(planned) / elapsed, "failed": sum(stats.failed.values()), "lost": lost,
            "worker_cpu_s": cpu_s}


def rows_for(label: str, stats: Stats, elapsed: float, lost: int | None) -> list[dict]:
    out = []
    for op in ("heartbeat", "request", "process", "get-plan"):
        lat = stats.lat.get(op, [])
        failed = stats.failed.get(op, 0)
        if not lat and not failed:
            continue
        out.append({"target": label, "op": op, "count": len(lat), "per_s": len(lat) / elapsed,
                    "p50_ms": pct(lat, 50) * 1000, "p99_ms": pct(lat, 99) * 1000,
                    "max_ms": max(lat) * 1000 if lat else float("nan"),
                    "mean_ms": statistics.fmean(lat) * 1000 if lat else float("nan"), "failed": failed,
                    "lost": lost if op == "heartbeat" else None})
    return out


def bench_reference(args: argparse.Namespace) -> list[dict]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", BARE_APP, str(port)])
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                httpx.post(url + "/x", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        nodes = {f"node-{i:03d}": "x" for i in range(args.nodes)}
        stats, _, _, elapsed = run_load([url], nodes, 0, None, args, path="/bare/{}")
        return rows_for("bare uvicorn (reference)", stats, elapsed, None)
    finally:
        proc.terminate()
        proc.wait(10)


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its children (the planning process): comparable across runs on a busy machine,
    where wall-clock figures also measure everyone else."""
    import psutil

    proc = psutil.Process(pid)
    times = [proc.cpu_times()] + [c.cpu_times() for c in proc.children(recursive=True)]
    return sum(t.user + t.system for t in times)


def bench_worker(label: str, db_url: str, meta: dict, args: argparse.Namespace, folder: Path,
                 workers: int = 1) -> tuple[list[dict], dict]:
    with ExitStack() as stack:
        procs = [stack.enter_context(WorkerProcess(db_url, TOKEN, node_ttl=3600, cwd=folder,
                                                   log_path=folder / f"{label}-{i}.log")) for i in range(workers)]
        urls = [p.url for p in procs]
        nodes = {}
        with httpx.Client(base_url=urls[0], headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as http:
            for i in range(args.nodes):
                body = {"node_id": f"node-{i:03d}", "compute_tflops": random.choice([10.0, 20.0, 40.0, 80.0]),
                        "memory_gb": random.choice([8.0, 16.0, 24.0, 80.0]), "memory_bandwidth_gbps": 500.0}
                nodes[body["node_id"]] = http.post("/api/nodes", json=body).raise_for_status().json()["node_token"]
        cpu0 = sum(cpu_seconds(p.proc.pid) for p in procs)
        stats, last_ack, planned, elapsed = run_load(urls, nodes, args.users, meta, args)
        cpu = sum(cpu_seconds(p.proc.pid) for p in procs) - cpu0
        lost = check_lost(urls[0], last_ack, planned)
        rows = rows_for(label, stats, elapsed, lost)
        if stats.errors:
            rows[0]["errors"] = stats.errors
        return rows, summary_for(label, stats, elapsed, planned, lost, cpu)


def tiny_metadata(folder: Path) -> dict:
    from williw.metadata import generate_metadata
    from williw.tinymodels import build_causal_lm

    model = build_causal_lm(folder / "tiny-llama", "llama")
    return json.loads(json.dumps(generate_metadata(model, model_name="bench/tiny-llama").to_dict()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between one node's heartbeats")
    parser.add_argument("--think", type=float, default=0.0, help="seconds a user waits between cycles")
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes sharing the PostgreSQL database (SQLite: always one)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]  # the machine is shared: say how busy it was
    rows = bench_reference(args)
    summaries = []
    with tempfile.TemporaryDirectory(prefix="williw-bench-") as tmp:
        folder = Path(tmp)
        meta = tiny_metadata(folder)
        for backend in args.backends.split(","):
            if backend == "sqlite":
                more, summary = bench_worker("worker, SQLite", f"sqlite:///{folder / 'bench.db'}", meta, args,
                                             folder)
            elif backend == "postgres":
                label = "worker, PostgreSQL" if args.workers == 1 else f"{args.workers} workers, PostgreSQL"
                with postgres_schema() as url:
                    more, summary = bench_worker(label, url, meta, args, folder, args.workers)
            else:
                parser.error(f"--backends: unknown backend {backend!r} (expected sqlite, postgres)")
            rows += more
            summaries.append(summary)
    if args.json:
        print(json.dumps({"duration_s": args.duration, "nodes": args.nodes, "users": args.users,
                          "workers": args.workers, "load_average": [load_before, os.getloadavg()[0]],
                          "interval_s": args.interval, "rows": rows, "summary": summaries}, indent=2))
        return
    print(f"{args.nodes} nodes heartbeating every {args.interval:g} s (offered {args.nodes / args.interval:,.0f}/s), "
          f"{args.users} users, {args.duration:g} s per target, loopback, load average {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after")
    header = (f"{'target':<26} {'op':<10} {'count':>8} {'per s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
              f"{'failed':>7} {'lost':>5}")
    print(header)
    print("-" * len(header))
    for r in rows:
        lost = "" if r["lost"] is None else str(r["lost"])
        print(f"{r['target']:<26} {r['op']:<10} {r['count']:>8} {r['per_s']:>8.0f} {r['p50_ms']:>8.1f} "
              f"{r['p99_ms']:>8.1f} {r['max_ms']:>8.1f} {r['failed']:>7} {lost:>5}")
        for e in r.get("errors", []):
            print(f"    error: {e}")
    print()
    print("summary: heartbeats, user cycles (request → process → get-plan), failed and lost requests, and the "
          "worker's CPU seconds (planning process included)")
    header = (f"{'target':<26} {'beats/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'cycles/s':>9} "
              f"{'failed':>7} {'lost':>5} {'cpu s':>6}")
    print(header)
    print("-" * len(header))
    for s in summaries:
        print(f"{s['target']:<26} {s['heartbeats_per_s']:>8.0f} {s['p50_ms']:>8.1f} {s['p99_ms']:>8.1f} "
              f"{s['max_ms']:>8.1f} {s['cycles_per_s']:>9.1f} {s['failed']:>7} {s['lost']:>5} "
              f"{s['worker_cpu_s']:>6.1f}")


if __name__ == "__main__":
    main()
