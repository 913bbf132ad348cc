"""Benchmark: `williw split --all` on the 1.1B bf16 Llama, 4 pipeline stages, against `cp` of the same files (the
disk's limit) and the seed's method (load the model with transformers, torch.save each node's part).

Each method runs in a subprocess; peak RSS comes from wait4() of that process. Every run starts from the same
page-cache state: dropped (``echo 3 > /proc/sys/vm/drop_caches``, needs root) when possible, else warmed by
reading the model once, and the table says which. Every method ends durable: cp is followed by ``sync``, williw
fsyncs each shard, the seed's files are synced too.

    .venv/bin/python bench/split.py [--repeat 3] [--skip-seed]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _models import ROOT, llama_1b

sys.path.insert(0, str(ROOT.parent / "src"))

from williw.metadata import generate_metadata  # noqa: E402
from williw.planner import pipeline_from_cuts  # noqa: E402
from williw.planner.plan import Plan, save_plan  # noqa: E402

VENV = Path(sys.executable).parent
NODES = 4

SEED = """
import sys, json, torch, transformers
model_dir, plan_path, out = sys.argv[1:4]
plan = json.load(open(plan_path))
model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
state = model.state_dict()
for node_id, a in plan.items():
    if node_id.startswith("@"):
        continue
    torch.save({n: state[n] for n in a["layer_names"] + a.get("shared_tensors", [])}, f"{out}/{node_id}.pth")
"""


def pipeline_plan(model_dir: Path, stages: int) -> Plan:
    """Contiguous blocks per stage, cut evenly; embeddings first, final norm and head last."""
    meta = generate_metadata(model_dir)
    n = len(meta.blocks)
    return pipeline_from_cuts(meta, [round(i * n / stages) for i in range(1, stages)],
                              [f"node-{s}" for s in range(stages)])


def reset_cache(model_dir: Path) -> str:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "dropped"
    except OSError:
        for f in model_dir.iterdir():
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass
        return "warm"


def run(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one subprocess."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env={**os.environ, "WILLIW_NO_PROGRESS": "1"})
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[0]} failed with status {status}")
    return seconds, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-seed", action="store_true")
    args = parser.parse_args()
    model = llama_1b()
    files = sorted(str(p) for p in model.glob("*.safetensors"))
    total = sum(os.path.getsize(f) for f in files)
    work = Path(tempfile.mkdtemp(prefix="williw-bench-split-", dir=ROOT / ".cache"))
    plan_path = work / "plan.json"
    save_plan(pipeline_plan(model, NODES), plan_path)
    methods = {
        "cp + sync": lambda out: ["sh", "-c", f"cp {' '.join(files)} {out}/ && sync"],
        "williw split --all": lambda out: [str(VENV / "williw"), "split", str(model), "--plan", str(plan_path),
                                           "--all", "-o", str(out), "--json"],
    }
    if not args.skip_seed:
        methods["seed (transformers + torch.save)"] = lambda out: [
            sys.executable, "-c", SEED + "\nimport os; os.sync()", str(model), str(plan_path), str(out)]
    results: dict[str, list[tuple[float, int]]] = {m: [] for m in methods}
    cache = ""
    try:
        for rep in range(args.repeat):
            for name, cmd in methods.items():
                if name.startswith("seed") and rep > 0:
                    continue  # slow and far off; one run says enough
                out = work / "out"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                cache = reset_cache(model)
                results[name].append(run(cmd(out)))
        shutil.rmtree(work / "out", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cp_s = statistics.median(s for s, _ in results["cp + sync"])
    rows = []
    for name, runs in results.items():
        s = statistics.median(x for x, _ in runs)
        rss = max(r for _, r in runs)
        rows.append([name, f"{s:.2f}", f"{total / s / 1e9:.2f}", f"{cp_s / s:.2f}x", f"{rss / 2**20:.0f}",
                     " ".join(f"{x:.2f}" for x, _ in runs)])
    head = ["method", "median s", "GB/s", "vs cp", "peak RSS MiB", "each run s"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    print(f"model {model.name}: {total / 1e9:.2f} GB in {len(files)} files, {NODES} nodes, page cache {cache}, "
          f"{os.cpu_count()} CPUs")
    for r in [head, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    print(json.dumps({r[0]: {"seconds": float(r[1]), "gb_per_s": float(r[2]), "peak_rss_mib": int(r[4])}
                      for r in rows}))


if __name__ == "__main__":
    main()
