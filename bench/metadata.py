"""Metadata of the 1.1B bf16 Llama: williw (headers only) against the seed's method (load the model with
transformers and walk its state_dict), in the same run; and metadata of a 70B-shaped model straight from a Hub.

    .venv/bin/python bench/metadata.py            # both parts
    .venv/bin/python bench/metadata.py --remote   # only the 70B part (no 2.2 GB model to generate)

Targets (issue 2): library call >= 100x faster in-process; the whole `williw metadata` command >= 25x faster
than the seed's whole script; williw's peak RSS < 150 MB.

Issue 18: Llama-3-70B's shape (141 GB of bf16) in 30 shard files of sparse holes (real headers, full sizes, no
disk), served by tests/hubserver.py (the fake Hub the tests use; the real huggingface_hub client) on loopback.
`williw metadata ORG/NAME` reads config, index and headers by range; the references, measured in the same run,
are downloading the files (one shard streamed in full over the same server, times the number of files) and the
seed's method, which downloads the model and then loads it with transformers (that load needs the 141 GB in RAM:
it cannot run here, so its row is the download alone, a lower bound).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _models import llama_1b, llama_70b_sparse

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


def remote_70b() -> None:
    sys.path.insert(0, str(HERE.parent / "tests"))
    import httpx

    from hubserver import FakeHub
    from williw.metadata import generate_metadata

    model = llama_70b_sparse()
    shards = sorted(model.glob("*.safetensors"))
    total = sum(p.stat().st_size for p in shards)
    small = sum(p.stat().st_size for p in model.iterdir() if p.suffix == ".json")
    with FakeHub() as hub, tempfile.TemporaryDirectory() as tmp:
        hub.add_repo("meta/llama-70b-shaped", model, on_disk=True)
        start = time.perf_counter()
        out = subprocess.run([str(BIN / "williw"), "metadata", "meta/llama-70b-shaped", "-o", f"{tmp}/m.json",
                              "--json"], capture_output=True, text=True, env={**os.environ, "HF_ENDPOINT": hub.url})
        ours_s = time.perf_counter() - start
        if out.returncode != 0:
            raise SystemExit(out.stderr)
        ours_bytes, ours_requests = sum(hub.bytes_sent.values()), len(hub.requests)
        remote = json.loads(Path(f"{tmp}/m.json").read_text())
        remote.pop("commit")
        local = json.loads(json.dumps(generate_metadata(model, model_name="meta/llama-70b-shaped").to_dict()))
        local.pop("commit")
        assert remote == local, "remote metadata differs from the folder's"

        hub.bytes_sent.clear()
        start = time.perf_counter()
        with httpx.Client(timeout=600) as client, client.stream(
                "GET", f"{hub.url}/meta/llama-70b-shaped/resolve/main/{shards[0].name}") as resp:
            for _ in resp.iter_raw(1 << 22):
                pass
        one_s = time.perf_counter() - start
        assert sum(hub.bytes_sent.values()) == shards[0].stat().st_size
    download_s = one_s * total / shards[0].stat().st_size
    rows = [("williw metadata ORG/NAME (headers by range)", ours_bytes, ours_requests, ours_s),
            (f"download the files ({len(shards)} shards, 1 measured)", total + small, len(shards) + 2, download_s),
            ("seed's method (download, then load: no RAM here)", total + small, len(shards) + 2, download_s)]
    print(f"\n70B-shaped Llama: {local['total_params']:,} params, {local['total_bytes'] / 1e9:.1f} GB, "
          f"{len(shards)} shard files, {local['total_layers']} tensors; remote metadata == folder metadata")
    print(f"{'what':52} {'bytes fetched':>14} {'requests':>9} {'seconds':>9}")
    for what, nbytes, requests, seconds in rows:
        print(f"{what:52} {nbytes / 1e6:11,.1f} MB {requests:9d} {seconds:9.2f}")
    print(f"williw fetched {ours_bytes / (total + small):.2e} of the download's bytes "
          f"({total / ours_bytes:,.0f}x less), {download_s / ours_s:,.0f}x faster than downloading over loopback")


def main() -> None:
    if "--remote" in sys.argv:
        remote_70b()
        return
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
    remote_70b()


if __name__ == "__main__":
    main()
