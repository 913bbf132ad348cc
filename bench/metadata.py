"""Metadata of the 1.1B bf16 Llama: williw (headers only) against the seed's method (load the model with
transformers and walk its state_dict), in the same run.

    .venv/bin/python bench/metadata.py

Targets (issue 2): library call >= 100x faster in-process; the whole `williw metadata` command >= 25x faster
than the seed's whole script; williw's peak RSS < 150 MB.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _models import llama_1b

BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent


def _williw_in_process(model: Path, repeat: int = 5) -> dict:
    code = ("import json, resource, sys, time\nfrom williw.metadata import generate_metadata\n"
            "best = min((lambda t: (generate_metadata(sys.argv[1]), time.perf_counter() - t)[1])(time.perf_counter())"
            f" for _ in range({repeat}))\n"
            "print(json.dumps({'seconds': best, 'max_rss_kb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))")
    out = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _timed(cmd: list[str]) -> tuple[float, int]:
    """Wall time and peak RSS (kB) of a whole command, fresh process included."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate()
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{err}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # max over children so far: run the small one first
    return elapsed, usage.ru_maxrss


def main() -> None:
    model = llama_1b()
    with tempfile.TemporaryDirectory() as tmp:
        lib = _williw_in_process(model)
        cmd_s, cmd_rss = _timed([str(BIN / "williw"), "metadata", str(model), "-o", f"{tmp}/w.json", "--json"])
        seed_script_s, _ = _timed([sys.executable, str(HERE / "_seed_metadata.py"), str(model), f"{tmp}/s.json"])
        seed = json.loads(subprocess.run([sys.executable, str(HERE / "_seed_metadata.py"), str(model),
                                          f"{tmp}/s2.json", "--in-process-timing"], capture_output=True, text=True,
                                         check=True).stdout.strip().splitlines()[-1])
        ours = json.loads(Path(f"{tmp}/w.json").read_text())
        seeds = json.loads(Path(f"{tmp}/s.json").read_text())
    rows = [
        ("library call (in-process, best of 5)", lib["seconds"], seed["seconds"], lib["max_rss_kb"],
         seed["max_rss_kb"]),
        ("whole command (fresh process)", cmd_s, seed_script_s, cmd_rss, seed["max_rss_kb"]),
    ]
    print(f"model: {model} ({ours['total_params']:,} params, {ours['total_bytes'] / 1e9:.2f} GB, "
          f"{ours['total_layers']} tensors; seed listed {seeds['total_layers']})")
    print(f"{'what':40} {'williw':>10} {'seed':>10} {'speed-up':>9} {'williw RSS':>11} {'seed RSS':>10}")
    for what, ours_s, seed_s, ours_rss, seed_rss in rows:
        print(f"{what:40} {ours_s:9.3f}s {seed_s:9.2f}s {seed_s / ours_s:8.0f}x {ours_rss / 1024:9.0f}MB "
              f"{seed_rss / 1024:8.0f}MB")
    ok = (seed["seconds"] / lib["seconds"] >= 100 and seed_script_s / cmd_s >= 25 and cmd_rss / 1024 < 150
          and lib["max_rss_kb"] / 1024 < 150)
    print("targets (>=100x library, >=25x command, RSS < 150 MB):", "met" if ok else "NOT met")


if __name__ == "__main__":
    main()
