"""Benchmark generation over the placed SmolLM2-135M-Instruct (float32) on 1, 2 and 3 local node processes.

For each fleet size a fresh worker and N node agents (equal compute, memory that forces N stages) place the model
(`williw run`'s workflow), then this process drives the pipeline (`williw.pipeline`): a prefill of PROMPT_TOKENS
tokens and DECODE_TOKENS greedy decode steps, three times. Reference, measured in the same run: the whole model
in this process with transformers, the same thread count, the same prefill and decode loop with its own
DynamicCache. Per-hop overhead is a hop's round trip minus the stage's own compute time (``X-Williw-Compute-Ms``):
HTTP, safetensors encoding and decoding, and the loopback socket. The planner's predicted bottleneck (the node
with the longest predicted stage time) is printed beside the measured one (the longest measured compute).

    .venv/bin/python bench/generate.py [--threads 2] [--prompt-tokens 128] [--decode-tokens 32]
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


def _reference(model: Path, ids: list[int], decode: int) -> tuple[float, float, list[int]]:
    import torch
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    best_p, best_d, tokens = float("inf"), float("inf"), []
    for _ in range(3):
        cache = transformers.DynamicCache(config=m.config)
        with torch.no_grad():
            t0 = time.perf_counter()
            out = m(input_ids=torch.tensor([ids]), use_cache=True, cache=cache, logits_to_keep=1)
            t1 = time.perf_counter()
            tokens = [int(out.logits[0, -1].argmax())]
            for _ in range(decode - 1):
                out = m(input_ids=torch.tensor([[tokens[-1]]]), use_cache=True, cache=cache, logits_to_keep=1)
                tokens.append(int(out.logits[0, -1].argmax()))
            t2 = time.perf_counter()
        best_p, best_d = min(best_p, t1 - t0), min(best_d, t2 - t1)
    return len(ids) / best_p, (decode - 1) / best_d, tokens


def _pipeline(model: Path, n: int, ids: list[int], decode: int, out: Path) -> dict:
    import torch

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
        p = Pipeline.from_worker(url, result.request_id)
        p.step("0" * 32, torch.tensor([ids[:4]]), 0)  # each node loads its stage
        p.end("0" * 32)
        best_p, best_d, hops, prefill_ms, decode_ms, tokens = float("inf"), float("inf"), [], [], [], []
        for r in range(3):
            session = f"{r + 1:032x}"
            t0 = time.perf_counter()
            logits = p.step(session, torch.tensor([ids]), 0)
            t1 = time.perf_counter()
            prefill_ms.append(p.compute_ms)
            tokens = [int(logits[0].argmax())]
            for i in range(decode - 1):
                logits = p.step(session, torch.tensor([[tokens[-1]]]), len(ids) + i)
                tokens.append(int(logits[0].argmax()))
                hops += [h - c for h, c in zip(p.hop_ms, p.compute_ms, strict=True)]
                decode_ms.append(p.compute_ms)
            t2 = time.perf_counter()
            p.end(session)
            best_p, best_d = min(best_p, t1 - t0), min(best_d, t2 - t1)
        p.close()
        order = [a.node_id for a in plan.assignments]
        mean = [statistics.mean(col) for col in zip(*decode_ms, strict=True)]
        pre = [statistics.mean(col) for col in zip(*prefill_ms, strict=True)]
        predicted_p = max(plan.assignments, key=lambda a: a.stage_time_s or 0).node_id
        predicted_d = max(plan.assignments, key=lambda a: a.decode_time_s or 0).node_id \
            if any(a.decode_time_s for a in plan.assignments) else "-"
        return {"n": n, "prefill": len(ids) / best_p, "decode": (decode - 1) / best_d, "tokens": tokens,
                "hop_ms": statistics.median(hops) if hops else 0.0, "blocks": [a.blocks for a in plan.assignments],
                "predicted": (predicted_p, predicted_d), "measured": (order[pre.index(max(pre))],
                                                                      order[mean.index(max(mean))])}
    finally:
        _stop(procs)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the node processes inherit it
    import torch

    from williw import realmodels
    from williw.cli._output import table

    torch.set_num_threads(args.threads)
    model, _ = realmodels.hf_folder()
    ids = [(i * 7919) % 40000 + 100 for i in range(args.prompt_tokens)]
    ref_p, ref_d, ref_tokens = _reference(model, ids, args.decode_tokens)
    rows = [["transformers, 1 process", "-", f"{ref_p:,.1f}", f"{ref_d:,.2f}", "-", "-", "-", "-"]]
    tmp = Path(tempfile.mkdtemp(prefix="williw-bench-generate-"))
    try:
        for n in (1, 2, 3):
            (tmp / str(n)).mkdir()
            r = _pipeline(model, n, ids, args.decode_tokens, tmp / str(n))
            same = "yes" if r["tokens"] == ref_tokens else "NO"
            rows.append([f"williw, {n} node process{'es' if n > 1 else ''}",
                         " ".join(f"[{a},{b})" for a, b in r["blocks"]), f"{r['prefill']:,.1f}",
                         f"{r['decode']:,.2f}", f"{r['hop_ms']:.2f}", r["predicted"][0] + " / " + r["predicted"][1],
                         r["measured"][0] + " / " + r["measured"][1], same])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"SmolLM2-135M-Instruct float32, {args.threads} threads per process, prompt {args.prompt_tokens} tokens, "
          f"{args.decode_tokens} greedy tokens, best of 3; {os.cpu_count()} cores on this machine")
    print(table(rows, ["run", "stages (blocks)", "prefill tok/s", "decode tok/s", "hop overhead ms",
                       "bottleneck predicted (prefill / decode)", "measured", "same tokens"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
