"""The device check for a machine with an NVIDIA GPU (issue 30), one script, run once: SmolLM2-135M-Instruct
(`williw.realmodels`, converted from its GGUF once and cached) split in three stages, then

1. ``verify`` on the device in bfloat16 and in int4 (bfloat16 compute): the stages against the whole model
   converted alike on the same device, max abs and rel difference and top-1 agreement (CUDA is not bit-exact:
   different kernels for different shapes);
2. greedy generation of 32 tokens over the three stages on the device (bfloat16, int8, int4), each stage's
   tokens/s, against the whole model converted alike on the device (tokens equal, or the first divergence);
3. a fleet of one CUDA node and two CPU nodes on this machine (``williw node --device cuda`` and ``--device cpu``),
   placed by the worker, generating through them.

On a machine without CUDA, ``--device cpu`` runs the same steps on the CPU (a dry run of the script itself).

    .venv/bin/python bench/cuda_check.py [--device cuda] [--tokens 32] [--skip-fleet]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
PROMPT = "The capital of France is"


def _split(model: Path, out: Path, cuts: list[int]):
    from williw.metadata import generate_metadata
    from williw.planner import pipeline_from_cuts
    from williw.splitter import split_all

    plan = pipeline_from_cuts(generate_metadata(model), cuts, [f"n{i}" for i in range(len(cuts) + 1)])
    split_all(model, plan, out)
    return plan


def verify_on(model: Path, plan, shards: Path, device: str) -> list[dict]:
    from williw.verify import verify_shards

    rows = []
    for weights in ("as-stored", "int4"):
        began = time.perf_counter()
        r = verify_shards(model, plan, shards, dtype="bfloat16", weights=weights, device=device, atol=0, rtol=0)
        o = next(o for o in r.outputs if o.name == "logits")
        rows.append({"check": f"verify bfloat16 {weights}", "max_abs": o.max_abs_diff, "max_rel": o.max_rel_diff,
                     "top1_agree": o.top1_agree, "bit_exact": r.ok, "s": round(time.perf_counter() - began, 2)})
    return rows


def generate_on(model: Path, shards: Path, bounds: list[tuple[int, int]], device: str, tokens: int) -> list[dict]:
    import torch
    import transformers

    from williw.progress import quiet_transformers
    from williw.quantize import quantize_linears, to_device
    from williw.runtime import load_host
    from williw.stages import align, block_stack, cache_argument

    ids = transformers.AutoTokenizer.from_pretrained(model)(PROMPT)["input_ids"]
    rows = []
    for weights in ("as-stored", "int8", "int4"):
        with quiet_transformers():
            whole = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval()
        align(whole)
        quantize_linears(list(block_stack(whole)[1]), weights, device=device)
        to_device(whole, device)
        cache, x, want = transformers.DynamicCache(config=whole.config), torch.tensor([ids], device=device), []
        with torch.no_grad():
            for _ in range(tokens):
                logits = whole(input_ids=x, **{cache_argument(whole): cache}, use_cache=True, logits_to_keep=1).logits
                want.append(int(logits[0, -1].argmax()))
                x = torch.tensor([[want[-1]]], device=device)
        del whole, cache
        hosts = [load_host(shards / f"n{i}", b, f"n{i}", max_sessions=1, max_tokens=256, dtype="bfloat16",
                           weights=weights, device=device) for i, b in enumerate(bounds)]
        x, start, got = torch.tensor([ids]), 0, []
        began = time.perf_counter()
        for _ in range(tokens):
            h = x
            for host in hosts:
                out = host.forward("s" * 32, h, start)
                h = out.get("hidden", out.get("logits"))
            got.append(int(h[0].argmax()))
            start += x.shape[1]
            x = torch.tensor([[got[-1]]])
        seconds = time.perf_counter() - began
        first_diff = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), None)
        rows.append({"check": f"generate {weights}/bfloat16 on {device}", "tokens_equal": got == want,
                     "first_divergence": first_diff, "tokens_per_s": round(tokens / seconds, 1),
                     "converted": [h.converted for h in hosts]})
        del hosts
    return rows


def fleet(model: Path, out: Path, device: str, tokens: int) -> dict:
    """A worker and three node processes on this machine: node-gpu on ``device``, two on the CPU."""
    from williw.client import WorkerClient
    from williw.demo import _start_worker, _stop, _williw
    from williw.metadata import generate_metadata
    from williw.serve import ModelServer

    procs: list = []
    server = ModelServer(model).start()
    try:
        url = _start_worker(out, procs)
        nodes = [("node-gpu", device, "8"), ("node-cpu-a", "cpu", "1"), ("node-cpu-b", "cpu", "1")]
        for node_id, dev, tflops in nodes:
            procs.append(subprocess.Popen(
                [*_williw(), "node", "--worker", url, "--node-id", node_id, "--device", dev,
                 "--dtype", "auto", "--compute-tflops", tflops, "--memory-gb", "0.3", "--data-dir", str(out / node_id),
                 "--heartbeat-s", "0.5", "--poll-s", "0.2"], stdout=open(out / f"{node_id}.log", "w"),  # noqa: SIM115
                stderr=subprocess.STDOUT))
        with WorkerClient(url) as c:
            deadline = time.monotonic() + 120
            while len(c.list_nodes(online=True)) < 3 and time.monotonic() < deadline:
                time.sleep(0.5)
            rid = c.create_request("bench/smollm2-cuda", batch_size=1, sequence_length=256)["request_id"]
            plan = c.process(rid, metadata=generate_metadata(model, batch_size=1, sequence_length=256).to_dict())
            c.distribute(rid, server.url)
            while not all(a["state"] == "ready" for a in c.request_assignments(rid)["assignments"]):
                if time.monotonic() > deadline + 180:
                    raise TimeoutError("the fleet's shards were not ready in 300 s")
                time.sleep(0.5)
        began = time.perf_counter()
        r = subprocess.run([*_williw(), "generate", "--worker", url, "--request", rid, PROMPT,
                            "--max-new-tokens", str(tokens), "--json"], capture_output=True, text=True, timeout=600)
        result = json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr.strip()}
        return {"check": "fleet: 1 device node + 2 CPU nodes", "stages": plan["plan"].get("@plan", {}).get("stages"),
                "s": round(time.perf_counter() - began, 2), **{k: result.get(k) for k in
                ("text", "decode_tokens_per_s", "prefill_tokens_per_s", "nodes", "error") if k in result}}
    finally:
        _stop(procs)
        server.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--skip-fleet", action="store_true")
    args = ap.parse_args()
    import torch

    from williw import realmodels
    from williw.devices import resolve_device

    device = resolve_device(args.device)
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.startswith("cuda") else ""), flush=True)
    model, _ = realmodels.hf_folder()
    with tempfile.TemporaryDirectory(prefix="williw-cuda-") as tmp:
        out = Path(tmp)
        plan = _split(model, out / "shards", [10, 20])
        rows = verify_on(model, plan, out / "shards", device)
        rows += generate_on(model, out / "shards", [(0, 10), (10, 20), (20, 30)], device, args.tokens)
        if not args.skip_fleet:
            rows.append(fleet(model, out, device, args.tokens))
    for row in rows:
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
