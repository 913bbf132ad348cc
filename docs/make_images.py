"""Make the README's pictures with williw's own commands: ``docs/plan.svg``, ``docs/dashboard.png`` and
``docs/dashboard-replan.png``.

1. A 1.1B Llama (TinyLlama's shape, bf16) as a *sparse* safetensors file: the real header and a hole where the
   weights would be. `williw metadata` reads only headers, so the numbers are the real model's, at no disk cost.
2. ``williw metadata`` → ``williw plan --svg docs/plan.svg`` on five heterogeneous nodes (one too small).
3. ``williw worker`` on a free loopback port, the same nodes registered and heartbeating (one stops), a request
   planned through the API, and headless Chromium (Debian's, driven by Playwright) photographs ``/``.
4. The request is distributed with automatic re-planning on, its nodes report their shards ready (no agents run:
   the script reports for them), a fast node joins, the worker re-plans by itself, and one node of the new version
   reports ready: the page's re-plan panel, photographed mid-migration.

Run: ``.venv/bin/python docs/make_images.py`` (needs ``chromium`` at /usr/bin/chromium and ``playwright``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
TOKEN = "docs-admin"
DIMS = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
            num_key_value_heads=4, vocab_size=32000)
JOINER = {"node_id": "h100-5", "compute_tflops": 989, "memory_gb": 0.9, "memory_bandwidth_gbps": 3350}
NODES = [
    {"node_id": "a100-0", "compute_tflops": 312, "memory_gb": 0.8, "memory_bandwidth_gbps": 2039},
    {"node_id": "l4-1", "compute_tflops": 121, "memory_gb": 0.9, "memory_bandwidth_gbps": 300},
    {"node_id": "rtx4090-2", "compute_tflops": 165, "memory_gb": 0.7, "memory_bandwidth_gbps": 1008},
    {"node_id": "t4-3", "compute_tflops": 65, "memory_gb": 0.5, "memory_bandwidth_gbps": 320},
    {"node_id": "edge-4", "compute_tflops": 10, "memory_gb": 0.05, "memory_bandwidth_gbps": 50},
]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def sparse_llama(folder: Path) -> Path:
    """config.json and a model.safetensors whose header is real and whose data is a hole (truncate)."""
    from williw.header import serialize_header

    h, kv, inter = DIMS["hidden_size"], DIMS["hidden_size"] // 32 * 4, DIMS["intermediate_size"]
    tensors = [("model.embed_tokens.weight", (DIMS["vocab_size"], h))]
    for i in range(DIMS["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                    (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                    (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
                    (p + "mlp.down_proj.weight", (h, inter)), (p + "input_layernorm.weight", (h,)),
                    (p + "post_attention_layernorm.weight", (h,))]
    tensors += [("model.norm.weight", (h,)), ("lm_head.weight", (DIMS["vocab_size"], h))]
    prefix, ranges = serialize_header([(n, "BF16", s) for n, s in tensors], {"format": "pt"})
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(prefix)
        f.truncate(len(prefix) + ranges[-1][1])
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
              "tie_word_embeddings": False, **DIMS}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def williw(*args: str) -> str:
    return subprocess.run([str(BIN / "williw"), *args], check=True, capture_output=True, text=True).stdout


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = sparse_llama(work / "TinyLlama-1.1B")
        nodes_file = work / "nodes.json"
        nodes_file.write_text(json.dumps(NODES))
        williw("metadata", str(model), "-o", str(work / "metadata.json"), "--json")
        williw("plan", str(work / "metadata.json"), "--nodes", str(nodes_file), "-o", str(work / "plan.json"),
               "--svg", str(DOCS / "plan.svg"), "--json")
        screenshot_dashboard(work, json.loads((work / "metadata.json").read_text()))
    print(f"wrote {DOCS / 'plan.svg'}, {DOCS / 'dashboard.png'} and {DOCS / 'dashboard-replan.png'}")


def screenshot_dashboard(work: Path, metadata: dict) -> None:
    import httpx
    from playwright.sync_api import sync_playwright

    proc = subprocess.Popen([str(BIN / "williw"), "worker", "--json", "--port", "0", "--db", str(work / "w.db"),
                             "--token", TOKEN, "--node-ttl", "3"], stdout=subprocess.PIPE, text=True,
                            stderr=subprocess.DEVNULL)
    try:
        url = json.loads(proc.stdout.readline())["url"]  # type: ignore[union-attr]
        admin = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=url, timeout=30) as http:
            for _ in range(100):
                if http.get("/healthz").status_code == 200:
                    break
                time.sleep(0.1)
            tokens = {n["node_id"]: http.post("/api/nodes", json=n, headers=admin).json()["node_token"]
                      for n in NODES}
            rid = http.post("/api/request", json={"model_name": "TinyLlama/TinyLlama-1.1B"},
                            headers=admin).json()["request_id"]
            http.post("/api/process", json={"request_id": rid, "metadata": metadata}, headers=admin).raise_for_status()
            http.post("/api/request", json={"model_name": "meta-llama/Llama-3.2-1B"}, headers=admin)
            time.sleep(3.5)  # past the TTL: only the nodes that beat below are online, edge-4 shows offline
        stop = threading.Event()
        beats = threading.Thread(target=_heartbeats, args=(url, tokens, stop), daemon=True)
        beats.start()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 820})
            page.goto(f"{url}/#request={rid}")
            page.fill("#token", TOKEN)
            page.click("#auth-form button")
            page.wait_for_selector("#plan svg g.stage")
            page.wait_for_selector('tr.node[data-node="edge-4"][data-online="false"]')
            page.screenshot(path=str(DOCS / "dashboard.png"), full_page=True)
            _start_replan(url, rid, tokens)
            page.wait_for_selector("#migration:not([hidden]) #migration-steps .badge.done")
            page.wait_for_timeout(300)
            page.screenshot(path=str(DOCS / "dashboard-replan.png"), full_page=True)
            browser.close()
        stop.set()
    finally:
        proc.terminate()
        proc.wait(10)


def _heartbeats(url: str, tokens: dict[str, str], stop: threading.Event) -> None:
    """Every node but edge-4 beats every 0.5 s (tokens may gain a node meanwhile)."""
    import httpx

    with httpx.Client(base_url=url, timeout=30) as http:
        while True:
            for node_id, token in list(tokens.items()):
                if node_id != "edge-4":
                    http.post(f"/api/nodes/{node_id}/heartbeat", headers={"Authorization": f"Bearer {token}"})
            if stop.wait(0.5):
                return


def _start_replan(url: str, rid: str, tokens: dict[str, str]) -> None:
    """Distribute with auto re-plan, report version 1 ready, let a fast node join, report one pull of version 2."""
    import httpx

    admin = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=url, timeout=30) as http:
        stages = http.post("/api/get-plan", json={"request_id": rid}).json()["@plan"]["stages"]
        http.post(f"/api/requests/{rid}/distribute", json={"source": "http://127.0.0.1:9/TinyLlama",
                                                           "auto_replan": True}, headers=admin).raise_for_status()
        for n in stages:
            http.post(f"/api/assignments/{rid}/{n}", json={"state": "ready", "plan_version": 1,
                                                           "shard_path": f"/data/{n}", "sha256": "0" * 64},
                      headers={"Authorization": f"Bearer {tokens[n]}"}).raise_for_status()
        tokens[JOINER["node_id"]] = http.post("/api/nodes", json=JOINER, headers=admin).json()["node_token"]
        for _ in range(200):
            migration = http.get(f"/api/requests/{rid}/plans").json()["migration"]
            if migration:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("the worker did not re-plan after a node joined")
        pullers = [s["node_id"] for s in migration["steps"] if s["action"] == "pull"]
        for n, state in zip(dict.fromkeys(pullers), ("ready", "pulling"), strict=False):
            body = {"state": state, "plan_version": 2}
            if state == "ready":
                body.update(shard_path=f"/data/{n}/v2", sha256="0" * 64)
            http.post(f"/api/assignments/{rid}/{n}", json=body,
                      headers={"Authorization": f"Bearer {tokens[n]}"}).raise_for_status()


if __name__ == "__main__":
    main()
