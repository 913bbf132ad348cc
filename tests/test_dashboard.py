"""The dashboard in a real browser: the real worker on a loopback port, headless Chromium from Debian's packages
driven by Playwright. Three nodes heartbeat, one request is planned; the page must show the nodes, the request's
status and one bar per stage, then show a node offline after its heartbeats stop, without a reload.

Re-planning, on a worker of its own: a distributed request loses a node, the worker re-plans it by itself, and the
page must show the migration's pull steps, each step's state as the nodes report, then the new version in force.

Also the dashboard's HTTP endpoints (list of requests, plan picture) and their auth, over plain HTTP.

Screenshots go to ``$WILLIW_TEST_ARTIFACTS`` (default ``test-artifacts/`` at the repo root, git-ignored).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest

from williw.client import WorkerClient
from williw.metadata import generate_metadata
from workerproc import WorkerProcess

TOKEN = "dash-admin"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
TTL = 2.0
BEAT_EVERY = 0.3
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("WILLIW_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))
# 2.01 MB each: the tiny Llama (blocks of ~0.28 MB with their KV cache at 512 tokens, and a 1.44 MB transient a
# stage) needs all three nodes, so the plan has 3 stages.
NODES = [("gpu-a", 40.0, 0.00201), ("gpu-b", 20.0, 0.00201), ("cpu-c", 2.0, 0.00201)]
STOPPED = "cpu-c"
# 2.39 MB each: the plan needs two of the three nodes and still fits on the other two when one of them leaves.
REPLAN_NODES = [("gpu-a", 40.0, 0.00239), ("gpu-b", 20.0, 0.00239), ("cpu-c", 2.0, 0.00239)]
LEAVES = "gpu-b"
SHARD = {"shard_path": "/x", "sha256": "0" * 64}
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium, installed with apt-get when missing; skip (saying why) only if that install fails."""
    if not Path(CHROMIUM).exists():
        if shutil.which("apt-get") is None:
            pytest.skip(f"{CHROMIUM} is missing and there is no apt-get to install Debian's 'chromium'")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"]):
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
            if done.returncode != 0:
                pytest.skip(f"cannot install Debian's chromium ({' '.join(cmd)} exited {done.returncode}: "
                            f"{done.stderr.strip()[-300:]})")
    return CHROMIUM


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dashboard")
    with WorkerProcess(f"sqlite:///{folder / 'worker.db'}", TOKEN, node_ttl=TTL) as proc:
        yield proc


class Beats:
    """Heartbeats for each node every BEAT_EVERY s, on a thread, until the node is stopped."""

    def __init__(self, url: str, tokens: dict[str, str]) -> None:
        self.url, self.tokens, self.stopped = url, tokens, set()
        self.stop_all = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=5) as http:
            while not self.stop_all.wait(BEAT_EVERY):
                for node_id, token in self.tokens.items():
                    if node_id not in self.stopped:
                        http.post(f"/api/nodes/{node_id}/heartbeat", headers={"Authorization": f"Bearer {token}"})


@pytest.fixture(scope="module")
def fleet(worker, tiny_llama):
    """Three registered, heartbeating nodes and one planned request; yields (request id, plan, beats)."""
    with WorkerClient(worker.url, TOKEN) as client:
        tokens = {node_id: client.register_node(node_id, tflops, mem, memory_bandwidth_gbps=100.0)["node_token"]
                  for node_id, tflops, mem in NODES}
        beats = Beats(worker.url, tokens)
        beats.thread.start()
        meta = json.loads(json.dumps(generate_metadata(tiny_llama, model_name="tiny/llama").to_dict()))
        rid = client.create_request("tiny/llama")["request_id"]
        plan = client.process(rid, metadata=meta)["plan"]
    yield rid, plan, beats
    beats.stop_all.set()
    beats.thread.join(5)


def _stages(plan: dict) -> list[dict]:
    return [plan[n] for n in plan["@plan"]["stages"]]


def test_plan_has_three_stages(fleet):
    _rid, plan, _ = fleet
    assert [a["node_id"] for a in _stages(plan)] and len(_stages(plan)) == 3


def test_requests_list_needs_the_admin_token(worker, fleet):
    rid = fleet[0]
    assert httpx.get(f"{worker.url}/api/requests").status_code == 401
    assert httpx.get(f"{worker.url}/api/requests", headers={"Authorization": "Bearer wrong"}).status_code == 403
    listed = httpx.get(f"{worker.url}/api/requests", headers=ADMIN).json()["requests"]
    assert [(r["request_id"], r["status"], r["plan_version"]) for r in listed] == [(rid, "planned", 1)]


def test_plan_picture_endpoint(worker, fleet):
    rid, plan, _ = fleet
    r = httpx.get(f"{worker.url}/api/plans/{rid}.svg")
    assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml")
    root = ET.fromstring(r.content)
    stages = root.findall(".//{http://www.w3.org/2000/svg}g[@class]")
    got = [(g.get("data-node"), g.get("data-blocks")) for g in stages if g.get("class").split()[0] == "stage"]
    assert got == [(a["node_id"], "[{},{})".format(*a["blocks"])) for a in _stages(plan)]
    # The registry knows the nodes, so each stage's memory is drawn against its node's capacity.
    assert "capacity unknown" not in r.text and "of 2.01 MB" in r.text
    assert httpx.get(f"{worker.url}/api/plans/{'0' * 32}.svg").status_code == 404
    assert httpx.get(f"{worker.url}/api/plans/{rid}.svg?version=7").status_code == 404


def test_page_security_headers(worker):
    r = httpx.get(f"{worker.url}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "connect-src 'self'" in csp and "script-src 'self';" in csp  # no inline script can run
    # The page loads its script and style from the worker's own files, and nothing else is served from there.
    assert '<script src="/static/dashboard.js">' in r.text and "<script>" not in r.text
    for name, kind in (("dashboard.js", "text/javascript"), ("migration.js", "text/javascript"),
                       ("dashboard.css", "text/css")):
        f = httpx.get(f"{worker.url}/static/{name}")
        assert (f.status_code, f.headers["content-type"].split(";")[0]) == (200, kind)
    for name in ("index.html", "..%2Fdashboard.py", "%2E%2E", "nothing.js"):
        assert httpx.get(f"{worker.url}/static/{name}").status_code == 404, name


def test_dashboard_in_chromium(worker, fleet, chromium, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    rid, plan, beats = fleet
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{worker.url}/?poll=300")
            # The worker has a token: the page asks for it once.
            page.wait_for_selector("#auth:not([hidden])", timeout=5000)
            page.wait_for_function("() => document.querySelector('#requests-msg').textContent !== ''",
                                   timeout=5000)
            assert page.inner_text("#requests-msg") == "Listing requests needs the admin token: enter it above."
            page.fill("#token", TOKEN)
            page.click("#auth-form button")

            page.wait_for_selector(f'tr.request[data-request="{rid}"]', timeout=5000)
            for node_id, _, _ in NODES:
                assert page.get_attribute(f'tr.node[data-node="{node_id}"]', "data-online") == "true"
            assert page.inner_text(f'tr.request[data-request="{rid}"] td.status') == "planned"
            page.wait_for_selector("#plan svg g.stage", timeout=5000)
            drawn = page.eval_on_selector_all(
                "#plan svg g.stage", "gs => gs.map(g => [g.dataset.node, g.dataset.blocks])")
            assert drawn == [[a["node_id"], "[{},{})".format(*a["blocks"])] for a in _stages(plan)]
            assert page.locator("#plan svg g.stage.bottleneck").count() == 1
            assert page.inner_text("#plan-broken") == ""
            # Assignments exist only after a distribute call, so the column's content stays empty here.
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

            marker = page.evaluate("() => (window.__marker = Math.random())")
            beats.stopped.add(STOPPED)
            stopped_at = time.monotonic()
            page.wait_for_selector(f'tr.node[data-node="{STOPPED}"][data-online="false"]', timeout=TTL * 1000 + 3000)
            took = time.monotonic() - stopped_at
            # The page ticks every 0.5 s; the slack is for a loaded machine.
            assert took <= TTL + 5, f"offline shown {took:.1f} s after the last heartbeat (TTL {TTL} s)"
            assert STOPPED in [a["node_id"] for a in _stages(plan)]
            assert page.inner_text("#plan-broken") == f"This plan cannot run: node {STOPPED} is offline."
            assert page.inner_text(f'tr.node[data-node="{STOPPED}"] td.status') == "offline"
            for node_id in ("gpu-a", "gpu-b"):  # the others keep beating and stay online
                assert page.get_attribute(f'tr.node[data-node="{node_id}"]', "data-online") == "true"
            assert page.evaluate("() => window.__marker") == marker, "the page was reloaded"
            page.screenshot(path=str(ARTIFACTS / "dashboard-offline.png"), full_page=True)
        finally:
            browser.close()


@pytest.fixture
def replanning(tmp_path, tiny_llama):
    """A worker of its own, three heartbeating nodes and one request distributed with automatic re-planning on,
    every node ready on version 1; yields (worker URL, request id, plan, node tokens, beats)."""
    with WorkerProcess(f"sqlite:///{tmp_path / 'worker.db'}", TOKEN, node_ttl=TTL) as proc, \
            WorkerClient(proc.url, TOKEN) as client:
        tokens = {node_id: client.register_node(node_id, tflops, mem, memory_bandwidth_gbps=100.0)["node_token"]
                  for node_id, tflops, mem in REPLAN_NODES}
        beats = Beats(proc.url, tokens)
        beats.thread.start()
        try:
            meta = json.loads(json.dumps(generate_metadata(tiny_llama, model_name="tiny/llama").to_dict()))
            rid = client.create_request("tiny/llama")["request_id"]
            plan = client.process(rid, metadata=meta)["plan"]
            client.distribute(rid, "http://127.0.0.1:9/model", auto_replan=True)
            for node_id in plan["@plan"]["stages"]:
                report(proc.url, tokens, rid, node_id, "ready", 1)
            yield proc.url, rid, plan, tokens, beats
        finally:
            beats.stop_all.set()
            beats.thread.join(5)


def report(url: str, tokens: dict[str, str], rid: str, node_id: str, state: str, version: int) -> None:
    """What a node agent reports, with the node's own token."""
    with WorkerClient(url, tokens[node_id]) as node:
        node.report_assignment(rid, node_id, state, plan_version=version, **(SHARD if state == "ready" else {}))


def _step_rows(page, table: str, action: str = "pull") -> list[list[str]]:
    return page.eval_on_selector_all(
        f'{table} tr.step[data-action="{action}"]',
        "rows => rows.map(r => [r.dataset.node, r.dataset.source, r.querySelector('td.source').innerText, "
        "r.querySelector('td.status').innerText])")


def test_migration_in_chromium(replanning, chromium):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    url, rid, plan, tokens, beats = replanning
    assert LEAVES in plan["@plan"]["stages"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw, WorkerClient(url, TOKEN) as client:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"{url}/?poll=300#request={rid}")
            page.fill("#token", TOKEN)
            page.click("#auth-form button")
            page.wait_for_selector("#plan svg g.stage", timeout=5000)
            assert page.is_hidden("#migration") and page.is_hidden("#history")  # one version, nothing moving
            marker = page.evaluate("() => (window.__marker = Math.random())")

            # The node leaves; within its TTL (and a Replanner tick) the worker starts a migration to version 2.
            beats.stopped.add(LEAVES)
            try:
                page.wait_for_selector("#migration:not([hidden]) tr.step", timeout=TTL * 1000 + 5000)
            except sync_api.TimeoutError:
                body, request = client.request_plans(rid), client.get_request(rid)
                pytest.fail(f"no migration shown after {LEAVES} left: request {request['status']} "
                            f"({request['reason']}), /plans migrations {body['migrations']}")
            m = client.request_plans(rid)["migration"]
            assert (m["from_version"], m["to_version"], m["state"], m["reason"]) == (1, 2, "pulling", f"{LEAVES} left")
            pulls = [s for s in m["steps"] if s["action"] == "pull"]
            label = {"@model": "the model"}
            assert _step_rows(page, "#migration-steps") == [
                [s["node_id"], s["source"], label.get(s["source"], f"peer {s['source']}"), "pending"] for s in pulls]
            # This fleet's migration fetches from both: the block only the leaver held from the model, and a block
            # a survivor holds from that peer.
            assert {s["source"] for s in pulls} == {"@model", "gpu-a"}
            assert page.inner_text("#migration-title") == "version 1 → version 2"
            assert f"because {LEAVES} left" in page.inner_text("#migration-reason")
            assert page.inner_text("#migration-progress").startswith(f"0 of {len(pulls)} pulls done")
            page.screenshot(path=str(ARTIFACTS / "dashboard-migration.png"), full_page=True)

            # One node pulls, then is ready: its pull steps go pending → pulling → done, without a reload.
            first = pulls[0]["node_id"]
            mine = f'#migration-steps tr.step[data-action="pull"][data-node="{first}"]'
            report(url, tokens, rid, first, "pulling", 2)
            page.wait_for_selector(f'{mine}[data-state="pulling"]', timeout=5000)
            report(url, tokens, rid, first, "ready", 2)
            page.wait_for_selector(f'{mine}[data-state="done"]', timeout=5000)
            assert page.inner_text(f"{mine} td.status") == "done"
            done = sum(1 for s in pulls if s["node_id"] == first)
            assert page.inner_text("#migration-progress").startswith(f"{done} of {len(pulls)} pulls done")
            assert page.evaluate("() => window.__marker") == marker, "the page was reloaded"

            # Every node of version 2 ready: the worker switches, the panel folds into a line under the plan.
            for node_id in sorted({s["node_id"] for s in pulls} - {first}):
                report(url, tokens, rid, node_id, "ready", 2)
            page.wait_for_selector('#versions tr[data-version="2"] .badge.in-force', timeout=5000)
            page.wait_for_selector("#migration", state="hidden", timeout=5000)
            assert page.inner_text("#last-summary").startswith("Version 2 in force since ")
            assert page.inner_text('#versions tr[data-version="1"] td.status') == "replaced"
            page.wait_for_function("() => document.getElementById('plan-title').textContent.endsWith('version 2')",
                                   timeout=5000)
            assert page.evaluate("() => window.__marker") == marker, "the page was reloaded"
            page.click("#last-summary")  # unfold the steps for the picture
            assert {r[3] for r in _step_rows(page, "#last-steps")} == {"done"}
            page.screenshot(path=str(ARTIFACTS / "dashboard-switched.png"), full_page=True)
        finally:
            browser.close()
