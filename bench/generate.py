"""Benchmark generation over the placed SmolLM2-135M-Instruct (float32) on 1, 2 and 3 local node processes.

For each fleet size a fresh worker and N node agents (equal compute, memory that forces N stages) place the model
(`williw run`'s workflow); once every node has loaded its stage, this process drives the pipeline
(`williw.pipeline`): a prefill of PROMPT_TOKENS tokens and DECODE_TOKENS greedy decode steps, chained (each stage
passes the step on to the next) and, for N > 1, caller-driven (this process posts to every stage in turn). The
reference is the whole model in this process with transformers, the same thread count, the same prefill and
decode loop with its own DynamicCache, measured with the fleet up and interleaved with the pipeline's runs
(reference, chained, caller-driven; three rounds, best of each), so all of them see the same machine load.
Per-hop overhead is a hop's round trip minus the stage's own compute time (``X-Williw-Compute-Ms``) and, along a
chain, minus the next hop's round trip: HTTP, safetensors encoding and decoding, and the loopback socket. The
planner's predicted bottleneck (the node with the longest predicted stage time) is printed beside the measured
one (the longest measured compute).

    .venv/bin/python bench/generate.py [--threads 2] [--prompt-tokens 128] [--decode-tokens 32] [--nodes 1 2 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


class Reference:
    """The whole model in this process with transformers: the same prefill and greedy decode loop, its own
    DynamicCache, measured between the pipeline's runs so both see the same machine load."""

    def __init__(self, model: Path) -> None:
        import torch
        import transformers

        self.torch, self.transformers = torch, transformers
        self.m = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()

    def run(self, ids: list[int], decode: int) -> tuple[float, float, list[int]]:
        """(prefill s, decode s, tokens) of one generation."""
        torch = self.torch
        cache = self.transformers.DynamicCache(config=self.m.config)
        with torch.no_grad():
            t0 = time.perf_counter()
            out = self.m(input_ids=torch.tensor([ids]), use_cache=True, cache=cache, logits_to_keep=1)
            t1 = time.perf_counter()
            tokens = [int(out.logits[0, -1].argmax())]
            for _ in range(decode - 1):
                out = self.m(input_ids=torch.tensor([[tokens[-1]]]), use_cache=True, cache=cache, logits_to_keep=1)
                tokens.append(int(out.logits[0, -1].argmax()))
            t2 = time.perf_counter()
        return t1 - t0, t2 - t1, tokens


def _generate(p, ids: list[int], decode: int, session: str) -> tuple[float, float, list[int], list, list]:
    """(prefill s, decode s, tokens, per-hop overhead ms of each decode step, compute ms per stage of each step)."""
    import torch

    t0 = time.perf_counter()
    logits = p.step(session, torch.tensor([ids]), 0)
    t1 = time.perf_counter()
    computes = [p.compute_ms]
    tokens, overheads = [int(logits[0].argmax())], []
    for i in range(decode - 1):
        logits = p.step(session, torch.tensor([[tokens[-1]]]), len(ids) + i)
        tokens.append(int(logits[0].argmax()))
        overheads.append(p.overhead_ms())
        computes.append(p.compute_ms)
    t2 = time.perf_counter()
    p.end(session)
    return t1 - t0, t2 - t1, tokens, overheads, computes


def _fleet(model: Path, n: int, ids: list[int], decode: int, out: Path, ref: Reference) -> list[dict]:
    """Rows for a fleet of n node processes: the reference measured beside it, then the pipeline chained (the
    stages pass each step on) and, for n > 1, driven hop by hop by the caller; best of 3 of each, interleaved."""
    import httpx

    from williw.client import WorkerClient
    from williw.demo import _start_nodes, _start_worker, _stop
    from williw.pipeline import Pipeline
    from williw.planner.plan import Plan
    from williw.workflow import NodeClient

    memory = {1: 1.0, 2: 0.4, 3: 0.25}[n]  # GB: the 538 MB model needs all n nodes
    nodes = tuple((f"node-{i}", 1.0, memory) for i in range(n))
    procs: list = []
    try:
        url = _start_worker(out, procs)
        _start_nodes(url, out, procs, nodes)
        result = NodeClient(url, node_id="user", work_dir=out / "run", model_label=f"bench/smollm2-{n}",
                            timeout_s=600).execute_complete_workflow(str(model), 1, len(ids) + decode + 8)
        plan = Plan.from_dict(result.plan)
        with WorkerClient(url) as c:
            rows = c.request_assignments(result.request_id)["assignments"]
        began = time.perf_counter()
        while any(httpx.get(f"{r['serve_url']}/stage/{result.request_id}/v{plan.version}").json()["state"]
                  != "loaded" for r in rows):  # each node loads its stage once its shard is ready
            assert time.perf_counter() - began < 300, "the stages did not load in 300 s"
            time.sleep(0.2)
        modes = [True, False] if n > 1 else [True]
        pipes = {m: Pipeline.from_worker(url, result.request_id, chained=m) for m in modes}
        best: dict = {m: [float("inf"), float("inf"), [], [], []] for m in [*modes, "ref"]}
        for r in range(3):
            for m in [*modes, "ref"]:
                got = ref.run(ids, decode) if m == "ref" else _generate(pipes[m], ids, decode, f"{r + 1:032x}")
                b = best[m]
                b[0], b[1], b[2] = min(b[0], got[0]), min(b[1], got[1]), got[2]
                if m != "ref":
                    b[3] += got[3]
                    b[4] += got[4]
        for p in pipes.values():
            p.close()
        order = [a.node_id for a in plan.assignments]
        predicted_p = max(plan.assignments, key=lambda a: a.stage_time_s or 0).node_id
        predicted_d = max(plan.assignments, key=lambda a: a.decode_time_s or 0).node_id \
            if any(a.decode_time_s for a in plan.assignments) else "-"
        out_rows = [{"run": f"transformers, 1 process (beside {n} node{'s' if n > 1 else ''})", "ref": True,
                     "prefill": len(ids) / best["ref"][0], "decode": (decode - 1) / best["ref"][1],
                     "tokens": best["ref"][2]}]
        for m in modes:
            b = best[m]
            prefill_ms, decode_ms = b[4][0::decode], [c for i, c in enumerate(b[4]) if i % decode]
            pre = [statistics.mean(col) for col in zip(*prefill_ms, strict=True)]
            dec = [statistics.mean(col) for col in zip(*decode_ms, strict=True)]
            hops = [statistics.median(col) for col in zip(*b[3], strict=True)] if b[3] else []
            how = "" if n == 1 else ", chained" if m else ", caller-driven"
            out_rows.append({"run": f"williw, {n} node process{'es' if n > 1 else ''}{how}", "ref": False,
                             "prefill": len(ids) / b[0], "decode": (decode - 1) / b[1], "tokens": b[2],
                             "hop_ms": hops, "blocks": [a.blocks for a in plan.assignments],
                             "predicted": (predicted_p, predicted_d),
                             "measured": (order[pre.index(max(pre))], order[dec.index(max(dec))])})
        return out_rows
    finally:
        _stop(procs)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the node processes inherit it
    import torch

    from williw import realmodels
    from williw.cli._output import table

    torch.set_num_threads(args.threads)
    model, _ = realmodels.hf_folder()
    ids = [(i * 7919) % 40000 + 100 for i in range(args.prompt_tokens)]
    ref = Reference(model)
    ref_tokens = ref.run(ids, args.decode_tokens)[2]
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="williw-bench-generate-"))
    load = [os.getloadavg()[0]]
    try:
        for n in args.nodes:
            (tmp / str(n)).mkdir()
            for r in _fleet(model, n, ids, args.decode_tokens, tmp / str(n), ref):
                load.append(os.getloadavg()[0])
                same = "yes" if r["tokens"] == ref_tokens else "NO"
                if r["ref"]:
                    rows.append([r["run"], "-", f"{r['prefill']:,.1f}", f"{r['decode']:,.2f}", "-", "-", "-", same])
                    continue
                rows.append([r["run"], " ".join(f"[{a},{b})" for a, b in r["blocks"]), f"{r['prefill']:,.1f}",
                             f"{r['decode']:,.2f}", " ".join(f"{h:.2f}" for h in r["hop_ms"]),
                             r["predicted"][0] + " / " + r["predicted"][1],
                             r["measured"][0] + " / " + r["measured"][1], same])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"SmolLM2-135M-Instruct float32, {args.threads} threads per process, prompt {args.prompt_tokens} tokens, "
          f"{args.decode_tokens} greedy tokens, best of 3; {os.cpu_count()} cores on this machine, load average "
          f"{min(load):.1f} to {max(load):.1f} during the run")
    print(table(rows, ["run", "stages (blocks)", "prefill tok/s", "decode tok/s", "overhead ms per hop",
                       "bottleneck predicted (prefill / decode)", "measured", "same tokens"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
