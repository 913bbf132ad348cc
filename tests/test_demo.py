"""`make demo`'s path: real worker and node processes, the plan table, verify passing, nothing left running.

It runs on the demo's tiny Llama (``main(tiny=True)``, ~10 s): on SmolLM2-135M the same path takes about a minute
more (README); the conversion of its real weights is tested in test_realmodels.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_ends_verified_and_leaves_nothing_running(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", f"import sys, williw.demo as d; "
                          f"from pathlib import Path; sys.exit(d.main(Path({str(tmp_path)!r}), tiny=True))"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pipeline (prefill): 3 of 3 nodes" in out.stdout
    assert "every node holds its shard" in out.stdout
    # each workflow step is one line (no placeholder line before its result)
    assert "] ..." not in out.stdout + out.stderr
    for step in ("request", "metadata", "process", "plan", "distribute"):
        assert sum(line.startswith(f"[{step}] ") for line in out.stdout.splitlines()) >= 1, step
    assert out.stdout.count("OK: the shards compute the model") == 2  # version 1, and the re-plan's version 2
    assert "node-d (16 TFLOPS, 1.6 MB) joins; the worker re-plans on its own" in out.stdout
    assert "version 2 in force " in out.stdout and " from peers and 0 bytes from the model " in out.stdout
    left = subprocess.run(["pgrep", "-f", f"{tmp_path}"], capture_output=True, text=True).stdout.split()
    assert left == [], f"processes left running: {left}"
