"""Benchmark `williw verify` on the generated 1.1B bf16 Llama cut into 4 pipeline stages.

Reference, measured in the same run: loading the full model once with transformers and running the prompt through
it. Each measurement runs in a fresh process so that its peak RSS (getrusage ru_maxrss) is its own.

    .venv/bin/python bench/verify.py [--dtype auto|float32] [--prompt TEXT]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from _models import CACHE, llama_1b
from williw.metadata import generate_metadata
from williw.planner import pipeline_from_cuts
from williw.planner.plan import Plan, load_plan, save_plan
from williw.units import format_bytes, format_seconds

CUTS = [6, 11, 17]  # 22 blocks -> 6, 5, 6, 5
PROMPT = "The quick brown fox jumps over the lazy dog. " * 4


def pipeline_plan(model: Path, cuts: list[int]) -> Plan:
    return pipeline_from_cuts(generate_metadata(model), cuts, [f"node-{i}" for i in range(len(cuts) + 1)],
                              model_name=model.name)


def shards_for(model: Path) -> tuple[Path, Path]:
    """The plan and its shards, written once by the real splitter and cached."""
    from williw.splitter import split_all

    out = CACHE / "verify-4-stages"
    plan_path = out / "plan.json"
    if not (out / "shards" / "node-3" / "shard.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        plan = pipeline_plan(model, CUTS)
        save_plan(plan, plan_path)
        split_all(model, plan, out / "shards")
    return plan_path, out / "shards"


def child_full(model: Path, dtype: str, prompt: str) -> dict:
    import torch
    import transformers

    from williw.verify import token_ids

    ids, _ = token_ids(model, prompt, 32000)
    start = time.perf_counter()
    m = transformers.LlamaForCausalLM.from_pretrained(model, dtype=None if dtype == "auto" else getattr(torch, dtype))
    with torch.no_grad():
        m(input_ids=ids, use_cache=False)
    return {"seconds": time.perf_counter() - start}


def child_verify(model: Path, dtype: str, prompt: str) -> dict:
    from williw.verify import verify_shards

    plan_path, shards = shards_for(model)
    start = time.perf_counter()
    report = verify_shards(model, load_plan(plan_path), shards, prompt=prompt, dtype=dtype)
    return {"seconds": time.perf_counter() - start, "report": report.to_dict()}


def run_child(kind: str, args: argparse.Namespace) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", kind, "--dtype", args.dtype, "--prompt", args.prompt],
                          capture_output=True, text=True, env={"WILLIW_NO_PROGRESS": "1", "PATH": "/usr/bin:/bin"})
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--child", choices=["full", "verify"])
    args = parser.parse_args()
    model = llama_1b()
    if args.child:
        result = (child_full if args.child == "full" else child_verify)(model, args.dtype, args.prompt)
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        print(json.dumps(result))
        return
    shards_for(model)  # split outside the timed runs
    full = run_child("full", args)
    ver = run_child("verify", args)
    r = ver["report"]
    rows = [["full model once (load + forward)", format_seconds(full["seconds"]), format_bytes(full["peak_rss_bytes"]),
             "-"],
            ["williw verify (reference + 4 stages)", format_seconds(ver["seconds"]),
             format_bytes(ver["peak_rss_bytes"]), f"{ver['seconds'] / full['seconds']:.2f}x"]]
    ref = r["reference"]
    rows.append(["  reference inside verify", format_seconds(ref["load_s"] + ref["run_s"]),
                 format_bytes(ref["peak_rss_bytes"]), ""])
    for s in r["stages"]:
        rows.append([f"  stage {s['stage']} {s['node_id']} blocks [{s['blocks'][0]}, {s['blocks'][1]}) "
                     f"{s['parameters'] / 1e6:.0f}M params", format_seconds(s["load_s"] + s["run_s"]),
                     format_bytes(s["peak_rss_bytes"]), f"+{format_bytes(s['rss_delta_bytes'])}"])
    from williw.cli._output import table

    print(f"{model.name}, dtype {r['dtype']}, {r['tokens']} tokens ({r['token_source']}), "
          f"4 stages cut at blocks {CUTS}")
    print(table(rows, ["run", "time", "peak RSS", "vs full / stage delta"]))
    for o in r["outputs"]:
        print(f"{o['name']} {o['shape']}: max abs diff {o['max_abs_diff']:.3g}, max rel diff {o['max_rel_diff']:.3g}, "
              f"top-1 agrees: {o['top1_agree']}, tolerance atol {r['atol']:g} rtol {r['rtol']:g}")
    print("verify:", "OK" if r["ok"] else f"FAILED: {r['failure']}")
    print(f"memory: peak RSS per process from getrusage; per stage: {r['memory_method']}")


if __name__ == "__main__":
    main()
