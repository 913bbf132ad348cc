"""``make demo``: the main job on embedded defaults, on a small model built here (no Hub needed).

Grows with the project: today it builds a tiny Llama and prints its metadata summary.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from williw.cli import cli


def main(out: Path = Path("demo-out")) -> int:
    from williw import tinymodels

    model = out / "model"
    if not (model / "config.json").exists():
        shutil.rmtree(model, ignore_errors=True)
        tinymodels.build_causal_lm(model, "llama", layers=8, shard_bytes=400_000)
    try:
        cli.main(["metadata", str(model), "-o", str(out / "metadata.json"), "--model-name", "demo/tiny-llama"],
                 standalone_mode=False)
    except Exception as exc:  # noqa: BLE001 - the demo reports and exits like the CLI
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
